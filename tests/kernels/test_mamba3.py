"""Mamba-3 references (kernels/mamba3.py): the chunked form against the recurrence, state passing,
the decoding step, padded rows, and, where a mamba_ssm source checkout is named by
``MAMBA_SSM_SRC``, against the plain-PyTorch references in its tests (run on the CPU).

Shapes are awkward on purpose: L not a multiple of the chunk, L = 1, B = 1, N not a power of two,
several groups, several ranks, fewer angles than N / 2."""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from mamba_eval.kernels.mamba3 import mamba3_recurrent_ref, mamba3_scan_ref, mamba3_step_ref

# (batch, length, heads, headdim, ranks, groups, d_state, angles, chunk, pairwise)
SHAPES = [
    pytest.param(2, 37, 6, 5, 1, 2, 12, 3, 8, True, id="siso-L37-C8-G2-N12"),
    pytest.param(1, 1, 2, 4, 1, 1, 8, 4, 16, True, id="siso-L1-B1"),
    pytest.param(3, 50, 4, 6, 4, 2, 20, 5, 16, False, id="mimo-R4-L50-C16-N20"),
    pytest.param(2, 33, 2, 3, 2, 1, 10, 5, 32, False, id="mimo-R2-full-rope"),
    pytest.param(2, 64, 2, 8, 1, 1, 16, 4, 64, True, id="siso-L=C"),
]


def _inputs(batch, length, heads, headdim, ranks, groups, d_state, n_angles, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        x=rand(batch, length, heads, headdim).to(dtype),
        dt=F.softplus(rand(batch, length, heads) - 1.0),
        A=-(torch.rand(batch, length, heads, generator=g) + 0.05),
        lam=torch.sigmoid(rand(batch, length, heads)),
        B=rand(batch, length, ranks, groups, d_state).to(dtype),
        C=rand(batch, length, ranks, groups, d_state).to(dtype),
        angles=rand(batch, length, n_angles),
        B_bias=rand(heads, ranks, d_state),
        C_bias=rand(heads, ranks, d_state),
        D=rand(heads),
        mimo_x=rand(heads, ranks, headdim) if ranks > 1 else None,
    )


def _slice(inputs, lo, hi):
    return {k: v[:, lo:hi] if k in ("x", "dt", "A", "lam", "B", "C", "angles") else v for k, v in inputs.items()}


def _assert_states(actual, expected, rtol, name):
    for part, a, e in zip(("θ", "S", "k", "x"), actual, expected):
        if part == "θ":  # angles mod 2π: compare the rotation, not the representative
            a, e = torch.stack([a.cos(), a.sin()]), torch.stack([e.cos(), e.sin()])
        assert_close(a, e, rtol, name=f"{name} {part}")


@pytest.mark.parametrize("batch, length, heads, headdim, ranks, groups, d_state, n_angles, chunk, pairwise", SHAPES)
def test_chunked_equals_recurrence(batch, length, heads, headdim, ranks, groups, d_state, n_angles, chunk, pairwise):
    inputs = _inputs(batch, length, heads, headdim, ranks, groups, d_state, n_angles)
    y, state = mamba3_scan_ref(**inputs, chunk_size=chunk, pairwise=pairwise)
    y_rec, state_rec = mamba3_recurrent_ref(**inputs, pairwise=pairwise)
    assert y.shape == (batch, length, ranks, heads, headdim) and y.dtype == torch.float32
    assert_close(y, y_rec, 1e-5, name="y")
    _assert_states(state, state_rec, 1e-5, "final")
    # From a nonzero state (the last one), too: the state's key and input enter through β_0.
    y, state = mamba3_scan_ref(**inputs, chunk_size=chunk, pairwise=pairwise, initial_state=state_rec)
    y_rec, state_rec2 = mamba3_recurrent_ref(**inputs, pairwise=pairwise, initial_state=state_rec)
    assert_close(y, y_rec, 1e-5, name="y from a state")
    _assert_states(state, state_rec2, 1e-5, "final from a state")


@pytest.mark.parametrize("batch, length, heads, headdim, ranks, groups, d_state, n_angles, chunk, pairwise",
                         [p for p in SHAPES if p.values[1] > 2])
