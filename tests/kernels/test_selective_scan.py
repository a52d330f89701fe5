"""The Triton selective scan and its one-step update against the plain-PyTorch references.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1) at tiny
sizes; with ``MAMBA_EVAL_TEST_SIZES=real`` on a GPU the same tests run at the published shapes.
Every output the wrappers allocate is filled with NaN first, so an element a kernel forgets to
write fails the comparison.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import assert_close  # noqa: E402

import mamba_eval.kernels.selective_scan as ss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REAL = os.environ.get("MAMBA_EVAL_TEST_SIZES") == "real"
# fp32: the kernel's exp2/softplus approximations and summation order against torch's, over a
# recurrence whose errors do not grow (|exp(Δ A)| <= 1). bf16: the rounding of y to bf16.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    """Every output of the wrappers starts as NaN: unwritten elements cannot pass."""

    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ss, "new_output", nan_output)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _scan_inputs(batch, dim, d_state, length, dtype, layout, seed=0):
    """Inputs of a scan, rounded to ``dtype``, with the strides of ``layout``:

    - "contiguous": u, delta, z [B, D, L] and B, C [B, N, L] contiguous;
    - "model": as Mamba's forward makes them: u, delta channel-contiguous ([B, L, D] seen as
      [B, D, L]), z half of a [B, L, 2D] projection, B and C slices of the [B, L, R + 2N] x_proj output;
    - "mixed": u contiguous [B, D, L], the rest as in "model".
    """
    g = _gen(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    if layout == "contiguous":
        u, delta, z = rnd(batch, dim, length), rnd(batch, dim, length, scale=0.5), rnd(batch, dim, length)
        B, C = rnd(batch, d_state, length), rnd(batch, d_state, length)
    else:
        u = rnd(batch, length, dim).transpose(1, 2)
        if layout == "mixed":
            u = u.contiguous()
        delta = rnd(batch, length, dim, scale=0.5).transpose(1, 2)
        z = rnd(batch, length, 2 * dim)[..., dim:].transpose(1, 2)
        x_dbl = rnd(batch, length, 3 + 2 * d_state)
        B, C = x_dbl[..., 3:3 + d_state].transpose(1, 2), x_dbl[..., 3 + d_state:].transpose(1, 2)
    return dict(
        u=u, delta=delta, A=-torch.exp(torch.randn(dim, d_state, generator=g) * 0.5).to(DEVICE), B=B, C=C,
        D=torch.randn(dim, generator=g).to(DEVICE), z=z,
        delta_bias=(torch.randn(dim, generator=g) * 0.5).to(DEVICE),
    )


def _as_fp32(inputs):
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def _check_scan(inputs, dtype, **kwargs):
    y, state = ss.selective_scan(**inputs, **kwargs)
    y_ref, state_ref = ss.selective_scan_ref(**_as_fp32(inputs), **kwargs)
    assert y.dtype == inputs["u"].dtype and state.dtype == torch.float32
    assert_close(y.float(), y_ref, RTOL[dtype], "y")
    assert_close(state, state_ref, RTOL[torch.float32], "final state")
    return y, state


# (B, D, N, L, layout, optional inputs, softplus, initial state)
SCAN_CASES = [
    (2, 5, 4, 11, "contiguous", True, True, True),  # D and L not multiples of the blocks
    (1, 40, 16, 9, "model", True, True, True),  # B = 1, two channel blocks, the last partial
    (2, 33, 16, 8, "mixed", True, True, False),  # L a multiple of the tile; y [B, D, L]
    (1, 3, 5, 1, "contiguous", True, True, True),  # one position
    (3, 7, 12, 6, "model", False, False, False),  # no D, z, Δ bias; no softplus; N not a power of 2
]
if REAL:
    SCAN_CASES = [
        (4, 1536, 16, 2048, "model", True, True, True),  # mamba-130m
        (16, 5120, 16, 128, "model", True, True, False),  # mamba-2.8b, short rows
        (1, 5120, 16, 2049, "model", True, True, True),  # few rows: split along L
        (2, 1536, 16, 1000, "contiguous", True, True, True),
        (3, 1000, 12, 300, "mixed", False, False, False),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: "B{}-D{}-N{}-L{}-{}".format(*c[:5]))
def test_scan_matches_reference(case, dtype):
    batch, dim, d_state, length, layout, optional, softplus, with_h0 = case
    inputs = _scan_inputs(batch, dim, d_state, length, dtype, layout)
    if not softplus:  # keep Δ positive without softplus
        inputs["delta"] = inputs["delta"].abs()
    if not optional:
        inputs.update(D=None, z=None, delta_bias=None)
    h0 = torch.randn(batch, dim, d_state, generator=_gen(1)).to(DEVICE) if with_h0 else None
    y, _ = _check_scan(inputs, dtype, delta_softplus=softplus, initial_state=h0)
    if layout == "model":  # y follows u: channel-contiguous, ready for out_proj
        assert y.stride(1) == 1 or length == 1


@pytest.mark.parametrize("n_chunks", [2, 3, 20])
def test_scan_split_along_length(n_chunks):
    """Rows split into chunks (used when rows are too few to fill the GPU) give the same result."""
    batch, dim, d_state, length = (1, 1536, 16, 3000) if REAL else (2, 6, 8, 37)
    inputs = _scan_inputs(batch, dim, d_state, length, torch.float32, "model", seed=2)
    for h0 in (None, torch.randn(batch, dim, d_state, generator=_gen(3)).to(DEVICE)):
        y, state = ss._selective_scan_fwd(**inputs, delta_softplus=True, initial_state=h0, n_chunks=n_chunks)
        y_ref, state_ref = ss.selective_scan_ref(**inputs, initial_state=h0)
        assert_close(y, y_ref, RTOL[torch.float32], "y")
        assert_close(state, state_ref, RTOL[torch.float32], "final state")


def test_scan_splits_few_long_rows(monkeypatch):
    """The wrapper splits rows along L when they cannot fill the GPU, and not otherwise."""
    calls = []
    original = ss._selective_scan_fwd
    def recording(*args, n_chunks):
        calls.append(n_chunks)
        return original(*args, n_chunks=n_chunks)

    monkeypatch.setattr(ss, "_selective_scan_fwd", recording)
    monkeypatch.setattr(ss, "_MIN_CHUNK", 8)
    monkeypatch.setattr(ss, "sm_count", lambda device: 1)  # split below _SPLIT_BELOW programs
    inputs = _scan_inputs(1, 6, 8, 40, torch.float32, "model", seed=4)
    _check_scan(inputs, torch.float32)  # 1 program: split
    inputs = _scan_inputs(ss._SPLIT_BELOW, 6, 4, 40, torch.float32, "model", seed=4)  # one per row: not split
    _check_scan(inputs, torch.float32)
    assert calls[0] > 1 and calls[1] == 1


def test_scan_rejects_bad_inputs():
    inputs = _scan_inputs(2, 5, 4, 7, torch.float32, "contiguous")
    cases = [
        (dict(B=inputs["B"][:, :3]), "B must be"),
        (dict(delta=inputs["delta"][..., :6]), "delta must be"),
        (dict(D=inputs["D"][:4]), "D must be"),
        (dict(initial_state=torch.zeros(2, 5, 3, device=DEVICE)), "initial_state must be"),
        (dict(u=inputs["u"].int()), "u must be a floating-point"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            ss.selective_scan(**{**inputs, **change})
    for change, message in cases[0], cases[3]:  # the reference checks these too
        with pytest.raises(ValueError, match=message):
            ss.selective_scan_ref(**{**inputs, **change})


# ---------------------------------------------------------------------------------------------
# One-step update
# ---------------------------------------------------------------------------------------------


def _step_inputs(batch, dim, d_state, dtype, seed=0):
    """As the model's decode step: x and z halves of a [B, 2D] projection, B and C slices."""
    g = _gen(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    xz = rnd(batch, 2 * dim)
    x_dbl = rnd(batch, 3 + 2 * d_state)
    return dict(
        x=xz[:, :dim], dt=rnd(batch, dim, scale=0.5),
        A=-torch.exp(torch.randn(dim, d_state, generator=g) * 0.5).to(DEVICE),
        B=x_dbl[:, 3:3 + d_state], C=x_dbl[:, 3 + d_state:], D=torch.randn(dim, generator=g).to(DEVICE), z=xz[:, dim:],
        dt_bias=(torch.randn(dim, generator=g) * 0.5).to(DEVICE),
    )


STEP_CASES = [(3, 6, 5), (1, 40, 16), (2, 33, 16)] if not REAL else [(64, 5120, 16), (1, 1536, 16), (7, 1000, 12)]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["state-fp32", "state-bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: "B{}-D{}-N{}".format(*c))
def test_state_update_matches_reference(case, dtype, state_dtype):
    batch, dim, d_state = case
    inputs = _step_inputs(batch, dim, d_state, dtype)
    state = torch.randn(batch, dim, d_state, generator=_gen(8)).to(DEVICE, state_dtype)
    state_ref = state.float().clone()
    y = ss.selective_state_update(state, **inputs)
    y_ref = ss.selective_state_update_ref(state_ref, **_as_fp32(inputs))
    assert y.dtype == dtype and state.dtype == state_dtype
    assert_close(y.float(), y_ref, RTOL[dtype], "y")
    assert_close(state.float(), state_ref, RTOL[state_dtype], "state")
    # Without the optional inputs.
    inputs.update(D=None, z=None, dt_bias=None)
    state_ref = state.float().clone()
    y = ss.selective_state_update(state, **inputs, dt_softplus=False)
    y_ref = ss.selective_state_update_ref(state_ref, **_as_fp32(inputs), dt_softplus=False)
    assert_close(y.float(), y_ref, RTOL[dtype], "y without optional inputs")


def test_decode_continues_the_scan():
    """Prefill with the scan kernel, then the update kernel position by position: the same
    outputs and final state as one reference scan over the whole sequence."""
    batch, dim, d_state, length, prefill = (2, 1536, 16, 64, 40) if REAL else (2, 7, 8, 13, 6)
    inputs = _scan_inputs(batch, dim, d_state, length, torch.float32, "model", seed=9)
    y_ref, state_ref = ss.selective_scan_ref(**inputs)
    head = {k: (v[..., :prefill] if k in ("u", "delta", "z", "B", "C") else v) for k, v in inputs.items()}
    y_head, state = ss.selective_scan(**head)
    ys = [y_head]
    for t in range(prefill, length):
        ys.append(ss.selective_state_update(
            state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"], inputs["B"][..., t],
            inputs["C"][..., t], inputs["D"], inputs["z"][..., t], dt_bias=inputs["delta_bias"],
        )[..., None])
    assert_close(torch.cat(ys, dim=-1), y_ref, RTOL[torch.float32], "y")
    assert_close(state, state_ref, RTOL[torch.float32], "final state")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_state_update_in_cuda_graph():
    """The update captures into a CUDA graph (no host sync) and replays on new inputs."""
    inputs = _step_inputs(4, 256, 16, torch.bfloat16)
    state = torch.randn(4, 256, 16, device=DEVICE)
    ss.selective_state_update(state.clone(), **inputs)  # compile outside the capture
    static_state = state.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = ss.selective_state_update(static_state, **inputs)
    fresh = _step_inputs(4, 256, 16, torch.bfloat16, seed=1)
    for name in ("x", "dt", "B", "C", "z"):
        inputs[name].copy_(fresh[name])
    static_state.copy_(state)
    graph.replay()
    expected_state = state.clone()
    expected_y = ss.selective_state_update(expected_state, **inputs)
    torch.cuda.synchronize()
    assert torch.equal(static_y, expected_y) and torch.equal(static_state, expected_state)
