"""bench/bench_constrained.py runs at tiny sizes and prints its keys (figures are timings: not checked, except what
is structural: without repairs a constraint adds no denoise step)."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_constrained_prints_its_keys():
    """Two requests, two steps, one repeat: the three modes and every key; the constrained mode takes exactly the
    free mode's steps per canvas, the repaired one more."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_constrained.py"), "--requests", "2", "--max-steps", "2",
                           "--max-new", "40", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300, cwd=BENCH.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = {m[1]: float(m[2]) for m in re.finditer(r"^(\w+): (-?[\d.e+-]+|nan|inf)$", proc.stdout, re.M)}
    assert set(got) == {"constrained_extra_steps_per_canvas", "repaired_extra_steps_per_canvas",
                        "constrained_wall_ratio_per_canvas", "repaired_wall_ratio_per_canvas",
                        "commit_pass_ms_per_canvas"}, proc.stdout  # fmt: skip
    assert got["constrained_extra_steps_per_canvas"] == 0 and got["repaired_extra_steps_per_canvas"] > 0
    assert all(f"{mode} " in proc.stdout for mode in ("free", "constrained", "repaired"))
