"""The batch entry point: line planning and resume state without an engine, then the CLI end to end."""

import json
import subprocess
import sys

import pytest

from sgl_diffusion.entrypoints.batch import Done, plan

ENGINE_ARGS = ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", "8192", "--disable-overlap-schedule"]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hello"}]


def line(custom_id, url, body, method="POST"):
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def steps1(seed=None, **body):
    return {"ignore_eos": True, "diffusion": {"max_denoising_steps": 1, "seed": seed}, **body}


CHAT_SEEDED = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, **steps1(3)}
COMPLETION_SEEDED = {"model": "tiny", "prompt": "Once", "max_tokens": 40, **steps1(5)}  # 40 tokens: 2 canvases
INPUT_LINES = [
    line("chat-seeded", CHAT, CHAT_SEEDED),
    line("comp-seeded", COMPLETIONS, COMPLETION_SEEDED),
    "not json",  # line 3
    line("bad-url", "/v1/embeddings", {"input": "x"}),
    line("bad-diffusion", COMPLETIONS, {"prompt": "x", "diffusion": {"max_denoising_steps": 0}}),
    line("bad-body", COMPLETIONS, {"max_tokens": 3}),  # no prompt
    line("chat-seeded", CHAT, CHAT_SEEDED),  # line 7: duplicate id
    "",  # blank: not an input
    line("streamed", CHAT, {"messages": MESSAGES, "stream": True}),
    json.dumps({"method": "POST", "url": COMPLETIONS, "body": {"prompt": "x"}}),  # line 10: no custom_id
]
ROWS_PER_RUN = 9  # non-blank input lines


def write_lines(path, lines):
    path.write_text("".join(f"{text}\n" for text in lines))
    return path


def read_rows(path):
    return [json.loads(text) for text in path.read_text().splitlines()]


def by_key(rows):
    """Request rows by custom_id and line-error rows by ("line", n); fails on a key written twice."""
    keyed = {}
    for row in rows:
        error = row["error"] or {}
        key = ("line", error["line"]) if "line" in error else row["custom_id"]
        assert key not in keyed, f"{key} written twice"
        keyed[key] = row
    return keyed


def run_cli(model_dir, input_path, output_path, *extra, engine_args=ENGINE_ARGS):
    args = [sys.executable, "-m", "sgl_diffusion.entrypoints.batch", "--model-path", str(model_dir),
            "--input", str(input_path), "--output", str(output_path), *engine_args, *extra]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=300)


# ---- without an engine -----------------------------------------------------------------------------------------


def test_plan_turns_bad_lines_into_error_rows(tmp_path):
    """Invalid JSON, a missing id, a repeated id, an unknown url or method each give one error row; blanks none."""
    path = write_lines(tmp_path / "in.jsonl", INPUT_LINES + ['["a list"]', line("get", CHAT, {}, method="GET")])
    items = list(plan(path, Done(frozenset(), frozenset())))
    requests = [item for item in items if not isinstance(item, dict)]
    assert [(r.line, r.custom_id, r.url) for r in requests] == [
        (1, "chat-seeded", CHAT), (2, "comp-seeded", COMPLETIONS), (5, "bad-diffusion", COMPLETIONS),
        (6, "bad-body", COMPLETIONS), (9, "streamed", CHAT),
    ]  # fmt: skip
    assert requests[0].body == CHAT_SEEDED
    rows = [item for item in items if isinstance(item, dict)]
    errors = [(row["custom_id"], row["error"]["code"], row["error"].get("line")) for row in rows]
    assert errors == [
        (None, "invalid_json", 3), ("bad-url", "invalid_url", None), ("chat-seeded", "duplicate_custom_id", 7),
        (None, "missing_custom_id", 10), (None, "missing_custom_id", 11), ("get", "invalid_method", None),
    ]  # fmt: skip
    assert all(row["response"] is None for row in rows)


