"""The canvas policy: what goes into each forward (segments, positions, KV slots), and what it returns."""

import json

import pytest
import torch

from sgl_diffusion.entrypoints.tiny_checkpoint import tiny_generation_config
from sgl_diffusion.runtime.offline import FreeListSlots, OfflineEngine
from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest, Reservation
from sgl_diffusion.sampling.params import DiffusionDefaults, DiffusionParams
from tests.models.test_parity import rel_err


def params(model, **kw):
    defaults = DiffusionDefaults.from_generation_config(json.loads(tiny_generation_config().to_json_string()))
    return DiffusionParams.from_request(kw, defaults, vocab_size=model.cfg.vocab_size,
                                        canvas_length=model.cfg.canvas_length)


def request(model, n_prompt, max_new, seed, steps=2):
    return DiffusionRequest(list(range(10, 10 + n_prompt)), params(model, seed=seed, max_denoising_steps=steps), max_new)


class Recorder:
    """Wraps the runner to keep every batch the policy builds."""

    def __init__(self, engine):
        self.batches = []
        runner = engine.scheduler.runner
        original = runner.run

        def run(batch, states, extra_steps=0):
            self.batches.append(batch)
            return original(batch, states, extra_steps)

        runner.run = run


def test_mixed_batch_layout(model):
    """A new prompt's prefill shares a forward with another request's denoise step; positions and slots line up."""
    engine = OfflineEngine(model)
    rec = Recorder(engine)
    a = request(model, 20, 32, seed=1, steps=3)
    engine.scheduler.add(a)
    engine.scheduler.step()  # a: prefill + first canvas step
    b = request(model, 7, 32, seed=2, steps=3)
    engine.scheduler.add(b)
    engine.scheduler.step()  # a: canvas step 2; b: prefill + canvas step 1
    batch = rec.batches[-1]
    kinds = [(s.kind, s.req_index) for s in batch.segments]
    assert kinds == [("canvas", 0), ("prefill", 1), ("canvas", 1)]
    c = model.cfg.canvas_length
    canvas_a, prefill_b, canvas_b = batch.segments
    assert batch.positions.tolist() == (list(range(20, 20 + c)) + list(range(7)) + list(range(7, 7 + c)))
    assert torch.equal(canvas_a.prefix_slots, a.slots) and canvas_a.new_slots is None
    assert torch.equal(canvas_b.prefix_slots, prefill_b.new_slots)  # b's canvas reads what its prefill writes
    assert set(prefill_b.new_slots.tolist()).isdisjoint(a.slots.tolist())
    assert batch.canvas_mask.tolist() == [True] * c + [False] * 7 + [True] * c


def test_homogeneous_rounds_keep_encodes_apart(model):
    """mixed_rounds=False (the bench's baseline): a round with a prefill or commit runs no canvas step, so a
    newcomer's prefill stalls the denoising request; the tokens are the same as with mixed rounds."""
    def run(mixed):
        engine = OfflineEngine(model, mixed_rounds=mixed)
        rec = Recorder(engine)
        a, b = request(model, 20, 40, seed=1, steps=3), request(model, 7, 40, seed=2, steps=2)
        engine.scheduler.add(a)
        engine.scheduler.step()
        engine.scheduler.add(b)
        while engine.scheduler.running:
            engine.scheduler.step()
        return [a.output_ids, b.output_ids], [[s.kind for s in batch.segments] for batch in rec.batches]

    (mixed_out, mixed_kinds), (homog_out, homog_kinds) = run(True), run(False)
    assert mixed_out == homog_out
    assert mixed_kinds[1] == ["canvas", "prefill", "canvas"]
    assert homog_kinds[:3] == [["prefill"], ["prefill"], ["canvas", "canvas"]]
    for kinds in homog_kinds:
        assert "canvas" not in kinds or set(kinds) == {"canvas"}
    assert len(homog_kinds) > len(mixed_kinds)


