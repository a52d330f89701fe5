"""The Triton Mamba-3 chunked scan (``kernels.mamba3.mamba3_scan``) against ``mamba3_scan_ref``.

Without CUDA the kernel runs in Triton's interpreter at small, awkward sizes (L not a multiple of
the step, L = 1, P and N not powers of two, several groups and ranks, fewer angles than pairs);
with ``MAMBA_EVAL_TEST_SIZES=real`` on a GPU also at the released models' head shapes, in bf16
too. From zeros and from a state, with per-row lengths, and each row alone against the batch
(bits). The outputs start as NaN.
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

# (batch, length, heads, headdim, ranks, groups, d_state, angles, pairwise)
SHAPES = [
    pytest.param(2, 37, 3, 5, 1, 1, 12, 3, True, id="siso-L37-N12"),
    pytest.param(1, 1, 2, 4, 1, 1, 8, 4, True, id="siso-L1-B1"),
    pytest.param(2, 21, 4, 6, 4, 2, 20, 5, False, id="mimo-R4-G2-N20"),
    pytest.param(2, 19, 2, 3, 2, 1, 10, 5, False, id="mimo-R2-full-rope"),
]
if REAL:  # the releases: 64-channel heads, N 128, 32 angles (rope_fraction 0.5); MIMO rank 4
    SHAPES += [pytest.param(4, 1000, 32, 64, 1, 1, 128, 32, True, id="siso-real"),
               pytest.param(2, 700, 16, 64, 4, 1, 128, 32, False, id="mimo-R4-real")]


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    monkeypatch.setattr(m3, "new_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                   device=device))


def _inputs(batch, length, heads, headdim, ranks, groups, d_state, n_angles, dtype, seed=0):
    """x, B and C are strided views, as the mixer's split makes them."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    wide = rand(batch, length, heads * headdim + 5)
    bc = rand(batch, length, 2, ranks, groups, d_state + 3)
    out = dict(
        x=wide[..., 2:2 + heads * headdim].view(batch, length, heads, headdim).to(dtype),
        dt=F.softplus(rand(batch, length, heads) - 1.0), A=-(torch.rand(batch, length, heads, generator=g) + 0.05),
        lam=torch.sigmoid(rand(batch, length, heads)),
        B=bc[:, :, 0, ..., :d_state].to(dtype), C=bc[:, :, 1, ..., 1:1 + d_state].to(dtype),
        angles=rand(batch, length, n_angles),
        B_bias=rand(heads, ranks, d_state), C_bias=rand(heads, ranks, d_state), D=rand(heads),
        mimo_x=rand(heads, ranks, headdim) if ranks > 1 else None,
    )
    return {k: v if v is None else v.to(DEVICE) for k, v in out.items()}


def _assert_states(actual, expected, rtol, name):
    for part, a, e in zip(("θ", "S", "k", "x"), actual, expected):
        if part == "θ":  # angles mod 2π: compare the rotation
            a, e = torch.stack([a.cos(), a.sin()]), torch.stack([e.cos(), e.sin()])
        assert_close(a.float(), e.float(), rtol, name=f"{name} {part}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, length, heads, headdim, ranks, groups, d_state, n_angles, pairwise", SHAPES)
def test_scan_equals_reference(batch, length, heads, headdim, ranks, groups, d_state, n_angles, pairwise, dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu" and length > 30:
        pytest.skip("bf16 under the interpreter: the short shapes suffice")
    inputs = _inputs(batch, length, heads, headdim, ranks, groups, d_state, n_angles, dtype)
    # bf16: the kernel's products take q, k, v rounded to bf16 (the reference keeps them fp32).
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    y_ref, state_ref = m3.mamba3_scan_ref(**inputs, pairwise=pairwise)
    y, state = m3.mamba3_scan(**inputs, pairwise=pairwise)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert_close(y, y_ref, rtol, name="y")
    _assert_states(state, state_ref, rtol, "final")
    # From a nonzero state: its key and input enter the first position through β_0.
    y_ref, state_ref2 = m3.mamba3_scan_ref(**inputs, pairwise=pairwise, initial_state=state_ref)
    y, state2 = m3.mamba3_scan(**inputs, pairwise=pairwise, initial_state=state_ref)
    assert_close(y, y_ref, rtol, name="y from a state")
    _assert_states(state2, state_ref2, rtol, "final from a state")


@pytest.mark.parametrize("batch, length, heads, headdim, ranks, groups, d_state, n_angles, pairwise",
                         [p for p in SHAPES if p.values[0] > 1 and p.values[1] > 2])
def test_rows_with_lengths_and_each_row_alone(batch, length, heads, headdim, ranks, groups, d_state, n_angles,
                                              pairwise):
    """Rows of their own lengths (Δ = 0 after them, as the model pads): the final state is the
    one after each row's last position, and a row's bits equal those of the row run alone."""
    inputs = _inputs(batch, length, heads, headdim, ranks, groups, d_state, n_angles, torch.float32, seed=3)
    lengths = torch.tensor([length - 3 * i for i in range(batch)], device=DEVICE).clamp(min=1)
    past = torch.arange(length, device=DEVICE)[None, :] >= lengths[:, None]
    inputs["dt"] = inputs["dt"].masked_fill(past[..., None], 0.0)
    y, state = m3.mamba3_scan(**inputs, pairwise=pairwise, lengths=lengths)
    y_ref, state_ref = m3.mamba3_scan_ref(**inputs, pairwise=pairwise, lengths=lengths)
    _assert_states(state, state_ref, 1e-5, "final")
    for b in range(batch):
        one = {k: v if v is None or v.dim() < 3 or k in ("B_bias", "C_bias", "mimo_x") else v[b:b + 1]
               for k, v in inputs.items()}
        n = int(lengths[b])
        y1, state1 = m3.mamba3_scan(**{k: v if v is None or v.dim() < 3 or k in ("B_bias", "C_bias", "mimo_x")
                                       else v[:, :n] for k, v in one.items()}, pairwise=pairwise)
        assert torch.equal(y[b, :n], y1[0]), f"row {b}: y depends on the other rows"
        for part, a, e in zip(("θ", "S", "k", "x"), state1, state):
            assert torch.equal(a[0], e[b]), f"row {b}: final {part} depends on the other rows or the padding"


def test_refuses_a_rank_not_a_power_of_two():
    inputs = _inputs(1, 3, 3, 4, 3, 1, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="power-of-two MIMO rank"):
        m3.mamba3_scan(**inputs, pairwise=False)
