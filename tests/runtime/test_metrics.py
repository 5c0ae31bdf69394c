"""runtime/metrics.py's report_round: what it hands sglang's metrics reporter, and the reporter's signatures it uses."""

import inspect
from types import SimpleNamespace

import pytest
from sglang.srt.managers.scheduler_components.metrics_reporter import SchedulerMetricsReporter
from sglang.srt.observability.metrics_collector import SchedulerMetricsCollector

from sgl_diffusion.runtime.metrics import report_round
from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest, StepOutput


def parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_sglang_reporter_signatures_as_report_round_calls_them():
    """report_round calls these positionally or by these names (sglang 0.5.23)."""
    assert parameters(SchedulerMetricsReporter.report_prefill_stats)[:4] == [
        "self", "batch", "prefill_stats", "can_run_cuda_graph"]
    assert parameters(SchedulerMetricsReporter.report_decode_stats)[:4] == [
        "self", "can_run_cuda_graph", "running_batch", "num_generated_tokens"]
    assert parameters(SchedulerMetricsCollector.increment_retracted_reqs) == [
        "self", "num_retracted_reqs", "num_retracted_input_tokens", "num_retracted_output_tokens"]
    assert parameters(SchedulerMetricsCollector.increment_decode_cuda_graph_pass) == ["self", "value"]


class Recorder:
    """Records every call made on it (and on the attributes it hands out)."""

    def __init__(self, name="", calls=None):
        self.name, self.calls = name, [] if calls is None else calls

    def __getattr__(self, attr):
        return Recorder(f"{self.name}.{attr}".lstrip("."), self.calls)

    def __call__(self, *args, **kwargs):
        self.calls.append((self.name, args, kwargs))


def test_a_round_with_a_retraction_is_reported_as_sglang_reports_one():
    """A retracted request counts in sglang's retraction gauge and counters (prompt and output tokens); every round is
    a decode pass, and the round's KV events are published whatever the decode log interval."""
    calls = []
    collector = Recorder("collector", calls)
    reporter = SimpleNamespace(num_retracted_reqs=0, num_generated_tokens=0, forward_ct_decode=0, enable_metrics=True,
                               metrics_collector=collector, report_decode_stats=Recorder("decode", calls))
    scheduler = SimpleNamespace(metrics_reporter=reporter, kv_events_publisher=Recorder("kv", calls))
    victim = DiffusionRequest([1, 2, 3, 4], None, 64)
    victim.output_ids = [5] * 32
    report_round(scheduler, StepOutput([], [], retracted=[victim]), running=[], graphed=False)
    assert reporter.num_retracted_reqs == 1 and reporter.forward_ct_decode == 1
    assert [name for name, _, _ in calls] == [
        "collector.increment_retracted_reqs", "collector.increment_decode_cuda_graph_pass", "decode",
        "kv.publish_kv_events"]
    assert calls[0][2] == {"num_retracted_reqs": 1, "num_retracted_input_tokens": 4, "num_retracted_output_tokens": 32}
    assert calls[1][2] == {"value": False}


