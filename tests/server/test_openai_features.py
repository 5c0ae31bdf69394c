"""OpenAI API features end to end (openai SDK): streaming, n, stop, ignore_eos, max_tokens, seed, usage, reasoning.

The tiny model is random, so a test that needs some output property (an EOS, a given character, a
``<channel|>`` marker) searches seeds with one-step canvases through /generate, which returns token ids,
and then replays that seed through the OpenAI route: a seeded request is deterministic.
"""

import json

import openai
import pytest
import requests
from transformers import AutoTokenizer


pytestmark = pytest.mark.slow

CANVAS = 32  # tiny checkpoint's canvas_length
EOS_IDS = (1, 6, 10)
CHANNEL_END = 8  # "<channel|>" in the tiny vocab, the end of Gemma 4's thought channel
MESSAGES = [{"role": "user", "content": "Hi"}]


def diffusion(seed, steps=1, **extra):
    return {"diffusion": {"max_denoising_steps": steps, "seed": seed}, **extra}


def native(server, **body):
    resp = requests.post(f"{server.url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint_dir):
    return AutoTokenizer.from_pretrained(tiny_checkpoint_dir)


def chat_prompt_ids(tokenizer, **template_kwargs):
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, **template_kwargs)
    return list(ids["input_ids"])


def _stream_friendly_seed(server, tokenizer, prompt, max_tokens):
    """A seed whose text after each canvas is a clean prefix of the final text.

    Random byte-fallback tokens can leave a canvas ending in an incomplete UTF-8 sequence; sglang's
    detokenizer then (rightly) holds that text back until the next canvas, and an invalid byte run split
    across canvases decodes differently from the whole run, so such seeds are skipped. ``prompt`` is a
    text or a list of token ids.
    """
    prompt_field = {"input_ids": prompt} if isinstance(prompt, list) else {"text": prompt}
    for seed in range(40):
        ids = native(server, **prompt_field, sampling_params={"max_new_tokens": max_tokens, "ignore_eos": True,
                                                              **diffusion(seed)})["output_ids"]
        texts = [tokenizer.decode(ids[:end], skip_special_tokens=True) for end in range(CANVAS, max_tokens, CANVAS)]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
        if all(a and not a.endswith("\ufffd") and b.startswith(a) and len(b) > len(a) for a, b in zip(texts, texts[1:])):
            return seed
    pytest.fail("no seed whose canvases decode to clean prefixes")


# ---- streaming -------------------------------------------------------------------------------------------------


def test_native_stream_sends_each_committed_canvas(server, tokenizer):
    """/generate stream=True sends an event per committed canvas, each adding whole canvases.

    NOTE: sglang's tokenizer manager hands a stream only the newest of its unread chunks (without
    --incremental-streaming-output), so two commits close together may reach the client as one event. That the
    server streams every canvas: tests/runtime/test_stop_rules.py::test_the_server_streams_each_committed_canvas_whole.
    """
    seed = _stream_friendly_seed(server, tokenizer, "Once", 70)
    body = {"text": "Once", "sampling_params": {"max_new_tokens": 70, "ignore_eos": True, **diffusion(seed)}}
    full = native(server, **body)
    resp = requests.post(f"{server.url}/generate", json=body | {"stream": True}, stream=True, timeout=120)
    events = [line[len(b"data: "):] for line in resp.iter_lines() if line.startswith(b"data: {")]
    events = [json.loads(e) for e in events]
    lengths = [len(e["output_ids"]) for e in events]
    assert lengths == sorted(set(lengths)) and set(lengths) <= {32, 64, 70} and lengths[-1] == 70, lengths
    assert events[-1]["output_ids"] == full["output_ids"] and events[-1]["text"] == full["text"]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_completions_stream_one_chunk_per_canvas(server, client, tokenizer):
    """Streamed completions send text after every canvas; the chunks concatenate to the non-streamed text."""
    seed = _stream_friendly_seed(server, tokenizer, "Once", 70)
    kwargs = dict(model="tiny", prompt="Once", max_tokens=70, extra_body=diffusion(seed, ignore_eos=True))
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert 1 <= len(texts) <= 3  # 70 tokens = 3 canvases, each streamed whole (commits close together may merge)
    assert "".join(texts) == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage.completion_tokens == 70 == full.usage.completion_tokens
    assert chunks[-1].usage.diffusion == full.usage.diffusion and full.usage.diffusion["canvases"] == 3


