"""Accept ``"diffusion"`` in OpenAI request bodies (chat, completions, responses) and in Anthropic Messages bodies,
and pass it on as ``sampling_params["diffusion"]``.

Also accept ``"image_token_budget"`` in chat bodies, checked here and passed on in the request's
``mm_processor_kwargs`` (what sgl_diffusion.multimodal's processor reads), on a DiffusionGemma server only.

Also report diffusion figures in ``usage.diffusion`` (canvases, denoise steps, tokens per forward; a streamed
answer's usage chunk gets them in srt_patches.openai_stream), in the Anthropic Messages usage, which sglang
converts from the chat usage field by field, and in the Responses usage, which sglang's ``ResponsesResponse``
serializer writes field by field (its serializer is extended; srt_patches.openai_stream fills the field).

Also serve the completions ``suffix`` as an infill: the completion is a hole of ``max_tokens`` tokens
followed by the suffix as fixed context (``diffusion.infill``); the answer is the hole's text, as
OpenAI defines it (the suffix is context the canvas reads, not output).

Target: sglang.srt.entrypoints.openai.protocol.{ChatCompletionRequest.to_sampling_params,
        ResponsesRequest.to_sampling_params, CompletionRequest, UsageInfo},
        sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._build_sampling_params,
        sglang.srt.entrypoints.anthropic.serving.AnthropicServing._convert_to_chat_completion_request,
        sglang.srt.entrypoints.openai.usage_processor.UsageProcessor.calculate_response_usage,
        sglang.srt.entrypoints.anthropic.serving._anthropic_usage_from_openai
Checked against: sglang 0.5.23
Why: the pydantic request models drop unknown fields, neither builder forwards them, and usage has
     no place for model-specific figures; sglang reads ``suffix`` only through FIM completion templates.
     ``diffusion.stream_drafts`` is refused with a 400 where the stream has no place for drafts (Responses and
     Anthropic streams are built from sglang's own events: drafts would be dropped without a word). A Responses
     request without a temperature gets none (sglang puts its endpoint's 0.7 there, which scaled the schedule).
     ``max_output_tokens`` is the answer's limit: sglang keeps 2 of it back for a token engine's BOS and EOS (so 1
     was a 400 and 5 gave 3 tokens). Any model's chat ``max_completion_tokens: 0`` is 0, as ``max_tokens: 0`` is:
     sglang reads ``max_completion_tokens or max_tokens``, and 0 generated up to the context length.
Remove when: sglang lets models declare extra request fields.

Target: sglang.srt.entrypoints.openai.protocol.ChatCompletionRequest (its ``mode="before"`` model validators)
Checked against: sglang 0.5.23
Why: its before-validators (``set_json_schema``, ``set_tool_choice_default``, ...) call ``values.get`` on the body
     as sent, so a chat body that is JSON but not an object (``null``, ``[1]``, ``"x"``) was an HTTP 500 with an
     AttributeError traceback; /v1/completions and /generate answer it with a 400. A before-validator that runs
     first refuses a body that is not an object with a validation error, which sglang answers with a 400.
Remove when: sglang's chat request validators accept any JSON value.

Target: sglang.srt.entrypoints.openai.serving_tokenize.OpenAIServingDetokenize._validate_request (sglang's
        OpenAIServingBase._validate_request, which checks nothing, wrapped on the detokenize handler only)
Checked against: sglang 0.5.23
Why: /v1/detokenize hands any integer to the tokenizer: a negative id is an HTTP 500 ("out of range integral type
     conversion"), and an id past the vocabulary decodes to nothing, silently. Both are a 400 naming the range; so
     is any request to a server without a tokenizer (--skip-tokenizer-init), which failed on it.
Remove when: sglang range-checks the ids it detokenizes.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

_PROTOCOL = "sglang.srt.entrypoints.openai.protocol"
TARGETS = (
    f"{_PROTOCOL}.ChatCompletionRequest.to_sampling_params",
    "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._build_sampling_params",
    "sglang.srt.entrypoints.openai.usage_processor.UsageProcessor.calculate_response_usage",
    "sglang.srt.entrypoints.openai.serving_tokenize.OpenAIServingDetokenize._validate_request",
    f"{_PROTOCOL}.ResponsesRequest.to_sampling_params",
    "sglang.srt.entrypoints.anthropic.serving.AnthropicServing._convert_to_chat_completion_request",
    "sglang.srt.entrypoints.anthropic.serving._anthropic_usage_from_openai",
)


def _add_diffusion_field() -> None:
    from pydantic.fields import FieldInfo
    from sglang.srt.entrypoints.anthropic import protocol as anthropic
    from sglang.srt.entrypoints.openai import protocol

    fields = [(cls, "diffusion", dict[str, Any] | None) for cls in (
        protocol.ChatCompletionRequest, protocol.CompletionRequest, protocol.ResponsesRequest,
        anthropic.AnthropicMessagesRequest, protocol.UsageInfo, anthropic.AnthropicUsage)]  # fmt: skip
    fields.append((protocol.ChatCompletionRequest, "image_token_budget", int | None))
    for cls, name, annotation in fields:
        if name not in cls.model_fields:
            # left out of the JSON while unset: another model's usage (and requests) serialize as sglang's do
            cls.model_fields[name] = FieldInfo(annotation=annotation, default=None, exclude_if=_is_none)
            cls.model_rebuild(force=True)
    _serialize_responses_diffusion(protocol.ResponsesResponse)
    _refuse_a_body_that_is_not_an_object(protocol.ChatCompletionRequest)
    # NOTE: models that nest UsageInfo captured its old schema; rebuild them so usage.diffusion serializes
    for cls in (protocol.ChatCompletionResponse, protocol.CompletionResponse, protocol.ChatCompletionStreamResponse,
                protocol.CompletionStreamResponse, anthropic.AnthropicMessagesResponse, anthropic.MessageDeltaEvent,
                anthropic.MessageStartEvent, protocol.ResponsesLifecycleEvent):
        cls.model_rebuild(force=True)


def _is_none(value) -> bool:
    return value is None


def _serialize_responses_diffusion(cls) -> None:
    """The Responses usage is written field by field by sglang's ``_serialize_usage`` serializer; ours adds
    ``diffusion`` to what it writes. NOTE: pydantic keeps a model's serializers in ``__pydantic_decorators__`` and
    builds the schema from there, so the entry is replaced and the model rebuilt."""
    import dataclasses

    serializers = cls.__pydantic_decorators__.field_serializers
    entry = serializers["_serialize_usage"]
    if getattr(entry.func, "_sgl_diffusion", False):
        return
    upstream = entry.func

    def serialize_usage(self, usage, info):
        out = upstream(self, usage, info)
        if out is not None and getattr(usage, "diffusion", None) is not None:
            out["diffusion"] = usage.diffusion
        return out

    serialize_usage._sgl_diffusion = True
    serializers["_serialize_usage"] = dataclasses.replace(entry, func=serialize_usage)
    cls.model_rebuild(force=True)


BODY_CHECK = "_sgl_diffusion_body_is_an_object"  # our before-validator's name among ChatCompletionRequest's


def _refuse_a_body_that_is_not_an_object(cls) -> None:
    """Add a before-validator that runs ahead of sglang's (pydantic runs the last one added first) and refuses a
    body that is not a JSON object. NOTE: as in _serialize_responses_diffusion, the entry goes into
    ``__pydantic_decorators__`` (a copy of one of sglang's before-validators, with our function) and the model is
    rebuilt."""
    import dataclasses

    validators = cls.__pydantic_decorators__.model_validators
    if BODY_CHECK in validators:
        return
    [entry, *_] = [v for v in validators.values() if v.info.mode == "before"]
    validators[BODY_CHECK] = dataclasses.replace(entry, cls_var_name=BODY_CHECK, func=body_is_an_object)
    cls.model_rebuild(force=True)


def body_is_an_object(values):
    if not isinstance(values, dict):
        raise ValueError(f"the request body must be a JSON object, not {type(values).__name__}")
    return values


def _carry_diffusion(params: dict, request) -> dict:
    if request.diffusion is not None:
        params["diffusion"] = request.diffusion
    return params


# set by srt_patches.serving_chat when this process's chat endpoint serves DiffusionGemma; another model's server
# leaves image_token_budget unread, as sglang drops a field it does not know
diffusion_served = False


def chat_to_sampling_params(original, request, *args, **kwargs):
    params = _carry_diffusion(original(request, *args, **kwargs), request)
    if request.max_completion_tokens == 0:  # sglang reads `max_completion_tokens or max_tokens`: 0 meant no limit
        params["max_new_tokens"] = 0
    if request.image_token_budget is not None and diffusion_served:
        from sgl_diffusion.multimodal.processor import BUDGET_KEY, check_image_token_budget

        # sglang builds the GenerateReqInput from request.mm_processor_kwargs right after this call
        budget = check_image_token_budget(request.image_token_budget)
        request.mm_processor_kwargs = dict(request.mm_processor_kwargs or {}) | {BUDGET_KEY: budget}
    return params


def responses_to_sampling_params(original, request, *args, **kwargs):
    diffusion = getattr(request, "diffusion", None)
    if isinstance(diffusion, dict) and diffusion.get("stream_drafts"):
        # its stream is sglang's own events, with no place for a draft: they would be dropped without a word
        raise ValueError("diffusion.stream_drafts: the Responses API has no draft events; stream drafts from "
                         "/v1/chat/completions, /v1/completions or /generate")
    params = _carry_diffusion(original(request, *args, **kwargs), request)
    if diffusion_served and params.get("max_new_tokens") is not None:
        # sglang keeps 2 tokens of max_output_tokens back, for a BOS and an EOS a token engine adds to the budget; a
        # canvas adds none, and the client's limit is the answer's length
        params["max_new_tokens"] += 2
    default_params = kwargs.get("default_params", args[1] if len(args) > 1 else None) or {}
    if request.temperature is None and "temperature" not in default_params:
        # sglang's own Responses default (0.7), not the client's: the checkpoint's schedule applies, as elsewhere, and
        # a request's diffusion.t_min/t_max are not refused as set beside a temperature
        params.pop("temperature", None)
    return params


def anthropic_to_chat_request(original, serving, anthropic_request, *args, **kwargs):
    diffusion = anthropic_request.diffusion
    if anthropic_request.stream and isinstance(diffusion, dict) and diffusion.get("stream_drafts"):
        # sglang's Anthropic stream is built from the chat chunks with choices only: the drafts were dropped
        raise ValueError("diffusion.stream_drafts: Anthropic message streams have no draft events; stream drafts "
                         "from /v1/chat/completions, /v1/completions or /generate")
    chat_request = original(serving, anthropic_request, *args, **kwargs)
    chat_request.diffusion = anthropic_request.diffusion  # read by chat_to_sampling_params
    return chat_request


def completion_sampling_params(original, serving, request, *args, **kwargs):
    params = _carry_diffusion(original(serving, request, *args, **kwargs), request)
    if request.suffix and serving.template_manager.completion_template_name is None:
        from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

        if serves_diffusion_model(serving.tokenizer_manager.model_config.hf_config):
            params["diffusion"] = _suffix_infill(request.suffix, request.max_tokens, params.get("diffusion"))
    return params


def _suffix_infill(suffix: str, max_tokens: int | None, diffusion):
    """``diffusion`` with an infill template: a hole of ``max_tokens`` (the answer), then the suffix, escaped."""
    if isinstance(diffusion, dict) and "infill" in diffusion:
        raise ValueError("use either suffix or diffusion.infill, not both")
    hole = "{{hole}}" if max_tokens is None else "{{hole:%d}}" % max_tokens
    template = hole + suffix.replace("{{", "{{{{")
    if diffusion is not None and not isinstance(diffusion, dict):
        return diffusion  # malformed: refused by the diffusion validation, naming it
    return (diffusion or {}) | {"infill": {"template": template}}


def response_usage(original, responses, *args, **kwargs):
    from sgl_diffusion.runtime.scheduler_hook import STEPS_KEY

    usage = original(responses, *args, **kwargs)
    usage.diffusion = diffusion_usage([s for r in responses for s in (r.get("meta_info", {}).get(STEPS_KEY) or [])])
    return usage


def anthropic_usage(original, usage, *args, **kwargs):
    converted = original(usage, *args, **kwargs)
    if converted.output_tokens and getattr(usage, "diffusion", None) is not None:
        converted.diffusion = usage.diffusion  # with the output tokens it describes
    return converted


def diffusion_usage(steps: list[int]) -> dict | None:
    """``usage.diffusion`` from the per-token step counts (a canvas's steps on its first token, 0 on the others)."""
    if not steps:
        return None
    forwards = sum(steps)
    return {"canvases": sum(1 for s in steps if s), "denoise_steps": forwards,
            "tokens_per_forward": round(len(steps) / max(forwards, 1), 4)}  # fmt: skip


def validate_detokenize(original, serving, request):
    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    if error := original(serving, request):
        return error
    if not serves_diffusion_model(serving.tokenizer_manager.model_config.hf_config):
        return None
    if serving.tokenizer_manager.tokenizer is None:  # sglang's handler would fail on it: a 500
        return "detokenize needs the server's tokenizer: this server runs with --skip-tokenizer-init"
    tokens = request.tokens if isinstance(request.tokens, list) else []
    ids = [t for row in tokens for t in (row if isinstance(row, list) else [row]) if isinstance(t, int)]
    vocab = len(serving.tokenizer_manager.tokenizer)
    if bad := [t for t in ids if not 0 <= t < vocab]:
        return f"token ids must be in [0, {vocab}): got {bad[:8]}"
    return None


def register() -> None:
    _add_diffusion_field()
    plugin_hook(TARGETS[0], HookType.AROUND)(chat_to_sampling_params)
    plugin_hook(TARGETS[1], HookType.AROUND)(completion_sampling_params)
    plugin_hook(TARGETS[2], HookType.AROUND)(response_usage)
    plugin_hook(TARGETS[3], HookType.AROUND)(validate_detokenize)
    plugin_hook(TARGETS[4], HookType.AROUND)(responses_to_sampling_params)
    plugin_hook(TARGETS[5], HookType.AROUND)(anthropic_to_chat_request)
    plugin_hook(TARGETS[6], HookType.AROUND)(anthropic_usage)
