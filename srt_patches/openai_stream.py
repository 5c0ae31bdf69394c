"""What OpenAI streams carry beyond sglang's chunks: provisional canvas drafts, and the usage chunk's diffusion block.

Targets: sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info,
         sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request,
         sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._generate_chat_stream,
         sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._generate_completion_stream
Checked against: sglang 0.5.23
Why: the scheduler sends each draft as per-chunk ``customized_info`` (sgl_diffusion.runtime.drafts).
     sglang accumulates customized values over a request's life; a draft replaces the previous one,
     so ``meta_info.diffusion_draft`` is set to the latest draft only. The OpenAI stream builders have
     no place for it and send nothing for a chunk without new text, so for a request with
     ``diffusion.stream_drafts`` the stream runs in a task and its drafts are sent in between, as
     chunks with no choices and a top-level ``diffusion_draft`` (like the usage chunk, which clients
     that read only ``choices`` skip).
Remove when: sglang streams model-specific per-chunk fields.

Targets: sglang.srt.entrypoints.openai.usage_processor.UsageProcessor.{calculate_streaming_usage,
         calculate_token_usage}
Checked against: sglang 0.5.23
Why: a streamed request's usage chunk (``stream_options.include_usage``), and the usage of every chunk with
     ``continuous_usage_stats``, are built from token counts alone, so they lacked the ``usage.diffusion`` block the
     non-streamed answer has. While an OpenAI stream runs, the chunks' per-token step counts are kept per choice
     (generate_request above): its usage chunk gets the block of all choices, and each chunk's usage the block of
     its own choice (the one whose output the stream took last, as the stream builds a chunk's usage right after).
Remove when: sglang passes the requests' meta_info to the streaming usage.

Targets: sglang.srt.entrypoints.openai.serving_responses.OpenAIServingResponses.{create_responses, _build_response}
Checked against: sglang 0.5.23
Why: the Responses API builds its usage from token counts alone, streamed or not. While a Responses request is served,
     its step counts are kept as an OpenAI stream's are, and every response built from it gets ``usage.diffusion``
     (srt_patches.openai_protocol serializes it in the Responses usage shape).
Remove when: sglang passes the requests' meta_info to the Responses usage.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextvars import ContextVar

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
TARGETS = (
    f"{_MANAGER}.update_request_meta_info",
    f"{_MANAGER}.generate_request",
    "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._generate_chat_stream",
    "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._generate_completion_stream",
    "sglang.srt.entrypoints.openai.usage_processor.UsageProcessor.calculate_streaming_usage",
    "sglang.srt.entrypoints.openai.usage_processor.UsageProcessor.calculate_token_usage",
    "sglang.srt.entrypoints.openai.serving_responses.OpenAIServingResponses.create_responses",
    "sglang.srt.entrypoints.openai.serving_responses.OpenAIServingResponses._build_response",
)
# Where generate_request diverts drafts while an OpenAI stream of this task wants them.
_draft_sink: ContextVar[asyncio.Queue | None] = ContextVar("sgl_diffusion_draft_sink", default=None)
_END = object()
# The step counts of the OpenAI stream or Responses request this task serves, per choice index (None outside one).
_stream_steps: ContextVar[dict[int, list[int]] | None] = ContextVar("sgl_diffusion_stream_steps", default=None)
# The choice whose output that stream took last (the one its next chunk, and that chunk's usage, are about).
_last_choice: ContextVar[int] = ContextVar("sgl_diffusion_last_choice", default=0)


def _draft_key() -> str:
    from sgl_diffusion.runtime.drafts import DRAFT_KEY

    return DRAFT_KEY


def update_request_meta_info(original, manager, meta_info, state, customized_info, index, *args, **kwargs):
    key = _draft_key()
    if key in customized_info:
        draft = customized_info[key][index]
        if draft is not None:
            meta_info[key] = draft
        customized_info = {k: v for k, v in customized_info.items() if k != key}
    return original(manager, meta_info, state, customized_info, index, *args, **kwargs)


def generate_request(original, manager, obj, *args, **kwargs):
    sink, steps = _draft_sink.get(), _stream_steps.get()
    outputs = original(manager, obj, *args, **kwargs)
    if steps is not None:
        outputs = _keep_steps(outputs, steps)
    return outputs if sink is None else _divert_drafts(outputs, sink)


async def _keep_steps(outputs, steps: dict[int, list[int]]):
    from sgl_diffusion.runtime.scheduler_hook import STEPS_KEY

    async for out in outputs:
        meta = out.get("meta_info", {}) if isinstance(out, dict) else {}
        index = out.get("index", 0) if isinstance(out, dict) else 0
        _last_choice.set(index)  # the generator runs in its consumer's context: the stream building the chunk
        if new := meta.get(STEPS_KEY):
            kept = steps.setdefault(index, [])
            if len(new) == meta.get("completion_tokens"):  # the whole answer's, as sglang accumulates them
                kept[:] = new
            else:  # --incremental-streaming-output: this chunk's only
                kept.extend(new)
        yield out


async def _divert_drafts(outputs, sink: asyncio.Queue):
    """Move drafts from the chunks to the sink; drop chunks that carried nothing else."""
    key, sent = _draft_key(), {}  # index -> completion_tokens of the last chunk passed on
    async for out in outputs:
        meta = out.get("meta_info", {}) if isinstance(out, dict) else {}
        index = out.get("index", 0) if isinstance(out, dict) else 0
        draft = meta.pop(key, None)
        if draft is not None:
            sink.put_nowait({"index": index, "id": meta.get("id"), **draft})
            if meta.get("completion_tokens") == sent.get(index, 0) and meta.get("finish_reason") is None:
                continue  # nothing but the draft
        sent[index] = meta.get("completion_tokens")
        yield out


def chat_stream(original, serving, adapted_request, request, *args, **kwargs):
    sse = _counting_steps(original, serving, adapted_request, request, *args, **kwargs)
    return _with_drafts(sse, adapted_request, request, "chat.completion.chunk")


def completion_stream(original, serving, adapted_request, request, *args, **kwargs):
    sse = _counting_steps(original, serving, adapted_request, request, *args, **kwargs)
    return _with_drafts(sse, adapted_request, request, "text_completion")


async def _counting_steps(original, *args, **kwargs):
    # Set in the context that runs the stream's body (and copied into the drafts' pump task, created later), so the
    # stream's generate_request and its usage see it; the context ends with the response, so it is never reset.
    _stream_steps.set({})
    async for event in original(*args, **kwargs):
        yield event


def streaming_usage(original, *args, **kwargs):
    return _with_kept_steps(original(*args, **kwargs))


def token_usage(original, *args, **kwargs):
    """A chunk's usage (``continuous_usage_stats``): the diffusion block of the choice the stream took last. The
    usage chunk and the Responses usage replace it with the block of all choices (streaming_usage, build_response)."""
    from srt_patches.openai_protocol import diffusion_usage

    usage = original(*args, **kwargs)
    steps = _stream_steps.get()
    if steps and (kept := steps.get(_last_choice.get())):
        usage.diffusion = diffusion_usage(kept)
    return usage


async def create_responses(original, serving, *args, **kwargs):
    # NOTE: set in the request's task; a streamed answer's body runs in a task that copies this context later, so its
    # generate_request and _build_response see the same dict
    _stream_steps.set({})
    return await original(serving, *args, **kwargs)


def build_response(original, *args, **kwargs):
    response = original(*args, **kwargs)
    if response.usage is not None:
        _with_kept_steps(response.usage)
    return response


def _with_kept_steps(usage):
    """``usage`` with the diffusion block of the step counts this task kept (none kept: unchanged)."""
    from srt_patches.openai_protocol import diffusion_usage

    if steps := _stream_steps.get():
        usage.diffusion = diffusion_usage([s for index in sorted(steps) for s in steps[index]])
    return usage


def wants_drafts(adapted_request) -> bool:
    sampling = adapted_request.sampling_params
    diffusion = sampling.get("diffusion") if isinstance(sampling, dict) else None
    return isinstance(diffusion, dict) and diffusion.get("stream_drafts") is True


def _with_drafts(sse, adapted_request, request, chunk_object: str):
    if not wants_drafts(adapted_request):
        return sse
    return _interleave(sse, request.model, chunk_object)


async def _interleave(sse, model: str, chunk_object: str):
    queue: asyncio.Queue = asyncio.Queue()

    async def pump():
        try:
            async for event in sse:
                queue.put_nowait(event)
        finally:
            queue.put_nowait(_END)

    token = _draft_sink.set(queue)
    task = asyncio.create_task(pump())  # runs in a copy of this context: its generate_request sees the sink
    _draft_sink.reset(token)
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, str):
                yield item
            else:
                chunk = {"id": item.pop("id"), "object": chunk_object, "created": int(time.time()), "model": model,
                         "choices": [], _draft_key(): item}
                yield f"data: {json.dumps(chunk)}\n\n"
        await task  # re-raise what the stream raised
    finally:
        task.cancel()


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(update_request_meta_info)
    plugin_hook(TARGETS[1], HookType.AROUND)(generate_request)
    plugin_hook(TARGETS[2], HookType.AROUND)(chat_stream)
    plugin_hook(TARGETS[3], HookType.AROUND)(completion_stream)
    plugin_hook(TARGETS[4], HookType.AROUND)(streaming_usage)
    plugin_hook(TARGETS[5], HookType.AROUND)(token_usage)
    plugin_hook(TARGETS[6], HookType.AROUND)(create_responses)
    plugin_hook(TARGETS[7], HookType.AROUND)(build_response)