def test_chat_stream_equals_non_stream(server, client, tokenizer):
    """Streamed chat deltas concatenate to the non-streamed message; the last choice chunk has finish_reason."""
    seed = _stream_friendly_seed(server, tokenizer, chat_prompt_ids(tokenizer), 70)
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=70, extra_body=diffusion(seed, ignore_eos=True))
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    choice_chunks = [c for c in chunks if c.choices]
    assert choice_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in choice_chunks) == full.choices[0].message.content
    assert 1 <= sum(bool(c.choices[0].delta.content) for c in choice_chunks) <= 3  # one per canvas at most
    assert choice_chunks[-1].choices[0].finish_reason == "length" == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == 70
    assert chunks[-1].usage.diffusion == full.usage.diffusion and full.usage.diffusion["canvases"] == 3


def test_continuous_usage_stats_carry_each_choice_diffusion_block(client):
    """stream_options.continuous_usage_stats: every chunk's usage (its choice's so far) has that choice's diffusion
    block, and the usage chunk the block of both choices."""
    chunks = list(client.chat.completions.create(
        model="tiny", messages=MESSAGES, n=2, max_tokens=40, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True, "diffusion": {"max_denoising_steps": 2}}))
    counted = [c for c in chunks if c.choices and c.usage is not None and c.usage.completion_tokens]
    assert {c.choices[0].index for c in counted} == {0, 1}
    for chunk in counted:
        tokens, canvases = chunk.usage.completion_tokens, -(-chunk.usage.completion_tokens // 32)
        assert chunk.usage.diffusion == {"canvases": canvases, "denoise_steps": 2 * canvases,
                                         "tokens_per_forward": round(tokens / (2 * canvases), 4)}, chunk
    assert chunks[-1].usage.diffusion == {"canvases": 4, "denoise_steps": 8, "tokens_per_forward": 10.0}


# ---- n, seed, max_tokens, ignore_eos, usage --------------------------------------------------------------------


def test_n2_returns_two_choices(client):
    """n=2 returns two indexed choices; unseeded they are independent samples; usage counts both."""
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, max_tokens=20,
                                          extra_body={"ignore_eos": True, "diffusion": {"max_denoising_steps": 1}})
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.choices[0].message.content != resp.choices[1].message.content
    assert resp.usage.completion_tokens == 40


@pytest.mark.parametrize("seed_in", ["diffusion", "openai"])
def test_n2_with_seed_gives_distinct_reproducible_choices(client, seed_in):
    """n=2 with a seed gives two different choices, and the same two again on a repeat."""
    kwargs = dict(model="tiny", messages=MESSAGES, n=2, max_tokens=20)
    if seed_in == "diffusion":
        kwargs["extra_body"] = diffusion(5, ignore_eos=True)
    else:
        kwargs |= dict(seed=5, extra_body={"ignore_eos": True, "diffusion": {"max_denoising_steps": 1}})
    first = [c.message.content for c in sorted(client.chat.completions.create(**kwargs).choices, key=lambda c: c.index)]
    again = [c.message.content for c in sorted(client.chat.completions.create(**kwargs).choices, key=lambda c: c.index)]
    assert first == again
    assert first[0] != first[1]


def test_openai_seed_reproducible(client):
    """The OpenAI seed parameter seeds the canvas sampler: same seed, same text; another seed, another text."""
    def run(seed):
        return client.completions.create(model="tiny", prompt="Once", max_tokens=40, seed=seed,
                                         extra_body={"ignore_eos": True, "diffusion": {"max_denoising_steps": 1}})

    assert run(7).choices[0].text == run(7).choices[0].text != run(8).choices[0].text


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_max_tokens_smaller_than_a_canvas(client, route):
    """max_tokens=5 (a canvas is 32) gives exactly 5 tokens and finish_reason length."""
    extra = diffusion(2, ignore_eos=True)
    if route == "chat":
        resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, extra_body=extra)
    else:
        resp = client.completions.create(model="tiny", prompt="Once", max_tokens=5, extra_body=extra)
    assert resp.usage.completion_tokens == 5
    assert resp.choices[0].finish_reason == "length"


