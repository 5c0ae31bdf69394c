from inspect import Parameter
from types import SimpleNamespace

import pytest

from srt_patches import serving_chat

EMPTY = Parameter.empty
EXPECTED_PARAMETERS = {
    "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat.__init__": [
        ("self", EMPTY), ("tokenizer_manager", EMPTY), ("template_manager", EMPTY),
    ],
}  # fmt: skip


def _serving(architecture):
    hf_config = SimpleNamespace(architectures=[architecture], model_type="x")
    return SimpleNamespace(tokenizer_manager=SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config)))


def test_every_target_has_an_expected_signature():
    assert set(serving_chat.TARGETS) == set(EXPECTED_PARAMETERS)


@pytest.mark.parametrize("target", serving_chat.TARGETS)
def test_upstream_signature(target, upstream_parameters):
    expected = EXPECTED_PARAMETERS[target]
    assert upstream_parameters(target)[: len(expected)] == expected


@pytest.mark.parametrize("target", serving_chat.TARGETS)
def test_installed(target, applied):
    assert applied.is_installed(target)


def test_upstream_keeps_special_tokens_only_for_gemma4_model_types(upstream):
    """Upstream decides is_gemma4 from model_type gemma4/gemma4_unified (what after_init extends to us)."""
    import inspect

    source = inspect.getsource(upstream(serving_chat.TARGETS[0]))
    assert "self.is_gemma4 =" in source and '("gemma4", "gemma4_unified")' in source


def test_diffusion_gemma_chat_is_served_as_gemma4():
    """after_init marks a DiffusionGemma chat server as Gemma 4, and leaves other models alone."""
    ours, other = _serving("DiffusionGemmaForBlockDiffusion"), _serving("LlamaForCausalLM")
    for serving in (ours, other):
        serving.is_gemma4 = False
        serving_chat.after_init(None, serving, None, None)
    assert ours.is_gemma4 is True and other.is_gemma4 is False
