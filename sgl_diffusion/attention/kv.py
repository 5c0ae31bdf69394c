"""KV stores: plain tensors (tests, single-process tools) and sglang's token_to_kv_pool (the server)."""

from __future__ import annotations

import torch

from sgl_diffusion.attention.base import KVStore


class TorchKVStore(KVStore):
    """One buffer pair per layer; a slot is a row of every layer's buffers."""

    def __init__(self, num_slots: int, layer_shapes: list[tuple[int, int]], dtype, device="cpu"):
        """layer_shapes[i] = (num_kv_heads, head_dim) of layer i."""
        self.k = [torch.zeros(num_slots, h, d, dtype=dtype, device=device) for h, d in layer_shapes]
        self.v = [torch.zeros(num_slots, h, d, dtype=dtype, device=device) for h, d in layer_shapes]

    def buffers(self, layer_id):
        return self.k[layer_id], self.v[layer_id]

    def rows(self, layer_id, slots):
        return slots


class SglangKVStore(KVStore):
    """Our KV contract over sglang's pool (MHA, or hybrid SWA whose sliding layers use their own rows)."""

    def __init__(self, pool):
        self.pool = pool
        self.mapping = getattr(pool, "layers_mapping", None)  # layer -> (pool layer, is_swa) in SWA pools

    def buffers(self, layer_id):
        return self.pool.get_key_buffer(layer_id), self.pool.get_value_buffer(layer_id)

    def rows(self, layer_id, slots):
        if self.mapping is not None and self.mapping[layer_id][1]:
            return self.pool.translate_loc_from_full_to_swa(slots).long()
        return slots
