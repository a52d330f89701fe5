"""The Triton SSD kernels (``ssd_scan``, ``ssd_state_update``) against their plain-PyTorch references.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1) at tiny sizes; on a GPU,
``MAMBA_EVAL_TEST_SIZES=real`` runs the same tests at the sizes of the published checkpoints.
Outputs are poisoned with NaN before each kernel runs, so an element the kernel forgets shows up.

Tolerances (relative max error, ``helpers.assert_close``), against the reference run in fp32 on the
same inputs: fp32 1e-4. bf16 2e-2: besides the bf16 inputs and the bf16 output (2^-9 relative),
the tensor-core products take bf16 operands, so the Δ-weighted B, the decay-masked C B^T weights
and the carried chunk states are rounded to bf16 (unit roundoff 2^-8), as in mamba_ssm; the
measured errors are 0.5-0.8e-2 on these random inputs.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before the kernels are decorated

triton = pytest.importorskip("triton")
from helpers import assert_close  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import mamba_eval.kernels.ssd as ssd  # noqa: E402

if not ON_GPU and not isinstance(ssd._ssd_state_update_kernel, InterpretedFunction):
    ssd = importlib.reload(ssd)  # imported earlier in this process, before the interpreter was switched on

REAL = os.environ.get("MAMBA_EVAL_TEST_SIZES") == "real"
if REAL and not ON_GPU:
    pytest.skip("MAMBA_EVAL_TEST_SIZES=real needs a CUDA GPU", allow_module_level=True)
DEVICE = "cuda" if ON_GPU else "cpu"
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}

# (batch, length, heads, headdim, groups, d_state, chunk)
if REAL:
    SCAN_CASES = [
        (2, 2048, 24, 64, 1, 128, 256),  # mamba2-130m
        (1, 4100, 80, 64, 1, 128, 256),  # mamba2-2.7b, L not a multiple of the chunk
        (3, 777, 16, 64, 8, 128, 256),  # 8 groups (Codestral-like)
        (4, 300, 10, 48, 2, 96, 128),  # P and N not powers of two
    ]
    CONFIG_CASE = (2, 1100, 8, 64, 2, 128, 256)
    STEP_CASES = [(64, 80, 64, 1, 128), (1, 24, 64, 1, 128), (5, 16, 64, 8, 128)]  # (batch, heads, P, G, N)
else:
    SCAN_CASES = [
        (2, 37, 4, 16, 2, 16, 16),  # L not a multiple of the chunk, 2 groups
        (1, 70, 3, 24, 1, 20, 32),  # B = 1, P and N not powers of two
        (2, 64, 2, 16, 1, 64, 16),  # L a multiple of the chunk; N split over two programs
        (1, 5, 2, 8, 1, 8, 64),  # L shorter than one chunk; P, N below the 16-wide tiles
        (1, 40, 6, 16, 3, 16, 12),  # chunk size not a power of two
        (1, 300, 2, 16, 1, 16, 256),  # several sequential steps and several row blocks per chunk
    ]
    CONFIG_CASE = (2, 150, 4, 32, 2, 16, 32)  # 5 chunks, the last one partial
    STEP_CASES = [(3, 4, 16, 2, 16), (2, 3, 24, 1, 20)]


def _scan_inputs(b, length, h, p, g, n, dtype, seed=0):
    """Random inputs with decays that carry state across several chunks (and some that do not)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    inp = dict(
        x=randn(b, length, h, p).to(dtype),
        dt=randn(b, length, h, scale=0.5).to(dtype),  # raw Δ, before bias and softplus
        A=-torch.exp(torch.empty(h).uniform_(math.log(0.05), math.log(2.0), generator=gen)),
        B=randn(b, length, g, n).to(dtype),
        C=randn(b, length, g, n).to(dtype),
        D=randn(h),
        dt_bias=randn(h, scale=0.5) - 1.5,
    )
    inp = {k: v.to(DEVICE) for k, v in inp.items()}
    h0 = randn(b, h, p, n).to(DEVICE)
    return inp, h0


def _fp32(inp):
    return {k: v.float() if torch.is_tensor(v) else v for k, v in inp.items()}


def _poisoned(like, dtype=None):
    return torch.full(like.shape, float("nan"), dtype=dtype or like.dtype, device=like.device)