def test_states_passed_in_pieces_equal_one_pass(batch, length, heads, headdim, ranks, groups, d_state, n_angles,
                                                chunk, pairwise):
    inputs = _inputs(batch, length, heads, headdim, ranks, groups, d_state, n_angles, seed=1)
    y, state = mamba3_scan_ref(**inputs, chunk_size=chunk, pairwise=pairwise)
    cuts = [0, 1, length // 3, length // 3 + chunk + 1, length]
    cuts = sorted(set(min(c, length) for c in cuts))
    ys, carried = [], None
    for lo, hi in zip(cuts, cuts[1:]):
        piece, carried = mamba3_scan_ref(**_slice(inputs, lo, hi), chunk_size=chunk, pairwise=pairwise,
                                         initial_state=carried)
        ys.append(piece)
    assert_close(torch.cat(ys, 1), y, 1e-5, name="y in pieces")
    _assert_states(carried, state, 1e-5, "state in pieces")
    # Decoding steps from the state after the first third continue the same sequence.
    third = length // 3
    _, carried = mamba3_scan_ref(**_slice(inputs, 0, third), chunk_size=chunk, pairwise=pairwise)
    angle, ssm, k, x = (t.clone() for t in carried)
    steps = []
    for t in range(third, length):
        step = {n: v[:, t] if n in ("x", "dt", "A", "lam", "B", "C", "angles") else v for n, v in inputs.items()}
        steps.append(mamba3_step_ref(angle, ssm, k, x, **step, pairwise=pairwise))
    assert_close(torch.stack(steps, 1), y[:, third:], 1e-5, name="steps")
    _assert_states((angle, ssm, k, x), state, 1e-5, "state after steps")


def test_padded_rows_end_in_their_own_final_state_bit_for_bit():
    """Rows of a right-padded pass (Δ = 0 past each row's length) end in the same bits as passes of
    their own lengths, and their outputs at real positions are the same bits."""
    inputs = _inputs(3, 45, 4, 6, 2, 2, 16, 4, seed=2)
    lengths = torch.tensor([45, 17, 3])
    padded = dict(inputs, dt=inputs["dt"].masked_fill(torch.arange(45)[None, :, None] >= lengths[:, None, None], 0.0))
    y, state = mamba3_scan_ref(**padded, chunk_size=16, pairwise=False, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        row = {k: v[b:b + 1, :n] if k in ("x", "dt", "A", "lam", "B", "C", "angles") else v for k, v in inputs.items()}
        y_own, state_own = mamba3_scan_ref(**row, chunk_size=16, pairwise=False)
        assert torch.equal(y[b:b + 1, :n], y_own), b
        for part, a, e in zip("θSkx", state, state_own):
            assert torch.equal(a[b:b + 1], e), (b, part)


def test_rotation_pairs():
    """θ rotates (2j, 2j+1) pairs in the SISO layout and (j, j + N/2) in the MIMO one; a rotation
    of both q and k by the same angle leaves their product unchanged, so the pairing shows only
    across positions: a one-position sequence is blind to it, a two-position one is not."""
    inputs = _inputs(1, 2, 1, 2, 1, 1, 8, 2, seed=3)
    one = _slice(inputs, 0, 1)
    assert_close(mamba3_scan_ref(**one, pairwise=True)[0], mamba3_scan_ref(**one, pairwise=False)[0], 1e-6)
    siso, mimo = mamba3_scan_ref(**inputs, pairwise=True)[0], mamba3_scan_ref(**inputs, pairwise=False)[0]
    assert not torch.allclose(siso[:, 1], mimo[:, 1])
    theta = mamba3_scan_ref(**inputs)[1][0]
    k = mamba3_scan_ref(**inputs, pairwise=False)[1][2][0, 0, 0]
    raw = inputs["B"][0, 1, 0, 0] + inputs["B_bias"][0, 0]
    c, s = theta[0, 0, 0].cos(), theta[0, 0, 0].sin()
    assert_close(k[[0, 4]], torch.stack([raw[0] * c - raw[4] * s, raw[0] * s + raw[4] * c]), 1e-6)
    assert torch.equal(k[[2, 3, 6, 7]], raw[[2, 3, 6, 7]])  # S = 2 angles: the rest unrotated


@pytest.mark.parametrize("bad, message", [
    (dict(dt=torch.zeros(2, 5, 3)), "dt must be"),
    (dict(B=torch.zeros(2, 5, 2, 3, 8), C=torch.zeros(2, 5, 2, 3, 8)), "multiple of the number of groups"),
    (dict(angles=torch.zeros(2, 5, 5)), "angles must be"),
    (dict(B_bias=torch.zeros(4, 1, 8)), "B_bias must be"),
    (dict(mimo_x=None), "mimo_x is required"),
])
def test_bad_shapes_name_the_argument(bad, message):
    inputs = _inputs(2, 5, 4, 3, 2, 2, 8, 2)
    inputs.update(bad)
    with pytest.raises(ValueError, match=message):
        mamba3_scan_ref(**inputs)


# ------------------------------------------------------------------ mamba_ssm's own references

def _mamba_ssm_refs():
    """The plain-PyTorch reference functions of a mamba_ssm source checkout's tests, loaded by name
    (their modules import CUDA-only kernels at the top, the functions themselves do not)."""
    root = os.environ.get("MAMBA_SSM_SRC")
    if not root:
        pytest.skip("MAMBA_SSM_SRC (a state-spaces/mamba source checkout with Mamba-3) is not set")
    einops = pytest.importorskip("einops")
    from typing import Optional, Tuple

    namespace = {"torch": torch, "F": F, "math": math, "rearrange": einops.rearrange, "repeat": einops.repeat,
                 "Optional": Optional, "Tuple": Tuple, "Tensor": torch.Tensor}
    wanted = {"tests/ops/triton/test_mamba3_siso.py": ("_segsum", "mamba3_siso_fwd_ref"),
              "tests/ops/tilelang/test_mamba3_mimo.py": ("_pad_zeros", "apply_angle_dt_reference",
                                                         "mamba3_MIMO_chunk_ref")}
    for rel, names in wanted.items():
        path = Path(root) / rel
        if not path.is_file():
            pytest.skip(f"{path} not found")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name in names:
                exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
    return namespace


def test_matches_mamba_ssm_references():
    refs = _mamba_ssm_refs()
    batch, length, heads, headdim, groups, d_state = 2, 40, 4, 8, 2, 16
    trap = torch.randn(batch, length, heads, generator=torch.Generator().manual_seed(5))
    siso = _inputs(batch, length, heads, headdim, 1, groups, d_state, 4, seed=4)
    siso["lam"] = torch.sigmoid(trap)
    y, state = mamba3_scan_ref(**siso, chunk_size=16, pairwise=True)
    t = lambda v: v.transpose(1, 2)  # noqa: E731  [b, L, h] -> [b, h, L]
    theirs, their_state = refs["mamba3_siso_fwd_ref"](
        Q=siso["C"][:, :, 0], K=siso["B"][:, :, 0], V=siso["x"], ADT=t(siso["A"] * siso["dt"]), DT=t(siso["dt"]),
        Trap=t(trap), Q_bias=siso["C_bias"][:, 0], K_bias=siso["B_bias"][:, 0],
        Angles=siso["angles"][:, :, None].expand(-1, -1, heads, -1), D=siso["D"])
    assert_close(y[:, :, 0], theirs, 1e-5, name="SISO y vs mamba3_siso_fwd_ref")
    assert_close(state[1], their_state[1], 1e-5, name="SISO state")
    assert_close(state[2][:, 0], their_state[2], 1e-5, name="SISO k")
    for divisor in (4, 2):  # rope_fraction 0.5 and 1.0
        mimo = _inputs(batch, length, heads, headdim, 4, groups, d_state, d_state // divisor, seed=6)
        mimo["lam"] = torch.sigmoid(trap)
        mimo_o = torch.randn(heads, 4, headdim)
        y, state = mamba3_scan_ref(**mimo, chunk_size=16, pairwise=False)
        adt = t(mimo["A"] * mimo["dt"])
        cs = torch.cat([c.cumsum(-1) for c in adt.split(8, -1)], -1)
        cs_rev = torch.cat([c.sum(-1, keepdim=True) - c.cumsum(-1) for c in adt.split(8, -1)], -1)
        theta = refs["apply_angle_dt_reference"](mimo["angles"][:, :, None].expand(-1, -1, heads, -1), mimo["dt"])
        theirs, their_ssm, their_k = refs["mamba3_MIMO_chunk_ref"](
            mimo["C"], mimo["B"], mimo["x"], mimo["C_bias"], mimo["B_bias"], mimo["mimo_x"], mimo_o, None, None,
            theta, cs, cs_rev, t(mimo["dt"]), t(trap), mimo["D"], chunk_size=8, rotary_dim_divisor=divisor,
            return_final_state=True)
        assert_close(torch.einsum("blrhp,hrp->blhp", y, mimo_o), theirs, 1e-5, name=f"MIMO y (1/{divisor})")
        assert_close(state[1], their_ssm.transpose(-1, -2), 1e-5, name="MIMO state")
        assert_close(state[2], their_k, 1e-5, name="MIMO k")
