"""Answer memory-occupation requests a DiffusionGemma server cannot honour with a 400, not a dead scheduler.

Targets: sglang.srt.managers.tokenizer_manager.TokenizerManager.{release_memory_occupation, resume_memory_occupation}
Checked against: sglang 0.5.23
Why: the scheduler's handlers (SchedulerWeightUpdaterManager.{release,resume}_memory_occupation) cannot fail
     politely: their output carries no error, so they assert, and an assertion there ends the scheduler and the
     server. The release asserts an idle engine, then synchronizes ``torch.get_device_module()``, which is CUDA on
     any host; the resume removes each tag from the released set, a KeyError for one never released. So a CPU
     server died on the first call, and a GPU server on a release while canvases run or a resume without a
     release. Those requests are refused here, in the HTTP process, where a ValueError becomes a 400 naming the
     cause. (A release right after an ``in_place`` pause still reaches sglang's assertion: only the scheduler knows
     which paused requests hold KV.)
Remove when: sglang's handlers synchronize the server's device and answer a busy engine with an error.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
TARGETS = (f"{_MANAGER}.release_memory_occupation", f"{_MANAGER}.resume_memory_occupation")
_RELEASED = "_sgl_diffusion_released"  # manager attribute: the memory tags released and not resumed yet


async def release_memory_occupation(original, manager, obj, request=None):
    if _serves_diffusion(manager):
        _check_device(manager, "release")
        if not manager.is_pause and _requests_in_flight(manager):
            raise ValueError("release_memory_occupation needs an idle server: requests are running; pause them "
                             'first (/pause_generation with {"mode": "retract"} or "abort")')  # fmt: skip
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
