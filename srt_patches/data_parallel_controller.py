"""Let sglang's data-parallel controller wait in zmq's poll while idle instead of spinning a core.

Target: sglang.srt.managers.data_parallel_controller.DataParallelController.event_loop
Checked against: sglang 0.5.23
Why: with ``--dp-size`` above 1 the controller's loop receives from the tokenizer manager with
     ``sock_recv(..., flags=zmq.NOBLOCK)`` and goes straight back to it when nothing came: a whole core
     stays busy while the server is idle (on a 2-core CPU host, half of what the replicas could use).
     We run sglang's loop unchanged over its socket wrapped so that a non-blocking receive first waits
     in ``zmq.Poller.poll`` for a message; a message wakes the poll at once, so dispatch is unchanged.
     ``sock_recv`` itself cannot be wrapped: HookRegistry re-points every module's binding of it, the
     scheduler's request receiver included, which must not block between batches.
Remove when: sglang's controller blocks (or polls) while idle.
"""

from __future__ import annotations

import zmq
from sglang.srt.plugins.hook_registry import HookType, plugin_hook

TARGETS = ("sglang.srt.managers.data_parallel_controller.DataParallelController.event_loop",)
# Bounded, so that sglang's loop still turns while idle: each turn feeds the controller's soft watchdog
# (its timeout is seconds: 300 in sglang's CI), which would otherwise report the idle controller as stuck.
# Ten wake-ups a second cost nothing measurable; a message never waits for the timeout.
POLL_TIMEOUT_MS = 100


class PollingSocket:
    """A zmq socket whose non-blocking receives wait up to ``POLL_TIMEOUT_MS`` for a message first.

    Then they receive as asked: a message, or ``zmq.Again`` (sglang's "nothing to receive") on timeout.
    ``recv``/``recv_pyobj`` are what sglang's ``sock_recv`` calls (msgpack / pickle IPC); the rest is the socket's.
    """

    def __init__(self, socket: zmq.Socket):
        self.socket = socket
        self.poller = zmq.Poller()
        self.poller.register(socket, zmq.POLLIN)

    def _wait(self, flags: int) -> None:
        if flags & zmq.NOBLOCK:
            self.poller.poll(POLL_TIMEOUT_MS)

    def recv(self, flags: int = 0, *args, **kwargs):
        self._wait(flags)
        return self.socket.recv(flags, *args, **kwargs)

    def recv_pyobj(self, flags: int = 0):
        self._wait(flags)
        return self.socket.recv_pyobj(flags)

    def __getattr__(self, name):
        return getattr(self.socket, name)


def _serves_diffusion(controller) -> bool:
    # The controller has no ModelConfig of its own; model_config_of reuses the one the launcher memoized on
    # the server args it pickled to this process (scheduler_hook.check_attention_backend reads it the same way).
    from sglang.srt.arg_groups.overrides import model_config_of

    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    return serves_diffusion_model(model_config_of(controller.server_args).hf_config)


def event_loop(original, controller, *args, **kwargs):
    """sglang's loop; for DiffusionGemma, over its tokenizer socket wrapped in a ``PollingSocket``."""
    if not _serves_diffusion(controller):
        return original(controller, *args, **kwargs)
    socket = controller.recv_from_tokenizer
    controller.recv_from_tokenizer = PollingSocket(socket)
    try:
        return original(controller, *args, **kwargs)
    finally:
        controller.recv_from_tokenizer = socket


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(event_loop)
