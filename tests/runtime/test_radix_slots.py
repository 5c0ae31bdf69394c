"""RadixKVSlots on sglang's own radix tree and CPU pools, without a server: what a retraction does to a request's
cached-token count and to the pool."""

from array import array
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.managers.schedule_batch import FINISH_LENGTH

from sgl_diffusion.runtime.radix_slots import RadixKVSlots
from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest

POOL = 1024


@pytest.fixture
def serving():
    """The server's --strip-thinking-cache, as sglang's runtime context holds it (tests may turn it on)."""
    return SimpleNamespace(strip_thinking_cache=False)


@pytest.fixture
def slots(monkeypatch, serving):
    import sgl_diffusion.runtime.radix_slots as radix_slots
    import sglang.srt.managers.schedule_batch as schedule_batch
    import sglang.srt.mem_cache.common as mem_cache_common
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixCache

    # NOTE: what a server publishes into sglang's runtime context at start-up, as far as Req and the tree read it
    for module in (schedule_batch, mem_cache_common, radix_slots):
        monkeypatch.setattr(module, "get_serving", lambda: serving, raising=False)
        monkeypatch.setattr(module, "get_spec", lambda: SimpleNamespace(speculative_algorithm=None), raising=False)
    rows = ReqToTokenPool(size=8, max_context_len=512, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(POOL, 1, torch.float32, 1, 8, 1, "cpu", False, enable_alt_stream=False)
    allocator = TokenToKVPoolAllocator(POOL, torch.float32, "cpu", kv, need_sort=False)
    tree = RadixCache(CacheInitParams(disable=False, req_to_token_pool=rows, token_to_kv_pool_allocator=allocator,
                                      page_size=1))  # fmt: skip
    # a tree without sliding-window layers (the server's has them): no window ever ends within these contexts
    tree.sliding_window_size, tree.draft_swa_window = 10**6, 0
    return RadixKVSlots(tree, rows, "cpu")


def _request(prompt, rid="r"):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=96)
    params.normalize(None)
    return DiffusionRequest(prompt, None, 96, handle=Req(rid, "", array("q", prompt), params))


def _encode(slots, dreq, tokens, limit=None):
    got = slots.reserve(dreq, tokens, limit)
    dreq.slots = torch.cat([got.reused if dreq.slots is None else dreq.slots, got.new])
    slots.encoded(dreq)
    return got


def test_a_retracted_request_re_encodes_from_its_cached_context_without_counting_it_as_a_cached_prompt(slots):
    """Retracted with one canvas committed and one done, it matches its own prompt + canvas in the tree; that reuse
    is not a prompt-cache hit (it counted 52 cached tokens for a 20-token prompt), and every slot comes back."""
    prompt, first, second = list(range(100, 120)), list(range(200, 232)), list(range(300, 332))
    dreq = _request(prompt)
    assert _encode(slots, dreq, prompt).reused.numel() == 0
    dreq.output_ids += first
    dreq.handle.output_ids.extend(first)
    _encode(slots, dreq, first)
    dreq.output_ids += second
    dreq.handle.output_ids.extend(second)
    slots.forget(dreq, cache=True)  # as CanvasScheduler._make_room does
    dreq.slots = None
    assert slots.room() == POOL  # all of it free or held only by the tree
    got = _encode(slots, dreq, prompt + dreq.output_ids)
    assert got.reused.numel() == len(prompt) + len(first) and got.new.numel() == len(second)
    assert dreq.handle.cached_tokens == 0
    slots.release(dreq)
    assert slots.room() == POOL and slots.rows.available_size() == 8


