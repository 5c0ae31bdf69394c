"""Serve DiffusionGemma's chat like Gemma 4's.

Target: sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat.__init__
Checked against: sglang 0.5.23
Why: sglang keeps special tokens in chat output only for hf model_type gemma4/gemma4_unified, so the
     gemma4 reasoning and tool-call parsers never see ``<|channel>``/``<channel|>``/``<|tool_call>`` of a
     ``diffusion_gemma`` model, whose chat format is Gemma 4's. (``tool_choice="required"`` or a named
     function become sglang's json_schema constraint, which the canvas commit honours.)
Remove when: sglang treats diffusion_gemma as a Gemma 4 chat model.

Target: sglang.srt.function_call.json_array_parser.JsonArrayParser.parse_streaming_increment
Checked against: sglang 0.5.23
Why: a streamed ``tool_choice="required"``/named answer (a JSON list of calls) is read by this parser, which finds
     the next call only when the text left after a complete call starts with the ``,`` separator. The grammar
     allows whitespace there (``}\\r\\n,{...}``), so when the text after a call arrives together with the next
     call, as a canvas brings it, the parser's buffer never parses again: the stream lost every later call
     that the non-streamed answer returned. Token by token, the whitespace happens to be sent on its own (as
     stray ``content``). Between calls the wrapper drops the whitespace before the ``,`` or the closing ``]``
     (the non-streamed answer's content is empty too), whatever the chunking. It is on the class, so it serves
     every model's forced-call streams: for a token model it only removes that stray whitespace content.
Remove when: sglang's JsonArrayParser skips whitespace between calls.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

_CHAT = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat"
TARGETS = (f"{_CHAT}.__init__", "sglang.srt.function_call.json_array_parser.JsonArrayParser.parse_streaming_increment")
JSON_WHITESPACE = " \t\n\r"


def _serves_diffusion_model(serving) -> bool:
    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    return serves_diffusion_model(serving.tokenizer_manager.model_config.hf_config)


def after_init(_result, serving, *args, **kwargs):
    if _serves_diffusion_model(serving):
        from srt_patches import openai_protocol

        serving.is_gemma4 = True
        openai_protocol.diffusion_served = True  # chat bodies' image_token_budget is this model's (one per process)


def parse_json_array_increment(original, parser, new_text, tools, *args, **kwargs):
    if parser.current_tool_id > 0:  # after a complete call: whitespace, then "," and the next call, or "]"
        parser._buffer = (parser._buffer + new_text).lstrip(JSON_WHITESPACE)
        new_text = ""
    return original(parser, new_text, tools, *args, **kwargs)


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AFTER)(after_init)
    plugin_hook(TARGETS[1], HookType.AROUND)(parse_json_array_increment)
