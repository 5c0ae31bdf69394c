"""Blocks of the DiffusionGemma transformer, on flat token batches [N, H].

Module and parameter names mirror the HF checkpoint's ``model.decoder.*`` tree so weights load by name.
Projections are sglang's tensor-parallel layers (built inside ``parallel.sglang_runtime()``): attention heads and
MLP/expert intermediate dims are split over the TP ranks, KV heads replicated where the ranks outnumber them, and
each block's output is all-reduced; with one rank they compute what plain ``nn.Linear`` layers do.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from sglang.srt.distributed.utils import divide
from sglang.srt.layers.layernorm import Gemma4RMSNorm
from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from torch import nn

from sgl_diffusion.attention.base import AttnLayer
from sgl_diffusion.models import fused_moe
from sgl_diffusion.models.config import DiffusionGemmaConfig, RopeSpec
from sgl_diffusion.models.parallel import all_reduce, moe_ranks
from sgl_diffusion.models.weights import (
    FP8, dequantize, expect, load_experts_block_scale, load_experts_fp8, load_experts_slice,
    load_experts_tensor_scale,
)

# What a layer's attention calls: q [N, H, D], k/v [N, KV, D] and the layer's geometry -> [N, H, D]. The mixed forward
# binds an attention backend and its planned batch; the graph-ready canvas step binds its static gather-and-mask.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttnLayer], torch.Tensor]

MOE_CHUNK_TOKENS = 2048  # tokens per pass of the torch experts: bounds their [tokens, K, H] fp32 buffer
# a compiled step runs every local expert over every token when that is at most this many times the routed work
DENSE_EXPERTS_MAX_WASTE = 4

GELU_TANH_SLOPE = 2 * math.sqrt(2 / math.pi)  # 0.5 * (1 + tanh(z)) = sigmoid(2 z)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' gelu_pytorch_tanh: its own op eagerly (the same bits), the same function written with a sigmoid
    when compiled (within float32 rounding of the op). NOTE: inductor's CPU tanh costs about twice its exp, and these
    GELUs were a tenth of a compiled 8-canvas round on the tiny model."""
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(GELU_TANH_SLOPE * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


def inverse_rms(h: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(h ** 2) + eps) over the last dim: transformers' ops eagerly (the same bits), rsqrt when compiled
    (within an ulp). NOTE: inductor's CPU code calls a scalar std::pow for pow(-0.5), which made its fused norms
    slower than eager ones."""
    mean_square = h.pow(2).mean(-1, keepdim=True)
    if torch.compiler.is_compiling():
        return torch.rsqrt(mean_square + eps)
    return mean_square.add_(eps).pow_(-0.5)


# hidden_activation -> the function transformers' ACT2FN gives for it (config.ACTIVATIONS lists the same keys)
ACTIVATIONS = {
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
}


class RMSNorm(Gemma4RMSNorm):
    """sglang's Gemma4RMSNorm, which dispatches to its own kernels on CUDA and on CPUs with AMX.

    Elsewhere on the CPU it runs transformers' ops (those of sglang's native path) called directly: sglang's
    per-call dispatch (backend and trace checks, a weight + 0.0 shift) costs more than the norm itself on a
    small model, and the model has nine norms per layer. Same ops, same bits; two of them in place.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or _cpu_has_amx():
            return super().forward(x)
        h = x.float()
        normed = h * inverse_rms(h, self.eps)
        if self.with_scale:
            normed = normed * self.weight.float()
        return normed.type_as(x)


_AMX: list[bool] = []  # memo of _cpu_has_amx (not functools.cache: dynamo traces through an lru wrapper)


