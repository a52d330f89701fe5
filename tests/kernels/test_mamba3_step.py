"""The Triton Mamba-3 decoding step (``kernels.mamba3.mamba3_step``) against ``mamba3_step_ref``.

Without CUDA the kernel runs in Triton's interpreter at small, awkward sizes (P and N/2 not powers
of two, several groups and ranks, fewer angles than pairs, strided inputs); with
``MAMBA_EVAL_TEST_SIZES=real`` on a GPU also at the released models' head shapes. Several steps in
a row, so that the states the kernel writes are the ones it reads next. The output starts as NaN.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import assert_close  # noqa: E402

import mamba_eval.kernels.mamba3 as m3  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REAL = os.environ.get("MAMBA_EVAL_TEST_SIZES") == "real"

# (batch, heads, headdim, ranks, groups, d_state, angles, pairwise)
SHAPES = [
    pytest.param(2, 6, 5, 1, 2, 12, 3, True, id="siso-G2-N12-S3"),
    pytest.param(1, 2, 4, 1, 1, 8, 4, True, id="siso-B1-all-pairs"),
    pytest.param(3, 4, 6, 4, 2, 20, 5, False, id="mimo-R4-N20"),
    pytest.param(2, 2, 3, 2, 1, 10, 5, False, id="mimo-R2-full-rope"),
]
if REAL:  # the releases: 64 heads of 64 channels, N 128, 32 angles (rope_fraction 0.5); MIMO rank 4
    SHAPES += [pytest.param(64, 64, 64, 1, 1, 128, 32, True, id="siso-1.5b-B64"),
               pytest.param(1, 32, 64, 4, 1, 128, 32, False, id="mimo-187m-B1")]


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    monkeypatch.setattr(m3, "new_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                   device=device))


def _step_inputs(batch, heads, headdim, ranks, groups, d_state, n_angles, dtype, seed):
    """One position's inputs; x, B and C are strided views, as the mixer's split makes them."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    wide = rand(batch, heads * headdim + 7).to(dtype)
    bc = rand(batch, 2, ranks, groups, d_state + 3).to(dtype)
    return dict(
        x=wide[:, 3:3 + heads * headdim].view(batch, heads, headdim),
        dt=F.softplus(rand(batch, heads) - 1.0), A=-(torch.rand(batch, heads, generator=g) + 0.05),
        lam=torch.sigmoid(rand(batch, heads)), B=bc[:, 0, ..., :d_state], C=bc[:, 1, ..., 2:2 + d_state],
        angles=rand(batch, n_angles + 2)[:, 1:1 + n_angles] * 2,
    )


def _weights(heads, ranks, headdim, d_state, seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(B_bias=rand(heads, ranks, d_state), C_bias=rand(heads, ranks, d_state), D=rand(heads),
                mimo_x=rand(heads, ranks, headdim) if ranks > 1 else None)


def _to(d, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["state-fp32", "state-bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch, heads, headdim, ranks, groups, d_state, n_angles, pairwise", SHAPES)
def test_steps_match_the_reference(batch, heads, headdim, ranks, groups, d_state, n_angles, pairwise, dtype,
                                   state_dtype):
    weights = _to(_weights(heads, ranks, headdim, d_state, seed=1), DEVICE)
    g = torch.Generator().manual_seed(2)
    theta = torch.rand(batch, heads, n_angles, generator=g) * 6.2
    ssm = torch.randn(batch, heads, headdim, d_state, generator=g).to(state_dtype)
    k = torch.randn(batch, ranks, heads, d_state, generator=g)
    v = torch.randn(batch, heads, headdim, generator=g).to(dtype)
    ours = [t.to(DEVICE) for t in (theta, ssm, k, v)]
    ref = [t.clone().to(DEVICE) for t in (theta, ssm, k, v)]
    # bf16 state: both round the new state to bf16 once a step; the kernel's fp32 sums in another
    # order can land one bf16 unit apart, and that difference is carried into the next steps.
    tol = 1e-5 if state_dtype == torch.float32 else 2e-2
    for step in range(3):
        inputs = _to(_step_inputs(batch, heads, headdim, ranks, groups, d_state, n_angles, dtype, seed=10 + step),
                     DEVICE)
        y = m3.mamba3_step(*ours, **inputs, **weights, pairwise=pairwise)
        y_ref = m3.mamba3_step_ref(*ref, **inputs, **weights, pairwise=pairwise)
        assert y.shape == (batch, ranks, heads, headdim) and y.dtype == torch.float32
        assert_close(y, y_ref, tol, name=f"y, step {step}")
        rotation = lambda t: torch.stack([t.cos(), t.sin()])  # noqa: E731  (θ is kept mod 2π)
        assert_close(rotation(ours[0]), rotation(ref[0]), 1e-5, name=f"θ, step {step}")
        assert_close(ours[1].float(), ref[1].float(), tol, name=f"S, step {step}")
        assert_close(ours[2], ref[2], 1e-5, name=f"k, step {step}")
        assert torch.equal(ours[3], ref[3]), f"the stored input, step {step}"
        assert ours[1].dtype == state_dtype and ours[3].dtype == dtype


def test_rows_do_not_depend_on_the_batch():
    """A row's outputs and states are the same bits stepped alone or among 4."""
    weights = _weights(3, 2, 4, 12, seed=3)
    inputs = _step_inputs(4, 3, 4, 2, 1, 12, 4, torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    states = [torch.rand(4, 3, 4, generator=g), torch.randn(4, 3, 4, 12, generator=g),
              torch.randn(4, 2, 3, 12, generator=g), torch.randn(4, 3, 4, generator=g)]
    states = [t.to(DEVICE) for t in states]
    alone = [t[2:3].clone() for t in states]
    y = m3.mamba3_step(*states, **_to(inputs, DEVICE), **_to(weights, DEVICE), pairwise=False)
    row = {k: v[2:3] for k, v in inputs.items()}
    y_alone = m3.mamba3_step(*alone, **_to(row, DEVICE), **_to(weights, DEVICE), pairwise=False)
    assert torch.equal(y_alone, y[2:3])
    for a, b in zip(alone, states):
        assert torch.equal(a, b[2:3])


def test_rejects_an_odd_state_size():
    weights = _weights(2, 1, 4, 9, seed=0)
    inputs = _step_inputs(1, 2, 4, 1, 1, 9, 4, torch.float32, seed=0)
    states = [torch.zeros(1, 2, 4), torch.zeros(1, 2, 4, 9), torch.zeros(1, 1, 2, 9), torch.zeros(1, 2, 4)]
    with pytest.raises(ValueError, match="even d_state"):
        m3.mamba3_step(*[t.to(DEVICE) for t in states], **_to(inputs, DEVICE), **_to(weights, DEVICE))