@pytest.mark.parametrize("num_slots", [150, 200])
def test_homogeneous_rounds_run_canvases_while_every_encode_waits_for_kv(model, num_slots):
    """With unmixed rounds, an encode that waits for KV (a prompt held back, a commit with no room) must not hold back
    the canvases too: they run (and free KV when they finish) instead of the engine spinning without a forward."""
    engine = OfflineEngine(model, num_slots=num_slots, mixed_rounds=False)
    reqs = [request(model, 63, 96, seed=0, steps=4), request(model, 63, 96, seed=1, steps=2)]
    for req in reqs:
        engine.scheduler.add(req)
    for _ in range(100):
        if not engine.scheduler.running:
            break
        assert not engine.scheduler.step().exhausted
    assert [len(r.output_ids) for r in reqs] == [96, 96]
    assert engine.slots.free_slots.numel() == num_slots


def test_commit_and_next_canvas_share_a_forward(model):
    """When a canvas finishes, its commit and the next canvas's first step run in one forward."""
    engine = OfflineEngine(model)
    rec = Recorder(engine)
    a = request(model, 5, 64, seed=3, steps=1)
    engine.generate([a])
    c = model.cfg.canvas_length
    second = rec.batches[1]
    assert [s.kind for s in second.segments] == ["commit", "canvas"]
    commit, canvas = second.segments
    assert commit.start_pos == 5 and commit.num_tokens == c
    assert canvas.start_pos == 5 + c and torch.equal(canvas.prefix_slots[5:], commit.new_slots)
    assert second.input_ids[:c].tolist() == a.output_ids[:c]  # the committed canvas is what was emitted


def test_window_limits_in_attention_plan(model):
    """Sliding layers see at most window-1 cached tokens; full layers see the whole context."""
    engine = OfflineEngine(model)
    rec = Recorder(engine)
    w = model.cfg.sliding_window
    engine.generate([request(model, 3 * w, 8, seed=4, steps=1)])
    plan = rec.batches[-1].attn_metadata.segments[-1]  # the canvas segment of the last forward
    assert plan.prefix_full.numel() == 3 * w and plan.prefix_sliding.numel() == w - 1
    assert torch.equal(plan.prefix_sliding, plan.prefix_full[-(w - 1):])
    assert plan.mask_full is None and plan.mask_sliding is None  # a canvas attends to everything it sees


def test_prefill_only_request(model):
    """max_new_tokens=0 runs the prefill and no canvas at all."""
    engine = OfflineEngine(model)
    rec = Recorder(engine)
    assert engine.generate([request(model, 9, 0, seed=5)]) == [[]]
    assert len(rec.batches) == 1 and [s.kind for s in rec.batches[0].segments] == ["prefill"]
    assert engine.slots.free_slots.numel() == 4096  # everything returned


class PromptCache:
    """Wraps the offline engine's free list to reuse a prompt encoded before, whole, as the radix cache does."""

    caches_prefixes = True

    def __init__(self, engine):
        self.slots, self.prompts = engine.slots, {}
        engine.scheduler.kv = self

    def reserve(self, req, tokens, limit=None):
        if req.slots is None and tuple(tokens) in self.prompts:
            return Reservation(self.prompts[tuple(tokens)], self.slots.empty)
        return self.slots.reserve(req, tokens, limit)

    def encoded(self, req):
        self.prompts.setdefault(tuple(req.prompt_ids), req.slots[: len(req.prompt_ids)])

    def release(self, req, cache=True):
        pass  # the prompt's slots stay cached

    def room(self):
        return self.slots.room()


def test_a_prompt_reused_whole_goes_straight_to_its_canvas(model):
    """A prompt the cache holds whole has nothing to encode: an answer's first round is its canvas alone, on the
    cached KV, and a prefill-only request finishes in a round without a forward (it waited for one forever)."""
    engine = OfflineEngine(model)
    rec = Recorder(engine)
    cache = PromptCache(engine)
    engine.generate([request(model, 12, 20, seed=3)])
    again = request(model, 12, 20, seed=3)
    engine.scheduler.add(again)
    engine.scheduler.step()
    [canvas] = rec.batches[-1].segments
    assert (canvas.kind, canvas.start_pos) == ("canvas", 12)
    assert torch.equal(canvas.prefix_slots, cache.prompts[tuple(again.prompt_ids)])
    while engine.scheduler.running:
        engine.scheduler.step()
    assert len(again.output_ids) == 20
    forwards = len(rec.batches)
    prefill_only = request(model, 12, 0, seed=3)
    engine.scheduler.add(prefill_only)
    out = engine.scheduler.step()
    assert out.finished == [prefill_only] and out.started == [prefill_only] and out.cached_tokens == 12
    assert len(rec.batches) == forwards and not engine.scheduler.running


