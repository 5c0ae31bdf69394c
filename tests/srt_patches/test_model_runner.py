"""srt_patches.model_runner: no token-decode CUDA graphs for DiffusionGemma."""

import contextlib
import inspect
from types import SimpleNamespace

import pytest

from srt_patches import model_runner


def test_upstream_signature(applied):
    """ModelRunner.init_cuda_graphs still takes (self, capture_decode_cuda_graph=True)."""
    from sglang.srt.model_executor.model_runner import ModelRunner

    params = list(inspect.signature(ModelRunner.init_cuda_graphs.__wrapped__).parameters.values())
    assert [(p.name, p.default) for p in params] == [("self", inspect.Parameter.empty), ("capture_decode_cuda_graph", True)]


@pytest.mark.parametrize("target", model_runner.TARGETS)
def test_installed(target, applied):
    """apply() leaves our wrapper on the target."""
    assert applied.is_installed(target)


def test_diffusion_model_skips_capture_other_models_do_not():
    """DiffusionGemma gets no graph runners and empty usage; other models run sglang's capture."""
    calls = []
    original = lambda runner, *a, **k: calls.append(runner)  # noqa: E731
    ours = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(architectures=["DiffusionGemmaForBlockDiffusion"])))
    model_runner.init_cuda_graphs(original, ours)
    assert calls == [] and ours.decode_cuda_graph_runner is None and ours.eager_runner is None
    assert not ours.decode_cuda_graph_captured and isinstance(ours.graph_memory_usage, dict)
    other = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"])))
    model_runner.init_cuda_graphs(original, other)
    assert calls == [other]


