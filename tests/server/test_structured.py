"""Structured output, tool calls, infill, logprobs and DSL select against one real server (tiny random checkpoint).

The model knows nothing of JSON, so every valid output is the grammar's doing. The server is the session's
``configured_server`` (tests/server/conftest.py): 2 denoise steps by default (the DSL cannot send diffusion
parameters), and sglang's gemma4 tool-call and reasoning parsers, as a deployment runs them (with a reasoning parser,
sglang hands the scheduler each grammar wrapped in its ReasonerGrammarObject).
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time
import uuid

import jsonschema
import openai
import pytest
import requests

import sglang as sgl
from tests.server.test_load import assert_idle_and_no_kv_in_use
from tests.server.test_metrics import metric

pytestmark = pytest.mark.slow

CANVAS = 32
EOS_IDS = (1, 6, 10)
MAX_NEW = 128  # 4 canvases

SCHEMAS = {
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6}, "id": {"type": "integer"}}, "required": ["name", "id"]}},
        "required": ["user"]},
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"type": "string", "enum": ["S", "M", "L"]}},
              "required": ["color", "size"]},
    "numbers": {"type": "object", "properties": {"x": {"type": "number"},
                                                 "n": {"type": "integer", "minimum": -5, "maximum": 50}},
                "required": ["x", "n"]},
    "array": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "flags": {"type": "object", "properties": {"ok": {"type": "boolean"}, "tags": {
        "type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}, "required": ["ok", "tags"]},
}  # fmt: skip
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{2,6} [0-9]{1,2}", r"0x[0-9a-f]{4}"]
EBNF = 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9] [0-9]?'
EBNF_AS_REGEX = r"[0-9]{1,2}([+-][0-9]{1,2})*"
CONSTRAINTS = ([("json_schema", json.dumps(s), s) for s in SCHEMAS.values()]
               + [("regex", r, r) for r in REGEXES] + [("ebnf", EBNF, EBNF_AS_REGEX)])  # fmt: skip
SEEDS_PER_CONSTRAINT = 5  # 10 constraints x 5 seeds = 50 constrained requests


@pytest.fixture(scope="module")
def srv(configured_server):
    return configured_server


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none")


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def grammars(tokenizer):
    """sglang's xgrammar backend on the checkpoint's tokenizer, as the server builds it (fresh matchers)."""
    from sglang.srt.constrained.xgrammar_backend import XGrammarGrammarBackend

    return XGrammarGrammarBackend(tokenizer, vocab_size=len(tokenizer), model_eos_token_ids=list(EOS_IDS))


def generate(srv, **body):
    resp = requests.post(f"{srv.url}/generate", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()


def is_valid(kind, check, text) -> bool:
    if kind == "json_schema":
        try:
            # NOTE: strict=False: xgrammar lets raw control characters into maxLength strings (see README)
            jsonschema.validate(json.loads(text, strict=False), check)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    return re.fullmatch(check, text) is not None


def matcher(grammars, kind, spec):
    return {"json_schema": grammars.dispatch_json, "regex": grammars.dispatch_regex,
            "ebnf": grammars.dispatch_ebnf}[kind](spec)  # fmt: skip


# ---- structured output ----------------------------------------------------------------------------------------


def test_constrained_outputs_are_valid_mixed_with_free_ones(srv, grammars):
    """50 constrained requests (schemas with nesting, enums, numbers, arrays; regexes; an EBNF) and 10 free ones, 8 at
    a time: every finished constrained output is valid; one cut by max_new_tokens ends with finish_reason "length"
    after a prefix the grammar accepts; the free ones are exactly what they are alone."""
    free = [{"text": f"free {i}", "sampling_params": {"max_new_tokens": 40, "ignore_eos": True,
                                                      "diffusion": {"seed": 100 + i}}} for i in range(10)]
    alone = [generate(srv, **body)["output_ids"] for body in free]
    jobs = [(kind, spec, check, {"text": f"Answer {i}:", "sampling_params": {
        "max_new_tokens": MAX_NEW, kind: spec, "diffusion": {"seed": i}}})
        for kind, spec, check in CONSTRAINTS for i in range(SEEDS_PER_CONSTRAINT)]  # fmt: skip
    mixed = [(None, None, None, body) for body in free] + jobs
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda job: generate(srv, **job[3]), mixed))
    assert [o["output_ids"] for o in outs[: len(free)]] == alone
    finished = 0
    for (kind, spec, check, _), out in zip(mixed[len(free) :], outs[len(free) :]):
        reason, ids = out["meta_info"]["finish_reason"], out["output_ids"]
        if reason["type"] == "stop":
            finished += 1
            assert ids[-1] in EOS_IDS and is_valid(kind, check, out["text"]), (kind, spec, out["text"])
        else:
            assert reason["type"] == "length" and len(ids) == MAX_NEW, (kind, reason)
            fresh = matcher(grammars, kind, spec)
            for token in ids:
                fresh.accept_token(token)  # raises on a token the grammar does not allow
    assert finished >= len(jobs) // 2, f"only {finished} of {len(jobs)} constrained requests finished"


def test_openai_response_format(client):
    """response_format json_object and json_schema give valid JSON through the chat API (each format's answers
    that end before max_tokens; at least one per format does, so the checks run)."""
    schema = SCHEMAS["enums"]
    messages = [{"role": "user", "content": "Describe a shirt as JSON."}]
    finished = {"json_schema": 0, "json_object": 0}
    for seed in range(5):
        fmt = {"type": "json_schema", "json_schema": {"name": "shirt", "schema": schema}}
        resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_NEW,
                                              response_format=fmt, extra_body={"diffusion": {"seed": seed}})
        if resp.choices[0].finish_reason == "stop":
            finished["json_schema"] += 1
            jsonschema.validate(json.loads(resp.choices[0].message.content, strict=False), schema)
        resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_NEW,
                                              response_format={"type": "json_object"},
                                              extra_body={"diffusion": {"seed": seed}})
        if resp.choices[0].finish_reason == "stop":
            finished["json_object"] += 1
            assert isinstance(json.loads(resp.choices[0].message.content, strict=False), dict)
    assert all(finished.values()), finished


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_parses(client, tool_choice):
    """tool_choice required or a named function: sglang's json_schema constraint makes the call, which the gemma4
    tool-call server returns as a parsed tool call (the first seed that finishes within max_tokens)."""
    for seed in range(8):
        resp = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
            tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=200, extra_body={"diffusion": {"seed": seed}})
        if resp.choices[0].finish_reason != "length":
            break
    else:
        pytest.fail("no seed finished its tool call within 200 tokens")
    calls = resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert set(json.loads(calls[0].function.arguments, strict=False)) == {"city"}


def test_bad_grammar_is_a_400(srv):
    """A grammar that does not compile is refused with a 400 naming it; the server keeps serving."""
    for key, spec in (("regex", "[a-"), ("json_schema", "{not json"), ("ebnf", "root ::= ")):
        resp = srv.post("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 8, key: spec}})
        assert resp.status_code == 400 and "grammar" in resp.text, (key, resp.text)


def _grammars_in_flight(srv) -> float:
    return metric(requests.get(f"{srv.url}/metrics", timeout=30).text, "sglang:diffusion_grammars_in_flight")


def test_abort_mid_canvas_frees_kv_and_grammar(srv):
    """A constrained request aborted in the middle of a canvas (after its first commit) ends with an abort, its KV
    is freed and its matcher released (the grammars-in-flight gauge returns to 0)."""
    rid = f"abort-grammar-{uuid.uuid4().hex}"
    body = {"rid": rid, "text": "letters", "stream": True, "sampling_params": {
        "max_new_tokens": 3000, "regex": "[a-z]{80,}", "diffusion": {"max_denoising_steps": 48, "confidence_threshold": 0,
                                                                  "seed": 1}}}  # fmt: skip
    with requests.post(f"{srv.url}/generate", json=body, stream=True, timeout=120) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith(b"data: {"):
                assert json.loads(line[6:])["meta_info"]["completion_tokens"] == CANVAS
                break
        assert _grammars_in_flight(srv) == 1
        assert requests.post(f"{srv.url}/abort_request", json={"rid": rid}, timeout=10).status_code == 200
        last = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")][-1]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert_idle_and_no_kv_in_use(srv)
    assert _grammars_in_flight(srv) == 0


# ---- infill ----------------------------------------------------------------------------------------------------


def test_infill_round_trip(srv, tokenizer):
    """A template with a hole longer than a canvas and a second hole: the fixed pieces come back byte-identical,
    the holes hold no EOS, the output is the template's length, and fixed positions are at their places."""
    pieces = ["def add(a, b):\n    ", 40, "\n    return ", 6, "  # sum\n"]
    template = "".join(p if isinstance(p, str) else "{{hole:%d}}" % p for p in pieces)
    out = generate(srv, text="Complete the code:\n", sampling_params={
        "diffusion": {"infill": {"template": template}, "seed": 4}})  # no max_new_tokens: the whole template
    ids, layout = out["output_ids"], []
    for p in pieces:
        layout += tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else [-1] * p
    assert len(ids) == len(layout) > CANVAS and out["meta_info"]["finish_reason"]["type"] == "length"
    assert all(i == t for i, t in zip(ids, layout) if t >= 0)
    assert not {i for i, t in zip(ids, layout) if t < 0} & set(EOS_IDS)
    text, cursor = out["text"], 0
    for p in pieces:
        if isinstance(p, str):
            found = text.find(p, cursor)
            assert found >= cursor, (p, text)
            cursor = found + len(p)
    assert text.startswith(pieces[0]) and text.endswith(pieces[-1])


