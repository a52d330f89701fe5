"""The fused Mamba-1 decoding step (``kernels/mamba1_step.py``) against its reference.

On a machine without CUDA the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1) at
tiny, awkward sizes; with ``MAMBA_EVAL_TEST_SIZES=real`` on a GPU the same tests also run at the
mamba-130m and mamba-2.8b shapes. The wrapper's output and workspace are filled with NaN first,
so an element a kernel forgets to write (or a partial row it forgets) fails the comparison.

Tolerances. The kernels keep every intermediate in fp32, the reference rounds as the model does.
- fp32 activations: kernel and reference agree to fp32 summation order (``TIGHT``).
- bf16 activations, against the reference run in fp32 on the same (bf16-valued) inputs: the fp32
  state agrees to ``TIGHT``; y and a bf16 state to one bf16 unit in the last place (``BF16_ULP``:
  the GPU rounds to nearest, Triton's interpreter truncates).
- bf16 activations, against the reference in bf16 (the model's roundings of u, δ, B, C and Δ):
  ``VS_BF16_REF``, with the largest error measured in these tests noted beside it.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import assert_close  # noqa: E402

import mamba_eval.kernels.mamba1_step as ms  # noqa: E402
from mamba_eval.models.ops import get_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REAL = os.environ.get("MAMBA_EVAL_TEST_SIZES") == "real"
TIGHT = 1e-5
BF16_ULP = 8e-3  # 2^-7: one unit in the last place of bf16, relative
VS_BF16_REF = 3e-2  # largest measured here: 1.6e-2 (y and state, bf16 state, 3 seeds x 3 steps)


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    """Every output and workspace of the wrapper starts as NaN: unwritten elements cannot pass."""

    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ms, "new_output", nan_output)


def _inputs(batch, dim, rank, d_state, width, dtype, state_dtype, conv_bias=True, seed=0):
    """One step's arguments with the model's magnitudes: x and z are the halves of one [B, 2D]
    tensor (strided views, as in_proj makes them); Δ bias is the inverse softplus of a
    log-uniform Δ in [1e-3, 0.1]; A = -exp(A_log) with A_log random around 0."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(DEVICE)

    xz = rnd(batch, 2 * dim)
    delta = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(
        x=xz[:, :dim], z=xz[:, dim:],
        conv_state=rnd(batch, dim, width - 1), ssm_state=rnd(batch, dim, d_state, scale=0.5, dt=state_dtype),
        conv_weight=rnd(dim, width, scale=0.5), conv_bias=rnd(dim, scale=0.1) if conv_bias else None,
        x_proj_weight=rnd(rank + 2 * d_state, dim, scale=dim**-0.5), dt_proj_weight=rnd(dim, rank, scale=rank**-0.5),
        dt_bias=(delta + torch.log(-torch.expm1(-delta))).to(DEVICE),
        A=-torch.exp(torch.randn(dim, d_state, generator=g) * 0.5).to(DEVICE),
        D=torch.randn(dim, generator=g).to(DEVICE),
    )


def _copy(inputs, fp32=False):
    """Independent copies (the states are written in place); ``fp32``: every float tensor in fp32."""
    out = {}
    for k, v in inputs.items():
        if v is None:
            out[k] = None
        else:
            out[k] = v.float().clone() if fp32 else v.clone()
    return out


def _new_token(inputs, seed, dtype=None):
    """The next token's x and z, rounded to ``dtype`` (default: x's), written into the same
    storage (the strides stay those of in_proj's halves)."""
    g = torch.Generator().manual_seed(1000 + seed)
    xz = torch.randn(inputs["x"].shape[0], 2 * inputs["x"].shape[1], generator=g).to(dtype or inputs["x"].dtype)
    dim = inputs["x"].shape[1]
    inputs["x"].copy_(xz[:, :dim])
    inputs["z"].copy_(xz[:, dim:])


# (B, D, R, N, K, conv bias, bcdt norms): D not a multiple of any block, R not a power of two,
# N = 16 and not a power of two, K = 2..4.
CASES = [
    (1, 40, 5, 16, 4, True, None),
    (3, 37, 3, 6, 2, False, 1e-5),
    (3, 72, 7, 16, 3, True, 1e-3),
    (1, 24, 6, 5, 4, False, None),
]
if REAL:
    CASES += [(1, 1536, 48, 16, 4, True, None), (64, 5120, 160, 16, 4, True, None), (1, 5120, 160, 16, 4, True, 1e-5)]
DTYPES = [  # (activations, SSM state)
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
]


