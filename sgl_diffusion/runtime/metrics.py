"""Prometheus metrics of the canvas engine, exported on sglang's /metrics (``--enable-metrics``).

Created in the scheduler process; sglang's multiprocess collector merges them with its own.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass


class DiffusionMetrics:
    def __init__(self, labels: dict[str, str]):
        from prometheus_client import Counter, Gauge, Histogram

        names = list(labels)
        self.labels = labels
        self.steps_per_canvas = Histogram(
            "sglang:diffusion_steps_per_canvas", "Denoise steps a committed canvas took.", names,
            buckets=(1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 96, 128),
        )
        self.tokens_per_forward = Histogram(
            "sglang:diffusion_tokens_per_forward", "Kept tokens of a canvas per denoise forward it took.", names,
            buckets=(0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.accepted_per_step = Histogram(
            "sglang:diffusion_accepted_tokens_per_step", "Canvas positions the sampler accepted, per step.", names,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.canvases_in_flight = Gauge(
            "sglang:diffusion_canvases_in_flight", "Canvases being denoised.", names, multiprocess_mode="mostrecent"
        )
        self.canvases = Counter("sglang:diffusion_canvases_total", "Committed canvases.", names)
        self.prefill_tokens_per_round = Histogram(
            "sglang:diffusion_prefill_tokens_per_round",
            "Prompt tokens a forward round encoded, over its requests (--chunked-prefill-size bounds them).", names,
            buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536),
        )
        self.grammars_in_flight = Gauge(
            "sglang:diffusion_grammars_in_flight", "Grammar matchers held by running requests.", names,
            multiprocess_mode="mostrecent",
        )

    def canvas_done(self, steps: int, kept_tokens: int, accepted_per_step: float) -> None:
        self.steps_per_canvas.labels(**self.labels).observe(steps)
        self.tokens_per_forward.labels(**self.labels).observe(kept_tokens / max(steps, 1))
        self.accepted_per_step.labels(**self.labels).observe(accepted_per_step)
        self.canvases.labels(**self.labels).inc()

    def prefill_round(self, tokens: int) -> None:
        self.prefill_tokens_per_round.labels(**self.labels).observe(tokens)

    def in_flight(self, canvases: int, grammars: int) -> None:
        self.canvases_in_flight.labels(**self.labels).set(canvases)
        self.grammars_in_flight.labels(**self.labels).set(grammars)


@dataclass
class _RoundBatch:
    """What sglang's decode report reads of a running batch (ScheduleBatch's fields): the canvas loop has none."""

    reqs: list
    forward_iter: int | None = None
    dp_cooperation_info: object = None
    seq_lens_cpu: object = None  # None: the report sums each Req's seqlen


def report_round(scheduler, out, running: list, graphed: bool, held: list = ()) -> None:
    """Report a forward round to sglang's scheduler metrics, as its prefill and decode result processors report a
    batch: its "Prefill batch" and "Decode batch" log lines, its gauges on /metrics (running and queued requests,
    token usage, generation throughput, cache hit rate), its realtime token, graph-pass and retraction counters, and
    its KV events (--kv-events-config; every round, as a cache-aware router needs them). A round counts as one decode
    step, whose generated tokens are the ones its committed canvases kept; a retracted request's re-encode, as
    sglang's reprocessed prefill (left out of its effective prefill counters). ``out``: the round's StepOutput;
    ``running``: the Reqs holding KV; ``held``: the Reqs the canvas policy holds until KV or the round's prefill
    budget lets them start, queued as sglang's waiting queue would hold them; ``graphed``: whether rounds run as
    graphs (--enable-torch-compile)."""
    from sglang.srt.managers.scheduler_components.metrics_reporter import PrefillStats
    from sglang.srt.observability.metrics_collector import QueueCount

    reporter = scheduler.metrics_reporter
    if out.retracted:  # as sglang's decode retraction reports them
        reporter.num_retracted_reqs += len(out.retracted)
        if reporter.enable_metrics:
            reporter.metrics_collector.increment_retracted_reqs(
                num_retracted_reqs=len(out.retracted),
                num_retracted_input_tokens=sum(len(req.prompt_ids) for req in out.retracted),
                num_retracted_output_tokens=sum(len(req.output_ids) for req in out.retracted))
    with _queued_with(scheduler, held):
        if out.started or out.prefill_tokens:
            joining = {id(dreq.handle) for dreq in out.started}
            before = [req for req in running if id(req) not in joining]  # sglang counts the batch the new ones join
            stats = PrefillStats(
                log_input_tokens=out.prefill_tokens, log_hit_tokens=out.cached_tokens,
                reprocessed_log_input_tokens=out.reencoded_tokens,
                reprocessed_log_hit_tokens=out.reencoded_cached_tokens,
                log_device_hit_tokens=out.cached_tokens - out.reencoded_cached_tokens,
                new_token_ratio=scheduler.new_token_ratio_tracker.current,
                num_running_reqs=QueueCount.from_reqs(before, scheduler.enable_priority_scheduling),
                num_new_seqs=len(out.started),
            )  # fmt: skip
            reporter.report_prefill_stats(None, stats, graphed)
        generated = sum(len(kept) for _, kept in out.committed)
        reporter.num_generated_tokens += generated
        reporter.forward_ct_decode = (reporter.forward_ct_decode + 1) % (1 << 30)  # as sglang wraps it
        if reporter.enable_metrics:
            reporter.metrics_collector.increment_decode_cuda_graph_pass(value=graphed)
        reporter.report_decode_stats(graphed, running_batch=_RoundBatch(running), num_generated_tokens=generated)
    # the decode report publishes every --decode-log-interval rounds only; a router wants each round's blocks (a
    # conversation's next turn follows the answer's last commit)
    scheduler.kv_events_publisher.publish_kv_events()


@contextmanager
def _queued_with(scheduler, held):
    """sglang's waiting queue plus ``held`` while a report reads it: its queue gauge, "#queue-req" and queued-request
    figures count the waiting queue alone."""
    if not held:
        yield
        return
    waiting = scheduler.waiting_queue
    scheduler.waiting_queue = [*waiting, *held]
    try:
        yield
    finally:
        scheduler.waiting_queue = waiting