def test_completions_suffix_fills_in_between(client, srv):
    """OpenAI completions suffix: the answer is a hole of max_tokens tokens written against the suffix (what
    diffusion.infill with "{{hole:N}}" + suffix gives)."""
    kwargs = dict(model="tiny", prompt="def f(x):\n    return ", max_tokens=6, extra_body={"diffusion": {"seed": 2}})
    resp = client.completions.create(suffix="\n\nprint(f(2))", **kwargs)
    assert resp.usage.completion_tokens == 6 and resp.choices[0].finish_reason == "length"
    same = generate(srv, text=kwargs["prompt"], sampling_params={"max_new_tokens": 6, "diffusion": {
        "seed": 2, "infill": {"template": "{{hole:6}}\n\nprint(f(2))"}}})
    assert resp.choices[0].text == same["text"]
    plain = client.completions.create(**kwargs)
    assert plain.choices[0].text != resp.choices[0].text  # the suffix is context the canvas reads


@pytest.mark.parametrize("template, word", [
    ("no hole here", "no hole"), ("{{gap}}", "unknown marker"), ("x {{hole:0}}", "malformed hole length"),
    ("x {{hole:abc}}", "malformed hole length"), ("x {{hole", "unclosed marker"),
    ("{{hole:9000}}", "longer than the context"), ("a<eos>{{hole:3}}", "end-of-sequence"),
])  # fmt: skip
def test_bad_infill_template_is_a_400(srv, template, word):
    resp = srv.post("/generate", {"text": "x", "sampling_params": {"diffusion": {"infill": {"template": template}}}})
    assert resp.status_code == 400 and word in resp.text, resp.text


