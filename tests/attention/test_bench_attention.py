"""bench/bench_attention.py at unit sizes on the CPU: it runs, compares with the reference, and says why it stops."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_attention.py"


def bench(*argv):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300, env=env)


def test_tiny_run_prints_a_line_per_config_and_a_summary():
    proc = bench("--tiny", "--warmup", "0", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3  # B = 1 and 2 (the tiny caps of 1/8/32), one prefix, the reference only; then the summary
    assert all("torch_native" in line and "vs sdpa 0.00e+00" in line for line in lines[:2])
    assert lines[-1].startswith("bench_attention (cpu") and "fastest" in lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the bench runs for real")
def test_refuses_real_shapes_without_a_gpu():
    proc = bench()
    assert proc.returncode != 0 and "run it on a CUDA host" in proc.stderr
