"""Reference attention backend on torch SDPA: readable, runs anywhere, the one the others are tested against."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sgl_diffusion.attention.base import AttnLayer, BaseAttnBackend
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment

# The largest [queries, keys] bool mask an encode builds at once. A long prompt is attended in query chunks whose
# masks fit: a 100k-token prompt would otherwise need [100k, 100k] masks (10 GB each).
MASK_BUDGET_BYTES = 64 << 20


@dataclass(frozen=True)
class EncodeMask:
    """The mask of an encode segment over [num_prefix cached ; own tokens], built one query chunk at a time.

    HF semantics: causal, a sliding window (a query sees itself + window-1 previous tokens), and image runs whose
    tokens also see their whole run.
    """

    seg: Segment
    num_prefix: int
    window: int | None
    chunk: int  # queries per chunk

    def chunks(self):
        """Yield (queries [a, b), own keys [lo, hi), mask [b - a, num_prefix + hi - lo] bool) covering the segment;
        the prefix's keys come before the own keys in every mask."""
        n = self.seg.num_tokens
        for a in range(0, n, self.chunk):
            b = min(a + self.chunk, n)
            lo, hi = self._own_keys(a, b)
            yield a, b, lo, hi, self._mask(a, b, lo, hi)

    def _own_keys(self, a: int, b: int) -> tuple[int, int]:
        lo = 0 if self.window is None else max(0, a - self.window + 1)
        hi = b
        for begin, end in self.seg.image_runs:
            if begin < b and end > a:  # a run the chunk's queries are in sees all of itself
                lo, hi = min(lo, begin), max(hi, end)
        return lo, hi

    def _mask(self, a: int, b: int, lo: int, hi: int) -> torch.Tensor:
        device = self.seg.prefix_slots.device
        start = self.seg.start_pos
        q_pos = start + torch.arange(a, b, device=device)
        k_pos = torch.cat([torch.arange(start - self.num_prefix, start, device=device),
                           start + torch.arange(lo, hi, device=device)])
        allowed = k_pos[None, :] <= q_pos[:, None]
        if self.window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - self.window
        for begin, end in self.seg.image_runs:
            if begin < b and end > a:
                in_run = (k_pos >= start + begin) & (k_pos < start + end)  # [keys]
                q_in_run = (q_pos >= start + begin) & (q_pos < start + end)  # [queries]
                allowed |= q_in_run[:, None] & in_run[None, :]
        return allowed


