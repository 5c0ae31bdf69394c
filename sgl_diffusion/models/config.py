"""Frozen, typed view of a DiffusionGemma HF config: the only place that reads the HF config object."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerSpec:
    sliding: bool
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # full-attention layers have no v_proj: V = rms0(k_proj(x))


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
            per_layer = text.per_layer_config[i]
            sliding = layer_type == "sliding_attention"
            layers.append(LayerSpec(sliding, per_layer.head_dim, per_layer.num_key_value_heads, not sliding))
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