def test_plan_skips_what_output_already_answers(tmp_path):
    """Done ids and reported lines are skipped; a later repeat of a done id is still a duplicate."""
    path = write_lines(tmp_path / "in.jsonl", INPUT_LINES)
    items = list(plan(path, Done(frozenset({"chat-seeded", "bad-url"}), frozenset({3, 10}))))
    keys = [item["error"]["code"] if isinstance(item, dict) else item.custom_id for item in items]
    assert keys == ["comp-seeded", "bad-diffusion", "bad-body", "duplicate_custom_id", "streamed"]


def test_done_reads_output_and_cuts_a_truncated_last_line(tmp_path):
    """Ids of request rows and lines of line errors are read; a partial last line is removed from the file."""
    rows = [
        {"id": "r1", "custom_id": "a", "response": {"status_code": 200}, "error": None},
        {"id": "r2", "custom_id": "b", "response": None, "error": {"code": "invalid_url", "message": "m"}},
        {"id": "r3", "custom_id": "a", "response": None, "error": {"code": "duplicate_custom_id", "line": 4}},
        {"id": "r4", "custom_id": None, "response": None, "error": {"code": "invalid_json", "line": 9}},
    ]
    complete = "".join(json.dumps(row) + "\n" for row in rows)
    out = tmp_path / "out.jsonl"
    out.write_text(complete + '{"id": "r5", "custom_id": "c", "resp')
    done = Done.read(out)
    assert done == Done(frozenset({"a", "b"}), frozenset({4, 9}))
    assert out.read_text() == complete
    assert Done.read(tmp_path / "missing.jsonl") == Done(frozenset(), frozenset())


def test_missing_input_is_a_usage_error(tmp_path):
    """A missing --input file exits with argparse's usage error before any engine starts."""
    proc = run_cli(tmp_path, tmp_path / "nope.jsonl", tmp_path / "out.jsonl")
    assert proc.returncode == 2
    assert "no such file" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_output_that_is_the_input_or_in_no_directory_is_a_usage_error(tmp_path):
    """--output the input file (also through a link) would append rows that are read back as lines to answer, each
    adding another, without end; an output in a missing directory, or a directory, failed only after the engine had
    started."""
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n')
    (tmp_path / "link.jsonl").symlink_to(lines)
    for output, message in ((lines, "is the input file"), (tmp_path / "link.jsonl", "is the input file"),
                            (tmp_path / "nodir" / "out.jsonl", "no such directory"),
                            (tmp_path, "is a directory")):  # fmt: skip
        proc = run_cli(tmp_path, lines, output)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert lines.read_text().count("\n") == 1 and not (tmp_path / "nodir").exists()


def test_lines_without_a_route_are_answered_when_the_engine_fails(tmp_path, monkeypatch):
    """An engine that does not start still leaves a row for every line that needs none; the error propagates,
    and a later run skips those rows."""
    import os

    import sglang

    from sgl_diffusion.entrypoints import batch

    def engine_fails(**kwargs):
        raise RuntimeError("No accelerator (CUDA, XPU, HPU, NPU, MUSA, MPS) or platform plugin is available.")

    monkeypatch.setattr(sglang, "Engine", engine_fails)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # main() sets defaults in the environment
    input_path, out = write_lines(tmp_path / "in.jsonl", INPUT_LINES), tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="No accelerator"):
        batch.main(["--model-path", str(tmp_path), "--input", str(input_path), "--output", str(out)])
    rows = by_key(read_rows(out))
    assert {key: _status(row) for key, row in rows.items()} == {
        ("line", 3): "invalid_json", "bad-url": "invalid_url", ("line", 7): "duplicate_custom_id",
        ("line", 10): "missing_custom_id",
    }  # fmt: skip
    assert [item.custom_id for item in plan(input_path, Done.read(out))] == [
        "chat-seeded", "comp-seeded", "bad-diffusion", "bad-body", "streamed"]  # fmt: skip


