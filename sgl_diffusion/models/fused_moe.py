"""sglang's Triton fused MoE for the routed experts, in any process.

sglang 0.5.23's ``fused_experts_impl`` reads process-wide config that only a server publishes
(``get_exec().moe.enable_fused_moe_sum_all_reduce``, ``get_exec().deterministic``, ``get_parallel().tp_group``), so
outside a server (the offline engine, parity tests, bench/) it raises "config namespace 'exec' not published".
There, the call runs inside ``parallel.sglang_runtime()`` (sglang's defaults and a single-rank TP group, active only
for the call); a server's published config is used as it is. Under TP the weights handed in are this rank's
intermediate shard: the kernel's output is a partial sum, which the caller all-reduces.
"""

from __future__ import annotations

import torch

from sgl_diffusion.models.config import ACTIVATIONS
from sgl_diffusion.models.parallel import sglang_runtime

# NOTE: the kernel's compute_type is bf16 for bf16 inputs and fp16 for every other dtype: float32 weights and
# activations would be silently rounded to fp16. float32 therefore never takes this path.
FUSED_DTYPES = (torch.bfloat16, torch.float16)


def applies(x: torch.Tensor) -> bool:
    """Whether the routed experts run fused for ``x`` [N, H]: on CUDA, in bf16 or fp16.

    Everything else (CPU, float32 on CUDA) runs the per-expert torch loop, transformers' own algorithm.
    """
    return x.is_cuda and x.dtype in FUSED_DTYPES


def fused_experts(x, gate_up_proj, down_proj, weights, ids, activation: str, gate_up_scale=None, down_scale=None,
                  block_shape: list[int] | None = None) -> torch.Tensor:
    """x [N, H]; gate_up_proj [E, 2I, H] (gate rows first: sglang's w13) and down_proj [E, H, I] (its w2);
    weights [N, K] routing weights, ids [N, K] expert ids (indices into the experts handed in; -1: a pair the
    kernel skips, another expert-parallel rank's); ``activation`` a ``hidden_activation``. -> [N, H].

    fp8 experts (float8_e4m3fn weights): ``gate_up_scale`` / ``down_scale`` their scales, per ``block_shape``
    [bn, bk] block ([E, rows / bn, cols / bk]) or per expert ([E], ``block_shape`` None), for the kernel's w8a8
    fp8 path (activations quantized on the fly: per token-group with blocks, per tensor without)."""
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"sglang's fused MoE computes {x.dtype} inputs in fp16; use it for {FUSED_DTYPES} only")
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_experts_impl

    fp8 = {}
    if gate_up_scale is not None:
        fp8 = dict(use_fp8_w8a8=True, w1_scale=gate_up_scale, w2_scale=down_scale, block_shape=block_shape)
    with sglang_runtime():
        return fused_experts_impl(
            x, gate_up_proj, down_proj, weights.to(torch.float32), ids.to(torch.int32),
            activation=ACTIVATIONS[activation], **fp8,
        )