def test_ignore_eos_runs_past_eos(server, client):
    """A seed whose canvas holds an EOS stops there; with ignore_eos the same request runs to max_tokens."""
    for seed in range(40):
        out = native(server, text="Once", sampling_params={"max_new_tokens": CANVAS, **diffusion(seed)})
        if out["meta_info"]["finish_reason"]["type"] == "stop" and len(out["output_ids"]) < CANVAS:
            break
    else:
        pytest.fail("no EOS in 40 seeded canvases")
    stopped = client.completions.create(model="tiny", prompt="Once", max_tokens=CANVAS, extra_body=diffusion(seed))
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == len(out["output_ids"])
    ignored = client.completions.create(model="tiny", prompt="Once", max_tokens=CANVAS,
                                        extra_body=diffusion(seed, ignore_eos=True))
    assert ignored.choices[0].finish_reason == "length" and ignored.usage.completion_tokens == CANVAS


def test_usage_counts(server, client):
    """usage: prompt/completion/total tokens agree with /generate, and usage.diffusion counts canvases and steps."""
    resp = client.completions.create(model="tiny", prompt="Once upon", max_tokens=70,
                                     extra_body=diffusion(4, steps=2, ignore_eos=True))
    out = native(server, text="Once upon", sampling_params={"max_new_tokens": 70, "ignore_eos": True,
                                                            **diffusion(4, steps=2)})
    assert resp.choices[0].text == out["text"]
    assert resp.usage.prompt_tokens == out["meta_info"]["prompt_tokens"]
    assert resp.usage.completion_tokens == len(out["output_ids"]) == 70
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 70
    assert resp.usage.diffusion == {"canvases": 3, "denoise_steps": 6, "tokens_per_forward": round(70 / 6, 4)}


def test_tokenize_round_trip_and_ids_outside_the_vocabulary(server, tokenizer):
    """/v1/tokenize and /v1/detokenize agree with the checkpoint's tokenizer; an id outside the vocabulary is a 400
    (a negative one was a 500, one past the end decoded to nothing)."""
    ids = requests.post(f"{server.url}/v1/tokenize", json={"prompt": "Once upon"}, timeout=30).json()["tokens"]
    assert ids == tokenizer("Once upon", add_special_tokens=False)["input_ids"] or ids == tokenizer("Once upon")[
        "input_ids"]  # fmt: skip
    text = requests.post(f"{server.url}/v1/detokenize", json={"tokens": ids}, timeout=30).json()["text"]
    assert text.endswith("Once upon")
    for bad in ([-1], [ids[0], len(tokenizer)]):
        resp = requests.post(f"{server.url}/v1/detokenize", json={"tokens": bad}, timeout=30)
        assert resp.status_code == 400 and f"token ids must be in [0, {len(tokenizer)})" in resp.text, resp.text


