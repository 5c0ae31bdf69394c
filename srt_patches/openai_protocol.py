"""Accept ``"diffusion"`` in OpenAI request bodies and pass it on as ``sampling_params["diffusion"]``.

Target: sglang.srt.entrypoints.openai.protocol.{ChatCompletionRequest.to_sampling_params,
        CompletionRequest}, sglang.srt.entrypoints.openai.serving_completions.
        OpenAIServingCompletion._build_sampling_params
Checked against: sglang 0.5.23
Why: the pydantic request models drop unknown fields, and neither builder forwards them.
Remove when: sglang lets models declare extra request fields.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

_PROTOCOL = "sglang.srt.entrypoints.openai.protocol"
TARGETS = (
    f"{_PROTOCOL}.ChatCompletionRequest.to_sampling_params",
    "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._build_sampling_params",
)


def _add_diffusion_field() -> None:
    from pydantic.fields import FieldInfo
    from sglang.srt.entrypoints.openai import protocol

    for cls in (protocol.ChatCompletionRequest, protocol.CompletionRequest):
        if "diffusion" not in cls.model_fields:
            cls.model_fields["diffusion"] = FieldInfo(annotation=dict[str, Any] | None, default=None)
            cls.model_rebuild(force=True)


def chat_to_sampling_params(original, request, *args, **kwargs):
    params = original(request, *args, **kwargs)
    if request.diffusion is not None:
        params["diffusion"] = request.diffusion
    return params


def completion_sampling_params(original, serving, request, *args, **kwargs):
    params = original(serving, request, *args, **kwargs)
    if request.diffusion is not None:
        params["diffusion"] = request.diffusion
    return params


def register() -> None:
    _add_diffusion_field()
    plugin_hook(TARGETS[0], HookType.AROUND)(chat_to_sampling_params)
    plugin_hook(TARGETS[1], HookType.AROUND)(completion_sampling_params)