def _case_id(c):
    return "B{}-D{}-R{}-N{}-K{}".format(*c[:5]) + ("-bias" if c[5] else "") + ("-norm" if c[6] else "")


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}-state-{str(d[1])[6:]}")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_step_matches_reference(case, dtypes):
    """Two steps in a row. Each step: the kernel against the reference in fp32 on copies of the
    same inputs and states (tight), and against the reference in the inputs' dtype (the model's
    roundings); the conv window exactly."""
    batch, dim, rank, d_state, width, bias, eps = case
    dtype, state_dtype = dtypes
    inputs = _inputs(batch, dim, rank, d_state, width, dtype, state_dtype, bias)
    for step in range(2):
        exact, rounded = _copy(inputs, fp32=True), _copy(inputs)
        y = ms.mamba1_decode(**inputs, bcdt_eps=eps)
        y_exact = ms.mamba1_decode_ref(**exact, bcdt_eps=eps)
        y_rounded = ms.mamba1_decode_ref(**rounded, bcdt_eps=eps)
        assert y.dtype == dtype and inputs["ssm_state"].dtype == state_dtype
        tol_y = TIGHT if dtype == torch.float32 else BF16_ULP
        tol_state = TIGHT if state_dtype == torch.float32 else BF16_ULP
        assert_close(y.float(), y_exact, tol_y, f"step {step} y")
        assert_close(inputs["ssm_state"].float(), exact["ssm_state"], tol_state, f"step {step} ssm_state")
        assert torch.equal(inputs["conv_state"], rounded["conv_state"]), f"step {step} conv_state"
        if dtype != torch.float32 or state_dtype != torch.float32:
            assert_close(y.float(), y_rounded.float(), VS_BF16_REF, f"step {step} y vs rounded reference")
            assert_close(inputs["ssm_state"].float(), rounded["ssm_state"].float(), VS_BF16_REF,
                         f"step {step} ssm_state vs rounded reference")
        _new_token(inputs, step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_states_carried_over_several_steps(dtype):
    """Four steps, kernel and fp32 reference each carrying their own states: the fp32 state and
    the conv window stay with the reference (the kernel's intermediates are fp32 in bf16 too)."""
    batch, dim, rank, d_state, width = (2, 1536, 48, 16, 4) if REAL else (2, 40, 5, 16, 4)
    kernel = _inputs(batch, dim, rank, d_state, width, dtype, torch.float32, seed=3)
    exact = _copy(kernel, fp32=True)
    for step in range(4):
        y = ms.mamba1_decode(**kernel, bcdt_eps=1e-5)
        y_exact = ms.mamba1_decode_ref(**exact, bcdt_eps=1e-5)
        assert_close(y.float(), y_exact, TIGHT if dtype == torch.float32 else BF16_ULP, f"step {step} y")
        _new_token(kernel, step)
        _new_token(exact, step, dtype)
    assert_close(kernel["ssm_state"], exact["ssm_state"], TIGHT, "ssm_state after 4 steps")
    assert torch.equal(kernel["conv_state"].float(), exact["conv_state"]), "conv_state after 4 steps"


def _run(inputs, eps, partition=None, monkeypatch=None):
    """The kernel, with (rows per program, tiles per program) forced to ``partition`` if given."""
    if partition is None:
        return ms.mamba1_decode(**inputs, bcdt_eps=eps)
    with monkeypatch.context() as patch:
        patch.setattr(ms, "_partition", lambda batch, tiles, others, device: partition)
        return ms.mamba1_decode(**inputs, bcdt_eps=eps)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["state-fp32", "state-bf16"])
def test_rows_do_not_depend_on_the_batch(state_dtype, monkeypatch):
    """A row's y and states are bitwise the same alone, in a batch, and whatever the split of rows
    and tiles over programs (the split is all a batch size changes)."""
    batch, dim, rank, d_state, width = (64, 5120, 160, 16, 4) if REAL else (5, 72, 7, 16, 4)
    eps = 1e-5
    inputs = _inputs(batch, dim, rank, d_state, width, torch.bfloat16, state_dtype, seed=5)
    batched = _copy(inputs)
    y = _run(batched, eps)
    for partition in [(2, 2), (batch, 3)]:
        other = _copy(inputs)
        y_other = _run(other, eps, partition, monkeypatch)
        assert torch.equal(y_other, y), partition
        assert torch.equal(other["ssm_state"], batched["ssm_state"]), partition
        assert torch.equal(other["conv_state"], batched["conv_state"]), partition
    for b in (0, 3, batch - 1):
        xz = torch.cat([inputs["x"][b:b + 1], inputs["z"][b:b + 1]], dim=1)  # a fresh [1, 2D] row
        alone = {k: (v[b:b + 1].clone() if k in ("conv_state", "ssm_state") else v) for k, v in inputs.items()}
        alone.update(x=xz[:, :dim], z=xz[:, dim:])
        y_alone = _run(alone, eps)
        assert torch.equal(y_alone[0], y[b]), b
        assert torch.equal(alone["ssm_state"][0], batched["ssm_state"][b]), b
        assert torch.equal(alone["conv_state"][0], batched["conv_state"][b]), b