# ---- the CLI on the tiny checkpoint ----------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
INFILL_TEMPLATE = "def f(x):\n    {{hole:12}}\n    return y\n"
ROUTE_LINES = [  # what the server's routes take: infill, a completions suffix, a json_schema, logprobs
    line("infill", COMPLETIONS, {"model": "tiny", "prompt": "Code:\n", "max_tokens": 64,
                                 "diffusion": {"infill": {"template": INFILL_TEMPLATE}, "seed": 1}}),
    line("suffix", COMPLETIONS, {"model": "tiny", "prompt": "a = ", "suffix": "\nprint(a)", "max_tokens": 5,
                                 **steps1(2)}),
    line("json", CHAT, {"model": "tiny", "messages": MESSAGES, "max_tokens": 64, "diffusion": {"seed": 3},
                        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}}),
    line("logprobs", COMPLETIONS, {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "logprobs": 2, **steps1(4)}),
]  # fmt: skip


def image_line(custom_id, path):
    content = [{"type": "image_url", "image_url": {"url": str(path)}}, {"type": "text", "text": "what is this?"}]
    return line(custom_id, CHAT, {"model": "tiny", "messages": [{"role": "user", "content": content}],
                                  "max_tokens": 4, **steps1(3)})  # fmt: skip


@pytest.fixture(scope="module")
def first_run(tiny_checkpoint_dir, tmp_path_factory):
    """One batch into a fresh output file (each engine start costs half a minute, so one run answers the tests
    below): INPUT_LINES, ROUTE_LINES, and three image lines (an image beside the input file, /etc/passwd, an image
    elsewhere). (input path, process, rows by key)."""
    from tests.multimodal.media import png_bytes

    tmp = tmp_path_factory.mktemp("batch")
    for folder in ("job", "elsewhere"):
        (tmp / folder).mkdir()
        (tmp / folder / "img.png").write_bytes(png_bytes())
    media_lines = [image_line("beside", tmp / "job" / "img.png"), image_line("passwd", "/etc/passwd"),
                   image_line("elsewhere", tmp / "elsewhere" / "img.png"),
                   # relative paths name files beside the input, not in the job's working directory (the repository)
                   image_line("relative", "img.png"), image_line("relative-out", "../elsewhere/img.png"),
                   json.dumps({"custom_id": "no-body", "method": "POST", "url": CHAT}),
                   line("list-body", CHAT, [1])]  # fmt: skip
    input_path = write_lines(tmp / "job" / "in.jsonl", INPUT_LINES + ROUTE_LINES + media_lines)
    proc = run_cli(tiny_checkpoint_dir, input_path, tmp / "out.jsonl", "--max-in-flight", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(tmp / "out.jsonl")
    assert len(rows) == ROWS_PER_RUN + len(ROUTE_LINES) + len(media_lines)
    return input_path, proc, by_key(rows)


FIRST_RUN_EXTRA_KEYS = {"infill", "suffix", "json", "logprobs", "beside", "passwd", "elsewhere", "relative",
                        "relative-out", "no-body", "list-body"}


def _status(row):
    return row["response"]["status_code"] if row["error"] is None else row["error"]["code"]


@pytest.mark.slow
def test_one_row_per_input_line_with_its_status(first_run):
    """Every input line has one row: completions answered 200, the rest with the Batch API's error convention."""
    _, proc, rows = first_run
    assert {key: _status(row) for key, row in rows.items() if key not in FIRST_RUN_EXTRA_KEYS} == {
        "chat-seeded": 200, "comp-seeded": 200, ("line", 3): "invalid_json", "bad-url": "invalid_url",
        "bad-diffusion": 400, "bad-body": 400, ("line", 7): "duplicate_custom_id", "streamed": 400,
        ("line", 10): "missing_custom_id",
    }  # fmt: skip
    assert all(row["id"].startswith("batch_req_") for row in rows.values())
    assert len({row["id"] for row in rows.values()}) == len(rows)
    assert "max_denoising_steps" in rows["bad-diffusion"]["response"]["body"]["message"]
    assert "prompt" in rows["bad-body"]["response"]["body"]["message"]
    assert rows["streamed"]["response"]["body"]["object"] == "error"
    assert "tok/s" in proc.stderr  # the progress bar


@pytest.mark.slow
def test_bodies_are_openai_responses_with_diffusion_usage(first_run):
    """Bodies are chat.completion / text_completion objects; ignore_eos fills max_tokens; usage.diffusion is set."""
    _, _, rows = first_run
    chat = rows["chat-seeded"]["response"]
    completion = rows["comp-seeded"]["response"]["body"]
    assert chat["body"]["object"] == "chat.completion" and chat["request_id"] == chat["body"]["id"]
    assert chat["body"]["choices"][0]["message"]["role"] == "assistant"
    assert completion["object"] == "text_completion" and completion["choices"][0]["finish_reason"] == "length"
    assert chat["body"]["usage"]["completion_tokens"] == 8 and completion["usage"]["completion_tokens"] == 40
    assert chat["body"]["usage"]["diffusion"] == {"canvases": 1, "denoise_steps": 1, "tokens_per_forward": 8.0}
    assert completion["usage"]["diffusion"] == {"canvases": 2, "denoise_steps": 2, "tokens_per_forward": 20.0}


@pytest.mark.slow
def test_seeded_rows_equal_the_server_answers(first_run, server):
    """The same seeded bodies posted to a server (the same engine flags) give the same choices and token counts."""
    _, _, rows = first_run
    answers = {url: server.post(url, body).json() for url, body in
               ((CHAT, CHAT_SEEDED), (COMPLETIONS, COMPLETION_SEEDED))}  # fmt: skip
    for url, custom_id in ((CHAT, "chat-seeded"), (COMPLETIONS, "comp-seeded")):
        body = rows[custom_id]["response"]["body"]
        assert body["choices"] == answers[url]["choices"]
        for field in ("prompt_tokens", "completion_tokens", "diffusion"):
            assert body["usage"][field] == answers[url]["usage"][field], field


@pytest.mark.slow
def test_resume_runs_only_what_output_lacks(first_run, tiny_checkpoint_dir, tmp_path):
    """Rows already in OUT are kept as they are; a truncated last line is rerun; the rest is added once."""
    input_path, _, first_rows = first_run
    kept = [
        json.dumps({"id": "batch_req_kept1", "custom_id": "comp-seeded", "response": {"status_code": 200,
                    "request_id": "r", "body": {"marker": 1}}, "error": None}),
        json.dumps({"id": "batch_req_kept2", "custom_id": "bad-url", "response": None,
                    "error": {"code": "marker", "message": "m"}}),
        json.dumps({"id": "batch_req_kept3", "custom_id": None, "response": None,
                    "error": {"code": "invalid_json", "message": "m", "line": 3}}),
    ]  # fmt: skip
    out = tmp_path / "out.jsonl"
    out.write_text("".join(f"{text}\n" for text in kept) + '{"id": "batch_req_cut", "custom_id": "chat-seeded", "re')
    proc = run_cli(tiny_checkpoint_dir, input_path, out, "--max-in-flight", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert lines[:3] == kept
    rows = by_key(read_rows(out))  # also asserts that no key is written twice
    assert set(rows) == set(first_rows)
    new = {key: _status(row) for key, row in rows.items() if not row["id"].startswith("batch_req_kept")}
    kept_keys = {"comp-seeded", "bad-url", ("line", 3)}
    assert new == {key: _status(row) for key, row in first_rows.items() if key not in kept_keys}
    # the seeded request lost to the truncated line is redone, and a seed gives the same answer in another run
    choices = [r["chat-seeded"]["response"]["body"]["choices"] for r in (rows, first_rows)]
    assert choices[0] == choices[1]
    assert "3 were already there" in proc.stderr


@pytest.mark.slow
def test_only_the_three_paths_answer_every_line(tiny_checkpoint_dir, tmp_path):
    """`--model-path --input --output` and nothing else: on a machine without an accelerator the engine picks
    the CPU by itself, and every line gets its row, a line that is not JSON included."""
    lines = [line("chat", CHAT, CHAT_SEEDED), "not json", line("comp", COMPLETIONS, COMPLETION_SEEDED),
             json.dumps({"url": CHAT, "body": {}})]  # fmt: skip
    input_path, out = write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    proc = run_cli(tiny_checkpoint_dir, input_path, out, engine_args=())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = by_key(read_rows(out))
    assert {key: _status(row) for key, row in rows.items()} == {
        "chat": 200, ("line", 2): "invalid_json", "comp": 200, ("line", 4): "missing_custom_id"}
    assert rows["comp"]["response"]["body"]["usage"]["completion_tokens"] == 40


# ---- local media in batch bodies -------------------------------------------------------------------------------


def test_local_media_default_is_the_input_directory(tmp_path):
    """Unset, the variable becomes the input file's directory; set (even empty), the operator's value stands."""
    from sgl_diffusion.entrypoints.batch import allow_input_directory

    environ = {}
    allow_input_directory(tmp_path / "sub" / ".." / "in.jsonl", environ)
    assert environ == {"SGL_DIFFUSION_ALLOWED_LOCAL_MEDIA_PATHS": str(tmp_path)}
    for value in ("", "/srv/media"):
        environ = {"SGL_DIFFUSION_ALLOWED_LOCAL_MEDIA_PATHS": value}
        allow_input_directory(tmp_path / "in.jsonl", environ)
        assert environ == {"SGL_DIFFUSION_ALLOWED_LOCAL_MEDIA_PATHS": value}


@pytest.mark.slow
def test_bodies_read_local_media_only_beside_the_input(first_run):
    """An image next to the input file is read; /etc/passwd and an image elsewhere get the server's refusal."""
    from sgl_diffusion.multimodal.media_policy import LOCAL_REFUSED

    _, _, rows = first_run
    assert {key: _status(rows[key]) for key in ("beside", "passwd", "elsewhere", "relative", "relative-out")} == {
        "beside": 200, "passwd": 400, "elsewhere": 400, "relative": 200, "relative-out": 400}  # fmt: skip
    refusals = {rows[key]["response"]["body"]["message"] for key in ("passwd", "elsewhere", "relative-out")}
    assert len(refusals) == 1 and LOCAL_REFUSED in refusals.pop()
    assert rows["relative"]["response"]["body"]["choices"] == rows["beside"]["response"]["body"]["choices"]


@pytest.mark.slow
def test_a_body_that_is_not_an_object_is_a_400(first_run):
    """A chat line without a body, or with a list, is the route's 400 (sglang's chat validator raised AttributeError:
    a 500 with a traceback)."""
    _, proc, rows = first_run
    for key, kind in (("no-body", "NoneType"), ("list-body", "list")):
        assert _status(rows[key]) == 400
        assert rows[key]["response"]["body"]["message"] == (
            f"body must be a JSON object with the {CHAT} request (got {kind})")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_infill_structured_output_and_logprobs_lines(first_run):
    """Batch bodies take what the server's routes take: a diffusion.infill template (fixed pieces back verbatim), a
    completions suffix, a response_format json_schema, logprobs."""
    _, _, rows = first_run
    assert {key: _status(rows[key]) for key in ("infill", "suffix", "json", "logprobs")} == dict.fromkeys(
        ("infill", "suffix", "json", "logprobs"), 200)
    text = rows["infill"]["response"]["body"]["choices"][0]["text"]
    assert text.startswith("def f(x):\n    ") and text.endswith("\n    return y\n")
    assert rows["suffix"]["response"]["body"]["usage"]["completion_tokens"] == 5
    choice = rows["json"]["response"]["body"]["choices"][0]
    if choice["finish_reason"] == "stop":
        assert set(json.loads(choice["message"]["content"], strict=False)) == {"ok"}
    logprobs = rows["logprobs"]["response"]["body"]["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == 4 and all(v <= 0 for v in logprobs["token_logprobs"])
