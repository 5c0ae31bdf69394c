"""Every field of transformers' DiffusionGemma configs is honoured, refused by name, or irrelevant by a table.

A field transformers adds upstream fails ``test_every_transformers_field_has_a_rule`` before it can be silently
ignored here.
"""

import dataclasses

import pytest
import torch
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.models.diffusion_gemma.configuration_diffusion_gemma import (
    DiffusionGemmaConfig as HFConfig,
    DiffusionGemmaTextConfig,
)

from sgl_diffusion.entrypoints.tiny_checkpoint import tiny_config
from sgl_diffusion.models import layers
from sgl_diffusion.models.config import ACTIVATIONS, TEXT_FIELDS, TOP_FIELDS, DiffusionGemmaConfig
from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion


def transformers_fields(config_cls) -> set[str]:
    """The dataclass fields, what a default config's ``to_dict`` serializes (per_layer_config, derived by
    __post_init__), and class attributes a subclass adds without an annotation (final_logit_softcapping: settable
    by kwarg and serialized, yet no dataclass field)."""
    plain = {name for name, value in vars(config_cls).items()
             if not name.startswith("__") and not callable(value) and not isinstance(value, (property, classmethod))
             and not hasattr(PreTrainedConfig, name)}
    return {f.name for f in dataclasses.fields(config_cls)} | set(config_cls().to_dict()) | plain


def test_every_transformers_field_has_a_rule():
    """The tables list exactly the fields transformers' two config classes have, no more, no fewer."""
    text, top = transformers_fields(DiffusionGemmaTextConfig), transformers_fields(HFConfig)
    assert {"final_logit_softcapping", "per_layer_config", "use_bidirectional_attention"} <= text
    assert text == set(TEXT_FIELDS), (sorted(text - set(TEXT_FIELDS)), sorted(set(TEXT_FIELDS) - text))
    assert top == set(TOP_FIELDS), (sorted(top - set(TOP_FIELDS)), sorted(set(TOP_FIELDS) - top))
    for table in (TEXT_FIELDS, TOP_FIELDS):
        for name, rule in table.items():
            assert rule.kind in ("honoured", "only", "irrelevant"), name
            assert rule.kind != "irrelevant" or (rule.reason and " " not in rule.reason), name
            assert rule.kind != "only" or rule.allowed, name


def _set(config, where: str, name: str, value):
    setattr(config.text_config if where == "text_config" else config, name, value)
    return config


@pytest.mark.parametrize("where, name, value", [
    ("config", "tie_word_embeddings", False),
    ("text_config", "attention_bias", True),
    ("text_config", "use_bidirectional_attention", "all"),
    ("text_config", "hidden_activation", "gelu_new"),
    ("text_config", "hidden_activation", "relu"),
])  # fmt: skip
def test_unsupported_values_are_refused_naming_the_field(where, name, value):
    """Building the model (what sglang does at startup) fails with the field's name, for each refused value."""
    config = _set(tiny_config(), where, name, value)
    with pytest.raises(ValueError, match=rf"{where}\.{name}={value!r}".replace("(", r"\(")):
        DiffusionGemmaForBlockDiffusion(config)


@pytest.mark.parametrize("layer_type, params, field", [
    ("sliding_attention", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}, "rope_type"),
    ("full_attention", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0}, "rope_type"),
    ("sliding_attention", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "partial_rotary_factor"),
])  # fmt: skip
def test_unsupported_rope_is_refused_naming_the_key(layer_type, params, field):
    config = tiny_config()
    config.text_config.rope_parameters = config.text_config.rope_parameters | {layer_type: params}
    with pytest.raises(ValueError, match=rf"rope_parameters\['{layer_type}'\]\.{field}"):
        DiffusionGemmaConfig.from_hf(config)


def test_layer_count_and_softcap_are_checked():
    config = tiny_config()
    config.text_config.num_hidden_layers = 5
    with pytest.raises(ValueError, match="num_hidden_layers"):
        DiffusionGemmaConfig.from_hf(config)
    config = tiny_config()
    config.text_config.final_logit_softcapping = None
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        DiffusionGemmaConfig.from_hf(config)


def test_irrelevant_and_allowed_values_pass():
    """Irrelevant fields may hold anything; allowed values of refused-by-default fields build the model."""
    config = tiny_config()
    for name, value in [("pad_token_id", 3), ("max_position_embeddings", 77), ("tie_word_embeddings", False),
                        ("attention_dropout", 0.5), ("use_bidirectional_attention", None)]:
        setattr(config.text_config, name, value)
    config.boi_token_id = 7
    assert DiffusionGemmaConfig.from_hf(config).bidirectional_images is False
    assert DiffusionGemmaConfig.from_hf(tiny_config()).bidirectional_images is True


def test_the_real_checkpoint_config_is_accepted():
    """google/diffusiongemma-26B-A4B-it's config (the HF converter's values) passes every check."""
    text = dict(
        vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, num_experts=128,
        top_k_experts=8, moe_intermediate_size=704, sliding_window=1024, max_position_embeddings=262144,
        use_bidirectional_attention="vision", final_logit_softcapping=30.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5,
    )
    cfg = DiffusionGemmaConfig.from_hf(HFConfig(text_config=text, vision_config=dict(hidden_size=1152),
                                                canvas_length=256, tie_word_embeddings=True))
    assert [i for i, s in enumerate(cfg.layers) if not s.sliding] == [5, 11, 17, 23, 29]
    assert cfg.hidden_activation == "gelu_pytorch_tanh" and cfg.bidirectional_images


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_are_transformers_functions_bit_for_bit(name):
    """Each supported hidden_activation computes exactly ACT2FN[name], in fp32 and bf16."""
    assert set(layers.ACTIVATIONS) == set(ACTIVATIONS)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(layers.ACTIVATIONS[name](x.to(dtype)), ACT2FN[name](x.to(dtype))), dtype


def test_per_layer_overrides_beyond_the_attention_shape_are_refused():
    """per_layer_config may set head_dim / num_key_value_heads of a layer (the full layers do); anything else is
    refused with the layer and the key."""
    config = tiny_config(per_layer_config={5: {"head_dim": 32, "num_key_value_heads": 1, "rms_norm_eps": 1e-3}})
    with pytest.raises(ValueError, match=r"per_layer_config\[0?5\] overrides \['rms_norm_eps'\]"):
        DiffusionGemmaConfig.from_hf(config)
    DiffusionGemmaConfig.from_hf(tiny_config(per_layer_config={5: {"head_dim": 32, "num_key_value_heads": 1}}))
