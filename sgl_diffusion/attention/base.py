"""Attention contract shared by every backend (SDPA on CPU, FlashInfer / Triton on CUDA).

Call order per forward: the runner calls ``plan(batch)`` once (host work, may sync), then the model
calls ``forward(...)`` once per layer. ``forward`` must not sync the host (no ``.item()``,
``.cpu()``, ``.tolist()``) so it can later run under CUDA-graph capture.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from sgl_diffusion.runtime.canvas_batch import CanvasBatch


@dataclass(frozen=True)
class AttnLayer:
    layer_id: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None  # HF semantics: an encoder query sees itself + window-1 previous tokens


class KVStore(ABC):
    """Per-layer K/V storage addressed by slot index (sglang's token_to_kv_pool slots in the server)."""

    @abstractmethod
    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [n, num_kv_heads, head_dim] at slots [n]."""

    @abstractmethod
    def gather(self, layer_id: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return K, V [n, num_kv_heads, head_dim] stored at slots [n]."""


class BaseAttnBackend(ABC):
    def __init__(self, kv: KVStore):
        self.kv = kv

    @abstractmethod
    def plan(self, batch: CanvasBatch) -> None:
        """Build per-segment attention metadata into ``batch.attn_metadata``. Called once per forward."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttnLayer, batch: CanvasBatch
    ) -> torch.Tensor:
        """q [N, H, D], k/v [N, KV, D] for every token of the batch -> output [N, H, D].

        Encode segments (prefill/commit) also write their k/v into the KV store. Canvas segments
        attend to [visible cached KV ; canvas] with no mask and write nothing.
        """
