"""bench/common.py's helpers that compute figures."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import common  # noqa: E402


def test_kernel_ms_is_torchs_self_time_of_the_kernels():
    """kernel_ms reads the raw events instead of torch's event tree: the same self time, on a trace with nested
    kernels (addmm and SDPA have children), kernels under record_function ranges, and other ops between them."""
    x, w, b = torch.randn(16, 32), torch.randn(32, 32), torch.randn(32)
    q = torch.randn(1, 2, 8, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(20):
            with torch.profiler.record_function(f"round {i}"):
                y = torch.addmm(b, x, w).relu() @ w
                torch.bmm(y[None], w[None])
                F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool))
                F.linear(x, w, b).sum()
    expected = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in common.KERNELS) / 1e3
    seen = {e.key for e in prof.key_averages()} & set(common.KERNELS)
    assert {"aten::addmm", "aten::mm", "aten::bmm"} <= seen, seen
    assert expected > 0 and abs(common.kernel_ms(prof) - expected) <= 1e-6 * expected + 1e-6
