"""Frozen, typed view of a DiffusionGemma HF config: the only place that reads the HF config object."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    partial_rotary_factor: float = 1.0
    proportional: bool = False  # Gemma 4 full layers: only the first angles rotate, exponent over head_dim
    factor: float = 1.0


@dataclass(frozen=True)
class LayerSpec:
    sliding: bool
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # full-attention layers have no v_proj: V = rms0(k_proj(x))
    rope: RopeSpec


@dataclass(frozen=True)
class DiffusionGemmaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP and self-conditioning MLP width
    moe_intermediate_size: int
    num_experts: int
    top_k_experts: int
    num_heads: int
    layers: tuple[LayerSpec, ...]
    sliding_window: int
    rms_norm_eps: float
    final_logit_softcapping: float
    hidden_activation: str
    canvas_length: int
    image_token_id: int
    bidirectional_images: bool
    pad_token_id: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def from_hf(cls, hf_config) -> DiffusionGemmaConfig:
        text = hf_config.text_config
        if text.use_bidirectional_attention == "all":
            raise ValueError("use_bidirectional_attention='all' (non-causal encoder) is not supported")
        layers = []
        for i, layer_type in enumerate(text.layer_types):
            sliding = layer_type == "sliding_attention"
            head_dim, kv_heads = _attention_shape(text, i, sliding)
            layers.append(LayerSpec(sliding, head_dim, kv_heads, not sliding, _rope(text.rope_parameters[layer_type])))
        return cls(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            moe_intermediate_size=text.moe_intermediate_size,
            num_experts=text.num_experts,
            top_k_experts=text.top_k_experts,
            num_heads=text.num_attention_heads,
            layers=tuple(layers),
            sliding_window=text.sliding_window,
            rms_norm_eps=text.rms_norm_eps,
            final_logit_softcapping=text.final_logit_softcapping,
            hidden_activation=text.hidden_activation,
            canvas_length=getattr(hf_config, "canvas_length", 256),
            image_token_id=hf_config.image_token_id,
            bidirectional_images=text.use_bidirectional_attention == "vision",
            pad_token_id=text.pad_token_id,
        )


def _attention_shape(text, layer: int, sliding: bool) -> tuple[int, int]:
    """(head_dim, num_kv_heads) of a layer, from transformers' per_layer_config or from the flat
    full/``swa_*`` attributes sglang's config loader replaces it with."""
    if hasattr(text, "swa_head_dim"):  # flattened by sglang: base attributes describe full layers
        if sliding:
            return text.swa_head_dim, text.swa_num_key_value_heads
        return text.head_dim, text.num_key_value_heads
    per_layer = text.per_layer_config[layer]
    return per_layer.head_dim, per_layer.num_key_value_heads


def _rope(params: dict) -> RopeSpec:
    kind = params.get("rope_type", "default")
    if kind not in ("default", "proportional"):
        raise ValueError(f"unsupported rope_type {kind!r} for DiffusionGemma")
    return RopeSpec(
        theta=params["rope_theta"],
        partial_rotary_factor=params.get("partial_rotary_factor", 1.0),
        proportional=kind == "proportional",
        factor=params.get("factor", 1.0),
    )