def test_a_retracted_request_queues_again_until_its_re_encode():
    """sglang re-queues a retracted request: meta_info.queue_time (time_stats.queue_duration_s) counts its first wait
    and its wait for the re-encode, each until the round that begins encoding it."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sgl_diffusion.runtime.scheduler_hook import DiffusionEngine

    sampling = SamplingParams(max_new_tokens=8)
    sampling.normalize(None)
    dreq = DiffusionRequest([1, 2, 3], None, 8, handle=Req("rid", "", [1, 2, 3], sampling, vocab_size=100))
    stats = dreq.handle.time_stats
    engine = DiffusionEngine.__new__(DiffusionEngine)  # only its stamping, without a Scheduler process
    engine.policy = SimpleNamespace(running=[dreq])
    stats.set_wait_queue_entry_time(10.0)  # sglang's intake
    engine._stamp_stages(StepOutput([], [], started=[dreq]), round_start=12.0)
    assert stats.queue_duration_s == 2.0 and stats.prefill_finished_time > 0
    engine._stamp_stages(StepOutput([], [], retracted=[dreq]), round_start=0.0)
    engine._stamp_stages(StepOutput([], [], started=[dreq]), round_start=stats.wait_queue_entry_time + 5.0)
    assert stats.queue_duration_s == 7.0


def test_requests_held_for_kv_are_reported_in_the_waiting_queue():
    """sglang's reports read its waiting queue for the queue gauge and "#queue-req": while they run, the requests the
    canvas policy holds are in it, behind sglang's own; afterwards the queue is sglang's alone again."""
    seen = []
    reporter = SimpleNamespace(num_generated_tokens=0, forward_ct_decode=0, enable_metrics=False)
    scheduler = SimpleNamespace(metrics_reporter=reporter, kv_events_publisher=Recorder(), waiting_queue=["sglang's"])
    reporter.report_decode_stats = lambda graphed, running_batch, num_generated_tokens: seen.append(
        (running_batch.reqs, list(scheduler.waiting_queue)))
    waiting = scheduler.waiting_queue
    report_round(scheduler, StepOutput([], []), running=["running"], graphed=False, held=["held"])
    assert seen == [(["running"], ["sglang's", "held"])]
    assert scheduler.waiting_queue is waiting and waiting == ["sglang's"]


class AbortingPolicy:
    """One running request; its round fails (``fail``) or ends it as needing more KV than the pool holds."""

    def __init__(self, dreq, fail: bool):
        self.running, self.fail, self.runner = [dreq], fail, SimpleNamespace(canvas_step=None)
        self.device = "cpu"

    def step(self):
        if self.fail:
            raise RuntimeError("a device fault")
        return StepOutput([], [], exhausted=list(self.running))

    def abort(self, dreq, cache=True):
        self.running.remove(dreq)


def _aborting_engine(monkeypatch, fail: bool):
    """A DiffusionEngine whose one request is ended by its round; (engine, request, streamed, gauges)."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sgl_diffusion.runtime import scheduler_hook

    monkeypatch.setattr(scheduler_hook, "report_round", lambda *args, **kwargs: None)
    sampling = SamplingParams(max_new_tokens=8)
    sampling.normalize(None)
    dreq = DiffusionRequest([1, 2, 3], None, 8, handle=Req("rid", "", [1, 2, 3], sampling, vocab_size=100))
    dreq.state, dreq.grammar = object(), object()  # a canvas under a grammar
    streamed, gauges = [], []
    engine = scheduler_hook.DiffusionEngine.__new__(scheduler_hook.DiffusionEngine)
    engine.policy, engine.drafts = AbortingPolicy(dreq, fail), None
    engine.metrics = SimpleNamespace(in_flight=lambda *counts: gauges.append(counts), prefill_round=None)
    engine.scheduler = SimpleNamespace(
        forward_ct=0, forward_sleep_time=None, profiler_manager=SimpleNamespace(_profile_batch_predicate=lambda b: None),
        output_streamer=SimpleNamespace(stream_output=lambda reqs, logprob: streamed.extend(reqs)))  # fmt: skip
    return engine, dreq, streamed, gauges


@pytest.mark.parametrize("fail", [True, False], ids=["failed round", "KV exhausted"])
def test_a_round_that_aborts_its_requests_reports_them_gone(monkeypatch, fail):
    """The loop goes idle after such a round and runs no other to report the gauges: the round itself reports none
    in flight, or /metrics would show a canvas (and its grammar) until the next request came."""
    engine, dreq, streamed, gauges = _aborting_engine(monkeypatch, fail)
    engine.step()
    assert streamed == [dreq.handle] and dreq.handle.finished_reason.status_code == (500 if fail else 503)
    assert gauges and gauges[-1] == (0, 0)


def test_a_failed_round_ends_the_scheduler_only_when_the_device_fails_too(monkeypatch):
    """A failed round costs its requests (above). When the device then fails a one-element add too (a poisoned CUDA
    context), every later round would fail the same way while /health_generate still answered: the scheduler ends,
    as sglang's does on any failure, after answering the round's requests."""
    import torch

    from sgl_diffusion.runtime import scheduler_hook

    assert scheduler_hook.device_works(torch.device("cpu"))
    assert not scheduler_hook.device_works(torch.device("meta"))  # no data to read back: the check's failing path
    engine, dreq, streamed, _ = _aborting_engine(monkeypatch, fail=True)
    engine.policy.device = torch.device("meta")
    with pytest.raises(RuntimeError, match="ending the scheduler") as ended:
        engine.step()
    assert "a device fault" in str(ended.value.__cause__) and streamed == [dreq.handle]
