"""srt_patches.model_runner: no token-decode CUDA graphs for DiffusionGemma."""

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