@pytest.mark.parametrize("steps_per_round", [1, 3])
def test_a_stability_threshold_past_the_steps_runs_every_step(model, steps_per_round):
    """stability_threshold > max_denoising_steps (valid, as in transformers): the stop never fires, each canvas runs
    its steps, and the output is the same as with the stop turned off (0) once the steps are spent."""
    def run(threshold):
        engine = OfflineEngine(model, steps_per_round=steps_per_round)
        rec = Recorder(engine)
        req = DiffusionRequest(list(range(10, 16)), params(model, seed=4, max_denoising_steps=3,
                                                           stability_threshold=threshold), 40)
        return engine.generate([req])[0], len(rec.batches)

    assert run(7) == run(0)


def test_steps_per_round_keeps_results(model):
    """Several denoise steps per round (no host sync between them) give the canvases of one step per round, and fewer
    host round trips. With 3 steps a round, canvases of 4 steps end mid-round: their rows are frozen for the rest of
    it, and their generators are set back to where the finishing step left them, so the next canvases draw the same."""
    def run(k):
        engine = OfflineEngine(model, steps_per_round=k)
        rec = Recorder(engine)
        reqs = [request(model, 6 + i, 70, seed=i, steps=4) for i in range(3)]
        return engine.generate(reqs), len(rec.batches)

    (one, rounds_one), (two, rounds_two), (three, rounds_three) = run(1), run(2), run(3)
    assert one == two == three and rounds_three < rounds_one and rounds_two < rounds_one


def test_kv_exhaustion_waits_instead_of_failing(model):
    """With KV for one committed canvas at a time, the second request's commit waits for the first to finish."""
    engine = OfflineEngine(model, num_slots=80)  # each request needs 10 + 32 slots to commit its first canvas
    starved = []
    step = engine.scheduler.step
    engine.scheduler.step = lambda: (out := step(), starved.extend(out.starved))[0]
    outs = engine.generate([request(model, 10, 64, seed=6, steps=1), request(model, 10, 64, seed=7, steps=1)])
    assert [len(o) for o in outs] == [64, 64] and starved
    assert engine.slots.free_slots.numel() == 80


def _recording_forget(engine):
    forgotten, forget = [], engine.slots.forget
    engine.slots.forget = lambda req, cache=False: (forgotten.append(req), forget(req, cache))[1]
    return forgotten


def test_a_burst_of_prompts_is_encoded_only_while_their_canvases_fit(model):
    """Encoding every prompt of a burst into the pool would leave no room for their first commits. A prompt is encoded
    only while its tokens and a canvas for each request holding KV fit: the second and third wait (FIFO), nobody is
    retracted, and all three get their whole output."""
    engine = OfflineEngine(model, num_slots=100)  # 3 prompts of 20, then 32 slots per committed canvas
    forgotten, recorder = _recording_forget(engine), Recorder(engine)
    reqs = [request(model, 20, 96, seed=s, steps=1) for s in (1, 2, 3)]
    outs = engine.generate(reqs)
    assert [len(o) for o in outs] == [96, 96, 96]
    prefills = [[seg.req_index for seg in b.segments if seg.kind == "prefill"] for b in recorder.batches]
    assert prefills[0] == [0]  # 20 + 2 x 32 > the 80 slots left: the second prompt waits
    assert sum(map(len, prefills)) == 3 and not forgotten
    assert engine.slots.free_slots.numel() == 100


def test_a_burst_that_fills_the_pool_retracts_the_newest_and_every_request_finishes(model):
    """Two short prompts leave room for one canvas each, then both commit and need a canvas more, which only the other
    could free. The newest request holding KV gives it back and waits (sglang's retraction), instead of one being
    failed; all get their whole output, the oldest is never retracted, and every slot comes back."""
    engine = OfflineEngine(model, num_slots=100)  # prompts of 4, then 32 slots per committed canvas
    forgotten = _recording_forget(engine)
    reqs = [request(model, 4, 96, seed=s, steps=1) for s in (1, 2, 3)]
    outs = engine.generate(reqs)
    assert [len(o) for o in outs] == [96, 96, 96]
    assert forgotten == [reqs[1]]  # the third prompt never fitted beside two requests' canvases
    assert engine.slots.free_slots.numel() == 100


