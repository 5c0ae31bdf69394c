"""Stop rules of a whole request, offline engine against the server's: EOS anywhere in a canvas, max_new_tokens
inside a canvas, and both in one canvas.

The model is the tiny checkpoint with its LM head replaced by a script, so each committed canvas is known. The
same script runs through the offline engine's ``eos_sink`` and through the server's ``DiffusionEngine._accept_canvas``
on a real sglang ``Req`` (sglang's own EOS and length checks); both must keep the same tokens and stop at the same
canvas.
"""

from types import MethodType, SimpleNamespace

import pytest
import torch
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, FINISH_MATCHED_TOKEN, Req
from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor
from sglang.srt.sampling.sampling_params import SamplingParams

from sgl_diffusion.runtime.offline import OfflineEngine
from sgl_diffusion.runtime.scheduler_hook import DiffusionEngine
from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
from sgl_diffusion.sampling.params import DiffusionParams

EOS = (1, 106)
PROMPT = list(range(10, 22))
THINK_END = [7, 8]  # the reasoning parser's end-of-thinking sequence, as sglang's model_config holds it


def result_processor():
    """sglang's own reasoning-token counter (SchedulerBatchResultProcessor), on a model config with THINK_END."""
    processor = SimpleNamespace(model_config=SimpleNamespace(think_end_ids=THINK_END, self_opened_think_start_ids=None))
    processor._maybe_update_reasoning_tokens = MethodType(
        SchedulerBatchResultProcessor._maybe_update_reasoning_tokens, processor)
    return processor


def canvases(model, eos_at: dict[int, list[tuple[int, int]]] | None = None, count: int = 4) -> list[list[int]]:
    """``count`` canvases of distinct non-EOS tokens; ``eos_at[k]`` puts (position, eos id) pairs into canvas k."""
    c = model.cfg.canvas_length
    out = [[200 + (k * c + i) % 250 for i in range(c)] for k in range(count)]
    for k, marks in (eos_at or {}).items():
        for position, token in marks:
            out[k][position] = token
    return out


class ScriptedHead:
    """Replaces ``model.logits``: canvas k's logits put all mass on script[k], so the step commits it."""

    def __init__(self, model, script):
        self.script, self.vocab, self.calls = script, model.cfg.vocab_size, 0

    def __call__(self, hidden):
        tokens = torch.tensor(self.script[self.calls])
        assert hidden.shape[0] == tokens.numel()  # one request, one canvas per step
        self.calls += 1
        logits = torch.full((tokens.numel(), self.vocab), -20.0)
        logits[torch.arange(tokens.numel()), tokens] = 20.0
        return logits


def params():
    return DiffusionParams(max_denoising_steps=1, entropy_bound=0.1, t_min=0.4, t_max=0.8,
                           confidence_threshold=0.005, stability_threshold=1, seed=0)


def run_offline(model, monkeypatch, script, max_new):
    head = ScriptedHead(model, script)
    monkeypatch.setattr(model, "logits", head)
    req = DiffusionRequest(list(PROMPT), params(), max_new)
    out = OfflineEngine(model, eos_token_ids=EOS).generate([req])[0]
    return out, head.calls


def run_server(model, monkeypatch, script, max_new, require_reasoning=False):
    """The same request through the server's stop rule: a sglang Req and DiffusionEngine._accept_canvas."""
    head = ScriptedHead(model, script)
    monkeypatch.setattr(model, "logits", head)
    sampling = SamplingParams(max_new_tokens=max_new)
    sampling.normalize(None)
    handle = Req("rid", "", list(PROMPT), sampling, eos_token_ids=set(EOS), vocab_size=model.cfg.vocab_size,
                 require_reasoning=require_reasoning)
    run_server.handle = handle
    server = SimpleNamespace(cfg=model.cfg, metrics=None,
                             scheduler=SimpleNamespace(model_config=SimpleNamespace(context_len=1 << 20),
                                                       batch_result_processor=result_processor()))
    engine = OfflineEngine(model, eos_token_ids=EOS)
    engine.scheduler.sink = lambda dreq, canvas: DiffusionEngine._accept_canvas(server, dreq, canvas)
    req = DiffusionRequest(list(PROMPT), params(), max_new, handle=handle)
    out = engine.generate([req])[0]
    assert handle.finished() and out == list(handle.output_ids)[: handle.finished_len or len(handle.output_ids)]
    return out, head.calls, handle.finished_reason


