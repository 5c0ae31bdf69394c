"""Reference attention backend on torch SDPA: readable, runs anywhere, the one the others are tested against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sgl_diffusion.attention.base import AttnLayer, BaseAttnBackend
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment


@dataclass
class SdpaSegmentPlan:
    prefix_full: torch.Tensor  # [P] slots visible to full-attention layers
    prefix_sliding: torch.Tensor  # [P'] slots visible to sliding layers (the last window-1)
    mask_full: torch.Tensor | None  # [n, P + n] bool (True = attend); None = attend to everything
    mask_sliding: torch.Tensor | None  # [n, P' + n] bool


@dataclass
class SdpaMetadata:
    segments: list[SdpaSegmentPlan]


def encode_mask(seg: Segment, num_prefix: int, window: int | None) -> torch.Tensor:
    """Causal mask of an encode segment over [num_prefix cached ; own tokens], with HF's sliding
    window (query sees itself + window-1 previous) and bidirectional image runs."""
    device = seg.prefix_slots.device
    q_pos = seg.start_pos + torch.arange(seg.num_tokens, device=device)
    k_pos = torch.arange(seg.start_pos - num_prefix, seg.start_pos + seg.num_tokens, device=device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    for begin, end in seg.image_runs:
        run = torch.zeros(num_prefix + seg.num_tokens, dtype=torch.bool, device=device)
        run[num_prefix + begin : num_prefix + end] = True
        allowed[begin:end] |= run
    return allowed


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
            k_seg, v_seg = k[sl], v[sl]
            if prefix.numel():
                k_pre, v_pre = self.kv.gather(layer.layer_id, prefix)
                k_all, v_all = torch.cat([k_pre.to(k.dtype), k_seg]), torch.cat([v_pre.to(v.dtype), v_seg])
            else:
                k_all, v_all = k_seg, v_seg
            # [n, H, D] -> [1, H, n, D]; scale 1.0 because q/k are RMS-normed (Gemma 4)
            o = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1)[None],
                k_all.transpose(0, 1)[None],
                v_all.transpose(0, 1)[None],
                attn_mask=mask,
                scale=1.0,
                enable_gqa=True,
            )
            out[sl] = o[0].transpose(0, 1)
        return out
