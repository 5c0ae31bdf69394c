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