def test_infill_with_a_grammar_is_a_400(srv):
    resp = srv.post("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 8, "regex": "[a-z]+",
                                                                   "diffusion": {"infill": {"template": "{{hole:3}}"}}}})
    assert resp.status_code == 400 and "cannot be combined with a grammar" in resp.text


# ---- logprobs --------------------------------------------------------------------------------------------------


def test_output_logprobs_native(srv):
    """return_logprob + top_logprobs_num: one finite logprob <= 0 per output token, top-k sorted, and (greedy or
    not) the committed token is the top-1: it is the argmax of the distribution the logprobs come from."""
    for temperature in (0, 1.0):
        out = generate(srv, text="Hello", return_logprob=True, top_logprobs_num=3, sampling_params={
            "max_new_tokens": 40, "ignore_eos": True, "temperature": temperature, "diffusion": {"seed": 1}})
        meta = out["meta_info"]
        tokens, tops = meta["output_token_logprobs"], meta["output_top_logprobs"]
        assert [t[1] for t in tokens] == out["output_ids"] and len(tops) == 40
        for (value, token, _), top in zip(tokens, tops):
            assert -1e30 < value <= 0
            values = [v for v, _, _ in top]
            assert values == sorted(values, reverse=True) and top[0][1] == token and top[0][0] == value
        assert meta["input_token_logprobs"] == []