def test_responses_and_anthropic_messages_take_diffusion_parameters(server, client):
    """/v1/responses and /v1/messages accept `diffusion` as chat does: the same seeded request gives chat's text (the
    same prompt, through the same template), and a bad value is a 400 naming it. /v1/messages and /v1/responses report
    chat's usage.diffusion, streamed (in message_delta, in response.completed) or not. (sglang fills a missing Responses
    temperature with 0.7; the first request sets none, so it must get chat's default schedule.)"""
    model = requests.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
    params = {"seed": 5, "max_denoising_steps": 2}
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20, extra_body={"diffusion": params})
    responses = requests.post(f"{server.url}/v1/responses", json={
        "model": model, "input": MESSAGES[0]["content"], "max_output_tokens": 20,  # chat's max_tokens
        "diffusion": params}, timeout=120).json()  # fmt: skip
    messages = requests.post(f"{server.url}/v1/messages", json={
        "model": model, "max_tokens": 20, "messages": MESSAGES, "diffusion": params}, timeout=120).json()
    assert responses["output"][0]["content"][0]["text"] == chat.choices[0].message.content
    assert messages["content"][0]["text"] == chat.choices[0].message.content
    assert messages["usage"]["diffusion"] == chat.usage.diffusion and chat.usage.diffusion["denoise_steps"] > 0
    assert responses["usage"]["diffusion"] == chat.usage.diffusion
    with requests.post(f"{server.url}/v1/responses", json={
            "model": model, "input": MESSAGES[0]["content"], "temperature": 1, "max_output_tokens": 20,
            "diffusion": params, "stream": True}, stream=True, timeout=120) as streamed:  # fmt: skip
        events = [json.loads(line[len(b"data: "):]) for line in streamed.iter_lines() if line.startswith(b"data: ")]
    completed = next(e for e in events if e["type"] == "response.completed")
    assert completed["response"]["usage"]["diffusion"] == chat.usage.diffusion, events[-1]
    with requests.post(f"{server.url}/v1/messages", json={"model": model, "max_tokens": 20, "messages": MESSAGES,
                                                          "diffusion": params, "stream": True}, stream=True,
                       timeout=120) as streamed:  # fmt: skip
        events = [json.loads(line[len(b"data: "):]) for line in streamed.iter_lines() if line.startswith(b"data: ")]
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["usage"]["diffusion"] == chat.usage.diffusion, events
    for route, body in (("/v1/responses", {"model": model, "input": "Hi"}),
                        ("/v1/messages", {"model": model, "max_tokens": 8, "messages": MESSAGES})):
        resp = requests.post(f"{server.url}{route}", json=body | {"diffusion": {"max_denoising_steps": -1}}, timeout=60)
        assert resp.status_code == 400 and "diffusion.max_denoising_steps" in resp.text, (route, resp.text)


def test_chat_prompt_tokens_are_the_chat_template(client, tokenizer):
    """Chat usage.prompt_tokens is the length of the checkpoint's Gemma 4 chat template applied to the messages."""
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, extra_body=diffusion(1))
    assert resp.usage.prompt_tokens == len(chat_prompt_ids(tokenizer))


# ---- stop strings, stop token ids -------------------------------------------------------------------------------


def _stop_char(text, start):
    """First uppercase letter or digit first occurring at or after start (these appear in no special token's text,
    which sglang's stop-string check decodes too)."""
    for i in range(start, len(text)):
        if (text[i].isascii() and (text[i].isupper() or text[i].isdigit())) and text[i] not in text[:i]:
            return i, text[i]
    return None


@pytest.mark.parametrize("canvas", [0, 1])
def test_stop_string_inside_a_canvas(server, client, tokenizer, canvas):
    """A stop string in the first or a later canvas cuts the text right before it, with finish_reason stop."""
    for seed in range(40):
        out = native(server, text="Once", sampling_params={"max_new_tokens": 2 * CANVAS, "ignore_eos": True,
                                                           **diffusion(seed)})
        first_canvas = tokenizer.decode(out["output_ids"][:CANVAS], skip_special_tokens=True)
        lo, hi = (1, len(first_canvas) - 1) if canvas == 0 else (len(first_canvas) + 1, len(out["text"]))
        found = _stop_char(out["text"][:hi], lo)
        if found and out["text"].startswith(first_canvas):
            break
    else:
        pytest.fail("no seed with a usable stop character")
    pos, char = found
    kwargs = dict(model="tiny", prompt="Once", max_tokens=2 * CANVAS, stop=[char], extra_body=diffusion(seed, ignore_eos=True))
    resp = client.completions.create(**kwargs)
    assert resp.choices[0].text == out["text"][:pos]
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens < 2 * CANVAS
    streamed = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out["text"][:pos]
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"


