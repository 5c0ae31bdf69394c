import asyncio
import inspect
from inspect import Parameter
from types import SimpleNamespace

import pytest

from srt_patches import control_requests

EMPTY = Parameter.empty
_M = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
# The wrappers take (obj, request) as sglang's HTTP handlers and Engine pass them, and read obj.tags.
EXPECTED_PARAMETERS = {
    f"{_M}.release_memory_occupation": [("self", EMPTY), ("obj", EMPTY), ("request", None)],
    f"{_M}.resume_memory_occupation": [("self", EMPTY), ("obj", EMPTY), ("request", None)],
    f"{_M}.start_profile": [("self", EMPTY), ("req", None)],
    f"{_M}.start_expert_distribution_record": [("self", EMPTY)],
    f"{_M}.stop_expert_distribution_record": [("self", EMPTY)],
    f"{_M}.dump_expert_distribution_record": [("self", EMPTY)],
    f"{_M}.pause_generation": [("self", EMPTY), ("obj", EMPTY)],
}
DIFFUSION_HF = SimpleNamespace(architectures=["DiffusionGemmaForBlockDiffusion"])
OTHER_HF = SimpleNamespace(architectures=["LlamaForCausalLM"])


def test_targets_are_the_ones_checked():
    assert set(control_requests.TARGETS) == set(EXPECTED_PARAMETERS)


@pytest.mark.parametrize("target", control_requests.TARGETS)
def test_upstream_signature(target, upstream_parameters):
    """The upstream method still has exactly the parameters the wrapper relies on."""
    assert upstream_parameters(target) == EXPECTED_PARAMETERS[target]


@pytest.mark.parametrize("target", control_requests.TARGETS)
def test_installed(target, applied):
    """apply() leaves our wrapper on the target."""
    assert applied.is_installed(target)


def test_the_scheduler_handlers_still_fail_by_assertion():
    """Why the patch exists (its "Remove when"): the scheduler's handlers end the process instead of answering an
    error. When sglang changes that, the refusals here may be dropped."""
    from sglang.srt.managers.io_struct import ReleaseMemoryOccupationReqOutput
    from sglang.srt.managers.scheduler_components.weight_updater import SchedulerWeightUpdaterManager

    release = inspect.getsource(SchedulerWeightUpdaterManager.release_memory_occupation)
    assert "assert self.is_fully_idle(" in release
    assert "torch.get_device_module().synchronize()" in release  # no device argument: CUDA on any host
    assert "self.offload_tags.remove(tag)" in inspect.getsource(SchedulerWeightUpdaterManager.resume_memory_occupation)
    assert set(ReleaseMemoryOccupationReqOutput.__struct_fields__) <= {"rid", "http_worker_ipc"}  # no error field


class Original:
    def __init__(self):
        self.calls = []

    async def __call__(self, manager, obj, request=None):
        self.calls.append(obj.tags)
        return "done"


def _manager(device="cuda", hf=DIFFUSION_HF, in_flight=(), paused=False):
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf), server_args=SimpleNamespace(device=device),
                           rid_to_state=dict.fromkeys(in_flight), is_pause=paused)  # fmt: skip


@pytest.fixture(autouse=True)
def device_from_server_args(monkeypatch):
    monkeypatch.setattr(control_requests, "_device", lambda manager: manager.server_args.device)


def _release(manager, original, tags=None):
    return asyncio.run(control_requests.release_memory_occupation(original, manager, SimpleNamespace(tags=tags)))


def _resume(manager, original, tags=None):
    return asyncio.run(control_requests.resume_memory_occupation(original, manager, SimpleNamespace(tags=tags)))


def test_a_cpu_server_refuses_both_without_reaching_the_scheduler():
    original = Original()
    for call in (_release, _resume):
        with pytest.raises(ValueError, match="this server runs on cpu"):
            call(_manager("cpu"), original)
    assert original.calls == []


def test_a_release_while_requests_run_is_refused_unless_paused():
    original = Original()
    with pytest.raises(ValueError, match="requests are running"):
        _release(_manager(in_flight=["r1"]), original)
    assert original.calls == []
    # health probes are requests too, but never a reason to refuse; a paused server's requests are the caller's choice
    assert _release(_manager(in_flight=["HEALTH_CHECK_1"]), original) == "done"
    assert _release(_manager(in_flight=["r1"], paused=True), original) == "done"
    assert original.calls == [None, None]


