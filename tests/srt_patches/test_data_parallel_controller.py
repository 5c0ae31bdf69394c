"""srt_patches.data_parallel_controller: the DP controller waits in zmq's poll while idle, and dispatches as sglang."""

import ast
import inspect
import textwrap
import threading
import time
from inspect import Parameter
from types import SimpleNamespace

import pytest
import zmq

from srt_patches import data_parallel_controller as patch

TARGET = patch.TARGETS[0]
POLL_TIMEOUT_S = patch.POLL_TIMEOUT_MS / 1000
# A zmq poll waits its whole timeout (libzmq's clock may read up to 1 ms early); a busy machine only makes it longer.
MIN_IDLE_GAP_S = POLL_TIMEOUT_S - 0.01


def _tree(fn) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(fn)))


def _calls(tree, name=None, owner=None):
    """Calls of ``name(...)`` (owner None) or of ``owner.<attr>(...)`` (name None: any attribute) in ``tree``."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if owner is None and isinstance(f, ast.Name) and f.id == name:
            out.append(node)
        elif owner is not None and isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            if f.value.id == owner and name in (None, f.attr):
                out.append(node)
    return out


# ---- the upstream structure the patch relies on ---------------------------------------------------------------


def test_upstream_signature(upstream_parameters):
    """The wrapper forwards only the controller: event_loop still takes (self) alone."""
    assert upstream_parameters(TARGET) == [("self", Parameter.empty)]


def test_upstream_loop_receives_only_with_a_noblock_sock_recv_from_the_tokenizer(upstream):
    """sglang's loop receives in exactly one place, ``sock_recv(self.recv_from_tokenizer, flags=zmq.NOBLOCK)`` in
    a try that ends the drain on zmq.ZMQError (zmq.Again: nothing to receive), and uses that socket nowhere else:
    the socket the patch wraps is the only one the loop waits on."""
    tree = _tree(upstream(TARGET))
    [call] = _calls(tree, "sock_recv")
    assert ast.unparse(call) == "sock_recv(self.recv_from_tokenizer, flags=zmq.NOBLOCK)"
    assert ast.unparse(tree).count("recv_from_tokenizer") == 1
    assert not [c for c in ast.walk(tree) if isinstance(c, ast.Attribute) and c.attr in ("recv", "recv_pyobj", "poll")]
    [handler] = [h for t in ast.walk(tree) if isinstance(t, ast.Try) for h in t.handlers if call in ast.walk(t)]
    assert ast.unparse(handler.type) == "zmq.ZMQError" and isinstance(handler.body[0], ast.Break)


def test_upstream_sock_recv_receives_with_the_methods_the_wrapper_covers():
    """``sock_recv``, as the controller's module binds it, receives only with socket.recv / recv_pyobj and passes
    its flags on (the two receive methods PollingSocket polls before), for msgpack and pickle IPC alike."""
    from sglang.srt.managers import data_parallel_controller as dpc
    from sglang.srt.managers import io_struct

    assert dpc.sock_recv is io_struct.sock_recv  # not wrapped by anyone (HookRegistry would re-point this binding)
    assert list(inspect.signature(dpc.sock_recv).parameters) == ["socket", "flags"]
    calls = _calls(_tree(dpc.sock_recv), owner="socket")
    assert sorted(ast.unparse(c) for c in calls) == ["socket.recv(flags=flags)", "socket.recv_pyobj(flags=flags)"]


# ---- installation ---------------------------------------------------------------------------------------------


def test_installed(applied):
    """apply() leaves our wrapper on the target, calling our hook."""
    assert applied.is_installed(TARGET)


def test_target_wears_its_hook(applied, resolve):
    assert patch.event_loop in [c.cell_contents for c in resolve(TARGET).__closure__]


# ---- which servers ----------------------------------------------------------------------------------------------


def test_applies_to_diffusion_gemma_servers_only(applied, tiny_checkpoint_dir, tmp_path):
    """The controller's server args tell: DiffusionGemma is ours, a Llama checkpoint keeps sglang's loop."""
    from sglang.srt.server_args import ServerArgs
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=256, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)  # fmt: skip
    ours = SimpleNamespace(server_args=ServerArgs(model_path=str(tiny_checkpoint_dir), device="cpu"))
    other = SimpleNamespace(server_args=ServerArgs(model_path=str(tmp_path), device="cpu"))
    assert patch._serves_diffusion(ours) and not patch._serves_diffusion(other)


@pytest.mark.parametrize("ours", [True, False])
def test_event_loop_wraps_the_socket_for_our_model_only(monkeypatch, ours):
    """For DiffusionGemma sglang's loop sees the tokenizer socket wrapped, for other models the socket itself;
    either way the controller keeps its own socket once the loop ends."""
    monkeypatch.setattr(patch, "_serves_diffusion", lambda controller: ours)
    socket = object()
    controller = SimpleNamespace(recv_from_tokenizer=socket)
    seen = []

    def original(ctrl, *args, **kwargs):
        seen.append((ctrl, ctrl.recv_from_tokenizer, args, kwargs))
        raise KeyboardInterrupt  # sglang's loop only ends by raising

    with pytest.raises(KeyboardInterrupt):
        patch.event_loop(original, controller)
    [(ctrl, sock, args, kwargs)] = seen
    assert ctrl is controller and (args, kwargs) == ((), {})
    if ours:
        assert isinstance(sock, patch.PollingSocket) and sock.socket is socket
    else:
        assert sock is socket
    assert controller.recv_from_tokenizer is socket


# ---- behaviour over real sockets --------------------------------------------------------------------------------


class _Stop(Exception):
    pass


class StoppableWatchdog:
    """The controller's soft watchdog; feed() (called once per receive attempt) ends the loop once stop is set."""

    def __init__(self):
        self.stop = threading.Event()
        self.feeds = 0

    def feed(self):
        self.feeds += 1
        if self.stop.is_set():
            raise _Stop