def test_a_retracted_request_keeps_its_output_and_re_encodes_it(model):
    """The newest request holding KV is the one retracted: it keeps its committed output and current canvas, moves
    behind the others (the waiting one included), and its next reservation is prompt + output as one prefill."""
    engine = OfflineEngine(model, num_slots=100)
    forgotten, policy = _recording_forget(engine), engine.scheduler
    a, b, c = (request(model, 4, 96, seed=s, steps=1) for s in (1, 2, 3))
    for req in (a, b, c):
        policy.add(req)
    outs = []
    while not forgotten:
        outs.append(policy.step())
    assert forgotten == [b] and policy.running == [a, c, b]
    # its second canvas was done but not yet committed (no room): it stays in the output, to be encoded with the rest
    assert b.slots is None and len(b.output_ids) == 64 and a.slots is not None and c.slots is None
    assert b.pending == b.prompt_ids + b.output_ids and b.state is not None
    # what the server reports to sglang's metrics: two prompts started, then one retraction; b's second start is a
    # re-encode of its prompt and output (sglang's reprocessed prefill), not a new prompt's
    assert [(o.started, o.prefill_tokens, o.reencoded_tokens, o.retracted) for o in outs] == [
        ([a, b], 8, 0, []), *[([], 0, 0, [])] * (len(outs) - 2), ([], 0, 0, [b])]
    outs = [policy.step() for _ in range(20) if policy.running]
    out = next(o for o in outs if b in o.started)
    assert out.started == [b] and out.reencoded_tokens == out.prefill_tokens == 4 + 64
    assert out.reencoded_cached_tokens == out.cached_tokens == 0  # the offline engine caches no prefixes


def test_a_request_the_pool_cannot_hold_alone_is_reported_not_waited_for(model):
    """Alone, holding all the KV it could get and short of more: it would wait forever, so the step reports it (the
    server ends it with a 503) and the offline engine raises."""
    engine = OfflineEngine(model, num_slots=40)  # a 10-token prompt, then 32 slots to commit the first canvas
    with pytest.raises(MemoryError, match="40 slots"):
        engine.generate([request(model, 10, 64, seed=1, steps=1)])
    engine = OfflineEngine(model, num_slots=40)
    big = request(model, 41, 32, seed=1, steps=1)  # its prompt alone does not fit
    engine.scheduler.add(big)
    assert engine.scheduler.step().exhausted == [big]


def test_sampler_tiles_give_the_same_tokens(model, monkeypatch):
    """Tiling the LM head and sampler over rows (bounded vocab-sized memory) changes no token."""
    from sgl_diffusion.runtime import runner

    def run():
        return OfflineEngine(model).generate([request(model, 6 + i, 40, seed=i, steps=2) for i in range(3)])

    whole = run()
    monkeypatch.setattr(runner, "SAMPLER_TILE_BYTES", 1)  # one row per tile
    assert run() == whole


def test_empty_prompt_generates_from_nothing(model):
    """A prompt with no tokens denoises a canvas that attends to itself only."""
    engine = OfflineEngine(model)
    out = engine.generate([DiffusionRequest([], params(model, seed=1, max_denoising_steps=1), 20)])
    assert len(out[0]) == 20 and engine.slots.free_slots.numel() == 4096


class CachingSlots:
    """Wraps the offline engine's free list to behave like a prefix cache: releases are recorded."""

    def __init__(self, engine, caches: bool):
        self.slots, self.caches, self.released, self.events = engine.slots, caches, [], []
        engine.scheduler.kv = self

    @property
    def caches_prefixes(self):
        return self.caches

    def reserve(self, req, tokens, limit=None):
        self.events.append(("reserve", req))
        return self.slots.reserve(req, tokens, limit)

    def encoded(self, req):
        self.events.append(("encoded", req))

    def release(self, req, cache=True):
        self.released.append((req.context_len, list(req.output_ids)))
        self.slots.release(req, cache)