def test_output_logprobs_openai(client):
    """chat logprobs/top_logprobs and completions logprobs=k come back, one entry per token, <= 0."""
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True, "diffusion": {"seed": 1}})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(c.logprob <= 0 and len(c.top_logprobs) == 2 for c in content)
    comp = client.completions.create(model="tiny", prompt="Hi", max_tokens=5, logprobs=2,
                                     extra_body={"ignore_eos": True, "diffusion": {"seed": 1}})
    lp = comp.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(v <= 0 for v in lp.token_logprobs)


def test_prompt_logprobs(srv):
    """logprob_start_len: the first scored entry is null (as sglang), the rest finite <= 0, top-k sorted; more than
    64 scored prompt tokens is a 400 that says why."""
    out = generate(srv, text="The quick brown fox", return_logprob=True, logprob_start_len=3, top_logprobs_num=2,
                   sampling_params={"max_new_tokens": 0})
    meta = out["meta_info"]
    prompt_len = meta["prompt_tokens"]
    values = [v for v, _, _ in meta["input_token_logprobs"]]
    assert len(values) == prompt_len - 3 and values[0] is None and all(v <= 0 for v in values[1:])
    tops = meta["input_top_logprobs"]
    assert tops[0] is None and all([v for v, _, _ in t] == sorted([v for v, _, _ in t], reverse=True) for t in tops[1:])
    resp = srv.post("/generate", {"text": "word " * 100, "return_logprob": True, "logprob_start_len": 0,
                                  "sampling_params": {"max_new_tokens": 0}})
    assert resp.status_code == 400 and "one canvas forward per scored token" in resp.text
    resp = srv.post("/generate", {"text": "x", "return_logprob": True, "token_ids_logprob": [5],
                                  "sampling_params": {"max_new_tokens": 1}})
    assert resp.status_code == 400 and "token_ids_logprob" in resp.text


# ---- frontend language -----------------------------------------------------------------------------------------


def run_program(program, backend, timeout=120, **kwargs):
    result = {}

    def target():
        try:
            result["state"] = program.run(backend=backend, **kwargs)
            result["state"].sync()
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "DSL program hung"
    if "error" in result:
        raise result["error"]
    assert result["state"].error() is None, result["state"].error()
    return result["state"]


@sgl.function
def pick(s, prompt, choices):
    s += prompt + sgl.select("c", choices=choices)


@sgl.function
def pick_gen(s, prompt, choices):
    s += prompt + sgl.gen("c", choices=choices)


@sgl.function
def formatted(s):
    s += "Phone: " + sgl.gen("phone", regex=r"[0-9]{3}-[0-9]{4}", max_tokens=40)
    s += "\nAge: " + sgl.gen_int("age", max_tokens=16)


def test_dsl_select_picks_the_clamped_obvious_choice(srv, tokenizer):
    """select / gen(choices) score each choice with the denoiser: after a prompt whose one-step greedy continuation
    is X (a one-token printable answer), the model picks X over another one-token string, in either order."""
    texts = [f"Question {k}?" for k in range(60)]
    outs = requests.post(f"{srv.url}/generate", timeout=120, json={"text": texts, "sampling_params": {
        "max_new_tokens": 1, "temperature": 0, "diffusion": {"max_denoising_steps": 1}}}).json()  # fmt: skip
    for prompt, out in zip(texts, outs):
        x = out["text"]
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        if len(x) == 1 and x.isalnum() and tokenizer.encode(prompt + x, add_special_tokens=False) == ids + out["output_ids"]:
            break
    else:
        pytest.fail("no prompt with a printable one-token greedy continuation")
    other = next(c for c in "ZQ7" if c != x and tokenizer.encode(prompt + c, add_special_tokens=False)[:-1] == ids)
    backend = sgl.RuntimeEndpoint(srv.url)
    for program in (pick, pick_gen):
        for choices in ([x, other], [other, x]):
            assert run_program(program, backend, prompt=prompt, choices=choices)["c"] == x


def test_dsl_regex_and_int(srv):
    """gen(regex=...) and gen_int are constrained on the canvas: the phone matches, the age is an integer (or
    the generation ran out of tokens first)."""
    state = run_program(formatted, sgl.RuntimeEndpoint(srv.url))
    if state.get_meta_info("phone")["finish_reason"]["type"] != "length":
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", state["phone"])
    if state.get_meta_info("age")["finish_reason"]["type"] != "length":
        int(state["age"])


def test_server_is_healthy_after_all(srv):
    assert srv.healthy()
    time.sleep(0)
