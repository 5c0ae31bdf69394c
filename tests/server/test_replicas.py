"""Replicas on CPU: sglang's data parallelism (--dp-size 2) and two servers behind sglang's cache-aware router."""

import subprocess
import sys
import time
import uuid

import pytest
import requests

from tests.server.conftest import Server, _free_port

pytestmark = pytest.mark.slow

SEEDED = {"max_new_tokens": 40, "ignore_eos": True, "diffusion": {"max_denoising_steps": 2}}


def generate(url, **body):
    resp = requests.post(f"{url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture
def dp_server(tiny_checkpoint_dir):
    # NOTE: more ranks than this machine's NUMA nodes: the package binds each replica's threads itself.
    # Stopped right after its test: three idle replicas' processes need not share 2 cores with the router test.
    srv = Server(tiny_checkpoint_dir, "--dp-size", "2")
    yield srv
    srv.stop()


def test_data_parallel_replicas_answer_like_one_server(dp_server, server):
    """Requests alternate between the two replicas, and each seeded answer is the single server's."""
    for seed in range(4):
        sampling = SEEDED | {"diffusion": SEEDED["diffusion"] | {"seed": seed}}
        want = generate(server.url, text=f"replica {seed}", sampling_params=sampling)["output_ids"]
        assert generate(dp_server.url, text=f"replica {seed}", sampling_params=sampling)["output_ids"] == want
    loads = requests.get(f"{dp_server.url}/v1/loads", timeout=10).json()["loads"]
    assert len(loads) == 2
    with open(dp_server.log_path) as log:
        text = log.read()
    assert "SGLANG_CPU_OMP_THREADS_BIND=" in text and "DP1" in text


class Router:
    """``python -m sglang_router.launch_router`` over ``workers``, loopback only (its metrics port too)."""

    def __init__(self, workers, policy="cache_aware"):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *(w.url for w in workers),
                "--policy", policy, "--host", "127.0.0.1", "--port", str(self.port),
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(_free_port())]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.wait_ready(len(workers))

    def wait_ready(self, workers: int, timeout=120):
        """/health answers before the workers are registered; /readiness only once they are healthy."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"router exited with {self.proc.returncode}"
            try:
                resp = requests.get(f"{self.url}/readiness", timeout=2)
                if resp.status_code == 200 and resp.json()["healthy_workers"] == workers:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"router not ready with {workers} workers after {timeout} s")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def router(server, tiny_checkpoint_dir):
    pytest.importorskip("sglang_router")
    second = Server(tiny_checkpoint_dir)
    rt = Router([server, second])
    yield rt
    rt.stop()
    second.stop()


def test_router_keeps_a_conversation_on_the_worker_that_holds_its_kv(router):
    """Four two-turn conversations through the cache-aware router: every second turn reports the first turn's
    prompt as cached, so it ran where the first turn's KV is (by chance that would hold for all four in 1/16)."""
    for i in range(4):
        text = f"conversation {i} {uuid.uuid4().hex[:8]}: tell me more"
        sampling = {"max_new_tokens": 20, "diffusion": {"max_denoising_steps": 1, "seed": i}}
        first = generate(router.url, text=text, sampling_params=sampling)
        second = generate(router.url, text=text + first["text"] + " and then?", sampling_params=sampling)
        assert second["meta_info"]["cached_tokens"] >= first["meta_info"]["prompt_tokens"], (i, first, second)
