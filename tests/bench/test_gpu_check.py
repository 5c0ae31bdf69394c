"""bench/gpu_check.py (the one-run GPU check of our CUDA attention paths) and bench/gpu_carry.sh (the sglang kernel
files it carries to a GPU host without sglang) do not rot: on the CPU the check runs under the Triton interpreter in
float32 at unit sizes, and the carried tree imports the Triton kernel with the real sglang out of the way."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def keys(out: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+): (-?[\d.e+-]+|nan|inf)$", out, re.M)}


def test_cpu_smoke_run_prints_passing_keys(tmp_path):
    """--device cpu --quick: the Triton backend on every layout and both geometries against SDPA (float32, the
    interpreter), the timing part at unit shapes, the CUDA-only parts skipped; keys last, a JSON written."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--quick", "--parts",
                           "triton,timing,graph", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = keys(proc.stdout)
    assert got["triton_passed"] == 1 and got["timing_passed"] == 1 and got["all_passed"] == 1, proc.stdout
    assert got["graph_passed"] == -1  # skipped: needs CUDA
    assert got["triton_cases_failed"] == 0 and got["triton_float32_max_kv_abs"] == 0
    assert got["triton_float32_max_out_abs"] <= 1e-4
    assert len(re.findall(r"^  triton .* float32  pass ", proc.stdout, re.M)) == 6  # 3 layouts x 2 geometries
    last = proc.stdout.strip().splitlines()[-len(got) :]
    assert all(re.fullmatch(r"\w+: \S+", line) for line in last), last  # the keys come last
    assert (tmp_path / "gpu_check.json").is_file()


def test_gpu_carry_tree_imports_the_kernel_without_the_real_sglang(tmp_path):
    """gpu_carry.sh copies the kernel files and stubs what they import; with the tree first on the path every sglang
    module comes from it (none from the venv's sglang), and the Triton backend matches SDPA through it."""
    carry = tmp_path / "carry"
    proc = subprocess.run(["bash", str(BENCH / "gpu_carry.sh"), str(carry)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "copied sglang.kernels.ops.attention.extend_attention" in proc.stdout
    assert (carry / "sglang/kernels/ops/attention/decode_attention.py").is_file()
    size = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    assert size < 2 << 20, size
    check = """
import sys
from tests.attention import triton_checks
out_err, kv_err = triton_checks.kernel_errors("canvases", "unit")
assert out_err <= 1e-5 and kv_err == 0, (out_err, kv_err)
files = {n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n == "sglang" or n.startswith("sglang.")}
assert "sglang.kernels.ops.attention.extend_attention" in files, sorted(files)
stray = {n: f for n, f in files.items() if not (f or "").startswith(sys.argv[1])}
assert not stray, stray
import sglang
print("carried", sglang.CARRIED_FROM, len(files))
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{carry}{os.pathsep}{ROOT}")
    proc = subprocess.run([sys.executable, "-c", check, str(carry)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("carried ")
