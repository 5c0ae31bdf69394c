"""`python -m sglang.launch_server --model-path DIR` and nothing else, on a machine without an accelerator."""

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
    """/generate answers; the server runs on the CPU with the CPU defaults, announced once (by the launcher)."""
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 8, "diffusion": {"max_denoising_steps": 2, "seed": 1}}}
    response = plain_server.post("/generate", body)
    assert response.status_code == 200, response.text
    assert len(response.json()["output_ids"]) == 8
    info = requests.get(f"{plain_server.url}/server_info", timeout=10).json()
    fields = ("device", "max_total_tokens", "sleep_on_idle", "disable_overlap_schedule", "skip_server_warmup")
    assert {name: info[name] for name in fields} == {
        "device": "cpu", "max_total_tokens": 8192, "sleep_on_idle": True, "disable_overlap_schedule": True,
        "skip_server_warmup": True,
    }  # fmt: skip
    with open(plain_server.log_path) as log:
        assert log.read().count("sgl-diffusion: no accelerator found") == 1