def test_the_earliest_stop_string_in_a_canvas_ends_it_whatever_their_order(server, client, tokenizer):
    """Two stop strings in one canvas: the text ends before the earlier one, even listed second (sglang's check takes
    the first listed string it finds among the new tokens: right token by token, wrong for a whole canvas)."""
    for seed in range(40):
        out = native(server, text="Once", sampling_params={"max_new_tokens": CANVAS, "ignore_eos": True,
                                                           **diffusion(seed)})
        earlier = _stop_char(out["text"], 1)
        later = earlier and _stop_char(out["text"], earlier[0] + 1)
        if later and later[1] not in out["text"][:earlier[0]]:
            break
    else:
        pytest.fail("no seed with two usable stop characters")
    (pos, first), (_, second) = earlier, later
    for stop in ([second, first], [first, second]):
        resp = client.completions.create(model="tiny", prompt="Once", max_tokens=CANVAS, stop=stop,
                                         extra_body=diffusion(seed, ignore_eos=True))
        assert resp.choices[0].text == out["text"][:pos], stop
        assert resp.choices[0].finish_reason == "stop" and resp.choices[0].matched_stop == first, stop


def test_stop_token_ids_inside_a_canvas(server, client, tokenizer):
    """stop_token_ids ends the request at that token inside the canvas (token counted, not in the text)."""
    for seed in range(40):
        ids = native(server, text="Once", sampling_params={"max_new_tokens": CANVAS, **diffusion(seed)})["output_ids"]
        if len(ids) > 8 and ids[5] not in ids[:5] and ids[5] not in EOS_IDS:
            break
    else:
        pytest.fail("no seed with 8 tokens before an EOS")
    resp = client.completions.create(model="tiny", prompt="Once", max_tokens=CANVAS,
                                     extra_body=diffusion(seed, stop_token_ids=[ids[5]]))
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == 6
    assert resp.choices[0].text == tokenizer.decode(ids[:5], skip_special_tokens=True)


# ---- reasoning and tool parsers (a second server started with the gemma4 parsers) -------------------------------


@pytest.fixture(scope="module")
def parser_server(configured_server):
    """Started with ``--reasoning-parser gemma4 --tool-call-parser gemma4`` (tests/server/conftest.py)."""
    return configured_server


@pytest.fixture(scope="module")
def parser_client(parser_server):
    return openai.OpenAI(base_url=f"{parser_server.url}/v1", api_key="none")


THINKING = {"chat_template_kwargs": {"enable_thinking": True}}


def _seed_where(server, ids, predicate, tries=300):
    """(seed, raw text with special tokens) of the first one-step 32-token canvas whose raw text satisfies predicate."""
    for seed in range(tries):
        out = native(server, input_ids=ids, sampling_params={"max_new_tokens": CANVAS, "ignore_eos": True,
                                                             "skip_special_tokens": False, **diffusion(seed)})
        if predicate(out["text"]):
            return seed, out["text"]
    pytest.fail("no seed with the wanted output")


def _no_channel_markers(raw):
    return "<|channel>" not in raw and "<channel|>" not in raw and len(raw) > 0


@pytest.fixture(scope="module")
def channel_end_seed(parser_server, tokenizer):
    """(seed, raw text, prompt length): a thinking-prompt canvas holding <channel|> once, no <|channel>, no EOS."""
    ids = chat_prompt_ids(tokenizer, enable_thinking=True)
    eos_texts = ("<eos>", "<turn|>", "<|tool_response>")

    def wanted(raw):
        return raw.count("<channel|>") == 1 and "<|channel>" not in raw and not any(e in raw for e in eos_texts)

    seed, raw = _seed_where(parser_server, ids, wanted)
    return seed, raw, len(ids)


def test_parser_names_exist_in_sglang():
    """sglang 0.5.23 knows the gemma4 reasoning parser and the gemma4 tool-call parser."""
    from sglang.srt.function_call.function_call_parser import FunctionCallParser
    from sglang.srt.parser.reasoning_parser import ReasoningParser

    assert "gemma4" in ReasoningParser.DetectorMap and "gemma4" in FunctionCallParser.ToolCallParserEnum


def test_without_thinking_everything_is_content(parser_server, parser_client, tokenizer):
    """Without enable_thinking (the template pre-fills an empty thought) the answer is content, no reasoning."""
    seed, _ = _seed_where(parser_server, chat_prompt_ids(tokenizer), _no_channel_markers)
    resp = parser_client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=CANVAS,
                                                 extra_body=diffusion(seed, ignore_eos=True))
    msg = resp.choices[0].message
    assert msg.content and getattr(msg, "reasoning_content", None) is None


