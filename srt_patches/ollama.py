"""Stream the text of a finished chunk through sglang's Ollama API too.

Targets: sglang.srt.entrypoints.ollama.serving.OllamaServing.{_stream_chat_response, _stream_generate_response}
Checked against: sglang 0.5.23
Why: sglang's Ollama streamers send a finished chunk as ``done`` with empty content, dropping the text that chunk
     brought. A token model loses its last token there; DiffusionGemma sends a whole canvas per chunk, so a streamed
     one-canvas answer arrived empty. The streamers run here on a view of the server whose tokenizer manager sends a
     finished chunk's new text first, in a chunk of its own that is not finished.
Remove when: sglang's Ollama streamers send the final chunk's delta.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

_SERVING = "sglang.srt.entrypoints.ollama.serving.OllamaServing"
TARGETS = (f"{_SERVING}._stream_chat_response", f"{_SERVING}._stream_generate_response")


def stream_response(original, serving, *args, **kwargs):
    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    if not serves_diffusion_model(serving.tokenizer_manager.model_config.hf_config):
        return original(serving, *args, **kwargs)
    return original(_TextBeforeDone(serving), *args, **kwargs)


class _TextBeforeDone:
    """``serving`` whose ``tokenizer_manager.generate_request`` yields a finished chunk's new text unfinished first."""

    def __init__(self, serving):
        self._serving = serving
        self.tokenizer_manager = _Manager(serving.tokenizer_manager)

    def __getattr__(self, name):
        return getattr(self._serving, name)


class _Manager:
    def __init__(self, manager):
        self._manager = manager

    def __getattr__(self, name):
        return getattr(self._manager, name)

    async def generate_request(self, *args, **kwargs):
        sent = ""
        async for chunk in self._manager.generate_request(*args, **kwargs):
            text, meta = chunk.get("text", ""), chunk.get("meta_info", {})
            if meta.get("finish_reason") is not None and len(text) > len(sent):
                yield {**chunk, "meta_info": {**meta, "finish_reason": None}}
            sent = text
            yield chunk


def register() -> None:
    for target in TARGETS:
        plugin_hook(target, HookType.AROUND)(stream_response)
