"""The shared helpers of ``mamba_eval.kernels.utils``: the Triton activations and matrix products.

Without CUDA they run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from helpers import assert_close  # noqa: E402

from mamba_eval.kernels import utils  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _softplus_kernel(x_ptr, y_ptr, n, LOG1P: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if LOG1P:
        y = utils.softplus_log1p(x)
    else:
        y = utils.softplus(x)
    tl.store(y_ptr + offs, y, mask=mask)


@pytest.mark.parametrize("log1p", [False, True], ids=["softplus", "softplus_log1p"])
def test_softplus_is_accurate_everywhere(log1p):
    """Δ = softplus(...) in the kernels: relative error < 1e-5 from -60 to 60, also where the naive
    log(1 + exp(x)) loses every digit (x << 0; the error there is that of exp(x) from an fp32
    argument), and exactly x above torch's threshold 20."""
    x = torch.cat([torch.linspace(-60, 60, 12001), torch.tensor([-20.5, -1e-3, 19.99, 20.0, 20.01, 0.0])])
    x = x.to(DEVICE)
    y = torch.empty_like(x)
    _softplus_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), LOG1P=log1p, BLOCK=1024)
    expected = torch.nn.functional.softplus(x.double())
    rel = ((y.double() - expected).abs() / expected).max().item()
    assert rel < 1e-5, rel
    assert torch.equal(y[x > 20], x[x > 20])


@triton.jit
def _silu_kernel(x_ptr, y_ptr, n, APPROX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if APPROX:
        y = utils.silu_approx(x)
    else:
        y = utils.silu(x)
    tl.store(y_ptr + offs, y, mask=mask)


@pytest.mark.parametrize("approx", [False, True], ids=["silu", "silu_approx"])
def test_silu_matches_torch(approx):
    x = torch.cat([torch.linspace(-80, 80, 16001), torch.tensor([0.0, -1e-6, 1e-6])]).to(DEVICE)
    y = torch.empty_like(x)
    _silu_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), APPROX=approx, BLOCK=1024)
    assert_close(y, torch.nn.functional.silu(x.double()).float(), 1e-6, "silu")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])  # [M, K]
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])  # [K, N]
    if ACC:
        out = utils.dot_acc(tl.full((M, N), 1.0, tl.float32), a, b, "ieee")
    else:
        out = utils.dot(a, b, "ieee")
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], out)


@pytest.mark.parametrize("acc", [False, True], ids=["dot", "dot_acc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dot_is_the_product_accumulated_in_fp32(dtype, acc):
    """16-bit operands multiply exactly (also under the interpreter, whose numpy would multiply
    their raw integers), the sum is fp32, and a row's result does not depend on the other rows."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 64, generator=g).to(dtype)
    b = torch.randn(64, 16, generator=g).to(dtype)
    expected = a.double() @ b.double() + (1.0 if acc else 0.0)
    out = torch.empty(32, 16, device=DEVICE)
    _dot_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), out, 32, 16, 64, acc)
    assert_close(out.cpu().double(), expected, 1e-5, "a @ b")
    # Row 0 alone (the others zero) gives the same bits as among the others.
    alone = torch.empty_like(out)
    _dot_kernel[(1,)](torch.cat([a[:1], torch.zeros_like(a[1:])]).to(DEVICE), b.to(DEVICE), alone, 32, 16, 64, acc)
    assert torch.equal(alone[0], out[0])


def test_new_output_and_sm_count():
    t = utils.new_output((2, 3), torch.bfloat16, torch.device(DEVICE))
    assert t.shape == (2, 3) and t.dtype == torch.bfloat16 and t.device.type == DEVICE
    assert utils.sm_count(torch.device("cpu")) == 4  # the interpreter's nominal machine
    if torch.cuda.is_available():
        assert utils.sm_count(torch.device("cuda")) == torch.cuda.get_device_properties(0).multi_processor_count
