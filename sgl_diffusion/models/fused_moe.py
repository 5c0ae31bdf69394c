"""sglang's Triton fused MoE for the routed experts, in any process.

sglang 0.5.23's ``fused_experts_impl`` reads process-wide config that only a server publishes
(``get_exec().moe.enable_fused_moe_sum_all_reduce``, ``get_exec().deterministic``, ``get_parallel().tp_group``), so
outside a server (the offline engine, parity tests, bench/) it raises "config namespace 'exec' not published".
There, the call runs inside a private sglang runtime context holding sglang's defaults and a single-rank TP group,
active only for the call; a server's published config is used as it is.
"""

from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

import torch

from sgl_diffusion.models.config import ACTIVATIONS

# NOTE: the kernel's compute_type is bf16 for bf16 inputs and fp16 for every other dtype: float32 weights and
# activations would be silently rounded to fp16. float32 therefore never takes this path.
FUSED_DTYPES = (torch.bfloat16, torch.float16)


def applies(x: torch.Tensor) -> bool:
    """Whether the routed experts run fused for ``x`` [N, H]: on CUDA, in bf16 or fp16.

    Everything else (CPU, float32 on CUDA) runs the per-expert torch loop, transformers' own algorithm.
    """
    return x.is_cuda and x.dtype in FUSED_DTYPES


def fused_experts(x, gate_up_proj, down_proj, weights, ids, activation: str) -> torch.Tensor:
    """x [N, H]; gate_up_proj [E, 2I, H] (gate rows first: sglang's w13) and down_proj [E, H, I] (its w2);
    weights [N, K] routing weights, ids [N, K] expert ids; ``activation`` a ``hidden_activation``. -> [N, H]."""
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"sglang's fused MoE computes {x.dtype} inputs in fp16; use it for {FUSED_DTYPES} only")
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_experts_impl

    with sglang_runtime():
        return fused_experts_impl(
            x, gate_up_proj, down_proj, weights.to(torch.float32), ids.to(torch.int32),
            activation=ACTIVATIONS[activation],
        )


@contextlib.contextmanager
def sglang_runtime():
    """Within the block, sglang's runtime config reads succeed: the server's own where one is published, else
    sglang's defaults (no deterministic mode, no fused all-reduce, no symmetric memory, one TP rank)."""
    from sglang.srt import runtime_context

    if runtime_context.get_context().is_config_namespace_published("exec"):
        yield
        return
    with runtime_context.use_context(_default_context()):
        yield


@functools.cache
def _default_context():
    from sglang.srt import runtime_context
    from sglang.srt.server_args import ServerArgs

    context = runtime_context.RuntimeContext(parallel=runtime_context.ParallelContext())
    # NOTE: ServerArgs defaults, never resolved: no model config is read and nothing is loaded
    context.set_server_args(ServerArgs(model_path="sgl-diffusion/no-server"))
    # read only when symmetric memory is on (it is not here); one rank, so nothing would be reduced anyway
    context.parallel.override_permanently(tp_group=SimpleNamespace(world_size=1))
    return context
