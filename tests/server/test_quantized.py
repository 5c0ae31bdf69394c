"""`--quantization fp8` on a CPU without AMX: the server refuses at startup, naming what it needs.

Without the refusal the weights load and quantize, and the first request fails inside a Triton kernel
("0 active drivers"): sglang's fp8 GEMMs run on CUDA or on its AMX CPU engine only.
"""

import subprocess
import sys

import pytest

from tests.server.conftest import Server, _free_port

pytestmark = pytest.mark.slow


def test_fp8_refused_without_amx(tiny_checkpoint_dir):
    from sglang.srt.utils import cpu_has_amx_support

    if cpu_has_amx_support():
        pytest.skip("this CPU has AMX: sglang's CPU engine (SGLANG_USE_CPU_ENGINE=1) may run fp8")
    flags = [f for f in Server.FLAGS if f not in ("--enable-metrics", "--enable-cache-report")]
    flags[flags.index("float32")] = "bfloat16"  # sglang's fp8 takes bf16/fp16 activations only
    args = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tiny_checkpoint_dir), "--host",
            "127.0.0.1", "--port", str(_free_port()), *flags, "--quantization", "fp8"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=240, start_new_session=True)
    assert done.returncode != 0
    log = done.stdout + done.stderr
    assert "fp8 weights (--quantization, or the checkpoint's quantization_config) on the CPU need" in log