@torch.compiler.assume_constant_result  # a fact about the machine: a compiled step bakes it in
def _cpu_has_amx() -> bool:
    if not _AMX:
        from sglang.srt.utils import cpu_has_amx_support

        _AMX.append(cpu_has_amx_support())
    return _AMX[0]


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, as transformers computes them for Gemma 4.

    "proportional" (full layers) rotates only the first ``partial * head_dim / 2`` angles, with the
    exponent over the whole head_dim; the rest get frequency 0. It is not standard partial rotary.
    """
    if rope.proportional:
        angles = int(rope.partial_rotary_factor * head_dim // 2)
        inv = 1.0 / rope.theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim)
        inv = torch.cat([inv, torch.zeros(head_dim // 2 - angles)])
    else:
        dim = int(head_dim * rope.partial_rotary_factor)
        inv = 1.0 / rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    return inv / rope.factor


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, D] for positions [N] (rotate-half layout: the angles repeat twice)."""
    freqs = positions[:, None].float() * inv_freq[None, :].to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE. x [N, heads, D], cos/sin [N, D] (zeros/ones where a dim does not rotate)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the dense "shared expert" and the self-conditioning MLP.

    NOTE: gate and up run as one GEMM (``gate_up_proj``, gate rows first; the checkpoint's gate_proj and up_proj
    load into its halves): each output element is the same dot product, so the same bits as two GEMMs.
    Under TP each rank holds a slice of the intermediate dim; down_proj all-reduces.
    """

    def __init__(self, hidden: int, intermediate: int, activation: str, quant_config=None, prefix: str = ""):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias=False,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        expect(self.gate_up_proj.weight, {0: (intermediate, hidden), 1: (intermediate, hidden)}, pad_dim=0)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        expect(self.down_proj.weight, {None: (hidden, intermediate)}, pad_dim=1)
        self.act = ACTIVATIONS[activation]

    def forward(self, x):
        gate, up = self.gate_up_proj(x)[0].chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)[0]


class Attention(nn.Module):
    def __init__(self, cfg: DiffusionGemmaConfig, layer_id: int, quant_config=None, prefix: str = ""):
        super().__init__()
        spec = cfg.layers[layer_id]
        d, h = spec.head_dim, cfg.hidden_size
        # NOTE: q, k and v run as one GEMM (the checkpoint's q_proj, k_proj, v_proj load into its rows): each output
        # element is the same dot product, so the same bits as three GEMMs. K=V layers have no v rows (v_head_size
        # 0) rather than sglang Gemma 4's copy of k_proj into them: no GEMM columns computed twice.
        # Under TP each rank holds num_heads / tp query heads; KV heads are split, or replicated on every rank
        # where the ranks outnumber them (the full layers have 2 on the real checkpoint, 1 on the tiny one).
        self.qkv_proj = QKVParallelLinear(h, d, cfg.num_heads, spec.num_kv_heads, bias=False,
                                          v_head_size=0 if spec.k_eq_v else d, quant_config=quant_config,
                                          prefix=f"{prefix}.{'qk_proj' if spec.k_eq_v else 'qkv_proj'}")  # fmt: skip
        shapes = {"q": (cfg.num_heads * d, h), "k": (spec.num_kv_heads * d, h)}
        expect(self.qkv_proj.weight, shapes if spec.k_eq_v else shapes | {"v": (spec.num_kv_heads * d, h)})
        # this rank's heads of the fused projection's output: q, k, then v (none on K=V layers)
        q_heads, kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.heads = (q_heads, kv_heads, 0 if spec.k_eq_v else kv_heads)
        self.info = AttnLayer(layer_id, q_heads, kv_heads, d, cfg.sliding_window if spec.sliding else None)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, h, bias=False, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        expect(self.o_proj.weight, {None: (h, cfg.num_heads * d)})
        self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps)
        self.v_norm = RMSNorm(d, eps=cfg.rms_norm_eps, with_scale=False)

    def forward(self, x, cos, sin, attend: Attend):
        n, d = x.shape[0], self.info.head_dim
        heads = self.qkv_proj(x)[0].view(n, -1, d)  # [N, q + k (+ v) heads, D], this rank's
        if x.device.type == "cpu" and not _cpu_has_amx():
            q, k, v = self._norm_rope_together(heads, cos, sin)
        else:  # sglang's norm kernels, one per kind of head
            q_raw, k_raw, v_raw = heads.split(self.heads, dim=1)
            q = apply_rope(self.q_norm(q_raw), cos, sin)
            # K=V on full layers: values are the un-normed, un-rotated keys (then a weightless RMS norm)
            v = self.v_norm(k_raw if self.heads[2] == 0 else v_raw)
            k = apply_rope(self.k_norm(k_raw), cos, sin)
        return self.o_proj(attend(q, k, v, self.info).reshape(n, -1))[0]

    def _norm_rope_together(self, heads, cos, sin):
        """q_norm, k_norm and v_norm (transformers' ops) over all heads at once, then one RoPE over q and k.

        Each head is normalised on its own, so normalising them together gives the same bits; a K=V layer's values
        are its keys normalised without the k_norm weight, the very intermediate k_norm multiplies.
        """
        nq, nk, _ = self.heads
        h = heads.float()
        normed = h * inverse_rms(h, self.q_norm.eps)  # [N, heads, D] fp32
        weight = torch.cat([self.q_norm.weight.expand(nq, -1), self.k_norm.weight.expand(nk, -1)]).float()
        qk = apply_rope((normed[:, : nq + nk] * weight).type_as(heads), cos, sin)
        v = (normed[:, nq : nq + nk] if self.heads[2] == 0 else normed[:, nq + nk :]).type_as(heads)
        q, k = qk.split((nq, nk), dim=1)
        return q, k, v


class Router(nn.Module):
    def __init__(self, cfg: DiffusionGemmaConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] (the pre-norm residual) -> weights [N, K] fp32, expert ids [N, K]."""
        scores = self.proj(self.norm(x) * self.scale * x.shape[-1] ** -0.5)
        weights, ids = torch.topk(scores.softmax(-1, dtype=torch.float32), self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


class Experts(nn.Module):
    """Routed experts as 3-D tensors: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I], of which a
    rank holds its part.

    Split as sglang's FusedMoE splits them (``parallel.moe_ranks()``): with ``--ep-size`` each expert-parallel rank
    holds a contiguous block of E / ep whole experts, and each MoE-TP rank (tp / ep of them) holds I / (tp / ep) of
    those experts' intermediate dim (its gate rows, then its up rows). A rank computes only the (token, slot) pairs
    routed to its experts, on its slice, and the partial outputs are all-reduced over the TP group (EP x MoE-TP).
    NOTE: not sglang's FusedMoE: off CUDA and AMX it runs ``moe_forward_native``, which has no gelu_tanh (the
    checkpoint's activation) and syncs the host for the tokens per expert; on CUDA ``fused_moe`` calls the same
    Triton kernel FusedMoE would, on these weights.

    FP8 (an fp8 ``quant_config``: ``--quantization fp8`` or the checkpoint's quantization_config, unless its
    ignored_layers name this module): both tensors are float8_e4m3fn, with fp32 scales beside them. A block-quantized
    checkpoint (weight_block_size [bn, bk]) loads its block scales, sliced like the weights in block units:
    ``gate_up_proj_scale_inv`` [E_local, 2 I_local / bn, H / bk] and ``down_proj_scale_inv`` [E_local, H / bn,
    I_local / bk] (I_local must be a multiple of bn and bk). A per-tensor checkpoint's scales, and online
    quantization of a bf16 checkpoint (each expert quantized at load with its own amax / e4m3 max, as sglang's online
    fp8 quantizes a tensor), give one scale per expert: ``gate_up_proj_scale`` / ``down_proj_scale`` [E_local].
    On CUDA in bf16/fp16 the fused kernel takes the fp8 weights and scales (``use_fp8_w8a8``); the torch loop
    dequantizes each expert it runs, per call, to x's dtype (weight.float() * scale).
    """

    def __init__(self, cfg: DiffusionGemmaConfig, quant_config=None, prefix: str = ""):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        ranks = moe_ranks()
        self.num_local = divide(e, ranks.ep_size)
        self.first = ranks.ep_rank * self.num_local  # this rank's experts: first .. first + num_local - 1
        self.expert_parallel = ranks.ep_size > 1
        self.tp_size = ranks.ep_size * ranks.tp_size  # the TP group the partial outputs are summed over
        local = divide(i, ranks.tp_size)
        fp8 = _fp8_experts(quant_config, prefix)
        self.block = list(quant_config.weight_block_size) if fp8 and quant_config.weight_block_size else None
        dtype = FP8 if fp8 else None
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_local, 2 * local, h, dtype=dtype), requires_grad=not fp8)
        self.down_proj = nn.Parameter(torch.empty(self.num_local, h, local, dtype=dtype), requires_grad=not fp8)
        expect(self.gate_up_proj, {None: (e, 2 * i, h)}, pad_dim=1, parts=2)
        expect(self.down_proj, {None: (e, h, i)}, pad_dim=2)
        mine = dict(first=self.first, rank=ranks.tp_rank, size=ranks.tp_size)
        gate_up = functools.partial(load_experts_slice, dim=1, parts=2, **mine)
        down = functools.partial(load_experts_slice, dim=2, parts=1, **mine)
        self.scale_names: tuple[str, str] | None = None  # fp8: the two scale parameters' names
        if fp8:
            gate_up, down = self._fp8_scales(quant_config, e, h, local, ranks.tp_size, gate_up, down)
        self.gate_up_proj.weight_loader, self.down_proj.weight_loader = gate_up, down
        self.activation = cfg.hidden_activation
        # NOTE: a compiled step on a CPU cannot fuse the loop (an opaque op, and each expert's host sync costs more
        # than its GEMMs on a small model); with few experts per routed slot, all of them over every token is cheaper
        self.dense_when_compiled = not fp8 and self.num_local <= DENSE_EXPERTS_MAX_WASTE * cfg.top_k_experts

    def _fp8_scales(self, quant_config, e: int, h: int, local: int, tp: int, gate_up, down):
        """Register the scale parameters; return the fp8 weights' loaders."""
        if self.block:
            bn, bk = self.block
            if local % bn or local % bk:
                raise ValueError(
                    f"fp8 experts: each MoE-TP rank's expert intermediate size ({local} = moe_intermediate_size / "
                    f"{tp} ranks) is not a multiple of the checkpoint's weight_block_size {self.block}: its block "
                    "scales cannot be split over the ranks; use fewer tensor-parallel ranks (or --ep-size)")
            shapes = {"gate_up_proj": (2 * local // bn, -(-h // bk)), "down_proj": (-(-h // bn), local // bk)}
            suffix = "_scale_inv"
        else:
            shapes, suffix = {"gate_up_proj": (), "down_proj": ()}, "_scale"
        online = not quant_config.is_checkpoint_fp8_serialized
        loaders = {"gate_up_proj": gate_up, "down_proj": down}
        for name, shape in shapes.items():
            scale = nn.Parameter(torch.ones(self.num_local, *shape, dtype=torch.float32), requires_grad=False)
            if self.block:  # sliced as its weight is, in block units
                scale.weight_loader = functools.partial(load_experts_block_scale, num_experts=e, slicer=loaders[name])
            else:
                scale.weight_loader = functools.partial(load_experts_tensor_scale, num_experts=e, first=self.first)
            scale.computed_at_load = online  # online: no checkpoint tensor; the weight's loader computes it
            setattr(self, name + suffix, scale)
            loaders[name] = functools.partial(load_experts_fp8, slicer=loaders[name], scale=scale, first=self.first,
                                              online=online)
        self.scale_names = ("gate_up_proj" + suffix, "down_proj" + suffix)
        return loaders["gate_up_proj"], loaders["down_proj"]

    def _scales(self):
        """(gate_up scales, down scales, block shape) of fp8 experts; (None, None, None) otherwise."""
        if self.scale_names is None:
            return None, None, None
        return getattr(self, self.scale_names[0]), getattr(self, self.scale_names[1]), self.block

    def forward(self, x, weights, ids):
        """x [N, H], weights [N, K] fp32, ids [N, K] global expert ids -> [N, H], summed over the TP group."""
        if fused_moe.applies(x):
            local = self._local_ids(ids) if self.expert_parallel else ids
            out = fused_moe.fused_experts(x, self.gate_up_proj, self.down_proj, weights, local, self.activation,
                                          *self._scales())
        else:
            out = self._forward_torch(x, weights, ids)
        return all_reduce(out) if self.tp_size > 1 else out  # the size, not a context read: a compiled step holds it

    def _local_ids(self, ids):
        """ids as indices into this rank's experts; -1 (the fused kernel skips the pair) for other ranks' experts."""
        local = ids - self.first
        return torch.where((local >= 0) & (local < self.num_local), local, -1)

    def _forward_torch(self, x, weights, ids):
        args = (x, weights, ids, self.gate_up_proj, self.down_proj, self.first, self.activation, *self._scales())
        if not torch.compiler.is_compiling():
            return experts_loop(*args)
        if self.dense_when_compiled:
            return experts_dense(*args[:7])
        # NOTE: a compiled canvas step sees the loop as one opaque op: its per-expert token lists are data-dependent
        # shapes that no graph holds, and the op keeps the loop's bits (and so transformers parity) in the graph.
        return torch.ops.sgl_diffusion.experts_loop(*args)


def _fp8_experts(quant_config, prefix: str) -> bool:
    """Whether the experts are stored in fp8: an fp8 quant_config whose ignored_layers do not name them."""
    if quant_config is None or quant_config.get_name() != "fp8":
        return False
    return not any(prefix == skip or prefix.startswith(f"{skip}.") for skip in quant_config.ignored_layers)


def experts_loop(x, weights, ids, gate_up_proj, down_proj, first: int, activation: str,
                 gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None,
                 block: list[int] | None = None) -> torch.Tensor:
    """The routed experts on the CPU: one GEMM pair per expert that has tokens, in chunks of MOE_CHUNK_TOKENS.
    ``gate_up_proj`` / ``down_proj`` hold experts first .. first + E_local - 1; other experts' pairs stay 0.
    fp8 experts: their scales (per expert [E_local], or per ``block`` [E_local, rows / bn, cols / bk]); each expert
    that has tokens is dequantized to x's dtype for its GEMMs.

    NOTE: not transformers' grouped_mm on the CPU: its GEMMs round differently as the tokens per expert change, so a
    seeded request's tokens would depend on what else shares its forward.
    """
    scales = (gate_up_scale, down_scale, block)
    if x.shape[0] <= MOE_CHUNK_TOKENS:
        return _experts_chunk(x, weights, ids, gate_up_proj, down_proj, first, ACTIVATIONS[activation], *scales)
    step = MOE_CHUNK_TOKENS
    return torch.cat([
        _experts_chunk(x[i : i + step], weights[i : i + step], ids[i : i + step], gate_up_proj, down_proj, first,
                       ACTIVATIONS[activation], *scales)
        for i in range(0, x.shape[0], step)
    ])  # fmt: skip


def experts_dense(x, weights, ids, gate_up_proj, down_proj, first: int, activation: str) -> torch.Tensor:
    """``experts_loop``'s result with no host sync and no data-dependent shape (what a compiled step can fuse): every
    local expert over every token, then each token's K outputs picked, weighted and summed in fp32 in slot order as
    the loop sums them. Its GEMMs are E_local / K times the routed ones (Experts.dense_when_compiled)."""
    e = gate_up_proj.shape[0]
    gate, up = torch.matmul(x, gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)  # [E, N, I] each
    y = torch.matmul(ACTIVATIONS[activation](gate) * up, down_proj.transpose(1, 2))  # [E, N, H]
    local = ids - first
    mine = (local >= 0) & (local < e)  # another expert-parallel rank's pairs stay 0 here
    picked = y[local.clamp(0, e - 1), torch.arange(x.shape[0], device=x.device)[:, None]]  # [N, K, H]
    out = torch.where(mine[..., None], picked * weights[..., None], 0.0)  # weights are fp32
    return out.sum(dim=1).to(x.dtype)


@torch.library.custom_op("sgl_diffusion::experts_loop", mutates_args=())
def _experts_loop_op(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up_proj: torch.Tensor,
                     down_proj: torch.Tensor, first: int, activation: str, gate_up_scale: torch.Tensor | None = None,
                     down_scale: torch.Tensor | None = None, block: list[int] | None = None) -> torch.Tensor:
    return experts_loop(x, weights, ids, gate_up_proj, down_proj, first, activation, gate_up_scale, down_scale, block)


@_experts_loop_op.register_fake
def _(x, weights, ids, gate_up_proj, down_proj, first, activation, gate_up_scale=None, down_scale=None, block=None):
    return torch.empty_like(x)


def _experts_chunk(x, weights, ids, gate_up_proj, down_proj, first: int, act, gate_up_scale=None, down_scale=None,
                   block=None):
    # NOTE: transformers' default experts implementation (grouped_mm) sums each token's K weighted expert
    # outputs in fp32, in slot order, and rounds once. Another order, or a running bf16 sum as its eager loop
    # keeps, moves a bf16 result by an ulp now and then, which a random tiny model amplifies to O(1).
    n, k = ids.shape
    out = torch.zeros(n, k, x.shape[1], dtype=torch.float32, device=x.device)  # [n, K, H]
    # one matmul per expert that has tokens: exact, and cheap for a few tokens
    for expert in ids.unique().tolist():
        if not first <= expert < first + gate_up_proj.shape[0]:
            continue  # another expert-parallel rank's: its pairs stay 0 here
        token, slot = torch.where(ids == expert)
        w13, w2 = gate_up_proj[expert - first], down_proj[expert - first]
        if gate_up_scale is not None:  # fp8: this expert dequantized for this call only
            w13 = dequantize(w13, gate_up_scale[expert - first], block).to(x.dtype)
            w2 = dequantize(w2, down_scale[expert - first], block).to(x.dtype)
        gate, up = F.linear(x[token], w13).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, w2)
        out[token, slot] = y * weights[token, slot, None]  # weights are fp32
    return out.sum(dim=1).to(x.dtype)


class DecoderLayer(nn.Module):
    """Attention + (dense MLP || routed MoE), shared by the encode and the denoise modes.

    ``quant_config`` (sglang's, e.g. fp8) reaches the attention and dense-MLP projections and the routed experts
    (fp8: ``Experts``): the router stays a plain full-precision linear (its top-k decides which experts run).
    """

    def __init__(self, cfg: DiffusionGemmaConfig, layer_id: int, quant_config=None, prefix: str = ""):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, layer_id, quant_config, f"{prefix}.self_attn")
        self.mlp = GatedMLP(h, cfg.intermediate_size, cfg.hidden_activation, quant_config, f"{prefix}.mlp")
        self.router = Router(cfg)
        self.experts = Experts(cfg, quant_config, f"{prefix}.experts")
        for name in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm", "post_feedforward_layernorm_1",
            "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2",
        ):
            setattr(self, name, RMSNorm(h, eps=eps))
        # NOTE: the checkpoint carries separate scalars for the encoder and the decoder pass.
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def forward(self, x, cos, sin, decoder_rows: bool | torch.Tensor, attend: Attend):
        """``decoder_rows``: True when every token is a canvas token (decoder layer scalar), False when none is
        (encoder layer scalar), else a [N, 1] bool mask of the canvas tokens."""
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, attend))
        residual = x
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        weights, ids = self.router(residual)  # the router sees the raw residual, not a normed copy
        routed = self.post_feedforward_layernorm_2(self.experts(self.pre_feedforward_layernorm_2(x), weights, ids))
        x = residual + self.post_feedforward_layernorm(dense + routed)
        if decoder_rows is True or decoder_rows is False:
            scalar = self.layer_scalar if decoder_rows else self.encoder_layer_scalar
        else:
            scalar = torch.where(decoder_rows, self.layer_scalar, self.encoder_layer_scalar)
        return x * scalar.to(x.dtype)


class SelfConditioning(GatedMLP):
    """Decoder input = rms0(token embeds + MLP(pre_norm(soft embeds of the previous step)))."""

    def __init__(self, cfg: DiffusionGemmaConfig, quant_config=None, prefix: str = ""):
        super().__init__(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_activation, quant_config, prefix)
        self.pre_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, with_scale=False)

    def forward(self, embeds, soft_embeds):
        if soft_embeds is None:  # first step: MLP(pre_norm(0)) == 0 (every activation here has act(0) == 0)
            return self.post_norm(embeds)
        return self.post_norm(embeds + super().forward(self.pre_norm(soft_embeds)))