class Harness:
    """A real DataParallelController (built with __new__, its real dispatcher) between real zmq PUSH/PULL sockets:
    ``send`` plays the tokenizer manager, ``workers`` the two DP ranks' schedulers. Status and active workers
    differ so that each dispatch route shows where it sends: all-workers messages (e.g. BlockReqInput) go to the
    workers whose status is up (rank 0), control messages (the fallback) to the active workers (rank 1)."""

    def __init__(self, context, loop):
        from sglang.srt.managers.data_parallel_controller import DataParallelController

        name = f"inproc://dpc-{id(self)}"
        c = DataParallelController.__new__(DataParallelController)
        c.recv_from_tokenizer = context.socket(zmq.PULL)
        c.recv_from_tokenizer.bind(f"{name}-in")
        self.tokenizer = context.socket(zmq.PUSH)
        self.tokenizer.connect(f"{name}-in")
        self.workers, c.workers = [], []
        for rank in range(2):
            pull = context.socket(zmq.PULL)
            pull.bind(f"{name}-w{rank}")
            push = context.socket(zmq.PUSH)
            push.connect(f"{name}-w{rank}")
            self.workers.append(pull)
            c.workers.append(push)
        c.status, c._active_workers, c.control_message_step = [True, False], [1], 1
        c.soft_watchdog = StoppableWatchdog()
        c.init_dispatcher()
        self.controller, self.errors = c, []
        self.thread = threading.Thread(target=self._run, args=(loop,), daemon=True)
        self.thread.start()

    def _run(self, loop):
        try:
            loop(self.controller)
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.errors.append(e)

    def send(self, obj):
        from sglang.srt.managers.io_struct import sock_send

        sock_send(self.tokenizer, obj)

    def received(self, count, timeout_s=30.0):
        """{rank: [messages]} the workers received, once ``count`` arrived in all (or the timeout passed)."""
        from sglang.srt.managers.io_struct import sock_recv

        poller = zmq.Poller()
        for w in self.workers:
            poller.register(w, zmq.POLLIN)
        out, deadline = {}, time.monotonic() + timeout_s
        while sum(map(len, out.values())) < count and time.monotonic() < deadline:
            for w, _ in poller.poll(100):
                out.setdefault(self.workers.index(w), []).append(sock_recv(w))
        return out

    def stop(self):
        self.controller.soft_watchdog.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the controller loop did not end"
        assert self.errors == []


