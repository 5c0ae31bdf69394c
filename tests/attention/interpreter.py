"""Running checks in a child process under the Triton interpreter (``TRITON_INTERPRET=1``).

Triton decides between compiling and interpreting a kernel when the kernel is defined, i.e. when its module
is imported, and the pytest process may have imported sglang's kernels already (compiled: unusable without a
GPU). So each test module that needs the interpreter gets one fresh spawned child with the variable set,
imports the kernels there, and sends it module-level functions to run; nothing in the parent changes.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

ENV = "TRITON_INTERPRET"


class InterpretedWorker:
    def __init__(self):
        saved = os.environ.get(ENV)
        os.environ[ENV] = "1"
        try:
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            self.pool.submit(check_interpreted).result()  # spawns the child now, while the variable is set
        finally:
            if saved is None:
                del os.environ[ENV]
            else:
                os.environ[ENV] = saved

    def __call__(self, fn, *args):
        """``fn(*args)`` in the child (``fn`` must be importable by name); its exceptions re-raise here."""
        return self.pool.submit(fn, *args).result()

    def close(self) -> None:
        self.pool.shutdown()


def check_interpreted() -> None:
    """In the child: Triton interprets, and sglang's extend kernel is an interpreted function."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    from sglang.kernels.ops.attention import extend_attention

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET is not set in the child"
    assert isinstance(extend_attention._fwd_kernel, InterpretedFunction), type(extend_attention._fwd_kernel)
