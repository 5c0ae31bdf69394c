"""Blocks of the DiffusionGemma transformer, on flat token batches [N, H].

Module and parameter names mirror the HF checkpoint's ``model.decoder.*`` tree so weights load by name.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from sglang.srt.layers.layernorm import Gemma4RMSNorm
from torch import nn

from sgl_diffusion.attention.base import AttnLayer, BaseAttnBackend
from sgl_diffusion.models import fused_moe
from sgl_diffusion.models.config import DiffusionGemmaConfig, RopeSpec
from sgl_diffusion.models.weights import pad_intermediate
from sgl_diffusion.runtime.canvas_batch import CanvasBatch


MOE_CHUNK_TOKENS = 2048  # tokens per pass of the torch experts: bounds their [tokens, K, H] fp32 buffer

# hidden_activation -> the function transformers' ACT2FN gives for it (config.ACTIVATIONS lists the same keys)
ACTIVATIONS = {
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
}


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
    """down(act(gate(x)) * up(x)): the dense "shared expert" and the self-conditioning MLP."""

    def __init__(self, hidden: int, intermediate: int, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = ACTIVATIONS[activation]
        _pad_gated_mlp(self)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _pad_gated_mlp(mlp: nn.Module) -> None:
    pad_intermediate(mlp.gate_proj.weight, 0)
    pad_intermediate(mlp.up_proj.weight, 0)
    pad_intermediate(mlp.down_proj.weight, 1)


class Attention(nn.Module):
    def __init__(self, cfg: DiffusionGemmaConfig, layer_id: int):
        super().__init__()
        spec = cfg.layers[layer_id]
        self.info = AttnLayer(
            layer_id, cfg.num_heads, spec.num_kv_heads, spec.head_dim, cfg.sliding_window if spec.sliding else None
        )
        d, h = spec.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * d, bias=False)
        self.v_proj = None if spec.k_eq_v else nn.Linear(h, spec.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.q_norm = Gemma4RMSNorm(d, eps=cfg.rms_norm_eps)
        self.k_norm = Gemma4RMSNorm(d, eps=cfg.rms_norm_eps)
        self.v_norm = Gemma4RMSNorm(d, eps=cfg.rms_norm_eps, with_scale=False)

    def forward(self, x, cos, sin, batch: CanvasBatch, attn: BaseAttnBackend):
        n, d = x.shape[0], self.info.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).view(n, -1, d)), cos, sin)
        k_raw = self.k_proj(x).view(n, -1, d)
        # K=V on full layers: values are the un-normed, un-rotated keys (then a weightless RMS norm)
        v = self.v_norm(k_raw if self.v_proj is None else self.v_proj(x).view(n, -1, d))
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        return self.o_proj(attn.forward(q, k, v, self.info, batch).reshape(n, -1))


class Router(nn.Module):
    def __init__(self, cfg: DiffusionGemmaConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.norm = Gemma4RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, with_scale=False)
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
    """Routed experts as 3-D tensors: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, cfg: DiffusionGemmaConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = pad_intermediate(nn.Parameter(torch.empty(e, 2 * i, h)), 1, parts=2)
        self.down_proj = pad_intermediate(nn.Parameter(torch.empty(e, h, i)), 2)
        self.activation = cfg.hidden_activation
        self.act = ACTIVATIONS[cfg.hidden_activation]

    def forward(self, x, weights, ids):
        if fused_moe.applies(x):
            return fused_moe.fused_experts(x, self.gate_up_proj, self.down_proj, weights, ids, self.activation)
        return self._forward_torch(x, weights, ids)

    def _forward_torch(self, x, weights, ids):
        if x.shape[0] <= MOE_CHUNK_TOKENS:
            return self._experts_chunk(x, weights, ids)
        step = MOE_CHUNK_TOKENS
        return torch.cat([self._experts_chunk(x[i : i + step], weights[i : i + step], ids[i : i + step])
                          for i in range(0, x.shape[0], step)])

    def _experts_chunk(self, x, weights, ids):
        # NOTE: transformers' default experts implementation (grouped_mm) sums each token's K weighted expert
        # outputs in fp32, in slot order, and rounds once. Another order, or a running bf16 sum as its eager loop
        # keeps, moves a bf16 result by an ulp now and then, which a random tiny model amplifies to O(1).
        n, k = ids.shape
        out = torch.zeros(n, k, x.shape[1], dtype=torch.float32, device=x.device)  # [n, K, H]
        # one matmul per expert that has tokens: exact on CPU and cheap for a few tokens
        for expert in ids.unique().tolist():
            token, slot = torch.where(ids == expert)
            gate, up = F.linear(x[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.down_proj[expert])
            out[token, slot] = y * weights[token, slot, None]  # weights are fp32
        return out.sum(dim=1).to(x.dtype)


class DecoderLayer(nn.Module):
    """Attention + (dense MLP || routed MoE), shared by the encode and the denoise modes."""

    def __init__(self, cfg: DiffusionGemmaConfig, layer_id: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, layer_id)
        self.mlp = GatedMLP(h, cfg.intermediate_size, cfg.hidden_activation)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm", "post_feedforward_layernorm_1",
            "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2",
        ):
            setattr(self, name, Gemma4RMSNorm(h, eps=eps))
        # NOTE: the checkpoint carries separate scalars for the encoder and the decoder pass.
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def forward(self, x, cos, sin, canvas_mask, batch: CanvasBatch, attn: BaseAttnBackend):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, batch, attn))
        residual = x
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        weights, ids = self.router(residual)  # the router sees the raw residual, not a normed copy
        routed = self.post_feedforward_layernorm_2(self.experts(self.pre_feedforward_layernorm_2(x), weights, ids))
        x = residual + self.post_feedforward_layernorm(dense + routed)
        scalar = torch.where(canvas_mask[:, None], self.layer_scalar, self.encoder_layer_scalar)
        return x * scalar.to(x.dtype)


class SelfConditioning(nn.Module):
    """Decoder input = rms0(token embeds + MLP(pre_norm(soft embeds of the previous step)))."""

    def __init__(self, cfg: DiffusionGemmaConfig):
        super().__init__()
        h = cfg.hidden_size
        self.pre_norm = Gemma4RMSNorm(h, eps=cfg.rms_norm_eps)
        self.post_norm = Gemma4RMSNorm(h, eps=cfg.rms_norm_eps, with_scale=False)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)
        self.act = ACTIVATIONS[cfg.hidden_activation]
        _pad_gated_mlp(self)

    def forward(self, embeds, soft_embeds):
        if soft_embeds is None:  # first step: MLP(pre_norm(0)) == 0 (every activation here has act(0) == 0)
            return self.post_norm(embeds)
        n = self.pre_norm(soft_embeds)
        return self.post_norm(embeds + self.down_proj(self.act(self.gate_proj(n)) * self.up_proj(n)))