@pytest.mark.parametrize("mode, refused", [("in_place", True), ("retract", False), ("abort", False)])
def test_a_release_after_an_in_place_pause_is_refused(mode, refused):
    """An in_place pause keeps the requests' KV (sglang's handler would assert an idle engine and stop the server);
    retract and abort give it back."""
    manager, original = _manager(in_flight=["r1"]), Original()

    async def pause(manager, obj):
        manager.is_pause = True

    asyncio.run(control_requests.pause_generation(pause, manager, SimpleNamespace(mode=mode)))
    if refused:
        with pytest.raises(ValueError, match="requests are paused in place, and keep their KV"):
            _release(manager, original)
        assert original.calls == []
        manager.rid_to_state = {}  # the requests finished or were aborted: nothing holds KV
    assert _release(manager, original) == "done"


def test_a_resume_needs_the_tags_released_before():
    manager, original = _manager(), Original()
    with pytest.raises(ValueError, match="kv_cache, weights, cuda_graph not released"):
        _resume(manager, original)
    _release(manager, original, ["kv_cache"])
    with pytest.raises(ValueError, match="weights not released"):
        _resume(manager, original, ["kv_cache", "weights"])
    assert _resume(manager, original, ["kv_cache"]) == "done"
    with pytest.raises(ValueError, match="kv_cache not released"):
        _resume(manager, original, ["kv_cache"])  # resumed already
    _release(manager, original)  # no tags: all of them, as sglang reads it
    assert _resume(manager, original, ["weights", "cuda_graph", "kv_cache"]) == "done"
    assert original.calls == [["kv_cache"], ["kv_cache"], None, ["weights", "cuda_graph", "kv_cache"]]


def test_other_models_go_to_sglang_unchanged():
    original = Original()
    manager = _manager("cpu", OTHER_HF, in_flight=["r1"])
    assert _release(manager, original) == "done"
    assert _resume(manager, original, ["kv_cache"]) == "done"
    assert original.calls == [None, ["kv_cache"]]


def test_the_profiler_and_expert_recorder_still_raise_in_the_scheduler():
    """Why the profile and expert-distribution refusals exist: the scheduler's profiler catches only a RuntimeError
    from torch, which raises an AssertionError when none of its activities is supported; the recorder without a
    mode raises for start, stop and dump."""
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder
    from sglang.srt.managers.scheduler_components.profiler_manager import SchedulerProfilerManager

    start = inspect.getsource(SchedulerProfilerManager._start_profile)
    assert "except RuntimeError" in start and "except Exception" not in start and "except AssertionError" not in start
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(AssertionError, match="No activities"):  # torch leaves CUDA out: nothing is left
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]).start()
    recorder = ExpertDistributionRecorder()
    for record in (recorder.start_record, recorder.stop_record, recorder.dump_record):
        with pytest.raises(Exception, match="expert_distribution_recorder_mode"):
            record()


async def _profiled(manager, req=None):
    return ("started", req)


def _start_profile(manager, activities):
    return asyncio.run(control_requests.start_profile(_profiled, manager, SimpleNamespace(activities=activities)))


@pytest.mark.parametrize("activities", [["GPU"], ["CPU", "MEM"], ["CPU", "CUDA_PROFILER"], ["RPD"], [], ["cpu"]])
def test_a_cpu_server_profiles_cpu_activity_only(activities):
    from fastapi import HTTPException

    with pytest.raises(HTTPException, match="records CPU activity only") as refused:
        _start_profile(_manager("cpu"), activities)
    assert refused.value.status_code == 400


@pytest.mark.parametrize("activities", [None, ["CPU"], ["CPU", "GPU"]])  # None: sglang's default, CPU and GPU
def test_a_cpu_server_starts_a_cpu_profile(activities):
    assert _start_profile(_manager("cpu"), activities)[0] == "started"


def test_a_cuda_server_or_another_model_profiles_as_sglang_does():
    assert _start_profile(_manager("cuda"), ["GPU", "MEM"])[0] == "started"
    assert _start_profile(_manager("cpu", OTHER_HF), ["GPU"])[0] == "started"
    assert asyncio.run(control_requests.start_profile(_profiled, _manager("cpu")))[0] == "started"  # no request


@pytest.mark.parametrize("target", control_requests.TARGETS[3:6])
def test_expert_distribution_requests_are_refused_for_diffusion_gemma_only(target, resolve):
    from fastapi import HTTPException

    verb = target.rpartition(".")[2].split("_")[0]
    wrapper = resolve(target).__closure__  # the installed hook is this verb's
    hook = next(c.cell_contents for c in wrapper if getattr(c.cell_contents, "__module__", "") ==
                "srt_patches.control_requests")  # fmt: skip
    calls = []

    async def original(manager):
        calls.append(manager)

    with pytest.raises(HTTPException, match=f"/{verb}_expert_distribution_record: DiffusionGemma") as refused:
        asyncio.run(hook(original, _manager("cuda")))
    assert refused.value.status_code == 400 and calls == []
    other = _manager("cuda", OTHER_HF)
    asyncio.run(hook(original, other))
    assert calls == [other]
