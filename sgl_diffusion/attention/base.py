"""Attention contract shared by every backend (SDPA on CPU, FlashInfer / Triton on CUDA).

Call order per forward: the runner calls ``plan(batch)`` once (host work, may sync), then the model
calls ``forward(...)`` once per layer. ``forward`` must not sync the host (no ``.item()``,
``.cpu()``, ``.tolist()``) and builds no index tensors, so it can later run under CUDA-graph capture.

What a segment sees (transformers' semantics, ``W`` = sliding window, ``P`` = cached context):
- encode (prefill, commit): causal over [cached context ; own tokens]; on sliding layers a query sees
  itself and W - 1 earlier tokens; an image run's tokens also see their whole run (and only there
  ignore the window).
- canvas: everything in [visible context ; canvas], no mask; the visible context is all P tokens on
  full layers and the last min(P, W - 1) on sliding layers (counted from the canvas start, not per query).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment


@dataclass(frozen=True)
class AttnLayer:
    layer_id: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None  # HF semantics: an encode query sees itself + window-1 previous tokens


class KVStore(ABC):
    """Per-layer K/V buffers addressed by slot (sglang's token_to_kv_pool slots in the server).

    A slot is a position in the full-attention pool; ``rows`` maps it to the row of a layer's buffers
    (sglang's hybrid pool gives sliding layers rows of their own). Layers with the same geometry and
    window share one mapping, so a backend maps slots once per group of layers (``LayerGroup``).
    """

    @abstractmethod
    def buffers(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V buffers of the layer, each [rows, num_kv_heads, head_dim] on the model's device."""

    @abstractmethod
    def rows(self, layer_id: int, slots: torch.Tensor) -> torch.Tensor:
        """Buffer rows [n] int64 of slots [n] int64, on the slots' device. Called by ``plan()``."""

    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [n, num_kv_heads, head_dim] at slots [n]."""
        self.store_rows(layer_id, self.rows(layer_id, slots), k, v)

    def store_rows(self, layer_id: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [n, num_kv_heads, head_dim] at buffer rows [n] (already mapped by ``rows``)."""
        k_buf, v_buf = self.buffers(layer_id)
        k_buf[rows] = k.to(k_buf.dtype)
        v_buf[rows] = v.to(v_buf.dtype)

    def gather(self, layer_id: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return K, V [n, num_kv_heads, head_dim] stored at slots [n]."""
        rows = self.rows(layer_id, slots)
        k_buf, v_buf = self.buffers(layer_id)
        return k_buf[rows], v_buf[rows]


class BaseAttnBackend(ABC):
    def __init__(self, kv: KVStore):
        self.kv = kv

    @abstractmethod
    def plan(self, batch: CanvasBatch) -> None:
        """Build per-segment attention metadata into ``batch.attn_metadata``. Called once per forward,
        by the model, before its first layer; may allocate and sync."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttnLayer, batch: CanvasBatch
    ) -> torch.Tensor:
        """q [N, H, D], k/v [N, KV, D] for every token of the batch -> output [N, H, D].

        Encode segments (prefill/commit) also write their k/v into the KV store, before any segment
        reads it (a canvas may read the commit of its own request in the same forward). Canvas
        segments attend to [visible cached KV ; canvas] with no mask and write nothing.
        """


# ---- planning helpers shared by the kernel backends --------------------------------------------

CallKind = Literal["encode", "image", "canvas"]


@dataclass(frozen=True)
class LayerGroup:
    """Layers with one geometry and one window: a plan's indices serve all of them.

    DiffusionGemma has two: sliding (head_dim 256, 8 KV heads, window 1024) and full (head_dim 512,
    2 KV heads, K = V).
    """

    window: int | None  # None: a full-attention layer
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_ids: tuple[int, ...]


def layer_groups(layers: Sequence[AttnLayer]) -> list[LayerGroup]:
    """``layers`` grouped by (window, heads, KV heads, head_dim), in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for layer in layers:
        key = (layer.sliding_window, layer.num_heads, layer.num_kv_heads, layer.head_dim)
        groups.setdefault(key, []).append(layer.layer_id)
    return [LayerGroup(*key, tuple(ids)) for key, ids in groups.items()]


def visible_prefix(seg: Segment, window: int | None) -> torch.Tensor:
    """Slots [P'] of the cached context a segment's queries may see on a layer with ``window``:
    all of it on full layers, the last min(P, W - 1) on sliding ones (HF keeps W - 1 tokens)."""
    keep = seg.start_pos if window is None else min(seg.start_pos, window - 1)
    return seg.prefix_slots[seg.start_pos - keep :]


def call_kind(seg: Segment) -> CallKind:
    """How a kernel backend runs a segment: causal (+window), causal with a custom mask, or a canvas."""
    if seg.kind == "canvas":
        return "canvas"
    return "image" if seg.image_runs else "encode"


def dense_encode_mask(seg: Segment, num_prefix: int, window: int | None) -> torch.Tensor:
    """[n, num_prefix + n] bool over [last num_prefix cached ; own tokens], True = attend.

    Causal, the window (a query sees itself and window - 1 earlier tokens), and whole image runs. Only
    segments with image runs need it: the kernels express the rest with causal and window flags.
    """
    n, device = seg.num_tokens, seg.prefix_slots.device
    q = torch.arange(n, device=device)[:, None]  # positions relative to the segment start
    k = torch.arange(-num_prefix, n, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    run = torch.full((n,), -1, dtype=torch.long, device=device)
    for r, (begin, end) in enumerate(seg.image_runs):
        run[begin:end] = r
    k_run = torch.cat([torch.full((num_prefix,), -1, dtype=torch.long, device=device), run])
    return mask | ((run[:, None] >= 0) & (run[:, None] == k_run[None, :]))


def segment_rows(segments: Sequence[Segment], device) -> torch.Tensor | slice:
    """Flat batch rows of ``segments``' tokens, concatenated in order: a slice when they are contiguous
    (no gather needed), else an int64 index tensor on ``device``."""
    if all(a.offset + a.num_tokens == b.offset for a, b in zip(segments, segments[1:])):
        return slice(segments[0].offset, segments[-1].offset + segments[-1].num_tokens)
    return torch.cat([torch.arange(s.offset, s.offset + s.num_tokens) for s in segments]).to(device)


def indptr(lengths: Sequence[int], device) -> torch.Tensor:
    """[len + 1] int32 exclusive prefix sums of ``lengths`` on ``device``."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out.to(device)
