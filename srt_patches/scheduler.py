"""Run the canvas engine inside sglang's Scheduler process.

Target: sglang.srt.managers.scheduler._dispatch_event_loop_once,
        sglang.srt.managers.scheduler.Scheduler.{collect_inflight_reqs, is_fully_idle, pause_generation}
Checked against: sglang 0.5.23
Why: the scheduler has no hook for a model that generates canvases instead of tokens; its dLLM path
     runs homogeneous rounds (see DESIGN.md). We keep its intake, Req lifecycle, pools and streamer
     and replace the batch loop. Our in-flight requests must be visible to aborts and idle checks, and a
     pause that retracts (before a weight update) must retract them too.
Remove when: sglang grows a pluggable batch loop.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

_SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
TARGETS = (
    "sglang.srt.managers.scheduler._dispatch_event_loop_once",
    f"{_SCHEDULER}.collect_inflight_reqs",
    f"{_SCHEDULER}.is_fully_idle",
    f"{_SCHEDULER}.pause_generation",
)


def _serves_diffusion(scheduler) -> bool:
    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    return serves_diffusion_model(scheduler.model_config.hf_config)


def event_loop(original, scheduler, *args, **kwargs):
    """Picks sglang's loop for other models; for DiffusionGemma, ours (every variant of sglang's
    loop, overlap included, is replaced: the canvas loop has its own overlap knob)."""
    if not _serves_diffusion(scheduler):
        return original(scheduler, *args, **kwargs)
    from sgl_diffusion.runtime.scheduler_hook import check_supported, run_event_loop

    check_supported(scheduler)
    return run_event_loop(scheduler)


def collect_inflight_reqs(original, scheduler, *args, **kwargs):
    reqs = original(scheduler, *args, **kwargs)
    engine = getattr(scheduler, "diffusion_engine", None)
    return reqs | set(engine.reqs) if engine is not None else reqs


def is_fully_idle(original, scheduler, for_health_check=False, ignore_waiting=False):
    """sglang's check, and ours: no canvas work, or (``ignore_waiting``: a paused flush) none that holds KV."""
    if not original(scheduler, for_health_check, ignore_waiting):
        return False
    engine = getattr(scheduler, "diffusion_engine", None)
    return engine is None or not engine.has_work() or (ignore_waiting and not engine.policy.holds_kv())


def pause_generation(original, scheduler, recv_req):
    """sglang's pause; a "retract" pause also gives back our requests' KV, as sglang's retracts its batch's: they
    re-encode prompt + output after the pause, under the weights then loaded, and the flush after an update can run."""
    original(scheduler, recv_req)
    engine = getattr(scheduler, "diffusion_engine", None)
    if engine is not None and recv_req.mode == "retract":
        engine.policy.retract()


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(event_loop)
    plugin_hook(TARGETS[1], HookType.AROUND)(collect_inflight_reqs)
    plugin_hook(TARGETS[2], HookType.AROUND)(is_fully_idle)
    plugin_hook(TARGETS[3], HookType.AROUND)(pause_generation)