@pytest.mark.parametrize("with_initial", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", SCAN_CASES)
def test_ssd_scan_matches_ref(case, dtype, with_initial):
    b, length, h, p, g, n, chunk = case
    inp, h0 = _scan_inputs(b, length, h, p, g, n, dtype)
    h0 = h0 if with_initial else None
    y_ref, final_ref = ssd.ssd_scan_ref(**_fp32(inp), chunk_size=chunk, initial_state=h0)
    out, final_out = _poisoned(inp["x"]), _poisoned(final_ref)
    y, final = ssd.ssd_scan(**inp, chunk_size=chunk, initial_state=h0, out=out, final_state_out=final_out)
    assert y.data_ptr() == out.data_ptr() and final.data_ptr() == final_out.data_ptr()
    assert y.dtype == dtype and final.dtype == torch.float32
    assert_close(y, y_ref, RTOL[dtype], "y")
    assert_close(final, final_ref, RTOL[dtype], "final state")


@pytest.mark.parametrize(
    "overrides",
    [dict(seg=1), dict(seg=3), dict(seg=10**6, block_p=16), dict(seg=2, block_t=2 * CONFIG_CASE[-1]),
     dict(seg=2, s_block_p=16, s_block_n=16, s_block_t=CONFIG_CASE[-1] // 2)],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_ssd_scan_launch_configs(overrides, monkeypatch):
    """Every split of the work gives the reference result: a state pass storing every ``seg`` chunks
    or none (one walk per row and head), the head dimension split over programs, output steps
    longer than a chunk, smaller state-pass tiles and two steps per chunk."""
    b, length, h, p, g, n, chunk = CONFIG_CASE
    inp, h0 = _scan_inputs(b, length, h, p, g, n, torch.float32, seed=6)
    default = ssd._scan_config
    monkeypatch.setattr(ssd, "_scan_config", lambda *args: {**default(*args), **overrides})
    y_ref, final_ref = ssd.ssd_scan_ref(**inp, chunk_size=chunk, initial_state=h0)
    y, final = ssd.ssd_scan(**inp, chunk_size=chunk, initial_state=h0, out=_poisoned(inp["x"]),
                            final_state_out=_poisoned(final_ref))
    assert_close(y, y_ref, RTOL[torch.float32], "y")
    assert_close(final, final_ref, RTOL[torch.float32], "final state")


def test_ssd_scan_optional_inputs_and_extreme_dt():
    """No D / no Δ bias / no softplus; Δ + bias above softplus's threshold (20) and far below 0."""
    b, length, h, p, g, n, chunk = SCAN_CASES[0]
    inp, _ = _scan_inputs(b, length, h, p, g, n, torch.float32, seed=1)
    # Without softplus, Δ must stay >= 0 (no bias), or the recurrence grows without bound and the
    # reference itself overflows to inf at real sizes.
    no_softplus = dict(dt_softplus=False, dt_bias=None, dt=inp["dt"].abs() * 0.2)
    for kwargs in (dict(D=None), dict(dt_bias=None), no_softplus):
        args = {**inp, **kwargs}
        y_ref, final_ref = ssd.ssd_scan_ref(**args, chunk_size=chunk)
        y, final = ssd.ssd_scan(**args, chunk_size=chunk, out=_poisoned(inp["x"]))
        assert_close(y, y_ref, RTOL[torch.float32], f"y {list(kwargs)}")
        assert_close(final, final_ref, RTOL[torch.float32], f"final state {list(kwargs)}")
    dt = inp["dt"].clone()
    dt[:, ::3] = 30.0  # softplus is the identity there: a large Δ that wipes out the state
    dt[:, 1::3] = -30.0  # softplus ~ 1e-13: a step that keeps the state
    args = {**inp, "dt": dt, "A": inp["A"] * 0.01}
    y_ref, final_ref = ssd.ssd_scan_ref(**args, chunk_size=chunk)
    y, final = ssd.ssd_scan(**args, chunk_size=chunk)
    assert_close(y, y_ref, RTOL[torch.float32], "y (extreme dt)")
    assert_close(final, final_ref, RTOL[torch.float32], "final state (extreme dt)")


def test_ssd_scan_reads_strided_inputs():
    """The model's layout: x, B, C are views into the conv output [B, conv_dim, L] (time contiguous)
    and dt a column slice of the projection; the result must not depend on the strides."""
    b, length, h, p, g, n, chunk = SCAN_CASES[0]
    inp, h0 = _scan_inputs(b, length, h, p, g, n, torch.float32, seed=2)
    xbc = torch.cat([inp["x"].flatten(2), inp["B"].flatten(2), inp["C"].flatten(2)], dim=-1)
    xbc = xbc.transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, conv_dim], stride 1 along L
    x, B, C = xbc.split([h * p, g * n, g * n], dim=-1)
    proj = torch.cat([torch.zeros_like(inp["dt"]), inp["dt"]], dim=-1)
    strided = dict(
        inp, x=x.unflatten(-1, (h, p)), B=B.unflatten(-1, (g, n)), C=C.unflatten(-1, (g, n)), dt=proj[..., h:],
    )
    h0_strided = h0.transpose(-1, -2).contiguous().transpose(-1, -2)
    y_ref, final_ref = ssd.ssd_scan(**inp, chunk_size=chunk, initial_state=h0)
    y, final = ssd.ssd_scan(**strided, chunk_size=chunk, initial_state=h0_strided)
    assert_close(y, y_ref, 1e-6, "y")
    assert_close(final, final_ref, 1e-6, "final state")


def _step_inputs(b, h, p, g, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    args = dict(
        x=torch.randn(b, h, p, generator=gen).to(dtype),
        dt=(torch.randn(b, h, generator=gen) * 0.5).to(dtype),
        A=-torch.exp(torch.empty(h).uniform_(math.log(0.05), math.log(2.0), generator=gen)),
        B=torch.randn(b, g, n, generator=gen).to(dtype),
        C=torch.randn(b, g, n, generator=gen).to(dtype),
        D=torch.randn(h, generator=gen),
        dt_bias=torch.randn(h, generator=gen) * 0.5 - 1.5,
    )
    return {k: v.to(DEVICE) for k, v in args.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", STEP_CASES)
def test_ssd_state_update_matches_ref(case, dtype):
    """One decode step, in place, on every other row of a larger cache (a strided state)."""
    b, h, p, g, n = case
    args = _step_inputs(b, h, p, g, n, dtype)
    cache = torch.randn(2 * b, h, p, n, device=DEVICE)
    untouched = cache[1::2].clone()
    state_ref = cache[::2].clone()
    y_ref = ssd.ssd_state_update_ref(state_ref, **_fp32(args))
    out = _poisoned(args["x"])
    y = ssd.ssd_state_update(cache[::2], **args, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    assert_close(y, y_ref, RTOL[dtype], "y")
    assert_close(cache[::2], state_ref, 1e-5, "state")
    assert torch.equal(cache[1::2], untouched)
    for kwargs in (dict(D=None), dict(dt_bias=None), dict(dt_softplus=False, dt=args["dt"].abs())):
        state, state_ref = cache[::2].clone(), cache[::2].clone()
        y_ref = ssd.ssd_state_update_ref(state_ref, **_fp32({**args, **kwargs}))
        y = ssd.ssd_state_update(state, **{**args, **kwargs})
        assert_close(y, y_ref, RTOL[dtype], f"y {list(kwargs)}")
        assert_close(state, state_ref, 1e-5, f"state {list(kwargs)}")


def test_decode_continues_the_scan():
    """Scan a prefix, then decode step by step from its final state: the same outputs and state as
    one scan over the whole sequence."""
    b, length, h, p, g, n, chunk = SCAN_CASES[0]
    inp, h0 = _scan_inputs(b, length, h, p, g, n, torch.float32, seed=5)
    y_full, final_full = ssd.ssd_scan(**inp, chunk_size=chunk, initial_state=h0)
    prefix = length - 6
    y_prefix, state = ssd.ssd_scan(
        **{k: v[:, :prefix] if k in ("x", "dt", "B", "C") else v for k, v in inp.items()},
        chunk_size=chunk, initial_state=h0,
    )
    steps = [
        ssd.ssd_state_update(
            state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t], inp["D"],
            dt_bias=inp["dt_bias"],
        )
        for t in range(prefix, length)
    ]
    y = torch.cat([y_prefix, torch.stack(steps, dim=1)], dim=1)
    assert_close(y, y_full, RTOL[torch.float32], "y")
    assert_close(state, final_full, RTOL[torch.float32], "state")


def test_ssd_kernels_reject_bad_shapes():
    inp, h0 = _scan_inputs(1, 8, 4, 4, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="multiple of the number of groups"):
        ssd.ssd_scan(**{**inp, "B": inp["B"][:, :, :1].expand(1, 8, 3, 4), "C": inp["C"][:, :, :1].expand(1, 8, 3, 4)},
                     chunk_size=4)
    with pytest.raises(ValueError, match="dt must be"):
        ssd.ssd_scan(**{**inp, "dt": inp["dt"][:, :7]}, chunk_size=4)
    with pytest.raises(ValueError, match="initial_state must be"):
        ssd.ssd_scan(**inp, chunk_size=4, initial_state=h0[..., :3])
    with pytest.raises(ValueError, match="out must be"):
        ssd.ssd_scan(**inp, chunk_size=4, out=torch.empty(1, 8, 4, 5, device=DEVICE))
    with pytest.raises(ValueError, match="must not be initial_state"):
        ssd.ssd_scan(**inp, chunk_size=4, initial_state=h0, final_state_out=h0)
    args = _step_inputs(2, 4, 4, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="state must be"):
        ssd.ssd_state_update(torch.zeros(2, 4, 4, 5, device=DEVICE), **args)