@pytest.mark.parametrize("max_new", [20, 40])
def test_last_canvas_is_committed_when_the_cache_keeps_it(model, max_new):
    """With a prefix cache, a finished request's kept tokens are encoded in one more forward before release, so
    the cache holds prompt + the whole answer; the answer itself is complete in the forward that finished it."""
    engine = OfflineEngine(model)
    rec = Recorder(engine)
    kv = CachingSlots(engine, caches=True)
    req = request(model, 12, max_new, seed=3, steps=1)
    engine.scheduler.add(req)
    outs = []
    while engine.scheduler.running:
        outs.append(engine.scheduler.step())
    finished_at = next(i for i, o in enumerate(outs) if o.finished)
    assert outs[finished_at].finished == [req] and len(req.output_ids) == max_new
    assert finished_at == len(outs) - 2  # one more forward, for the last commit only
    last = rec.batches[-1]
    assert [(s.kind, s.num_tokens) for s in last.segments] == [("commit", max_new - 32 * (max_new > 32))]
    assert last.input_ids.tolist() == req.output_ids[32 * (max_new > 32):]
    assert kv.released == [(12 + max_new, req.output_ids)]
    assert engine.slots.free_slots.numel() == 4096


def test_a_new_prompt_is_matched_after_the_last_commits_of_finished_answers(model):
    """The next turn may reach the scheduler before the answer's last canvas is encoded: its prompt is matched
    against the cache (its first reserve) only after that commit is published, one round later."""
    engine = OfflineEngine(model)
    rec = Recorder(engine)
    kv = CachingSlots(engine, caches=True)
    first = request(model, 12, 20, seed=3, steps=1)
    engine.scheduler.add(first)
    while not engine.scheduler.step().finished:
        pass
    follow_up = DiffusionRequest(first.prompt_ids + first.output_ids + [5, 6], params(model, seed=4), 8)
    engine.scheduler.add(follow_up)
    engine.scheduler.step()
    assert [s.kind for s in rec.batches[-1].segments] == ["commit"] and follow_up.slots is None
    while engine.scheduler.running:
        engine.scheduler.step()
    order = [(event, req is first) for event, req in kv.events]
    assert order.index(("reserve", False)) > len(order) - 1 - order[::-1].index(("encoded", True))
    assert len(follow_up.output_ids) == 8


def test_only_prompts_added_after_an_answer_wait_for_its_last_commit(model):
    """A prompt that was waiting before an answer was streamed cannot be that conversation's next turn: it starts in
    the round that encodes the answer's last canvas, while one added after the answer waits for that round. (Held back
    each time an answer finished, new prompts waited until a busy batch had drained.)"""
    engine = OfflineEngine(model, prefill_chunk=12)
    rec = Recorder(engine)
    CachingSlots(engine, caches=True)
    first, waiting = request(model, 12, 20, seed=3, steps=1), request(model, 9, 8, seed=4, steps=1)
    engine.scheduler.add(first)
    engine.scheduler.add(waiting)
    engine.scheduler.step()  # first: prefill (the whole budget) + its only canvas; waiting: held back by the budget
    assert first.finished and first.pending and waiting.slots is None
    later = request(model, 7, 8, seed=5, steps=1)
    engine.scheduler.add(later)
    engine.scheduler.step()
    assert [(s.kind, s.num_tokens) for s in rec.batches[-1].segments][:2] == [("commit", 20), ("prefill", 9)]
    assert waiting.slots is not None and later.slots is None
    while engine.scheduler.running:
        engine.scheduler.step()
    assert len(waiting.output_ids) == 8 and len(later.output_ids) == 8


def test_last_canvas_is_not_encoded_without_a_prefix_cache(model):
    """Without a cache to keep it, encoding the last canvas would be wasted: the request is freed at once."""
    engine = OfflineEngine(model)
    rec = Recorder(engine)
    kv = CachingSlots(engine, caches=False)
    engine.generate([request(model, 12, 20, seed=3, steps=1)])
    assert len(rec.batches) == 1 and kv.released == [(12, kv.released[0][1])]


