"""SglangKVStore over sglang's own hybrid sliding-window pool (built on the CPU): sliding layers use their own rows."""

import torch

from sgl_diffusion.attention.kv import SglangKVStore


def swa_pool():
    """Layer 0 sliding (8 rows of its own), layer 1 full (16 rows); full slots 3 and 7 live at sliding rows 5, 2."""
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    pool = SWAKVPool(size=16, size_swa=8, page_size=1, dtype=torch.float32, head_num=1, head_dim=4,
                     swa_attention_layer_ids=[0], full_attention_layer_ids=[1], device="cpu")  # fmt: skip
    mapping = torch.zeros(17, dtype=torch.int64)
    mapping[3], mapping[7] = 5, 2
    pool.register_mapping(mapping)
    return pool


def test_sliding_layers_are_addressed_through_the_swa_mapping():
    store = SglangKVStore(swa_pool())
    slots = torch.tensor([3, 7])
    assert store.rows(0, slots).tolist() == [5, 2] and store.rows(1, slots).tolist() == [3, 7]
    k, v = torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    for layer in (0, 1):
        store.store(layer, slots, k, v)
        got_k, got_v = store.gather(layer, slots)
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
        rows = store.rows(layer, slots)
        k_buf, v_buf = store.buffers(layer)
        assert torch.equal(k_buf[rows], k) and torch.equal(v_buf[rows], v)
    assert torch.equal(store.buffers(0)[0][[5, 2]], k)  # written where sglang's SWA pool keeps them
