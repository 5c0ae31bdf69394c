"""Serve DiffusionGemma's chat like Gemma 4's.

Target: sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat.__init__
Checked against: sglang 0.5.23
Why: sglang keeps special tokens in chat output only for hf model_type gemma4/gemma4_unified, so the
     gemma4 reasoning and tool-call parsers never see ``<|channel>``/``<channel|>``/``<|tool_call>`` of a
     ``diffusion_gemma`` model, whose chat format is Gemma 4's. (``tool_choice="required"`` or a named
     function become sglang's json_schema constraint, which the canvas commit honours.)
Remove when: sglang treats diffusion_gemma as a Gemma 4 chat model.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

_CHAT = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat"
TARGETS = (f"{_CHAT}.__init__",)


def _serves_diffusion_model(serving) -> bool:
    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    return serves_diffusion_model(serving.tokenizer_manager.model_config.hf_config)


def after_init(_result, serving, *args, **kwargs):
    if _serves_diffusion_model(serving):
        serving.is_gemma4 = True


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AFTER)(after_init)
