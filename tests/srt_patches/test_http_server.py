import inspect
from types import SimpleNamespace

import pytest
import requests

from srt_patches import http_server

TARGET = http_server.TARGETS[0]


def test_upstream_signature_and_why(upstream_parameters):
    """The freeze takes the server args and posts /freeze_gc at once; sglang's warm-up, which waits for the HTTP
    server first, is skipped with --skip-server-warmup (why the patch waits)."""
    assert upstream_parameters(TARGET) == [("server_args", inspect.Parameter.empty)]
    from sglang.srt.entrypoints import http_server as upstream

    freeze = inspect.getsource(upstream._freeze_gc_after_server_warmup.__wrapped__)
    assert "/freeze_gc" in freeze and "model_info" not in freeze
    warmup = inspect.getsource(upstream._wait_and_warmup)
    assert warmup.index("skip_server_warmup") < warmup.index("_freeze_gc_after_server_warmup(server_args)")


def test_installed(applied):
    assert applied.is_installed(TARGET)


@pytest.fixture
def steps(monkeypatch):
    """What the wrapper did, in order: 'wait', then 'freeze'."""
    done = []
    monkeypatch.setattr(http_server, "_wait_until_answering", lambda server_args: done.append("wait"))
    return done


@pytest.mark.parametrize("skipped, ours, expected", [
    (True, True, ["wait", "freeze"]),
    (False, True, ["freeze"]),  # sglang's warm-up waited already
    (True, False, ["freeze"]),  # other models: sglang's behaviour
])  # fmt: skip
def test_the_freeze_waits_for_the_http_server_only_when_the_warm_up_is_skipped(monkeypatch, steps, skipped, ours,
                                                                                 expected):
    import sglang.srt.runtime_context as runtime_context

    monkeypatch.setattr(runtime_context, "get_serving", lambda: SimpleNamespace(skip_server_warmup=skipped))
    monkeypatch.setattr(http_server, "_serves_diffusion", lambda server_args: ours)
    http_server.freeze_gc_after_server_warmup(lambda server_args: steps.append("freeze"), object())
    assert steps == expected


def test_waiting_polls_until_the_server_answers(monkeypatch):
    attempts, naps = [], []

    def get(url, **kwargs):
        attempts.append(url)
        if len(attempts) < 3:
            raise requests.exceptions.ConnectionError("refused")
        return SimpleNamespace(status_code=401)  # any answer: uvicorn listens

    monkeypatch.setattr(requests, "get", get)
    monkeypatch.setattr(http_server.time, "sleep", naps.append)
    server_args = SimpleNamespace(url=lambda: "http://127.0.0.1:1", ssl_verify=None)
    monkeypatch.setattr("sglang.srt.arg_groups.serving_hook.ssl_verify_of", lambda args: True)
    http_server._wait_until_answering(server_args)
    assert attempts == ["http://127.0.0.1:1/model_info"] * 3 and naps == [http_server.POLL_S] * 2


def test_launch_server_signature_and_the_routes_still_exist(upstream_parameters):
    """launch_server still takes the server args first; the routes whose bad arguments are answered still exist."""
    from sglang.srt.entrypoints.http_server import app

    assert upstream_parameters(http_server.TARGETS[1])[0] == ("server_args", inspect.Parameter.empty)
    paths = {getattr(route, "path", None) for route in app.routes}
    assert set(http_server.BAD_ARGUMENT_ERRORS) <= paths


def test_launch_server_installed(applied):
    assert applied.is_installed(http_server.TARGETS[1])


def _app_with_bad_argument_handlers():
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/configure_logging")
    async def configure_logging(level: str = "LOUD"):
        raise ValueError(f"Unknown level: {level!r}")

    @app.post("/vertex_generate")
    async def vertex_generate():
        raise TypeError("'NoneType' object is not iterable")  # a bug, not a bad argument

    @app.post("/generate")
    async def generate():
        raise ValueError("Unknown level: 'LOUD'")  # another route's error

    for error in (ValueError, TypeError):
        app.add_exception_handler(error, http_server.bad_argument_is_a_400)
    return app