@pytest.mark.parametrize("canvas_index", [0, 1])
@pytest.mark.parametrize("position", [0, 13, 31])
def test_eos_at_first_middle_and_last_position_ends_the_request(model, monkeypatch, canvas_index, position):
    """An EOS at the first, a middle or the last position of a canvas ends the request there, EOS kept, after
    exactly that canvas; offline and server agree."""
    c = model.cfg.canvas_length
    script = canvases(model, {canvas_index: [(position, EOS[0])]})
    want = sum(script[:canvas_index], []) + script[canvas_index][: position + 1]
    offline = run_offline(model, monkeypatch, script, max_new=4 * c)
    server = run_server(model, monkeypatch, script, max_new=4 * c)
    assert offline == (want, canvas_index + 1)
    assert server[:2] == offline and isinstance(server[2], FINISH_MATCHED_TOKEN)


def test_the_first_of_several_eos_ids_wins(model, monkeypatch):
    script = canvases(model, {1: [(5, EOS[1]), (10, EOS[0])]})
    offline = run_offline(model, monkeypatch, script, max_new=200)
    assert offline == (script[0] + script[1][:6], 2)
    assert run_server(model, monkeypatch, script, max_new=200)[:2] == offline


@pytest.mark.parametrize("max_new", [1, 5, 31, 32, 40, 64, 70])
def test_max_new_tokens_inside_a_canvas_cuts_it(model, monkeypatch, max_new):
    """No EOS: the output is exactly max_new_tokens long, from ceil(max_new / C) canvases, wherever the limit falls
    in the last one; offline and server agree."""
    c = model.cfg.canvas_length
    script = canvases(model)
    offline = run_offline(model, monkeypatch, script, max_new)
    server = run_server(model, monkeypatch, script, max_new)
    assert offline == (sum(script, [])[:max_new], -(-max_new // c))
    assert server[:2] == offline and isinstance(server[2], FINISH_LENGTH)


@pytest.mark.parametrize("eos_position, want_len, reason", [(3, 36, FINISH_MATCHED_TOKEN), (20, 40, FINISH_LENGTH)])
def test_eos_and_max_new_tokens_in_the_same_canvas(model, monkeypatch, eos_position, want_len, reason):
    """max_new_tokens=40 ends inside canvas 2: an EOS before the limit wins; one after it is never reached."""
    script = canvases(model, {1: [(eos_position, EOS[0])]})
    offline = run_offline(model, monkeypatch, script, max_new=40)
    server = run_server(model, monkeypatch, script, max_new=40)
    assert offline == (sum(script, [])[:want_len], 2)
    assert server[:2] == offline and isinstance(server[2], reason)


def engine_without_scheduler(model, stream_output):
    """The server's round (DiffusionEngine.step) and its streaming, on the offline engine's policy, without a Scheduler
    process: (engine, sglang's metrics reporter, the profiler's calls, prefill and decode reports)."""
    engine = DiffusionEngine.__new__(DiffusionEngine)
    engine.cfg, engine.metrics, engine.drafts = model.cfg, None, None
    profiled, prefills, decodes = [], [], []
    reporter = SimpleNamespace(num_generated_tokens=0, forward_ct_decode=0, num_retracted_reqs=0, enable_metrics=False,
                               report_prefill_stats=lambda batch, stats, graphed: prefills.append(stats),
                               report_decode_stats=lambda graphed, running_batch, num_generated_tokens: decodes.append(
                                   (num_generated_tokens, len(running_batch.reqs))))  # fmt: skip
    engine.scheduler = SimpleNamespace(model_config=SimpleNamespace(context_len=1 << 20),
                                       batch_result_processor=result_processor(),
                                       output_streamer=SimpleNamespace(stream_output=stream_output),
                                       forward_ct=0, forward_sleep_time=None, metrics_reporter=reporter,
                                       new_token_ratio_tracker=SimpleNamespace(current=0.5),
                                       enable_priority_scheduling=False,
                                       kv_events_publisher=SimpleNamespace(publish_kv_events=lambda: None),
                                       profiler_manager=SimpleNamespace(_profile_batch_predicate=profiled.append))
    engine.policy = OfflineEngine(model, eos_token_ids=EOS).scheduler
    engine.policy.sink = engine._accept_canvas
    return engine, reporter, profiled, prefills, decodes


def test_the_server_streams_each_committed_canvas_whole(model, monkeypatch):
    """The server's round (DiffusionEngine.step) hands a request to sglang's streamer once per canvas it commits,
    with that whole canvas: 32, 64, then the last 6 of 70 tokens, finished. (The HTTP stream may merge chunks the
    client has not read yet, so the server tests cannot pin this down.)"""
    c = model.cfg.canvas_length
    monkeypatch.setattr(model, "logits", ScriptedHead(model, canvases(model)))
    sampling = SamplingParams(max_new_tokens=2 * c + 6, ignore_eos=True)
    sampling.normalize(None)
    handle = Req("rid", "", list(PROMPT), sampling, eos_token_ids=set(EOS), vocab_size=model.cfg.vocab_size)
    streamed = []

    def stream_output(reqs, return_logprob):
        streamed.extend((len(r.output_ids[: r.finished_len]), r.finished()) for r in reqs)

    engine, reporter, profiled, prefills, decodes = engine_without_scheduler(model, stream_output)
    engine.policy.add(DiffusionRequest(list(PROMPT), params(), 2 * c + 6, handle=handle))
    with torch.inference_mode():
        while engine.policy.running:
            engine.step()
    assert streamed == [(c, False), (2 * c, False), (2 * c + 6, True)]
    assert engine.scheduler.forward_ct == len(profiled) == 3  # each round counted and shown to the profiler
    # each round reported to sglang's metrics as a decode step with the tokens it committed (the request runs until
    # its last one), the first also as the prefill of one new prompt
    assert decodes == [(c, 1), (c, 1), (6, 0)] and reporter.num_generated_tokens == 2 * c + 6
    assert reporter.forward_ct_decode == 3
    assert [(p.num_new_seqs, p.log_input_tokens, p.log_hit_tokens) for p in prefills] == [(1, len(PROMPT), 0)]


def test_a_failed_round_answers_the_requests_it_had_finished(model, monkeypatch):
    """A round that fails aborts its requests with an error (DiffusionEngine.step), also one whose answer the round
    had already decided before the failure: it must still get its final chunk (it was dropped unanswered, and its
    client waited forever)."""
    c = model.cfg.canvas_length
    monkeypatch.setattr(model, "logits", lambda hidden: torch.nn.functional.one_hot(
        torch.full((hidden.shape[0],), EOS[0]), model.cfg.vocab_size).float() * 40)  # every canvas ends at once
    streamed = []
    engine, *_ = engine_without_scheduler(model, lambda reqs, return_logprob: streamed.extend(reqs))
    handles = []
    for rid in ("decided", "failing"):
        sampling = SamplingParams(max_new_tokens=c)
        sampling.normalize(None)
        handles.append(Req(rid, "", list(PROMPT), sampling, eos_token_ids=set(EOS), vocab_size=model.cfg.vocab_size))
        engine.policy.add(DiffusionRequest(list(PROMPT), params(), c, handle=handles[-1]))
    accept = engine.policy.sink

    def sink(dreq, canvas):
        if dreq.handle.rid == "failing":
            raise RuntimeError("a bug in the second request's commit")
        return accept(dreq, canvas)

    engine.policy.sink = sink
    with torch.inference_mode():
        engine.step()
    assert not engine.policy.running
    assert sorted(r.rid for r in streamed) == ["decided", "failing"]  # each got a final chunk, once
    assert all(r.finished() and r.finished_reason.to_json()["type"] == "abort" for r in streamed)


@pytest.mark.parametrize("end_at, eos_at, want", [
    ((1, 4), None, 32 + 6),  # thinking ends inside canvas 1, its end sequence counted
    ((0, 31), None, 33),  # ... across the boundary of canvases 0 and 1: the sequence's last token ends it
    (None, (1, 9), 32 + 10),  # never ends: every kept token counts, none of the canvas past the EOS
])
def test_reasoning_tokens_count_the_committed_thinking(model, monkeypatch, end_at, eos_at, want):
    """usage.reasoning_tokens: sglang counts a reasoning request's tokens up to the end of its thinking as they are
    accepted; here a canvas at a time, only what the request keeps (0 for every request until this stop)."""
    marks = {}
    if end_at is not None:
        k, i = end_at
        marks.setdefault(k, []).append((i, THINK_END[0]))
        marks.setdefault(k + (i + 1) // 32, []).append(((i + 1) % 32, THINK_END[1]))
    if eos_at is not None:
        marks.setdefault(eos_at[0], []).append((eos_at[1], EOS[0]))
    script = canvases(model, marks)
    run_server(model, monkeypatch, script, max_new=3 * 32, require_reasoning=True)
    assert run_server.handle.reasoning_tokens == want
    run_server(model, monkeypatch, script, max_new=3 * 32)  # a request without reasoning counts none
    assert run_server.handle.reasoning_tokens == 0


def _req_with_stops(tokenizer, stops, text, stop_token_ids=None):
    from sglang.srt.managers.schedule_batch import Req as SglangReq
    from sglang.srt.utils.hf_transformers.common import attach_additional_stop_token_ids

    attach_additional_stop_token_ids(tokenizer)  # as sglang's get_tokenizer gives the scheduler its tokenizer

    sampling = SamplingParams(max_new_tokens=64, stop=stops, stop_token_ids=stop_token_ids)
    sampling.normalize(tokenizer)
    req = SglangReq("rid", "", list(PROMPT), sampling, eos_token_ids=set(EOS), vocab_size=len(tokenizer))
    req.tokenizer = tokenizer
    canvas = tokenizer("x" + text, add_special_tokens=False)["input_ids"]
    req.output_ids.extend(canvas)
    return req, len(canvas)


@pytest.mark.parametrize("stops", [["B", "A"], ["A", "B"]])
def test_the_earliest_stop_string_of_a_canvas_ends_it(tiny_checkpoint_dir, stops):
    """Token by token "A" would end "x1A2B3" first; a canvas holds it all, and the order of the list must not
    matter (sglang takes the first listed string it finds)."""
    from transformers import AutoTokenizer

    from sgl_diffusion.runtime.scheduler_hook import _earliest_stop_first

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    req, n = _req_with_stops(tokenizer, stops, "1A2B3")
    with _earliest_stop_first(req, n):
        req.update_finish_state(new_accepted_len=n)
    assert req.finished_reason.matched == "A"
    assert tokenizer.decode(req.output_ids[: req.finished_len]).endswith("A")
    assert "B" not in tokenizer.decode(req.output_ids[: req.finished_len])
    assert req.sampling_params.stop_strs == stops  # the request's list is given back as it was


@pytest.mark.parametrize("stop_string, stop_token, want", [
    ("B", "A", "A"),  # the stop token comes first: token by token it ends the request there
    ("A", "B", "A"),  # the stop string comes first
    ("A", "A", "A"),  # both end on the same token: the string's finish, as sglang gives it
], ids=["token first", "string first", "same token"])
def test_the_earliest_of_stop_strings_and_stop_tokens_ends_a_canvas(tiny_checkpoint_dir, stop_string, stop_token,
                                                                    want):
    """In "x1A2B3" a stop token (stop_token_ids) and a stop string both occur: the earlier one ends the canvas, as
    it would token by token (sglang checks every string of the new tokens before any token)."""
    from sglang.srt.managers.schedule_batch import FINISH_MATCHED_STR
    from transformers import AutoTokenizer

    from sgl_diffusion.runtime.scheduler_hook import _earliest_stop_first

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    token_id = tokenizer(stop_token, add_special_tokens=False)["input_ids"]
    assert len(token_id) == 1
    req, n = _req_with_stops(tokenizer, [stop_string], "1A2B3", stop_token_ids=token_id)
    with _earliest_stop_first(req, n):
        req.update_finish_state(new_accepted_len=n)
    assert tokenizer.decode(req.output_ids[: req.finished_len]) == "x1" + want
    by_string = stop_string == want
    assert isinstance(req.finished_reason, FINISH_MATCHED_STR if by_string else FINISH_MATCHED_TOKEN)
    assert req.sampling_params.stop_strs == [stop_string]


def test_sglang_still_takes_the_first_listed_stop_string():
    """Why the reordering exists; when this fails, sglang matches the earliest string itself."""
    import inspect

    from sglang.srt.managers.schedule_batch import Req as SglangReq

    source = inspect.getsource(SglangReq._check_str_based_finish)
    assert "for stop_str in self.sampling_params.stop_strs:" in source and "return True" in source
    # and it looks for stop strings before stop tokens, over all the new tokens at once
    finish = inspect.getsource(SglangReq.update_finish_state)
    assert finish.index("self._check_str_based_finish(") < finish.index("self._check_token_based_finish(")
    assert "_locate_str_stop_finished_len" in source
