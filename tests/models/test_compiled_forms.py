"""The forms a compiled canvas step computes the GELU and the RMS norm's scale in (models/layers.py): eagerly
transformers' own ops, bit for bit; compiled, a sigmoid and an rsqrt, whose generated CPU code has no tanh and no
scalar pow (the two cost a compiled 8-canvas forward a sixth of its time, bench/RESULTS.md), and whose values stay
within float32 rounding of the exact function."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from sgl_diffusion.models.layers import gelu_tanh, inverse_rms


def compiled(fn, *args):
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(fn, fullgraph=True), *args)
    return out, "\n".join(code)


def test_gelu_tanh_eager_is_transformers_op_and_compiled_is_a_sigmoid():
    x = torch.linspace(-12, 12, 4001)
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    got, code = compiled(gelu_tanh, x)
    assert "tanh(" not in code  # at::vec tanh() or std::tanh
    x64 = x.double()
    exact = 0.5 * x64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    assert (got.double() - exact).abs().max() <= 4 * torch.finfo(torch.float32).eps * exact.abs().clamp(min=1).max()


@pytest.mark.parametrize("shape", [(64, 128), (64, 6, 32)])  # hidden rows, and per-head rows (q/k/v norms)
def test_inverse_rms_eager_is_transformers_ops_and_compiled_has_no_scalar_pow(shape):
    h = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    eps = 1e-6
    assert torch.equal(inverse_rms(h, eps), h.pow(2).mean(-1, keepdim=True).add_(eps).pow_(-0.5))
    got, code = compiled(inverse_rms, h, eps)
    assert "std::pow" not in code and "rsqrt" in code
    exact = 1 / (h.double().pow(2).mean(-1, keepdim=True) + eps).sqrt()
    assert ((got.double() - exact) / exact).abs().max() <= 4 * torch.finfo(torch.float32).eps
