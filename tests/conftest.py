import json
import os

import pytest


def pytest_configure(config):
    """With ``-n N`` (README's test command), N workers and the servers and probes they start share the machine's
    cores: unless OMP_NUM_THREADS is given, each gets its share. At torch's default (one OpenMP thread per core in
    every process) their threads spin-wait on each other's cores; two processes at 2 threads each on the 2-core
    machine ran 4x slower than at 1 thread each. Tests that need a thread count pin it (``torch_threads``)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        share = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)  # inherited by the servers and scripts the tests start
        torch.set_num_threads(share)


def pytest_collection_modifyitems(config, items):
    """Modules that start servers (marked slow) first, each kept in file order: with README's ``-n 2`` two workers
    share the modules, and a long one started last would leave one worker running it alone."""
    server_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in server_files)  # stable: file order otherwise


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory):
    """Default-preset tiny DiffusionGemma checkpoint (seed 0), built once per test session."""
    # Imported here so test runs that never use the fixture don't pay for importing transformers.
    from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture
def torch_threads(request):
    """Run the test with ``torch.set_num_threads(request.param)`` (parametrize it indirectly); restored after.

    Bit identity with transformers holds only where both sides reduce in the same order: tests that rely on it pin
    one thread; tolerance-level tests run at several counts.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_checkpoint_dir():
    """The trained tiny checkpoint (sgl_diffusion/entrypoints/tiny_training.py): trained once per recipe on a machine
    (a few minutes), then reused from SGL_DIFFUSION_CACHE_DIR (default ~/.cache/sgl-diffusion)."""
    from sgl_diffusion.entrypoints.tiny_training import trained_checkpoint

    return trained_checkpoint()


@pytest.fixture(scope="session", autouse=True)
def server_logs(tmp_path_factory):
    """Servers' logs go under pytest's temporary directory, kept for the last three runs (not left in /tmp)."""
    from tests.server.conftest import Server

    Server.log_root = str(tmp_path_factory.mktemp("server-logs"))


@pytest.fixture(scope="session")
def server(tiny_checkpoint_dir):
    """A real ``python -m sglang.launch_server`` on the tiny checkpoint (tests/server/conftest.py's flags), started
    once per test session and shared by every module that only needs a default server."""
    from tests.server.conftest import Server, _free_port

    # KV events on, as a cache-aware router's deployment has them (test_metrics.py subscribes)
    kv_events = f"tcp://127.0.0.1:{_free_port()}"
    config = json.dumps({"publisher": "zmq", "endpoint": kv_events.replace("127.0.0.1", "*")})
    srv = Server(tiny_checkpoint_dir, "--kv-events-config", config)
    srv.kv_events = kv_events
    yield srv
    srv.stop()
