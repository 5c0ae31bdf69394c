"""Serve DiffusionGemma's chat like Gemma 4's, and refuse forced tool calls by their own name.

Targets: sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat.__init__, ._validate_request
Checked against: sglang 0.5.23
Why: sglang keeps special tokens in chat output only for hf model_type gemma4/gemma4_unified, so the
     gemma4 reasoning and tool-call parsers never see ``<|channel>``/``<channel|>``/``<|tool_call>`` of a
     ``diffusion_gemma`` model, whose chat format is Gemma 4's. And ``tool_choice="required"`` or a named
     function turn into a json_schema constraint the canvas sampler cannot honour; the user gets a 400
     about the tool_choice they sent instead of one about a json_schema they never sent.
Remove when: sglang treats diffusion_gemma as a Gemma 4 chat model and the canvas sampler has grammars.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

_CHAT = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat"
TARGETS = (f"{_CHAT}.__init__", f"{_CHAT}._validate_request")
FORCED_TOOL_CHOICE_ERROR = (
    "tool_choice='required' or a named function needs constrained decoding, which DiffusionGemma does not "
    "support yet; use tool_choice='auto' (the model may still call the tools)"
)


def _serves_diffusion_model(serving) -> bool:
    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    return serves_diffusion_model(serving.tokenizer_manager.model_config.hf_config)


def after_init(_result, serving, *args, **kwargs):
    if _serves_diffusion_model(serving):
        serving.is_gemma4 = True


def after_validate_request(error, serving, request, *args, **kwargs):
    if error is not None or not _serves_diffusion_model(serving):
        return error
    tool_choice = request.tool_choice  # upstream has already checked that tools exist for a forced choice
    if tool_choice == "required" or not (tool_choice is None or isinstance(tool_choice, str)):
        return FORCED_TOOL_CHOICE_ERROR
    return None


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AFTER)(after_init)
    plugin_hook(TARGETS[1], HookType.AFTER)(after_validate_request)
