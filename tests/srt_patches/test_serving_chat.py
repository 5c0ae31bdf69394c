import json
import re
from inspect import Parameter
from types import SimpleNamespace

import pytest

from srt_patches import serving_chat

EMPTY = Parameter.empty
EXPECTED_PARAMETERS = {
    "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat.__init__": [
        ("self", EMPTY), ("tokenizer_manager", EMPTY), ("template_manager", EMPTY),
    ],
    "sglang.srt.function_call.json_array_parser.JsonArrayParser.parse_streaming_increment": [
        ("self", EMPTY), ("new_text", EMPTY), ("tools", EMPTY),
    ],
}  # fmt: skip
# A forced tool-call answer as the grammar lets a model write it (whitespace before each ","; a random checkpoint's
# seed-4 answer had "}\r,"): three calls, brackets and braces inside the strings.
CALLS_TEXT = ('[ \n{"name":"get_time"\n,"parameters" :\n{"tz"\n: "5v[se}"  \r}  } \n , \n\t {\n"name": '
              '"get_weather","parameters":{ "city" : "b+(}=j" \n }}\r,{"name": "get_time", "parameters": {"tz": "x"}}'
              '\t\n]')


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


def test_diffusion_gemma_chat_is_served_as_gemma4(monkeypatch):
    """after_init marks a DiffusionGemma chat server as Gemma 4 and its chat bodies' image_token_budget as read, and
    leaves other models alone."""
    from srt_patches import openai_protocol

    monkeypatch.setattr(openai_protocol, "diffusion_served", False)
    ours, other = _serving("DiffusionGemmaForBlockDiffusion"), _serving("LlamaForCausalLM")
    other.is_gemma4 = False
    serving_chat.after_init(None, other, None, None)
    assert other.is_gemma4 is False and openai_protocol.diffusion_served is False
    ours.is_gemma4 = False
    serving_chat.after_init(None, ours, None, None)
    assert ours.is_gemma4 is True and openai_protocol.diffusion_served is True


def _tools():
    from sglang.srt.entrypoints.openai.protocol import Tool

    return [Tool(type="function", function={"name": name, "parameters": {
        "type": "object", "properties": {key: {"type": "string"}}, "required": [key]}})
        for name, key in (("get_weather", "city"), ("get_time", "tz"))]  # fmt: skip


def _non_streamed_calls(text):
    """The tool calls sglang's non-streamed answer returns for a forced-call text (_process_tool_calls)."""
    return [(call["name"], json.dumps(call["parameters"], ensure_ascii=False)) for call in json.loads(text)]


def _streamed(pieces, increment=None):
    """(calls, content) a stream sends for ``pieces``, as _process_tool_call_stream reads them: each piece, then
    the drain on the final chunk (JsonArrayParser.finish). ``increment``: the parser's step (default: installed)."""
    from sglang.srt.function_call.json_array_parser import JsonArrayParser

    parser, tools, calls, content = JsonArrayParser(), _tools(), {}, ""
    step = increment or (lambda text: parser.parse_streaming_increment(text, tools))
    results = [step(piece) for piece in pieces]
    while True:  # finish(), over ``step``
        results.append(result := step(""))
        if not any(call.name or call.parameters for call in result.calls):
            break
    for result in results:
        content += result.normal_text or ""
        for call in result.calls:
            entry = calls.setdefault(call.tool_index, ["", ""])
            entry[0] += call.name or ""
            entry[1] += call.parameters or ""
    return [tuple(calls[i]) for i in sorted(calls)], content


def _chunkings(text):
    """Token-like pieces, canvas-like chunks, the whole text, and cuts just after and just before each separator."""
    yield "one char", list(text)
    for size in (7, 32, 64):
        yield f"{size} chars", [text[i:i + size] for i in range(0, len(text), size)]
    yield "whole", [text]
    for cut in [m.end() for m in re.finditer(r"}\s*}", text)] + [m.start() for m in re.finditer(r",\s*{", text)]:
        yield f"cut at {cut}", [text[:cut], text[cut:]]


def test_upstream_loses_the_calls_after_whitespace_before_a_separator(upstream):
    """Upstream, a call that arrives in one piece with the whitespace and "," before it is never parsed."""
    from sglang.srt.function_call.json_array_parser import JsonArrayParser

    parser, tools = JsonArrayParser(), _tools()
    increment = upstream(serving_chat.TARGETS[1])
    calls, _ = _streamed([CALLS_TEXT], lambda text: increment(parser, text, tools))
    assert calls == _non_streamed_calls(CALLS_TEXT)[:1]


@pytest.mark.parametrize("name, pieces", list(_chunkings(CALLS_TEXT)), ids=[n for n, _ in _chunkings(CALLS_TEXT)])
def test_streamed_forced_calls_equal_the_non_streamed_ones_whatever_the_chunks(applied, name, pieces):
    """However the answer is cut into chunks (a token, a canvas, all of it), the stream's calls are the non-streamed
    answer's, and no whitespace between the calls comes out as content (the non-streamed content is empty)."""
    assert _streamed(pieces) == (_non_streamed_calls(CALLS_TEXT), "")


def test_text_before_the_list_is_left_alone(applied):
    """Before the first complete call the wrapper changes nothing."""
    assert _streamed(["Sure: ", '[{"name": "get_time", "parameters": {"tz": "UTC"}}]']) == (
        [("get_time", '{"tz": "UTC"}')], "Sure: ")
