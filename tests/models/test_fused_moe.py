"""The CUDA routed-expert path (sglang's Triton fused MoE), checked on CPU around a stand-in kernel.

The kernel itself needs CUDA; these tests check what runs before it: that sglang's runtime-config reads succeed in
a bare process (no server published anything) and leak nothing, that a server's published config wins, that the
call is built with the right weights, dtypes and activation, and that float32 never reaches the kernel.
"""

from types import SimpleNamespace

import pytest
import torch
from sglang.srt import runtime_context
from sglang.srt.distributed.device_communicators.pynccl_allocator import use_symmetric_memory
from sglang.srt.layers.dp_attention import is_allocation_symmetric
from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe as sglang_fused_moe
from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config import get_default_config
from sglang.srt.server_args import ServerArgs

from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_model
from sgl_diffusion.models import fused_moe
from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
from sgl_diffusion.models.layers import Experts
from tests.models.test_parity import our_kv, prefill, prompt_ids


def runtime_reads():
    """The process-wide reads sglang 0.5.23's fused_experts_impl makes before and around its kernels."""
    exec_config = runtime_context.get_exec()
    with use_symmetric_memory(runtime_context.get_parallel().tp_group, disabled=not is_allocation_symmetric()):
        pass
    get_default_config(16, 4, 64, 64, 2, None, False)
    return exec_config.moe.enable_fused_moe_sum_all_reduce, exec_config.deterministic.enable_deterministic_inference


@pytest.fixture
def bare_process():
    """A process in which nothing published sglang's config (as in the offline engine or this test process)."""
    with runtime_context.use_context(runtime_context.RuntimeContext(parallel=runtime_context.ParallelContext())):
        yield


def test_bare_process_gets_a_private_scoped_runtime(bare_process):
    """Nothing published: the reads fail outside the block, succeed with sglang's defaults inside, and fail again
    after it (the process's own state is untouched)."""
    assert not runtime_context.get_context().is_config_namespace_published("exec")
    with pytest.raises(ValueError, match="not published"):
        runtime_reads()
    with fused_moe.sglang_runtime():
        assert runtime_reads() == (False, False)
    with pytest.raises(ValueError, match="not published"):
        runtime_reads()


def test_a_published_runtime_is_used_as_is():
    """In a server (config published), its settings apply inside the block, not the private defaults."""
    server = runtime_context.RuntimeContext(parallel=runtime_context.ParallelContext())
    server.set_server_args(ServerArgs(model_path="unused", enable_deterministic_inference=True))
    server.parallel.override_permanently(tp_group=SimpleNamespace(world_size=1))
    with runtime_context.use_context(server), fused_moe.sglang_runtime():
        assert runtime_reads() == (False, True)


def test_float32_never_reaches_the_kernel():
    """The kernel computes non-bf16 inputs in fp16, so only bf16/fp16 on CUDA take it; float32 is refused there."""
    for dtype, fused in [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False)]:
        assert fused_moe.applies(SimpleNamespace(is_cuda=True, dtype=dtype)) is fused, dtype
        assert not fused_moe.applies(torch.zeros(1, dtype=dtype))  # CPU: always the torch loop
    with pytest.raises(TypeError, match="fp16"):
        fused_moe.fused_experts(torch.zeros(2, 4), torch.zeros(1, 4, 4), torch.zeros(1, 4, 2),
                                torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), "gelu_pytorch_tanh")


class FakeKernel:
    """Stands in for sglang's fused_experts_impl: makes its runtime reads, records the call, and computes the
    routed experts with our torch loop on the weights it was handed."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, w13, w2, topk_weights, topk_ids, activation="silu", **kwargs):
        runtime_reads()
        self.calls.append(SimpleNamespace(x=x, w13=w13, w2=w2, weights=topk_weights, ids=topk_ids,
                                          activation=activation, kwargs=kwargs))
        torch_name = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu"}[activation]
        experts = Experts(SimpleNamespace(num_experts=w13.shape[0], top_k_experts=topk_ids.shape[1],
                                          hidden_size=x.shape[1], moe_intermediate_size=w2.shape[2],
                                          hidden_activation=torch_name))
        experts.gate_up_proj, experts.down_proj = torch.nn.Parameter(w13), torch.nn.Parameter(w2)
        return experts._forward_torch(x, topk_weights, topk_ids)


@pytest.mark.parametrize("activation, sglang_name", [("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu"),
                                                     ("silu", "silu")])
def test_bf16_model_runs_the_fused_path_without_a_server(monkeypatch, bare_process, activation, sglang_name):
    """A bf16 model whose experts take the fused path (CPU standing in for CUDA) runs a prefill in a bare process:
    each layer hands sglang its own [E, 2I, H] / [E, H, I] weights, fp32 routing weights, int32 ids and the
    checkpoint's activation, and the KV equals the torch path's."""
    kernel = FakeKernel()
    monkeypatch.setattr(sglang_fused_moe, "fused_experts_impl", kernel)
    hf = build_tiny_model(0, "default", hidden_activation=activation)
    ours = DiffusionGemmaForBlockDiffusion(hf.config).to(torch.bfloat16).eval()
    ours.load_weights(hf.state_dict().items())
    ids = prompt_ids(20, ours.cfg.vocab_size)

    kv_torch, attn = our_kv(ours)
    prefill(ours, attn, ids)
    assert not kernel.calls  # CPU: the torch loop
    monkeypatch.setattr(fused_moe, "applies", lambda x: x.dtype in fused_moe.FUSED_DTYPES)
    kv_fused, attn = our_kv(ours)
    prefill(ours, attn, ids)

    assert len(kernel.calls) == ours.cfg.num_layers
    for call, layer in zip(kernel.calls, ours.layers):
        assert call.w13 is layer.experts.gate_up_proj and call.w2 is layer.experts.down_proj
        assert call.x.dtype == torch.bfloat16 and call.weights.dtype == torch.float32
        assert call.ids.dtype == torch.int32 and call.activation == sglang_name
    for layer in range(ours.cfg.num_layers):
        assert torch.equal(kv_fused.k[layer], kv_torch.k[layer]) and torch.equal(kv_fused.v[layer], kv_torch.v[layer])
    assert not runtime_context.get_context().is_config_namespace_published("exec")
