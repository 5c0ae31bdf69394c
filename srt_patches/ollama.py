"""sglang's Ollama API for DiffusionGemma: stream the text of the finished chunk, answer a refused request with a 400.

Targets: sglang.srt.entrypoints.ollama.serving.OllamaServing.{_stream_chat_response, _stream_generate_response,
         handle_chat, handle_generate}
Checked against: sglang 0.5.23
Why: sglang's Ollama streamers send a finished chunk as ``done`` with empty content, dropping the text that chunk
     brought. A token model loses its last token there; DiffusionGemma sends a whole canvas per chunk, so a streamed
     one-canvas answer arrived empty. The streamers run here on a copy of the server whose tokenizer manager sends a
     finished chunk's new text first, in a chunk of its own that is not finished.
     The Ollama handlers catch no error: a request the server refuses (an option our sampler does not have, such as
     ``top_k``) was a 500, or a stream cut off with no body. The stream's first chunk is awaited before the response
     starts, and a refusal (ValueError, or the TypeError sglang's checks raise on an option of the wrong type, such
     as ``"num_predict": "x"``) is answered 400 with Ollama's ``{"error": ...}`` body.
Remove when: sglang's Ollama streamers send the final chunk's delta and its handlers answer ValueErrors with a 400.

Target: sglang.srt.entrypoints.ollama.serving.OllamaServing._convert_options_to_sampling_params
Checked against: sglang 0.5.23
Why: it maps the ``seed`` option to a ``seed`` sampling parameter, which sglang's SamplingParams does not have: any
     request with ``options.seed`` was a 500 (TypeError). It is ``sampling_seed``, which seeds the canvas sampler as
     the OpenAI ``seed`` does (runtime/admission.py); for a diffusion model the seed decides the whole canvas.
Remove when: sglang maps ``seed`` to ``sampling_seed``.
"""

from __future__ import annotations

import copy

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

_SERVING = "sglang.srt.entrypoints.ollama.serving.OllamaServing"
TARGETS = (f"{_SERVING}._stream_chat_response", f"{_SERVING}._stream_generate_response",
           f"{_SERVING}.handle_chat", f"{_SERVING}.handle_generate", f"{_SERVING}._convert_options_to_sampling_params")


def _serves_diffusion(serving) -> bool:
    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    return serves_diffusion_model(serving.tokenizer_manager.model_config.hf_config)


async def handle(original, serving, request, raw_request):
    if not _serves_diffusion(serving):
        return await original(serving, request, raw_request)
    from fastapi.responses import ORJSONResponse

    try:
        return await original(serving, request, raw_request)
    except (ValueError, TypeError) as e:  # TypeError: sglang's checks on an option of the wrong type
        return ORJSONResponse({"error": str(e)}, status_code=400)


async def stream_response(original, serving, gen_request, raw_request, model_name):
    if not _serves_diffusion(serving):
        return await original(serving, gen_request, raw_request, model_name)
    chunks = serving.tokenizer_manager.generate_request(gen_request, raw_request)
    first = await anext(chunks)  # a refused request raises here, before any byte is sent
    view = copy.copy(serving)  # the streamer reads only self.tokenizer_manager and sglang's helpers
    view.tokenizer_manager = _StartedStream(serving.tokenizer_manager, first, chunks)
    return await original(view, gen_request, raw_request, model_name)


class _StartedStream:
    """A tokenizer manager whose ``generate_request`` yields the stream already started, a finished chunk's new text
    unfinished first."""

    def __init__(self, manager, first, rest):
        self._manager, self._first, self._rest = manager, first, rest

    def __getattr__(self, name):
        return getattr(self._manager, name)

    async def generate_request(self, *args, **kwargs):  # the request is the one already started
        sent, chunk = "", self._first
        while True:
            text, meta = chunk.get("text", ""), chunk.get("meta_info", {})
            if meta.get("finish_reason") is not None and len(text) > len(sent):
                yield {**chunk, "meta_info": {**meta, "finish_reason": None}}
            sent = text
            yield chunk
            try:
                chunk = await anext(self._rest)
            except StopAsyncIteration:
                return


def options_to_sampling_params(result: dict, serving, *args, **kwargs) -> dict:
    if "seed" in result and _serves_diffusion(serving):
        result["sampling_seed"] = result.pop("seed")
    return result


def register() -> None:
    for target in TARGETS[:2]:
        plugin_hook(target, HookType.AROUND)(stream_response)
    for target in TARGETS[2:4]:
        plugin_hook(target, HookType.AROUND)(handle)
    plugin_hook(TARGETS[4], HookType.AFTER)(options_to_sampling_params)