def test_last_commit_yields_to_memory(model):
    """No room for the last canvas: the request is released with what is encoded instead of waiting for KV."""
    engine = OfflineEngine(model, num_slots=40)
    kv = CachingSlots(engine, caches=True)
    out = engine.generate([request(model, 30, 20, seed=3, steps=1)])
    assert len(out[0]) == 20 and kv.released == [(30, out[0])]
    assert engine.slots.free_slots.numel() == 40


@pytest.mark.parametrize("position", [0, 13, 31])
def test_offline_eos_anywhere_in_a_canvas_ends_the_request(model, position):
    """The offline stop rule ends a request on an EOS at the first, a middle and the last canvas position."""
    from sgl_diffusion.runtime.scheduler_policy import eos_sink

    req = request(model, 4, 96, seed=1)
    canvas = [7] * 32
    canvas[position] = 1
    kept, finished = eos_sink([1])(req, canvas)
    assert finished and kept == canvas[: position + 1]
    assert eos_sink([1])(req, [7] * 32) == ([7] * 32, False)


def test_a_retract_gives_the_kv_back_and_re_encodes_prompt_and_output(model):
    """CanvasScheduler.retract (a pause before new weights): every running request gives its KV back and keeps its
    output and current canvas; its next forward encodes prompt + output as one prefill, which rebuilds the KV it had
    (same weights: within rounding), and it goes on to its full length. An answered request whose last canvas was
    left to encode (a prefix cache keeps it) just leaves."""
    engine = OfflineEngine(model, num_slots=512)
    engine.slots.__class__ = type("CachingSlots", (FreeListSlots,), {"caches_prefixes": True})
    rec, policy, kv = Recorder(engine), engine.scheduler, engine.scheduler.runner.attn.kv
    a, answered = request(model, 12, 96, seed=3, steps=2), request(model, 5, 32, seed=4, steps=2)
    policy.add(a), policy.add(answered)
    while not answered.finished:  # its one canvas is committed (streamed), its encode is still to come
        policy.step()
    assert answered.pending and a.output_ids and a.pending == a.output_ids
    old_slots, output = a.slots.clone(), list(a.output_ids)
    old_k = [kv.k[i][old_slots].clone() for i in range(len(kv.k))]
    policy.retract()
    assert engine.slots.free_slots.numel() == 512 and policy.running == [a] and a.slots is None
    assert a.pending == a.prompt_ids + output and a.state is not None
    policy.step()
    prefill = rec.batches[-1].segments[0]
    assert (prefill.kind, prefill.num_tokens, prefill.start_pos) == ("prefill", 12 + len(output), 0)
    for layer, k in enumerate(old_k):
        torch.testing.assert_close(kv.k[layer][a.slots[: old_slots.numel()]], k, rtol=1e-4, atol=1e-5)
    while policy.running:
        policy.step()
    assert len(a.output_ids) == 96 and a.output_ids[: len(output)] == output
    assert engine.slots.free_slots.numel() == 512


# ---- chunked prefill (sglang's --chunked-prefill-size) --------------------------------------------------------------


def test_a_long_prompt_is_encoded_in_chunks_while_another_request_denoises(model):
    """With a prefill budget of 16 tokens a round, a 40-token prompt is encoded in chunks of 16, 16 and 8, each after
    the ones before it; the request already denoising takes a step in every one of those rounds, and the newcomer's
    canvas starts in the round of its last chunk, reading the whole prompt."""
    engine = OfflineEngine(model, prefill_chunk=16)
    rec = Recorder(engine)
    a = request(model, 10, 96, seed=1, steps=4)
    engine.scheduler.add(a)
    engine.scheduler.step()  # a: prefill + first canvas step
    b = request(model, 40, 32, seed=2, steps=2)
    engine.scheduler.add(b)
    for _ in range(3):
        engine.scheduler.step()
    rounds = rec.batches[1:4]
    for batch in rounds:  # a is the first running request: index 0 in every round
        assert any(s.kind == "canvas" and s.req_index == 0 for s in batch.segments)
    chunks = [[s for s in batch.segments if s.req_index == 1] for batch in rounds]
    assert [[(s.kind, s.start_pos, s.num_tokens) for s in segs] for segs in chunks] == [
        [("prefill", 0, 16)], [("prefill", 16, 16)], [("prefill", 32, 8), ("canvas", 40, 32)]]
    (first,), (second,), (third, canvas) = chunks
    assert torch.equal(second.prefix_slots, first.new_slots)
    assert torch.equal(third.prefix_slots, torch.cat([first.new_slots, second.new_slots]))
    assert torch.equal(canvas.prefix_slots, b.slots) and b.slots.numel() == 40
    assert [batch.input_ids[segs[0].offset : segs[0].offset + segs[0].num_tokens].tolist() for batch, segs in
            zip(rounds, chunks)] == [b.prompt_ids[:16], b.prompt_ids[16:32], b.prompt_ids[32:]]
    while engine.scheduler.running:
        engine.scheduler.step()
    assert len(a.output_ids) == 96 and len(b.output_ids) == 32 and engine.slots.free_slots.numel() == 4096