def test_thinking_without_channel_end_is_all_reasoning(parser_server, parser_client, tokenizer):
    """With enable_thinking and no <channel|> in the output, the whole answer is reasoning_content."""
    ids = chat_prompt_ids(tokenizer, enable_thinking=True)
    seed, _ = _seed_where(parser_server, ids, _no_channel_markers)
    resp = parser_client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=CANVAS,
                                                 extra_body=diffusion(seed, ignore_eos=True) | THINKING)
    msg = resp.choices[0].message
    assert msg.reasoning_content and not msg.content
    assert resp.usage.prompt_tokens == len(ids)  # the system turn with <|think|> was rendered
    assert resp.usage.completion_tokens_details.reasoning_tokens == resp.usage.completion_tokens == CANVAS


def test_channel_end_splits_reasoning_and_content_with_special_tokens_kept(parser_client, channel_end_seed):
    """With skip_special_tokens=False, text before <channel|> is reasoning_content and the rest is content."""
    seed, raw, prompt_len = channel_end_seed
    resp = parser_client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=CANVAS,
        extra_body=diffusion(seed, skip_special_tokens=False) | THINKING)
    reasoning, content = raw.split("<channel|>")
    assert resp.usage.prompt_tokens == prompt_len
    assert resp.choices[0].message.reasoning_content == reasoning
    assert (resp.choices[0].message.content or "") == content


def test_channel_end_splits_reasoning_and_content_by_default(parser_client, channel_end_seed):
    """A default thinking request (no extra flags) splits at <channel|> into reasoning_content and content."""
    seed, raw, _ = channel_end_seed
    resp = parser_client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=CANVAS,
                                                 extra_body=diffusion(seed) | THINKING)
    assert resp.choices[0].message.reasoning_content == raw.split("<channel|>")[0]
    # the thought and its <channel|>, counted as sglang counts them token by token (0 until this stop)
    assert 0 < resp.usage.completion_tokens_details.reasoning_tokens < resp.usage.completion_tokens


def test_reasoning_stream_equals_non_stream(parser_client, channel_end_seed):
    """Streamed reasoning_content / content deltas concatenate to the non-streamed split."""
    seed, raw, _ = channel_end_seed
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=CANVAS,
                  extra_body=diffusion(seed, skip_special_tokens=False) | THINKING)
    full = parser_client.chat.completions.create(**kwargs).choices[0].message
    chunks = [c for c in parser_client.chat.completions.create(stream=True, **kwargs) if c.choices]
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert reasoning == full.reasoning_content and content == (full.content or "")
    assert chunks[-1].choices[0].finish_reason is not None


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_tools_with_auto_tool_choice_answer(parser_client):
    """A request with tools (tool_choice auto) through the gemma4 tool parser answers 200 with a finish_reason."""
    resp = parser_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                                 tools=TOOLS, max_tokens=20, extra_body=diffusion(1))
    assert resp.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert resp.usage.prompt_tokens > 100  # the tool declaration was rendered into the prompt


def test_earlier_thoughts_are_dropped_from_history(client, tokenizer):
    """An earlier assistant turn's thought (inline or as reasoning_content) is not sent back to the model: the
    prompt is the one without it, as the checkpoint's Gemma 4 template renders history."""
    def prompt_tokens(assistant):
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", **assistant}, {"role": "user", "content": "More"}]
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                              extra_body=diffusion(1) | THINKING).usage.prompt_tokens

    plain = prompt_tokens({"content": "Hello!"})
    assert prompt_tokens({"content": "<|channel>thought\nsome long secret reasoning<channel|>Hello!"}) == plain
    assert prompt_tokens({"content": "Hello!", "reasoning_content": "some long secret reasoning"}) == plain
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "More"}],
        add_generation_prompt=True, tokenize=True, enable_thinking=True)["input_ids"]
    assert plain == len(expected)
