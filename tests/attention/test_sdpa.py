"""The SDPA reference backend: encode masks built per query chunk within a fixed budget, never [n, P + n] at once."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.cache_utils import DynamicCache

from sgl_diffusion.attention import sdpa
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment
from tests.models.test_parity import generate_both, hf_cache_kv, make_pair, our_kv, prefill, prompt_ids, rel_err


def dense_reference(seg: Segment, num_prefix: int, window: int | None) -> torch.Tensor:
    """[n, P + n] bool, query by query: causal, HF's window (itself + window-1 previous), whole image runs."""
    start, n = seg.start_pos, seg.num_tokens
    keys = list(range(start - num_prefix, start + n))
    run_of = {}
    for r, (begin, end) in enumerate(seg.image_runs):
        run_of.update({start + i: r for i in range(begin, end)})
    mask = torch.zeros(n, num_prefix + n, dtype=torch.bool)
    for i in range(n):
        q = start + i
        for j, k in enumerate(keys):
            in_window = k <= q and (window is None or k > q - window)
            mask[i, j] = in_window or (q in run_of and run_of[q] == run_of.get(k))
    return mask


def assembled(plan: sdpa.EncodeMask) -> tuple[torch.Tensor, int]:
    """The chunks laid back into one [n, P + n] mask (keys a chunk leaves out are masked), and the largest chunk."""
    p, n = plan.num_prefix, plan.seg.num_tokens
    mask, largest = torch.zeros(n, p + n, dtype=torch.bool), 0
    for a, b, lo, hi, chunk in plan.chunks():
        assert chunk.shape == (b - a, p + hi - lo)
        mask[a:b, :p] = chunk[:, :p]
        mask[a:b, p + lo : p + hi] = chunk[:, p:]
        largest = max(largest, chunk.numel())
    return mask, largest


def segment(n, prefix, runs=()):
    return Segment("commit" if prefix else "prefill", 0, n, prefix, torch.arange(prefix), torch.arange(n), runs)


@pytest.mark.parametrize("n, prefix, runs", [
    (40, 0, ()), (37, 12, ()), (50, 0, ((3, 20),)), (45, 9, ((0, 4), (30, 41))),
])  # fmt: skip
@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("budget", [1, 64, 300, 1 << 20])
def test_chunked_masks_are_the_dense_mask(n, prefix, runs, window, budget):
    """Chunks together give the query-by-query mask (prefix, window, image runs across chunk borders), and each
    chunk's mask fits the budget unless one query's keys alone exceed it."""
    num_prefix = prefix if window is None else min(prefix, window - 1)
    seg = segment(n, prefix, runs)
    plan = sdpa.encode_mask(seg, num_prefix, window, budget)
    mask, largest = assembled(plan)
    assert torch.equal(mask, dense_reference(seg, num_prefix, window))
    assert largest <= max(budget, num_prefix + n)
    if budget >= num_prefix + n:
        assert largest <= budget


class BoolAllocations(TorchDispatchMode):
    """Records the element count of every bool tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.bool:
                self.largest = max(self.largest, t.numel())
        return out


def test_long_prompt_encode_stays_within_the_mask_budget(monkeypatch):
    """A prompt six windows long: no bool tensor of the forward exceeds the budget (the dense masks would be 20x
    it), and the KV and first-canvas logits still match transformers."""
    budget = 512
    monkeypatch.setattr(sdpa, "MASK_BUDGET_BYTES", budget)
    hf, ours = make_pair("default")
    cfg = ours.cfg
    n = 6 * cfg.sliding_window + 5
    assert n * n > 16 * budget
    ids = prompt_ids(n, cfg.vocab_size)
    kv, attn = our_kv(ours)
    with BoolAllocations() as seen:
        slots = prefill(ours, attn, ids)
    assert 0 < seen.largest <= budget

    cache = DynamicCache(config=hf.config.text_config)
    with torch.no_grad():
        hf.model.encoder(input_ids=ids[None], past_key_values=cache, use_cache=True)
    for layer in range(cfg.num_layers):
        ref_k, ref_v = hf_cache_kv(cache, layer)
        got_k, got_v = kv.gather(layer, slots[-ref_k.shape[0] :])
        assert rel_err(got_k, ref_k) <= 1e-4 and rel_err(got_v, ref_v) <= 1e-4, layer
    canvas = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(decoder_input_ids=canvas[None], past_key_values=cache).logits[0]
    got = ours.logits(ours(CanvasBatch([Segment("canvas", 0, cfg.canvas_length, n, slots)], canvas), attn))
    assert rel_err(got, ref) <= 1e-4


def test_generation_with_a_tiny_mask_budget_matches_generate(monkeypatch):
    """Prefill and the commits of three canvases, attended one query at a time, give HF generate's tokens."""
    monkeypatch.setattr(sdpa, "MASK_BUDGET_BYTES", 1)
    hf, ours = make_pair("default")
    got, ref = generate_both(hf, ours, steps=2, with_eos=False)
    assert got == ref and len(got) == 3 * ours.cfg.canvas_length