def test_the_prefill_budget_is_shared_first_come_first_served(model):
    """Two new prompts of 20 with a budget of 32 a round: the first is encoded whole and the second gets the 12 tokens
    left, then the rest of it; a third prompt behind them waits for the budget, not for KV."""
    engine = OfflineEngine(model, prefill_chunk=32)
    rec = Recorder(engine)
    reqs = [request(model, 20, 32, seed=s, steps=1) for s in (1, 2, 3)]
    for req in reqs:
        engine.scheduler.add(req)
    first = engine.scheduler.step()
    assert not first.starved and reqs[2].slots is None and reqs[2].pending == reqs[2].prompt_ids  # untouched
    engine.generate([])
    prefills = [[(s.start_pos, s.num_tokens) for s in batch.segments if s.kind == "prefill"] for batch in rec.batches]
    assert prefills[0] == [(0, 20), (0, 12)]
    assert prefills[1] == [(12, 8), (0, 20)] and sum(n for rnd in prefills for _, n in rnd) == 60
    assert [len(r.output_ids) for r in reqs] == [32, 32, 32]


def test_a_prompt_whose_next_chunk_waits_for_kv_is_not_overtaken(model):
    """A 300-token prompt's second chunk (128) waits for KV that others hold (here: slots taken out of the pool while
    an older request denoises); a 4-token prompt arriving then would fit beside it, headroom included, but waits
    behind it, first come first served, untouched. Once the KV comes back both are encoded, in order, and finish."""
    engine = OfflineEngine(model, num_slots=600, prefill_chunk=128)
    rec = Recorder(engine)
    older = request(model, 4, 32, seed=3, steps=8)
    long, short = request(model, 300, 32, seed=1, steps=1), request(model, 4, 32, seed=2, steps=1)
    engine.scheduler.add(older)
    engine.scheduler.step()  # its prefill and first step
    engine.scheduler.add(long)
    engine.scheduler.step()  # the long prompt's first chunk
    pool = engine.slots
    held, pool.free_slots = pool.free_slots[:368], pool.free_slots[368:]  # 100 free: 4 + 3 canvases fit, 128 not
    engine.scheduler.add(short)
    out = engine.scheduler.step()  # the older request's canvas runs; both prompts wait
    assert out.starved == [long, short] and not out.exhausted
    assert short.slots is None and short.pending == short.prompt_ids
    pool.free_slots = torch.cat([pool.free_slots, held])
    engine.generate([])
    prefills = [[(s.start_pos, s.num_tokens) for s in b.segments if s.kind == "prefill"] for b in rec.batches]
    assert prefills[:5] == [[(0, 4)], [(0, 128)], [], [(128, 128)], [(256, 44), (0, 4)]]
    assert [len(r.output_ids) for r in (older, long, short)] == [32, 32, 32] and pool.free_slots.numel() == 600