def test_cpu_tp_padding_keeps_diffusion_gemma_head_counts(applied, tiny_checkpoint_dir):
    """sglang's CPU padding for --tp 2 runs on DiffusionGemma's config (it raised AmbiguousGlobalPerLayerAttributeError
    on the top-level config): intermediate sizes are padded, head counts stay the checkpoint's (KV heads replicated)."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor import model_runner as upstream
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(model_path=str(tiny_checkpoint_dir), device="cpu", tp_size=2)
    model_config = ModelConfig.from_server_args(server_args)
    model_config = upstream.adjust_config_with_unaligned_cpu_tp(model_config, LoadConfig(), 2)
    text = model_config.hf_text_config
    assert (model_config.num_attention_heads, model_config.get_total_num_kv_heads()) == (4, 1)
    assert (text.swa_num_key_value_heads, getattr(text, "swa_num_attention_heads", None)) == (2, None)
    assert (text.moe_intermediate_size, text.intermediate_size) == (64, 128)  # 32 padded to 32 x TP
    assert (model_config.get_num_kv_heads(2), model_config.get_swa_num_kv_heads(2)) == (1, 1)  # the pool per rank


_UPDATE = model_runner.TARGETS[2]
DIFFUSION_HF = SimpleNamespace(architectures=["DiffusionGemmaForBlockDiffusion"])


def test_weight_update_signature_and_rollback_path(upstream_parameters):
    """WeightUpdater.update_weights_from_disk still takes (model_path, load_format, ...), and still points
    model_config at the new path before loading: its rollback then reads the new checkpoint (why the patch exists)."""
    from sglang.srt.model_executor.model_runner_components.weight_updater import WeightUpdater

    empty = inspect.Parameter.empty
    assert upstream_parameters(_UPDATE)[:3] == [("self", empty), ("model_path", empty), ("load_format", empty)]
    source = inspect.getsource(WeightUpdater.update_weights_from_disk.__wrapped__)
    assert source.index("self.model_config.model_path = model_path") < source.index("Rolling back to original weights")
    # and answers a checkpoint it cannot read with a failure, after pointing model_config at it
    assert source.index("self.model_config.model_path = model_path") < source.index("Failed to get weights iterator")


class FakeUpdate:
    """A fake original: loading from a path in ``bad`` raises (as sglang's failed rollback does); one in ``refused``
    answers a failure (as sglang does when it cannot read the checkpoint at all)."""

    def __init__(self, bad=(), refused=()):
        self.bad, self.refused, self.calls = set(bad), set(refused), []

    def __call__(self, updater, model_path, load_format, *args, **kwargs):
        self.calls.append((model_path, load_format))
        updater.model_config.model_path = model_path
        if model_path in self.bad:
            raise ValueError(f"{model_path}: checkpoint shape (397, 64) does not fit model (397, 128)")
        if model_path in self.refused:
            return False, "Failed to get weights iterator"
        return True, "Succeeded to update model weights."


def _updater(hf=DIFFUSION_HF, path="/served"):
    runner = SimpleNamespace(load_config=SimpleNamespace(load_format="auto"))
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf, model_path=path), get_model_runner=lambda: runner)


def test_a_failed_weight_update_rolls_back_from_the_served_path():
    updater = _updater()
    original = FakeUpdate(bad={"/new"})
    success, message = model_runner.update_weights_from_disk(original, updater, "/new", "safetensors")
    assert not success and "does not fit" in message and "Rolled back to /served" in message
    assert original.calls == [("/new", "safetensors"), ("/served", "auto")]
    assert updater.model_config.model_path == "/served"


def test_a_weight_update_that_loads_or_fails_politely_is_sglangs_answer():
    updater = _updater()
    original = FakeUpdate()
    answer = model_runner.update_weights_from_disk(original, updater, "/new", "auto")
    assert answer == (True, "Succeeded to update model weights.")
    assert original.calls == [("/new", "auto")]


def test_an_unreadable_checkpoint_leaves_the_served_path_for_the_next_rollback():
    """sglang answers a checkpoint it cannot read with a failure and keeps the weights: the served path stays
    theirs, so a later update that fails half-way rolls back to it, not to the unreadable one."""
    updater = _updater()
    original = FakeUpdate(bad={"/narrower"}, refused={"/typo"})
    assert model_runner.update_weights_from_disk(original, updater, "/typo", "auto") == (
        False, "Failed to get weights iterator")
    assert updater.model_config.model_path == "/served"
    success, message = model_runner.update_weights_from_disk(original, updater, "/narrower", "auto")
    assert not success and "Rolled back to /served" in message
    assert original.calls[-1] == ("/served", "auto") and updater.model_config.model_path == "/served"


def test_a_failed_rollback_still_raises_and_other_models_are_untouched():
    """Weights that neither checkpoint could restore must not be served: the scheduler still stops then."""
    updater = _updater()
    with pytest.raises(ValueError, match="/served: checkpoint shape"):
        model_runner.update_weights_from_disk(FakeUpdate(bad={"/new", "/served"}), updater, "/new", "auto")
    with pytest.raises(RuntimeError, match="rolling back to /served failed too: Failed to get weights iterator"):
        model_runner.update_weights_from_disk(FakeUpdate(bad={"/new"}, refused={"/served"}), updater, "/new", "auto")
    other = _updater(SimpleNamespace(architectures=["LlamaForCausalLM"]))
    with pytest.raises(ValueError, match="does not fit"):
        model_runner.update_weights_from_disk(FakeUpdate(bad={"/new"}), other, "/new", "auto")


_TENSOR, _DISTRIBUTED = model_runner.TARGETS[3], model_runner.TARGETS[4]


def test_partial_update_signatures(upstream_parameters):
    """The wrappers forward every argument; sglang still loads a tensor update through model.load_weights without
    catching its errors (why the tensor wrapper answers them), and catches them for a distributed one."""
    from sglang.srt.model_executor.model_runner_components.weight_updater import WeightUpdater

    empty = inspect.Parameter.empty
    assert upstream_parameters(_TENSOR) == [("self", empty), ("named_tensors", empty), ("load_format", None)]
    assert upstream_parameters(_DISTRIBUTED) == [("self", empty), ("named_tensors", empty)]
    tensor = inspect.getsource(WeightUpdater.update_weights_from_tensor.__wrapped__)
    assert "self.get_model().load_weights(named_tensors)" in tensor and "except" not in tensor
    assert "except Exception" in inspect.getsource(WeightUpdater.load_weights_from_distributed.__wrapped__)


class Model:
    accepts_partial_weights = False


def _tensor_updater(model):
    return SimpleNamespace(get_model=lambda: model)


def test_tensor_and_distributed_updates_load_partial_weights_then_stop_accepting_them():
    model, seen = Model(), []

    def original(updater, named_tensors, load_format=None):
        seen.append(updater.get_model().accepts_partial_weights)
        return True, "Success"

    updater = _tensor_updater(model)
    assert model_runner.update_weights_from_tensor(original, updater, [("w", None)]) == (True, "Success")
    assert model_runner.load_weights_from_distributed(original, updater, [("w", None)]) == (True, "Success")
    assert seen == [True, True] and model.accepts_partial_weights is False


def test_a_tensor_update_that_fails_answers_the_cause():
    model = Model()

    def original(updater, named_tensors, load_format=None):
        raise KeyError("unexpected DiffusionGemma checkpoint key: nope")

    success, message = model_runner.update_weights_from_tensor(original, _tensor_updater(model), [("nope", None)])
    assert not success and "unexpected DiffusionGemma checkpoint key: nope" in message
    assert model.accepts_partial_weights is False
    with pytest.raises(KeyError):  # sglang catches a distributed update's errors itself
        model_runner.load_weights_from_distributed(original, _tensor_updater(model), [])
    assert model.accepts_partial_weights is False


def test_other_models_update_as_sglang_does():
    other, calls = SimpleNamespace(), []

    def original(updater, *args):
        calls.append(args)
        raise ValueError("theirs")

    for wrapper in (model_runner.update_weights_from_tensor, model_runner.load_weights_from_distributed):
        with pytest.raises(ValueError, match="theirs"):
            wrapper(original, _tensor_updater(other), [("w", None)])
    assert len(calls) == 2 and not hasattr(other, "accepts_partial_weights")


_SCHEDULER_TENSOR, _INIT_GROUP, _SEND = model_runner.TARGETS[5:8]


def test_weight_transfer_signatures_and_why(upstream_parameters):
    """The scheduler unpickles a tensor update's payload outside any try, then meets the other ranks at a barrier;
    the exporter asserts its arguments and looks the send group up with []. (Why the wrappers exist.)"""
    from sglang.srt.managers.scheduler_components.weight_updater import SchedulerWeightUpdaterManager
    from sglang.srt.model_executor.model_runner_components.weight_exporter import WeightExporter

    empty = inspect.Parameter.empty
    assert upstream_parameters(_SCHEDULER_TENSOR) == [("self", empty), ("recv_req", empty)]
    assert upstream_parameters(_INIT_GROUP) == [
        ("self", empty), ("master_address", empty), ("ports", empty), ("group_rank", empty), ("world_size", empty),
        ("group_name", empty), ("backend", "nccl")]  # fmt: skip
    assert upstream_parameters(_SEND) == [("self", empty), ("master_address", empty), ("ports", empty),
                                          ("group_name", empty)]  # fmt: skip
    update = inspect.getsource(SchedulerWeightUpdaterManager.update_weights_from_tensor.__wrapped__)
    assert "self.tp_worker.deserialize_own_rank(" in update and "try:" not in update
    assert update.index("deserialize_own_rank") < update.index("torch.distributed.barrier(group=self.tp_cpu_group)")
    send = inspect.getsource(WeightExporter.send_weights_to_remote_instance.__wrapped__)
    assert "self._weights_send_group[group_name] is not None" in send and "assert len(ports_list)" in send


def _scheduler_updater(tp_worker):
    return SimpleNamespace(tp_worker=tp_worker, tp_cpu_group="tp-group", _session=object(),
                           _observe_weight_load=lambda source: contextlib.nullcontext())  # fmt: skip


@pytest.mark.parametrize("payload, cause", [(["aGVsbG8="], "UnpicklingError"), ([], "IndexError")])
def test_a_tensor_payload_that_cannot_be_read_answers_and_meets_the_barrier(upstream, monkeypatch, payload, cause):
    import torch
    from sglang.srt.utils import MultiprocessingSerializer

    barriers = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda group: barriers.append(group))
    tp_worker = SimpleNamespace(model_config=SimpleNamespace(hf_config=DIFFUSION_HF),
                                deserialize_own_rank=lambda p: MultiprocessingSerializer.deserialize(p[0]))  # fmt: skip
    recv_req = SimpleNamespace(serialized_named_tensors=payload, selector=None, load_format=None)
    out = model_runner.scheduler_update_weights_from_tensor(upstream(_SCHEDULER_TENSOR),
                                                            _scheduler_updater(tp_worker), recv_req)
    assert not out.success and cause in out.message and "per TP rank" in out.message
    assert barriers == ["tp-group"]  # once, as a rank that read its tensors


def test_a_readable_tensor_update_and_other_models_are_sglangs(monkeypatch):
    import torch

    barriers = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda group: barriers.append(group))

    def original(manager, recv_req):
        if manager.tp_worker.model_config.hf_config is not DIFFUSION_HF:
            raise ValueError("theirs")
        return "answered"

    ours = SimpleNamespace(tp_worker=SimpleNamespace(model_config=SimpleNamespace(hf_config=DIFFUSION_HF)))
    assert model_runner.scheduler_update_weights_from_tensor(original, ours, None) == "answered"
    other = SimpleNamespace(tp_worker=SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace())))
    with pytest.raises(ValueError, match="theirs"):
        model_runner.scheduler_update_weights_from_tensor(original, other, None)
    assert barriers == []


@pytest.fixture
def diffusion_model(monkeypatch):
    """model(device): a stand-in the exporter wrapper takes for DiffusionGemma, its parameters on ``device``."""
    import torch

    from sgl_diffusion.models import diffusion_gemma

    class Model(torch.nn.Module):
        def __init__(self, device):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, device=device))

    monkeypatch.setattr(diffusion_gemma, "DiffusionGemmaForBlockDiffusion", Model)
    return Model


def _exporter(model):
    from sglang.srt.model_executor.model_runner_components.weight_exporter import WeightExporter

    return WeightExporter(tp_rank=0, tp_size=1, gpu_id=0, get_model_path=lambda: "/served", get_model=lambda: model)


def test_remote_instance_weights_are_refused_on_a_cpu_server(upstream, diffusion_model):
    exporter = _exporter(diffusion_model("cpu"))
    assert model_runner.remote_instance_weights(upstream(_SEND), exporter, "127.0.0.1", "1", "g") == (
        False, "send_weights_to_remote_instance: weights go to a remote instance over NCCL; this server runs on cpu")
    success, message = model_runner.remote_instance_weights(upstream(_INIT_GROUP), exporter, "127.0.0.1", "1", 0, 2,
                                                            "g")  # fmt: skip
    assert not success and message.startswith("init_weights_send_group_for_remote_instance: ") and "cpu" in message


def test_bad_remote_instance_arguments_answer_instead_of_raising(upstream, diffusion_model, monkeypatch):
    import torch

    model = diffusion_model("cpu")
    monkeypatch.setattr(model_runner, "_parameter_device", lambda model: "cuda")  # past the refusal: sglang's checks
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    exporter = _exporter(model)
    assert model_runner.remote_instance_weights(upstream(_SEND), exporter, "127.0.0.1", "1", "g") == (
        False, "send_weights_to_remote_instance: no group named 'g_1_0' was set up "
        "(/init_weights_send_group_for_remote_instance first)")  # fmt: skip
    assert model_runner.remote_instance_weights(upstream(_SEND), exporter, "127.0.0.1", "1,2", "g") == (
        False, "send_weights_to_remote_instance: Expected 1 ports, but got 2 ports.")
    assert model_runner.remote_instance_weights(upstream(_INIT_GROUP), exporter, "127.0.0.1", "1,2", 0, 2, "g") == (
        False, "init_weights_send_group_for_remote_instance: Expected 1 ports, but got 2 ports.")
    other = _exporter(torch.nn.Linear(1, 1))
    with pytest.raises(KeyError):
        model_runner.remote_instance_weights(upstream(_SEND), other, "127.0.0.1", "1", "g")