def test_a_prompt_encoded_in_chunks_is_published_chunk_by_chunk(slots):
    """A chunk of a prompt (chunked prefill) gets slots for its own tokens after the matched prefix only. Each encoded
    chunk goes into the tree, so the same prompt arriving meanwhile reuses what is encoded so far, and its own first
    chunk starts there."""
    prompt = list(range(100, 150))
    first = _request(prompt)
    got = _encode(slots, first, prompt, limit=16)
    assert got.reused.numel() == 0 and got.new.numel() == 16
    got = _encode(slots, first, prompt[16:], limit=16)
    assert got.new.numel() == 16 and first.slots.numel() == 32
    second = _request(prompt)
    got = _encode(slots, second, prompt, limit=16)
    assert torch.equal(got.reused, first.slots) and got.new.numel() == 16
    assert second.handle.cached_tokens == 32
    for dreq in (first, second):
        slots.release(dreq)
    assert slots.room() == POOL and slots.rows.available_size() == 8


def test_strip_thinking_cache_keeps_a_reasoning_answer_out_of_the_tree(slots, serving):
    """--strip-thinking-cache: once a request has reasoning tokens its canvases are not published (sglang's release
    frees everything past the prompt, Req.owned_kv_len); the prompt stays cached and every slot comes back. Published,
    they were freed under the tree: the pool counted more free slots than it has."""
    serving.strip_thinking_cache = True
    prompt, canvas = list(range(100, 120)), list(range(200, 232))
    dreq = _request(prompt)
    _encode(slots, dreq, prompt)
    dreq.handle.output_ids.extend(canvas)
    dreq.handle.reasoning_tokens = 7  # as DiffusionEngine._accept_canvas counts them
    _encode(slots, dreq, canvas)
    dreq.handle.finished_reason = FINISH_LENGTH(length=len(canvas))
    slots.release(dreq)
    assert slots.room() == POOL and slots.allocator.available_size() + slots.tree.evictable_size() == POOL
    again = _request(prompt + canvas)
    assert _encode(slots, again, prompt + canvas).reused.numel() == len(prompt)  # the prompt, not the answer
    slots.release(again)


def test_a_prompt_the_tree_holds_whole_is_reused_whole(slots):
    """A repeated prompt reuses all of its KV and gets no new slots (sglang's match stops one token short, for the
    logits a token step needs and a canvas does not); asking for prompt logprobs keeps sglang's cap at
    logprob_start_len, where the scored tokens begin."""
    prompt = list(range(100, 120))
    first = _request(prompt)
    _encode(slots, first, prompt)
    slots.release(first)
    again = _request(prompt)
    got = _encode(slots, again, prompt)
    assert got.reused.numel() == len(prompt) and got.new.numel() == 0
    assert torch.equal(again.slots, first.slots) and again.handle.cached_tokens == len(prompt)
    scored = _request(prompt)
    scored.handle.return_logprob, scored.handle.logprob_start_len = True, 5
    assert _encode(slots, scored, prompt).reused.numel() == 5
    for dreq in (again, scored):
        slots.release(dreq)
    assert slots.room() == POOL and slots.rows.available_size() == 8


def test_a_health_probe_runs_a_forward_though_its_prompt_is_cached(slots):
    """/health_generate's probe (sglang's input_ids [0]) keeps sglang's match, one token short: each probe encodes a
    token, so it proves the model runs, not only the loop."""
    from sglang.srt.constants import HEALTH_CHECK_RID_PREFIX

    for i in range(2):
        probe = _request([0], rid=f"{HEALTH_CHECK_RID_PREFIX}_{i}")
        got = _encode(slots, probe, [0])
        assert got.reused.numel() == 0 and got.new.numel() == 1
        slots.release(probe)
    assert _encode(slots, _request([0]), [0]).reused.numel() == 1  # the cache holds it: other requests reuse it


def test_sglang_stops_its_own_match_one_token_short_of_the_input(slots):
    """radix_slots.match_whole lifts sglang's cap (Req._compute_max_prefix_len, sglang 0.5.23) by the one token it
    keeps back for the last token's logits; if upstream stops keeping it back, or keeps back more, this fails."""
    from sglang.srt.managers.schedule_batch import Req

    req = _request(list(range(100, 120))).handle
    assert Req._compute_max_prefix_len(req, 20) == 19
    req.return_logprob, req.logprob_start_len = True, 5
    assert Req._compute_max_prefix_len(req, 20) == 5