@pytest.mark.parametrize("canvas_step", [None, "eager"])  # the mixed forward; the graph-ready step's encode rounds
def test_chunked_prefill_writes_the_kv_of_a_whole_one(model, canvas_step):
    """Each chunk's queries attend causally to the chunks before it (in the cache) and to themselves: the prompt's
    K/V in every layer is the one a single prefill writes, up to rounding."""
    def prompt_kv(chunk):
        engine = OfflineEngine(model, prefill_chunk=chunk, canvas_step=canvas_step if chunk else None)
        req = request(model, 45, 0, seed=1)
        engine.scheduler.add(req)
        kv, slots = engine.scheduler.runner.attn.kv, []
        engine.scheduler.kv.release = lambda r, cache=True: slots.append(r.slots.clone())  # keep the rows written
        while engine.scheduler.running:
            engine.scheduler.step()
        return [torch.stack([k[slots[0]], v[slots[0]]]) for k, v in zip(kv.k, kv.v)]

    whole, chunked = prompt_kv(None), prompt_kv(16)
    assert [rel_err(b, a) < 1e-5 for a, b in zip(whole, chunked)] == [True] * len(whole)


def test_a_prefill_only_request_finishes_after_its_last_chunk(model):
    """max_new_tokens=0 (the DSL's prefix caching): finished once the whole prompt is encoded, not after its first
    chunk, with no canvas at all."""
    engine = OfflineEngine(model, prefill_chunk=16)
    rec = Recorder(engine)
    req = request(model, 40, 0, seed=5)
    engine.scheduler.add(req)
    finished_at, chunked = [], []
    while engine.scheduler.running:
        out = engine.scheduler.step()
        finished_at.append(bool(out.finished))
        chunked.append(out.chunked)
    assert finished_at == [False, False, True]
    assert chunked == [[req], [req], []]  # sglang's chunked_prefill stage: each chunk before the last
    assert [[(s.kind, s.num_tokens) for s in b.segments] for b in rec.batches] == [
        [("prefill", 16)], [("prefill", 16)], [("prefill", 8)]]
    assert engine.slots.free_slots.numel() == 4096


def test_a_request_retracted_between_chunks_encodes_its_prompt_again(model):
    """A retract (new weights coming) between two chunks gives the partial prompt's KV back; the request encodes its
    prompt from the start, in chunks again, and finishes with its whole output."""
    engine = OfflineEngine(model, prefill_chunk=16)
    rec = Recorder(engine)
    req = request(model, 40, 32, seed=2, steps=1)
    engine.scheduler.add(req)
    engine.scheduler.step()
    assert req.slots.numel() == 16 and len(req.pending) == 24
    engine.scheduler.retract()
    assert req.slots is None and req.pending == req.prompt_ids
    while engine.scheduler.running:
        engine.scheduler.step()
    prefills = [(s.start_pos, s.num_tokens) for b in rec.batches for s in b.segments if s.kind == "prefill"]
    assert prefills == [(0, 16), (0, 16), (16, 16), (32, 8)]
    assert len(req.output_ids) == 32 and engine.slots.free_slots.numel() == 4096


def test_prompts_with_scores_are_encoded_whole(model):
    """Prompt scores (logprob_start_len) run one-step canvases over every scored prefix after the prompt is encoded;
    they read the sliding window there, which a chunk's insertion into the radix cache gives back behind it, so such a
    prompt is encoded in one round whatever the budget."""
    engine = OfflineEngine(model, prefill_chunk=16)
    rec = Recorder(engine)
    req = DiffusionRequest(list(range(10, 50)), params(model, seed=0, max_denoising_steps=1), 0, logprobs=2,
                           score_from=30)
    engine.generate([req])
    assert [(s.kind, s.num_tokens) for s in rec.batches[0].segments][0] == ("prefill", 40)
    assert len(req.prompt_logprobs.token) == 40 - 30 - 1


def test_an_empty_prompt_commits_its_canvas_as_a_commit(model):
    """With nothing to prefill, the first canvas's commit is an ordinary commit beside the next canvas's first step,
    not a prompt chunked by the budget."""
    engine = OfflineEngine(model, prefill_chunk=8)
    rec = Recorder(engine)
    engine.generate([DiffusionRequest([], params(model, seed=1, max_denoising_steps=1), 64)])
    assert [[(s.kind, s.num_tokens) for s in b.segments] for b in rec.batches] == [
        [("canvas", 32)], [("commit", 32), ("canvas", 32)]]