@pytest.fixture
def recv_times(monkeypatch):
    """Monotonic times of every call of sock_recv from the controller's module (its loop's receive attempts)."""
    from sglang.srt.managers import data_parallel_controller as dpc

    times, real = [], dpc.sock_recv

    def counted(socket, flags=0):
        times.append(time.monotonic())
        return real(socket, flags)

    monkeypatch.setattr(dpc, "sock_recv", counted)
    return times


@pytest.fixture(params=[False, True], ids=["msgpack_ipc", "pickle_ipc"])
def pickle_ipc(request, monkeypatch):
    """sock_send/sock_recv over msgpack (sglang's default) or pickle (SGLANG_USE_PICKLE_IPC): recv vs recv_pyobj."""
    from sglang.srt.managers import io_struct

    monkeypatch.setattr(io_struct, "_USE_PICKLE_IPC", request.param)
    return request.param


@pytest.fixture
def harness(applied, monkeypatch, recv_times, pickle_ipc):
    """harness(loop): a running Harness over ``loop`` ('patched': sglang's loop as installed, for DiffusionGemma;
    'upstream': sglang's own); stopped and its sockets closed after the test."""
    monkeypatch.setattr(patch, "_serves_diffusion", lambda controller: True)
    from sglang.srt.managers.data_parallel_controller import DataParallelController

    loops = {"patched": DataParallelController.event_loop, "upstream": DataParallelController.event_loop.__wrapped__}
    context = zmq.Context()
    started = []

    def start(loop):
        started.append(Harness(context, loops[loop]))
        return started[-1]

    yield start
    for h in started:
        h.stop()
    context.destroy(linger=0)


def _wait_for(predicate, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_idle_loop_waits_a_poll_timeout_between_receive_attempts(harness, recv_times):
    """With nothing arriving, each receive attempt of the patched loop is a full poll timeout after the last one
    (sglang's loop makes them microseconds apart), and the watchdog is still fed before each."""
    h = harness("patched")
    _wait_for(lambda: len(recv_times) >= 6)
    times = list(recv_times[:6])
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= MIN_IDLE_GAP_S, gaps
    assert h.controller.soft_watchdog.feeds >= 6
    assert isinstance(h.controller.recv_from_tokenizer, patch.PollingSocket)


def test_upstream_idle_loop_spins(harness, recv_times):
    """The control for the test above: sglang's own loop tries to receive again at once (of 200 attempts, some
    come less than a poll timeout apart; all 199 gaps would need the thread descheduled for 100 ms each)."""
    harness("upstream")
    _wait_for(lambda: len(recv_times) >= 200)
    times = list(recv_times[:200])
    assert min(b - a for a, b in zip(times, times[1:])) < MIN_IDLE_GAP_S


def test_patched_loop_dispatches_like_upstream(harness, pickle_ipc):
    """The same messages, sent while each loop idles, reach the same workers by sglang's dispatch routes:
    BlockReqInput to all workers that are up (send_to_all_workers), FlushCacheReqInput to the active workers
    (the send_control_message fallback); in order, after the patched loop has been idle for several polls."""
    from sglang.srt.managers.io_struct import BlockReqInput, BlockReqType, FlushCacheReqInput

    messages = [BlockReqInput(req_type=BlockReqType.BLOCK), FlushCacheReqInput(timeout_s=1.5),
                BlockReqInput(req_type=BlockReqType.UNBLOCK)]  # fmt: skip
    results = {}
    for loop in ("upstream", "patched"):
        h = harness(loop)
        _wait_for(lambda: h.controller.soft_watchdog.feeds >= 3)  # idle, waiting (patched: polls timed out)
        for m in messages:
            h.send(m)
        results[loop] = h.received(len(messages))
        h.stop()
    assert results["upstream"] == {0: [messages[0], messages[2]], 1: [messages[1]]}
    assert results["patched"] == results["upstream"]
