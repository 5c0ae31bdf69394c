"""Answer control requests a DiffusionGemma server cannot honour with a 400, not a dead scheduler.

The scheduler handles these requests in its event loop, and an exception there ends the scheduler and the server.
sglang's handlers below raise where they should answer an error (their outputs carry none, or their checks run in
the scheduler). The requests are refused here instead, in the HTTP process: a ValueError is a 400 in the memory
routes, which catch it; the profile and expert routes catch nothing, so they get an HTTPException(400).

Targets: sglang.srt.managers.tokenizer_manager.TokenizerManager.{release_memory_occupation, resume_memory_occupation,
         pause_generation}
Checked against: sglang 0.5.23
Why: their scheduler handlers (SchedulerWeightUpdaterManager.{release,resume}_memory_occupation) assert an idle
     engine, then synchronize ``torch.get_device_module()``, which is CUDA on any host; the resume removes each tag
     from the released set, a KeyError for one never released. So a CPU server died on the first call, and a GPU
     server on a release while canvases run or a resume without a release. A pause counts as idle only when it
     retracted or aborted the requests: after an ``in_place`` pause they keep their KV, so a release then is refused
     too (pause_generation is wrapped to note the mode).
Remove when: sglang's handlers synchronize the server's device and answer a busy engine with an error.

Target: sglang.srt.managers.tokenizer_manager.TokenizerManager.start_profile
Checked against: sglang 0.5.23
Why: the scheduler's SchedulerProfilerManager._start_profile only catches a RuntimeError from the torch profiler.
     On a host without CUDA, ``"activities": ["GPU"]`` leaves torch no activity it supports (AssertionError), and
     "MEM", "CUDA_PROFILER" and "RPD" call CUDA or ROCm tools; with ``start_step`` the failure comes later, in the
     canvas loop. A CPU server records CPU activity only: it refuses a list without "CPU" or with those three
     ("GPU" next to "CPU" is sglang's default, and torch leaves it out).
Remove when: sglang checks the activities against the device before starting the profiler.

Target: sglang.srt.managers.tokenizer_manager.TokenizerManager.{start,stop,dump}_expert_distribution_record
Checked against: sglang 0.5.23
Why: without ``--expert-distribution-recorder-mode`` sglang's recorder raises in the scheduler; with it a
     DiffusionGemma server does not start (the model gives sglang no expert-location config), so every call is
     refused for DiffusionGemma.
Remove when: sglang's recorder answers an error, or our model records its expert choices.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
TARGETS = (
    f"{_MANAGER}.release_memory_occupation", f"{_MANAGER}.resume_memory_occupation", f"{_MANAGER}.start_profile",
    f"{_MANAGER}.start_expert_distribution_record", f"{_MANAGER}.stop_expert_distribution_record",
    f"{_MANAGER}.dump_expert_distribution_record", f"{_MANAGER}.pause_generation",
)  # fmt: skip
CPU_PROFILE_ACTIVITIES = {"CPU", "GPU"}  # "GPU" is dropped by torch without CUDA; "CPU" must be there
_RELEASED = "_sgl_diffusion_released"  # manager attribute: the memory tags released and not resumed yet
_PAUSE_MODE = "_sgl_diffusion_pause_mode"  # manager attribute: the mode of the last /pause_generation


async def release_memory_occupation(original, manager, obj, request=None):
    if _serves_diffusion(manager):
        _check_device(manager, "release")
        holding_kv = not manager.is_pause or getattr(manager, _PAUSE_MODE, None) == "in_place"
        if holding_kv and _requests_in_flight(manager):
            state = "paused in place, and keep their KV" if manager.is_pause else "running"
            raise ValueError(f"release_memory_occupation needs an idle server: requests are {state}; pause them "
                             'with /pause_generation {"mode": "retract"} or "abort" first')  # fmt: skip
    result = await original(manager, obj, request)
    _released(manager).update(_tags(obj))
    return result


async def resume_memory_occupation(original, manager, obj, request=None):
    if _serves_diffusion(manager):
        _check_device(manager, "resume")
        if missing := [tag for tag in _tags(obj) if tag not in _released(manager)]:
            raise ValueError(f"resume_memory_occupation: {', '.join(missing)} not released "
                             "(/release_memory_occupation first)")  # fmt: skip
    result = await original(manager, obj, request)
    _released(manager).difference_update(_tags(obj))
    return result


async def start_profile(original, manager, req=None):
    activities = getattr(req, "activities", None)
    if activities is not None and _serves_diffusion(manager) and (device := _device(manager)) != "cuda":
        if "CPU" not in activities or not CPU_PROFILE_ACTIVITIES.issuperset(activities):
            _bad_request(f"this server runs on {device}: its profiler records CPU activity only; send "
                         f'"activities": ["CPU"] (got {activities})')  # fmt: skip
    return await original(manager, req)


async def pause_generation(original, manager, obj):
    setattr(manager, _PAUSE_MODE, obj.mode)
    return await original(manager, obj)


def _expert_distribution_record(verb: str):
    async def wrapper(original, manager):
        if _serves_diffusion(manager):
            _bad_request(f"/{verb}_expert_distribution_record: DiffusionGemma's engine does not record expert "
                         "distributions (sglang's recorder has no expert-location config for the model)")  # fmt: skip
        return await original(manager)

    wrapper.__name__ = f"{verb}_expert_distribution_record"
    return wrapper


def _bad_request(message: str):
    from fastapi import HTTPException

    raise HTTPException(status_code=400, detail=message)


def _serves_diffusion(manager) -> bool:
    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    return serves_diffusion_model(manager.model_config.hf_config)


def _check_device(manager, verb: str) -> None:
    if (device := _device(manager)) != "cuda":
        raise ValueError(f"{verb}_memory_occupation frees and restores GPU memory (sglang's torch_memory_saver); "
                         f"this server runs on {device}")  # fmt: skip


def _device(manager) -> str:
    from sglang.srt.arg_groups.model_override_base import resolving_view

    return resolving_view(manager.server_args).device  # NOTE: server_args.device is None unless given


def _requests_in_flight(manager) -> bool:
    from sglang.srt.constants import HEALTH_CHECK_RID_PREFIX

    return any(not str(rid).startswith(HEALTH_CHECK_RID_PREFIX) for rid in manager.rid_to_state)


def _tags(obj) -> list[str]:
    from sglang.srt.constants import GPU_MEMORY_ALL_TYPES

    return list(obj.tags) if obj.tags else list(GPU_MEMORY_ALL_TYPES)  # sglang's reading: none given means all


def _released(manager) -> set[str]:
    if not hasattr(manager, _RELEASED):
        setattr(manager, _RELEASED, set())
    return getattr(manager, _RELEASED)


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(release_memory_occupation)
    plugin_hook(TARGETS[1], HookType.AROUND)(resume_memory_occupation)
    plugin_hook(TARGETS[2], HookType.AROUND)(start_profile)
    for target, verb in zip(TARGETS[3:6], ("start", "stop", "dump")):
        plugin_hook(target, HookType.AROUND)(_expert_distribution_record(verb))
    plugin_hook(TARGETS[6], HookType.AROUND)(pause_generation)