def test_any_strides():
    """States and weights that are views with other layouts give the same results as contiguous ones."""
    batch, dim, rank, d_state, width = 2, 40, 5, 16, 4
    inputs = _inputs(batch, dim, rank, d_state, width, torch.float32, torch.float32, seed=7)
    strided = dict(inputs)
    strided["conv_state"] = inputs["conv_state"].transpose(1, 2).contiguous().transpose(1, 2)  # [B, K-1, D] memory
    strided["ssm_state"] = inputs["ssm_state"].transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, D] memory
    strided["x_proj_weight"] = inputs["x_proj_weight"].t().contiguous().t()
    strided["dt_proj_weight"] = inputs["dt_proj_weight"].t().contiguous().t()
    strided["A"] = inputs["A"].t().contiguous().t()
    strided["conv_weight"] = inputs["conv_weight"].t().contiguous().t()
    exact = _copy(inputs)
    y = ms.mamba1_decode(**strided)
    y_exact = ms.mamba1_decode_ref(**exact)
    assert_close(y, y_exact, TIGHT, "y")
    assert_close(strided["ssm_state"], exact["ssm_state"], TIGHT, "ssm_state")
    assert torch.equal(strided["conv_state"], exact["conv_state"])


def test_rejects_bad_inputs():
    good = _inputs(2, 24, 3, 4, 4, torch.float32, torch.float32)
    bad = [
        (dict(z=good["z"][:1]), "z must be of shape"),
        (dict(conv_state=good["conv_state"][..., :2]), "conv_state must be of shape"),
        (dict(ssm_state=good["ssm_state"][..., :3]), "ssm_state must be of shape"),
        (dict(x_proj_weight=good["x_proj_weight"][:-1]), r"x_proj_weight must be of shape \(11, 24\)"),
        (dict(dt_proj_weight=good["dt_proj_weight"][:5]), "dt_proj_weight must be"),
        (dict(A=good["A"][:, None]), "A must be"),
        (dict(D=None), "D is required"),
        (dict(dt_bias=good["dt_bias"].long()), "dt_bias must be a floating-point"),
        (dict(x=good["x"][0]), "x must be"),
    ]
    for fn in (ms.mamba1_decode_ref, ms.mamba1_decode):
        for change, message in bad:
            with pytest.raises(ValueError, match=message):
                fn(**{**good, **change})
        with pytest.raises(ValueError, match="bcdt_eps"):
            fn(**good, bcdt_eps=-1.0)
    wide = _inputs(1, 8, 2, 4, 9, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="conv width K"):
        ms.mamba1_decode(**wide)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_step_in_cuda_graph():
    """The two launches capture into a CUDA graph (no host sync, workspace from the graph's pool),
    and a replay on new inputs equals the eager call, states updated exactly once."""
    batch, dim, rank, d_state, width = 4, 1536, 48, 16, 4
    inputs = _inputs(batch, dim, rank, d_state, width, torch.bfloat16, torch.float32, seed=11)
    start = _copy(inputs)
    warm = _copy(inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        ms.mamba1_decode(**warm, bcdt_eps=1e-5)
    torch.cuda.current_stream().wait_stream(side)
    static = _copy(inputs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = ms.mamba1_decode(**static, bcdt_eps=1e-5)
    # Capture does not run the kernels: reset the states, set a new token, replay once.
    static["conv_state"].copy_(start["conv_state"])
    static["ssm_state"].copy_(start["ssm_state"])
    _new_token(static, 0)
    graph.replay()
    eager = _copy(start)
    eager["x"].copy_(static["x"])
    eager["z"].copy_(static["z"])
    y = ms.mamba1_decode(**eager, bcdt_eps=1e-5)
    torch.cuda.synchronize()
    assert torch.equal(static_y, y)
    assert torch.equal(static["ssm_state"], eager["ssm_state"])
    assert torch.equal(static["conv_state"], eager["conv_state"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("eps", [None, 1e-5], ids=["plain", "bcdt-norm"])
def test_ref_backend_is_the_old_op_sequence(dtype, eps):
    """``ops.mamba1_decode`` of the ``ref`` backend gives, bit for bit, what the model's step did
    op by op (conv update, x_proj, split, Falcon-Mamba's norms, dt_proj, state update)."""
    from mamba_eval.kernels.norm import weightless_rmsnorm_ref as _weightless_rmsnorm

    ops = get_ops("ref")
    batch, dim, rank, d_state, width = 3, 40, 5, 16, 4
    inputs = {k: (v.cpu() if v is not None else None)
              for k, v in _inputs(batch, dim, rank, d_state, width, dtype, torch.float32, seed=13).items()}
    # The same tensors but for the states (CPU BLAS results may depend on the operands' addresses).
    old = {**inputs, "conv_state": inputs["conv_state"].clone(), "ssm_state": inputs["ssm_state"].clone()}
    y = ops.mamba1_decode(**inputs, bcdt_eps=eps)
    u = ops.causal_conv1d_update(old["x"], old["conv_state"], old["conv_weight"], old["conv_bias"], "silu")
    dt, B, C = F.linear(u, old["x_proj_weight"]).split([rank, d_state, d_state], dim=-1)
    if eps is not None:
        dt, B, C = (_weightless_rmsnorm(t, eps) for t in (dt, B, C))
    y_old = ops.selective_state_update(
        old["ssm_state"], u, F.linear(dt, old["dt_proj_weight"]), old["A"], B, C, old["D"], old["z"],
        dt_bias=old["dt_bias"], dt_softplus=True,
    )
    assert torch.equal(y, y_old)
    assert torch.equal(inputs["ssm_state"], old["ssm_state"])
    assert torch.equal(inputs["conv_state"], old["conv_state"])
