import asyncio
import inspect
from inspect import Parameter
from types import SimpleNamespace

import pytest

from srt_patches import memory_occupation

EMPTY = Parameter.empty
_M = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
# The wrappers take (obj, request) as sglang's HTTP handlers and Engine pass them, and read obj.tags.
EXPECTED_PARAMETERS = {
    f"{_M}.release_memory_occupation": [("self", EMPTY), ("obj", EMPTY), ("request", None)],
    f"{_M}.resume_memory_occupation": [("self", EMPTY), ("obj", EMPTY), ("request", None)],
}
DIFFUSION_HF = SimpleNamespace(architectures=["DiffusionGemmaForBlockDiffusion"])
OTHER_HF = SimpleNamespace(architectures=["LlamaForCausalLM"])


def test_targets_are_the_ones_checked():
    assert set(memory_occupation.TARGETS) == set(EXPECTED_PARAMETERS)


@pytest.mark.parametrize("target", memory_occupation.TARGETS)
def test_upstream_signature(target, upstream_parameters):
    """The upstream method still has exactly the parameters the wrapper relies on."""
    assert upstream_parameters(target) == EXPECTED_PARAMETERS[target]


@pytest.mark.parametrize("target", memory_occupation.TARGETS)
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
    monkeypatch.setattr(memory_occupation, "_device", lambda manager: manager.server_args.device)


def _release(manager, original, tags=None):
    return asyncio.run(memory_occupation.release_memory_occupation(original, manager, SimpleNamespace(tags=tags)))


def _resume(manager, original, tags=None):
    return asyncio.run(memory_occupation.resume_memory_occupation(original, manager, SimpleNamespace(tags=tags)))


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
