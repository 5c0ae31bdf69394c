"""Frozen, typed view of a DiffusionGemma HF config: the only place that reads the HF config object.

``TEXT_FIELDS`` and ``TOP_FIELDS`` list every field of transformers' ``DiffusionGemmaTextConfig`` and
``DiffusionGemmaConfig``, each honoured, honoured only at some values (anything else is refused at startup, naming
the field), or irrelevant to what we compute (with a one-word reason). ``tests/models/test_config_fields.py``
fails when transformers grows a field these tables do not list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class FieldRule:
    kind: Literal["honoured", "only", "irrelevant"]
    allowed: tuple = ()  # "only": the values we compute exactly; any other is refused
    reason: str = ""  # "irrelevant": one word saying why; "only": what the other values would need

    def check(self, where: str, name: str, value) -> None:
        if self.kind == "only" and value not in self.allowed:
            supported = ", ".join(repr(v) for v in self.allowed)
            raise ValueError(f"{where}.{name}={value!r} is not supported by sgl-diffusion (supported: {supported})"
                             + (f": {self.reason}" if self.reason else ""))


HONOURED = FieldRule("honoured")


def only(*allowed, why: str = "") -> FieldRule:
    return FieldRule("only", allowed, why)


def irrelevant(reason: str) -> FieldRule:
    return FieldRule("irrelevant", reason=reason)


# hidden_activation -> sglang's fused-MoE activation of the same function (layers.ACTIVATIONS holds the torch side)
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu", "swish": "silu"}

_PRETRAINED_FIELDS = {  # PreTrainedConfig's own fields, on both configs
    "transformers_version": irrelevant("metadata"),
    "_name_or_path": irrelevant("metadata"),
    "model_type": irrelevant("metadata"),
    "architectures": irrelevant("dispatch"),  # sglang picks the model class from it
    "dtype": irrelevant("loader"),  # sglang's --dtype auto reads it; the math follows the weights' dtype
    "output_hidden_states": irrelevant("outputs"),
    "output_attentions": irrelevant("outputs"),
    "return_dict": irrelevant("outputs"),
    "chunk_size_feed_forward": irrelevant("unused"),  # no DiffusionGemma module reads it
    "is_encoder_decoder": irrelevant("generation"),
    "id2label": irrelevant("classification"),
    "label2id": irrelevant("classification"),
    "problem_type": irrelevant("classification"),
}

TEXT_FIELDS = _PRETRAINED_FIELDS | {
    "vocab_size": HONOURED,
    "hidden_size": HONOURED,
    "intermediate_size": HONOURED,
    "num_hidden_layers": HONOURED,
    "num_attention_heads": HONOURED,
    "num_key_value_heads": HONOURED,
    "head_dim": HONOURED,
    "per_layer_config": HONOURED,  # head_dim / num_key_value_heads of each layer
    "hidden_activation": only(*ACTIVATIONS),
    "max_position_embeddings": irrelevant("context"),  # sglang's context limit; neither RoPE type reads it
    "initializer_range": irrelevant("training"),
    "rms_norm_eps": HONOURED,
    "pad_token_id": irrelevant("training"),  # only the embedding's padding_idx (gradients)
    "eos_token_id": irrelevant("stopping"),  # stop rules: generation_config.json / sglang, not the model
    "bos_token_id": irrelevant("tokenizer"),
    "tie_word_embeddings": irrelevant("overridden"),  # transformers ties on the top-level flag alone
    "rope_parameters": HONOURED,  # rope_type default | proportional; see _rope for the keys
    "attention_bias": only(False, why="the projections have no bias"),
    "attention_dropout": irrelevant("training"),
    "sliding_window": HONOURED,
    "layer_types": HONOURED,
    "use_bidirectional_attention": only(None, "vision", why="'all' (a non-causal encoder) is not implemented"),
    "num_experts": HONOURED,
    "top_k_experts": HONOURED,
    "moe_intermediate_size": HONOURED,
    "final_logit_softcapping": HONOURED,  # a class attribute, not a dataclass field, but settable and serialized
}

TOP_FIELDS = _PRETRAINED_FIELDS | {
    "text_config": HONOURED,  # TEXT_FIELDS
    "vision_config": HONOURED,  # built by transformers' own Gemma4VisionModel and embedder
    "boi_token_id": irrelevant("processor"),
    "eoi_token_id": irrelevant("processor"),
    "image_token_id": HONOURED,
    "initializer_range": irrelevant("training"),
    # False unties lm_head and the whole encoder text stack from the decoder (twice the text weights); the
    # released checkpoint is tied, so that second stack is refused rather than built.
    "tie_word_embeddings": only(True, why="a separate lm_head and encoder text stack are not implemented"),
    "canvas_length": HONOURED,
}


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
    hidden_activation: str  # a key of ACTIVATIONS
    canvas_length: int
    image_token_id: int
    bidirectional_images: bool  # image runs of a prompt attend bidirectionally (use_bidirectional_attention="vision")
    pad_token_id: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def from_hf(cls, hf_config) -> DiffusionGemmaConfig:
        """Read and check an HF config; a field we would compute differently from transformers raises ValueError."""
        text = hf_config.text_config
        check_fields(hf_config)
        if len(text.layer_types) != text.num_hidden_layers:
            raise ValueError(f"text_config.layer_types has {len(text.layer_types)} entries for "
                             f"num_hidden_layers={text.num_hidden_layers}")
        if text.final_logit_softcapping is None:
            raise ValueError("text_config.final_logit_softcapping=None is not supported (transformers divides by it)")
        layers = []
        for i, layer_type in enumerate(text.layer_types):
            sliding = layer_type == "sliding_attention"
            head_dim, kv_heads = _attention_shape(text, i, sliding)
            rope = _rope(text.rope_parameters[layer_type], f"text_config.rope_parameters[{layer_type!r}]")
            layers.append(LayerSpec(sliding, head_dim, kv_heads, not sliding, rope))
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
            canvas_length=hf_config.canvas_length,
            image_token_id=hf_config.image_token_id,
            bidirectional_images=text.use_bidirectional_attention == "vision",
            pad_token_id=text.pad_token_id,
        )


def check_fields(hf_config) -> None:
    """Refuse, naming the field, every value of TOP_FIELDS / TEXT_FIELDS we do not compute as transformers does.

    Fields a config lacks are at transformers' default. Attributes the tables do not list (sglang's flattened
    ``swa_*`` copies, converter extras such as ``vision_soft_tokens_per_image``) are read by no transformers module.
    """
    tables = (("config", hf_config, TOP_FIELDS), ("text_config", hf_config.text_config, TEXT_FIELDS))
    for where, config, table in tables:
        for name, rule in table.items():
            if rule.kind == "only" and hasattr(config, name):
                rule.check(where, name, getattr(config, name))
    # transformers' attention and RoPE read only these two from a layer's overrides (sglang's loader has
    # flattened them into swa_* attributes already, and serializes none)
    for layer, overrides in (hf_config.text_config.to_dict().get("per_layer_config") or {}).items():
        if extra := sorted(set(overrides) - {"head_dim", "num_key_value_heads"}):
            raise ValueError(f"text_config.per_layer_config[{layer}] overrides {extra}, which sgl-diffusion does not "
                             "support (only head_dim and num_key_value_heads)")


def _attention_shape(text, layer: int, sliding: bool) -> tuple[int, int]:
    """(head_dim, num_kv_heads) of a layer, from transformers' per_layer_config or from the flat
    full/``swa_*`` attributes sglang's config loader replaces it with."""
    if hasattr(text, "swa_head_dim"):  # flattened by sglang: base attributes describe full layers
        if sliding:
            return text.swa_head_dim, text.swa_num_key_value_heads
        return text.head_dim, text.num_key_value_heads
    per_layer = text.per_layer_config[layer]
    return per_layer.head_dim, per_layer.num_key_value_heads


def _rope(params: dict, where: str) -> RopeSpec:
    """The keys transformers' two RoPE types read: ``rope_theta`` and ``partial_rotary_factor`` (both types),
    ``factor`` (proportional only: the default type ignores it, with a warning). Other keys are read by neither."""
    kind = params.get("rope_type", "default")
    if kind not in ("default", "proportional"):
        raise ValueError(f"{where}.rope_type={kind!r} is not supported by sgl-diffusion (default, proportional)")
    partial = params.get("partial_rotary_factor", 1.0)
    if kind == "default" and partial != 1.0:
        # transformers builds cos/sin of int(head_dim * partial) dims and fails to broadcast them over head_dim
        raise ValueError(f"{where}.partial_rotary_factor={partial!r} is not supported with rope_type 'default'")
    return RopeSpec(
        theta=params["rope_theta"],
        partial_rotary_factor=partial,
        proportional=kind == "proportional",
        factor=params.get("factor", 1.0) if kind == "proportional" else 1.0,
    )
