"""Prometheus metrics of the canvas engine, exported on sglang's /metrics (``--enable-metrics``).

Created in the scheduler process; sglang's multiprocess collector merges them with its own.
"""

from __future__ import annotations


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