def encode_mask(seg: Segment, num_prefix: int, window: int | None, budget: int | None = None) -> EncodeMask:
    """The chunked mask of an encode segment, each chunk's mask within ``budget`` bools (MASK_BUDGET_BYTES).

    Full layers bound a chunk's keys by the whole context; sliding layers without image runs by the window, so
    their chunks can be larger. A single query over more than ``budget`` keys (a context past 64M tokens at the
    default budget) still gets its one row.
    """
    budget = MASK_BUDGET_BYTES if budget is None else budget
    n = seg.num_tokens
    chunk = budget // (num_prefix + n)  # every chunk's keys fit in the whole context
    if window is not None and not seg.image_runs:
        # keys of q queries: the prefix plus at most q + window - 1 own tokens; largest q with q * keys <= budget
        c = num_prefix + window - 1
        chunk = max(chunk, (math.isqrt(c * c + 4 * budget) - c) // 2)
    return EncodeMask(seg, num_prefix, window, max(1, min(chunk, n)))


@dataclass
class SdpaSegmentPlan:
    prefix_full: torch.Tensor  # [P] slots visible to full-attention layers
    prefix_sliding: torch.Tensor  # [P'] slots visible to sliding layers (the last window-1)
    mask_full: EncodeMask | None  # None: a canvas, which attends to everything it sees
    mask_sliding: EncodeMask | None


@dataclass
class SdpaMetadata:
    segments: list[SdpaSegmentPlan]


class SdpaBackend(BaseAttnBackend):
    def __init__(self, kv, sliding_window: int | None):
        super().__init__(kv)
        self.sliding_window = sliding_window

    def plan(self, batch: CanvasBatch) -> None:
        plans = []
        for seg in batch.segments:
            prefix_full = seg.prefix_slots
            # NOTE: HF's sliding cache keeps only window-1 tokens; both canvas and encode queries
            # see at most that many cached tokens on sliding layers.
            keep = seg.start_pos if self.sliding_window is None else min(seg.start_pos, self.sliding_window - 1)
            prefix_sliding = prefix_full[prefix_full.numel() - keep :]
            if seg.kind == "canvas":
                mask_full = mask_sliding = None
            else:
                mask_full = encode_mask(seg, prefix_full.numel(), None)
                mask_sliding = encode_mask(seg, prefix_sliding.numel(), self.sliding_window)
            plans.append(SdpaSegmentPlan(prefix_full, prefix_sliding, mask_full, mask_sliding))
        batch.attn_metadata = SdpaMetadata(plans)

    def forward(self, q, k, v, layer: AttnLayer, batch: CanvasBatch) -> torch.Tensor:
        out = torch.empty_like(q)
        sliding = layer.sliding_window is not None
        # NOTE: write first: a canvas may read the KV its own request's commit writes in this forward.
        for seg in batch.segments:
            if seg.writes_kv:
                sl = slice(seg.offset, seg.offset + seg.num_tokens)
                self.kv.store(layer.layer_id, seg.new_slots, k[sl], v[sl])
        for seg, plan in zip(batch.segments, batch.attn_metadata.segments):
            sl = slice(seg.offset, seg.offset + seg.num_tokens)
            prefix = plan.prefix_sliding if sliding else plan.prefix_full
            mask = plan.mask_sliding if sliding else plan.mask_full
            k_pre, v_pre = self.kv.gather(layer.layer_id, prefix) if prefix.numel() else (k[:0], v[:0])
            k_pre, v_pre = k_pre.to(k.dtype), v_pre.to(v.dtype)
            keys, values = torch.cat([k_pre, k[sl]]), torch.cat([v_pre, v[sl]])  # [P + n, KV, D]
            if mask is None:
                out[sl] = _sdpa(q[sl], keys, values, None)
                continue
            p = k_pre.shape[0]
            for a, b, lo, hi, chunk_mask in mask.chunks():
                if lo == 0:  # full layers (and sliding ones near the start): a view of the keys, no copy per chunk
                    chunk_k, chunk_v = keys[: p + hi], values[: p + hi]
                else:  # at most window-1 cached + chunk + window-1 own keys (more only inside image runs)
                    chunk_k, chunk_v = torch.cat([k_pre, k[sl][lo:hi]]), torch.cat([v_pre, v[sl][lo:hi]])
                out[seg.offset + a : seg.offset + b] = _sdpa(q[sl][a:b], chunk_k, chunk_v, chunk_mask)
        return out


def _sdpa(q, k, v, mask) -> torch.Tensor:
    """q [n, H, D], k/v [m, KV, D], mask [n, m] bool or None -> [n, H, D]."""
    # [n, H, D] -> [1, H, n, D]; scale 1.0 because q/k are RMS-normed (Gemma 4)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, scale=1.0, enable_gqa=True,
    )
    return o[0].transpose(0, 1)


def canvas_step_attention(q, k, v, k_buf, v_buf, rows, key_mask, writes=None) -> torch.Tensor:
    """Attention of B rows of C queries in one SDPA call, with static shapes (runtime/canvas_step.py plans the inputs).

    q [B*C, H, D], k/v [B*C, KV, D] the rows' own; k_buf/v_buf a layer's KV buffers; ``rows`` [B, P] the buffer rows
    of each row's visible context, padded; ``key_mask`` over [context rows ; own C keys], False on the padding:
    [B, P + C] bool for canvases (every query sees the same keys), [B, C, P + C] per query in rounds that encode.
    ``writes`` [B*C] (rounds that encode): the buffer row each token's k/v goes to, written before any row reads
    its context (0, the padding row, for tokens that keep nothing). -> [B*C, H, D]. No host sync and no
    data-dependent shape: graph-capturable.
    """
    b, p = rows.shape
    n, _, d = q.shape
    c = key_mask.shape[-1] - p  # the canvas length (static), not n // b (a ratio of two dynamic sizes)
    if writes is not None:  # NOTE: an indexed store, not index_copy_, which has no fp8 kernel (an fp8 KV cache)
        k_buf[writes] = k.to(k_buf.dtype)
        if v_buf is not k_buf:
            v_buf[writes] = v.to(v_buf.dtype)
    keys = torch.cat([k_buf[rows].to(k.dtype), k.view(b, c, -1, d)], dim=1)  # [B, P + C, KV, D]
    values = torch.cat([v_buf[rows].to(v.dtype), v.view(b, c, -1, d)], dim=1)
    mask = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]
    out = F.scaled_dot_product_attention(
        q.view(b, c, -1, d).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask, scale=1.0, enable_gqa=True,
    )  # [B, H, C, D]
    return out.transpose(1, 2).reshape(n, -1, d)