def test_a_bad_argument_of_those_routes_is_a_400_and_anything_else_a_500():
    from fastapi.testclient import TestClient

    client = TestClient(_app_with_bad_argument_handlers(), raise_server_exceptions=False)
    resp = client.post("/configure_logging")
    assert resp.status_code == 400 and resp.json() == {"error": {"message": "Unknown level: 'LOUD'"}}
    assert client.post("/vertex_generate").status_code == 500
    assert client.post("/generate").status_code == 500


@pytest.mark.parametrize("ours", [True, False])
def test_the_handlers_are_added_before_a_diffusion_server_starts(monkeypatch, ours):
    from sglang.srt.entrypoints.http_server import app

    monkeypatch.setattr(http_server, "_serves_diffusion", lambda server_args: ours)
    monkeypatch.setattr(app, "exception_handlers", dict(app.exception_handlers))
    started = []
    http_server.launch_server(lambda server_args: started.append(dict(app.exception_handlers)), object())
    added = {error for error in (ValueError, TypeError) if started[0].get(error) is http_server.bad_argument_is_a_400}
    assert added == ({ValueError, TypeError} if ours else set())


def test_a_body_that_fails_validation_is_answered_without_the_servers_source_path(monkeypatch):
    """sglang's own handler, reached through sglang's app: a JSON body cut short is a 400 that names the route but
    not the file and line of sglang's source (which told any client where the server is installed)."""
    from fastapi.testclient import TestClient
    from sglang.srt.entrypoints.http_server import app

    monkeypatch.setattr(app, "exception_handlers", dict(app.exception_handlers))
    monkeypatch.setattr(http_server, "_serves_diffusion", lambda server_args: False)  # any model's server
    bodies = {}
    for patched in (False, True):
        if patched:
            http_server.launch_server(lambda server_args: None, object())
        monkeypatch.setattr(app, "middleware_stack", None)  # starlette builds it, with the handlers, on first use
        resp = TestClient(app).post("/generate", content=b'{"text": ', headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
        bodies[patched] = resp.json()["message"]
    assert 'http_server.py", line' in bodies[False]  # why the patch exists
    assert "json_invalid" in bodies[True] and "POST /generate" in bodies[True] and "File " not in bodies[True]


def test_server_info_signature_and_why(upstream_parameters):
    """/server_info builds its answer with build_server_info(server_args, scheduler_info), which still puts every
    server argument and the launch command in it (the patch's reason)."""
    from sglang.srt.entrypoints import http_server as upstream

    assert upstream_parameters(http_server.TARGETS[2]) == [("server_args", inspect.Parameter.empty),
                                                            ("scheduler_info", inspect.Parameter.empty)]
    assert upstream_parameters(http_server.TARGETS[3]) == [("self", inspect.Parameter.empty)]
    assert "internal_states" in inspect.getsource(upstream.server_info)
    source = inspect.getsource(upstream.build_server_info.__wrapped__)
    assert "resolved_dict()" in source and "launch_command" in source
    assert "build_server_info(" in inspect.getsource(upstream.server_info)



def test_server_info_shows_no_credentials(applied):
    """The ordinary API key's holder read the admin key in /server_info; keys and the SSL key password are redacted
    in the fields and in the launch command, whatever the flags' form; unset ones stay None, the rest is untouched."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    assert applied.is_installed(http_server.TARGETS[2])
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    flags = [word for field in http_server.SECRET_FIELDS for word in ("--" + field.replace("_", "-"), "x")]
    parsed = vars(parser.parse_args(["--model-path", "m", *flags]))
    assert all(parsed[field] == "x" for field in http_server.SECRET_FIELDS)  # sglang's names for its secrets
    command = ("python -m sglang.launch_server --api-key secret --admin-api-key=adminsecret --port 30000 "
               "--ssl-keyfile-password pw --served-model-name api-key")
    info = http_server.server_info_without_secrets({
        "api_key": "secret", "admin_api_key": "adminsecret", "ssl_keyfile_password": "pw", "port": 30000,
        "served_model_name": "api-key", "launch_command": command})  # fmt: skip
    assert info == {
        "api_key": "<redacted>", "admin_api_key": "<redacted>", "ssl_keyfile_password": "<redacted>", "port": 30000,
        "served_model_name": "api-key",
        "launch_command": "python -m sglang.launch_server --api-key <redacted> --admin-api-key=<redacted> "
                          "--port 30000 --ssl-keyfile-password <redacted> --served-model-name api-key",
    }  # fmt: skip
    unset = {"api_key": None, "admin_api_key": None, "launch_command": None}
    assert http_server.server_info_without_secrets(dict(unset)) == unset


def test_each_schedulers_state_shows_no_credentials(applied):
    """/server_info's internal_states hold each scheduler's server arguments: redacted there too."""
    import asyncio

    from sglang.srt.managers.tokenizer_control_mixin import TokenizerControlMixin

    assert applied.is_installed(http_server.TARGETS[3])

    async def states(manager):
        return [{"api_key": "secret", "admin_api_key": "adminsecret", "dp_rank": rank} for rank in (0, 1)]

    got = asyncio.run(http_server.internal_states_without_secrets(states, None))
    assert got == [{"api_key": "<redacted>", "admin_api_key": "<redacted>", "dp_rank": rank} for rank in (0, 1)]
    assert TokenizerControlMixin.get_internal_state.__wrapped__.__qualname__.endswith("get_internal_state")


def test_generate_stream_signature_and_why(upstream_parameters):
    """serve_generate_request still takes (obj, request), and still answers a streamed request's refusal inside the
    stream it has started: one error event, as the wrapper reads it, then [DONE]."""
    from sglang.srt.entrypoints import http_server as upstream

    assert upstream_parameters(http_server.TARGETS[4])[:2] == [("obj", inspect.Parameter.empty),
                                                               ("request", inspect.Parameter.empty)]  # fmt: skip
    source = inspect.getsource(upstream.serve_generate_request.__wrapped__)
    assert '"error": {' in source and 'b"data: " + dumps_json(out)' in source and "StreamingResponse(" in source


def test_generate_stream_installed(applied):
    assert applied.is_installed(http_server.TARGETS[4])


def _streamed(chunks):
    from fastapi.responses import StreamingResponse

    async def body():
        for chunk in chunks:
            yield chunk

    async def original(obj, request):
        return StreamingResponse(body(), media_type="text/event-stream")

    return original


def test_a_refused_streamed_generate_is_answered_with_its_status():
    import asyncio

    import orjson

    refusal = b'data: {"error":{"message":"diffusion.max_denoising_steps must be in [1, 1024] (got 0)","type":' \
              b'"invalid_request_error","code":400,"retryable":false}}\n\n'  # fmt: skip
    resp = asyncio.run(http_server.serve_generate_request(_streamed([refusal, b"data: [DONE]\n\n"]), None, None))
    assert resp.status_code == 400
    assert orjson.loads(resp.body) == {"error": {"message": "diffusion.max_denoising_steps must be in [1, 1024] (got 0)"}}


def test_a_streamed_generate_that_runs_streams_every_chunk_in_order():
    import asyncio

    chunks = [b'data: {"text":"a"}\n\n', b'data: {"text":"ab"}\n\n', b'data: {"error":{"message":"late"}}\n\n',
              b"data: [DONE]\n\n"]  # an error after the first chunk stays in the stream  # fmt: skip

    async def run():
        resp = await http_server.serve_generate_request(_streamed(chunks), None, None)
        return resp.status_code, [chunk async for chunk in resp.body_iterator]

    assert asyncio.run(run()) == (200, chunks)
