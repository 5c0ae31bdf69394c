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
