"""A plain-tensor KV store: one buffer pair per layer, used by tests and single-process tools."""

from __future__ import annotations

import torch

from sgl_diffusion.attention.base import KVStore


class TorchKVStore(KVStore):
    def __init__(self, num_slots: int, layer_shapes: list[tuple[int, int]], dtype, device="cpu"):
        """layer_shapes[i] = (num_kv_heads, head_dim) of layer i."""
        self.k = [torch.zeros(num_slots, h, d, dtype=dtype, device=device) for h, d in layer_shapes]
        self.v = [torch.zeros(num_slots, h, d, dtype=dtype, device=device) for h, d in layer_shapes]

    def store(self, layer_id, slots, k, v):
        self.k[layer_id][slots] = k.to(self.k[layer_id].dtype)
        self.v[layer_id][slots] = v.to(self.v[layer_id].dtype)

    def gather(self, layer_id, slots):
        return self.k[layer_id][slots], self.v[layer_id][slots]
