"""A real ``python -m sglang.launch_server`` on a checkpoint (the shared one: ``server`` in tests/conftest.py)."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import requests

from tests.multimodal.media import mp4_bytes, png_bytes


def _free_port() -> int:
    """A free port below the kernel's ephemeral range, where no outgoing connection or bind(0) (gloo's, a client's)
    can take it before the server binds it, and below sglang's own pick for its nccl port (22000-29999)."""
    from sglang.srt.utils.network import get_free_port_below_ephemeral

    return get_free_port_below_ephemeral(low=10000, high=21999)


# the files of ``media_disk``, as bytes (tests compare them sent inline with read from disk)
IMAGE = png_bytes(48, 32, shade=9)
VIDEO = mp4_bytes(2.5, fps=2, width=64, height=48)


class PortTaken(RuntimeError):
    """The server's HTTP port was bound by another process between our pick and its bind."""


class Server:
    READY_PATH = "/health"  # polled until it answers 200
    STARTS = 3  # tries, each on a new port, when another process takes the port first
    HEALTHY_S = 240  # start-up, until /health answers
    # a server that compiles answers /health after compiling its canvas step's graphs: on a cold inductor cache (a
    # fresh machine) and beside another worker's tests, that took over 240 s on a 2-core AMD EPYC (2026-12-03)
    COMPILING_HEALTHY_S = 900
    # under pytest's temporary directory (tests/conftest.py sets it), which keeps the last three runs' and removes
    # older ones; None: the system's
    log_root: str | None = None
    # explicit CPU settings (some are also what a DiffusionGemma server picks by itself on a CPU-only machine)
    FLAGS = (
        "--device", "cpu", "--dtype", "float32", "--max-total-tokens", "8192", "--skip-server-warmup",
        "--sleep-on-idle", "--disable-overlap-schedule", "--enable-metrics", "--enable-cache-report",
    )  # fmt: skip

    def __init__(self, model_dir, *extra_args, env: dict[str, str] | None = None):
        """``env``: variables added to this process's environment for the server (e.g. ``SGL_DIFFUSION_*``)."""
        timeout = self.COMPILING_HEALTHY_S if "--enable-torch-compile" in extra_args else self.HEALTHY_S
        for start in range(self.STARTS):
            self._start(model_dir, extra_args, env)
            try:
                self._wait_healthy(timeout)
                return
            except PortTaken:
                self.stop()
                if start == self.STARTS - 1:
                    raise
            except BaseException:  # not healthy, or the test run interrupted: leave no server behind
                self.stop()
                raise

    def _start(self, model_dir, extra_args, env):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # not inside model_dir: tests compare the checkpoint directory's files
        log_dir = tempfile.mkdtemp(prefix="sgl-diffusion-server-", dir=self.log_root)
        self.log_path = f"{log_dir}/server-{self.port}.log"
        args = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--host", "127.0.0.1",
            "--port", str(self.port), *self.FLAGS, *extra_args,
        ]  # fmt: skip
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=None if env is None else os.environ | env)

    def _wait_healthy(self, timeout):
        """Healthy once our server listens on the port and READY_PATH answers 200 (an answer alone may come from
        whichever process took the port)."""
        taken = f"error while attempting to bind on address ('127.0.0.1', {self.port})"  # uvicorn's words
        deadline = time.time() + timeout
        while time.time() < deadline:
            with open(self.log_path) as log:
                if taken in log.read():
                    raise PortTaken(f"port {self.port} taken by another process; see {self.log_path}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if self._listening() and requests.get(f"{self.url}{self.READY_PATH}", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not healthy after {timeout}s; see {self.log_path}")

    def _listening(self) -> bool:
        """Whether the server's own process (sglang's HTTP server runs in it) listens on the port."""
        try:
            connections = psutil.Process(self.proc.pid).net_connections(kind="tcp")
        except psutil.Error:  # it has just exited: the next poll says so
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in connections)

    def post(self, path, body, timeout=120):
        return requests.post(f"{self.url}{path}", json=body, timeout=timeout)

    def healthy(self) -> bool:
        return requests.get(f"{self.url}/health", timeout=10).status_code == 200

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:  # the whole group has exited already
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="session")
def media_disk(tmp_path_factory):
    """allowed/ (``configured_server``'s media directory: an image, a video, playlists, links out), outside/ (an
    image); tests/server/test_media_security.py attacks through them."""
    from tests.multimodal.media import hls_playlist

    root = tmp_path_factory.mktemp("media")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "img.png").write_bytes(IMAGE)
    (allowed / "clip.mp4").write_bytes(VIDEO)
    (outside / "img.png").write_bytes(IMAGE)
    playlist = hls_playlist(f"file://{allowed / 'clip.mp4'}")
    (allowed / "list.m3u8").write_bytes(playlist)
    (allowed / "list.mp4").write_bytes(playlist)  # a playlist named like a video
    (allowed / "out.png").symlink_to(outside / "img.png")
    (allowed / "out-missing.png").symlink_to(outside / "missing.png")
    return root


@pytest.fixture(scope="session")
def configured_server(tiny_checkpoint_dir, media_disk):
    """A server set up as a deployment would be, shared by the modules that need a non-default one (each server
    start costs 30-40 s): Gemma 4's reasoning and tool-call parsers (test_openai_features.py, test_structured.py),
    2 denoise steps unless a request says otherwise, as DSL programs need (test_structured.py, test_dsl.py), and local media
    allowed from ``media_disk``/allowed and 127.0.0.1 only, not the rest of 127/8 nor ::1 (test_media_security.py)."""
    srv = Server(tiny_checkpoint_dir, "--reasoning-parser", "gemma4", "--tool-call-parser", "gemma4",
                 "--preferred-sampling-params", '{"diffusion": {"max_denoising_steps": 2}}',
                 env={"SGL_DIFFUSION_ALLOWED_LOCAL_MEDIA_PATHS": str(media_disk / "allowed"),
                      "SGL_DIFFUSION_ALLOWED_MEDIA_NETWORKS": "127.0.0.1/32"})  # fmt: skip
    yield srv
    srv.stop()
