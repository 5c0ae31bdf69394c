"""A real ``python -m sglang.launch_server`` on the tiny checkpoint, started once per test session."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    READY_PATH = "/health"  # polled until it answers 200
    # explicit CPU settings (some are also what a DiffusionGemma server picks by itself on a CPU-only machine)
    FLAGS = (
        "--device", "cpu", "--dtype", "float32", "--max-total-tokens", "8192", "--skip-server-warmup",
        "--sleep-on-idle", "--disable-overlap-schedule", "--enable-metrics", "--enable-cache-report",
    )  # fmt: skip

    def __init__(self, model_dir, *extra_args, env: dict[str, str] | None = None):
        """``env``: variables added to this process's environment for the server (e.g. ``SGL_DIFFUSION_*``)."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # not inside model_dir: tests compare the checkpoint directory's files
        self.log_path = f"{tempfile.mkdtemp(prefix='sgl-diffusion-server-')}/server-{self.port}.log"
        args = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--host", "127.0.0.1",
            "--port", str(self.port), *self.FLAGS, *extra_args,
        ]  # fmt: skip
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=None if env is None else os.environ | env)
        self._wait_healthy(timeout=240)

    def _wait_healthy(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if requests.get(f"{self.url}{self.READY_PATH}", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not healthy after {timeout}s; see {self.log_path}")

    def post(self, path, body, timeout=120):
        return requests.post(f"{self.url}{path}", json=body, timeout=timeout)

    def healthy(self) -> bool:
        return requests.get(f"{self.url}/health", timeout=10).status_code == 200

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="session")
def server(tiny_checkpoint_dir):
    srv = Server(tiny_checkpoint_dir)
    yield srv
    srv.stop()
