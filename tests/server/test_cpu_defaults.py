"""`python -m sglang.launch_server --model-path DIR` and nothing else, on a machine without an accelerator."""

import time
from pathlib import Path

import pytest
import requests

from tests.server.conftest import Server


class PlainServer(Server):
    FLAGS = ()  # only --model-path, --host and --port


@pytest.fixture(scope="module")
def plain_server(tiny_checkpoint_dir):
    from sgl_diffusion.runtime.cpu_defaults import sglang_picks_a_device

    if sglang_picks_a_device():
        pytest.skip("an accelerator (or SGLANG_USE_CPU_ENGINE=1) is present: the CPU fallback does not apply")
    srv = PlainServer(tiny_checkpoint_dir)
    yield srv
    srv.stop()


@pytest.mark.slow
def test_plain_command_serves_on_the_cpu(plain_server):
    """/generate answers; the server runs on the CPU with the CPU defaults (the float32 checkpoint in float32, not
    sglang's float16), announced once (by the launcher)."""
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 8, "diffusion": {"max_denoising_steps": 2, "seed": 1}}}
    response = plain_server.post("/generate", body)
    assert response.status_code == 200, response.text
    assert len(response.json()["output_ids"]) == 8
    info = requests.get(f"{plain_server.url}/server_info", timeout=10).json()
    fields = ("device", "dtype", "max_total_tokens", "sleep_on_idle", "disable_overlap_schedule", "skip_server_warmup")
    assert {name: info[name] for name in fields} == {
        "device": "cpu", "dtype": "float32", "max_total_tokens": 8192, "sleep_on_idle": True,
        "disable_overlap_schedule": True, "skip_server_warmup": True,
    }  # fmt: skip
    with open(plain_server.log_path) as log:
        assert log.read().count("sgl-diffusion: no accelerator found") == 1


@pytest.mark.slow
def test_the_gc_is_frozen_once_the_server_answers(plain_server):
    """The warm-up is skipped on the CPU; the GC freeze that follows it waits for the HTTP server (it was posted
    before uvicorn listened, and logged a connection-refused traceback at every start)."""
    deadline = time.monotonic() + 120
    while "The server is fired up" not in (log := Path(plain_server.log_path).read_text()):
        assert time.monotonic() < deadline, "the launcher never said it was ready"
        time.sleep(0.5)  # logged right after the freeze
    assert '"POST /freeze_gc HTTP/1.1" 200' in log and "freeze_gc failed" not in log
