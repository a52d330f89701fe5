"""The plain-PyTorch references of ``mamba_eval.kernels`` against explicit loops and each other.

The Triton kernels are tested against these references, so these references are tested against
the equations themselves: element-by-element loops, the sequential SSD recurrence, one-step
updates against one position of the sequence form, and state passing against one pass.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from mamba_eval.kernels.conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from mamba_eval.kernels.norm import add_rmsnorm_ref, gated_rmsnorm_ref
from mamba_eval.kernels.selective_scan import selective_scan_ref, selective_state_update_ref
from mamba_eval.kernels.ssd import ssd_recurrent_ref, ssd_scan_ref, ssd_state_update_ref


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _softplus(v: float) -> float:
    return v if v > 20 else math.log1p(math.exp(v))


def _silu(v: float) -> float:
    return v / (1 + math.exp(-v))


# --------------------------------------------------------------------------------------------
# causal conv1d
# --------------------------------------------------------------------------------------------

CONV_SHAPES = [  # (batch, channels, length, width)
    (1, 5, 7, 4),
    (2, 3, 2, 4),  # L < K - 1: the final state still holds part of the initial state
    (3, 6, 9, 3),
    (2, 4, 5, 1),  # K = 1: no state at all
]


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv1d_ref_matches_loop(shape, with_state, with_bias, activation):
    b, c, length, k = shape
    g = _gen()
    x, w = _randn(b, c, length, gen=g), _randn(c, k, gen=g)
    bias = _randn(c, gen=g) if with_bias else None
    state = _randn(b, c, k - 1, gen=g) if with_state else None
    y, final = causal_conv1d_ref(x, w, bias, initial_state=state, activation=activation)

    history = torch.cat([state if with_state else torch.zeros(b, c, k - 1), x], dim=-1).tolist()
    expected = torch.zeros(b, c, length)
    for bi in range(b):
        for ci in range(c):
            for t in range(length):
                acc = bias[ci].item() if with_bias else 0.0
                for j in range(k):  # input at time t - (k-1) + j, i.e. history index t + j
                    acc += w[ci, j].item() * history[bi][ci][t + j]
                expected[bi, ci, t] = _silu(acc) if activation else acc
    assert_close(y, expected, rtol_max=1e-6)
    expected_final = torch.tensor(history)[:, :, length:] if k > 1 else torch.zeros(b, c, 0)
    assert torch.equal(final, expected_final)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_state_passing_and_update(dtype):
    b, c, length, k = 2, 7, 13, 4
    g = _gen(1)
    x, w = _randn(b, c, length, gen=g, dtype=dtype), _randn(c, k, gen=g, dtype=dtype)
    bias = _randn(c, gen=g, dtype=dtype)
    y_full, final_full = causal_conv1d_ref(x, w, bias)
    assert y_full.dtype == dtype and final_full.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # fp32 sums in another order, then rounding

    # Three uneven pieces, the state carried across.
    ys, state = [], None
    for piece in x.split([5, 1, 7], dim=-1):
        y, state = causal_conv1d_ref(piece, w, bias, initial_state=state)
        ys.append(y)
    assert_close(torch.cat(ys, dim=-1), y_full, rtol_max=tol)
    assert torch.equal(state, final_full)

    # One token at a time with the in-place update.
    conv_state = torch.zeros(b, c, k - 1, dtype=dtype)
    stepped = torch.stack([causal_conv1d_update_ref(x[:, :, t], conv_state, w, bias) for t in range(length)], dim=-1)
    assert stepped.dtype == dtype
    assert_close(stepped, y_full, rtol_max=tol)
    assert torch.equal(conv_state, final_full)


def test_conv1d_rejects_bad_shapes():
    x = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d_ref(x, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="initial_state must be"):
        causal_conv1d_ref(x, torch.zeros(3, 4), initial_state=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_ref(x, torch.zeros(3, 4), activation="relu")


# --------------------------------------------------------------------------------------------
# Mamba-1 selective scan
# --------------------------------------------------------------------------------------------


def _scan_inputs(b, d, n, length, seed=0, dtype=torch.float32):
    g = _gen(seed)
    return dict(
        u=_randn(b, d, length, gen=g, dtype=dtype),
        delta=_randn(b, d, length, gen=g, scale=0.5, dtype=dtype),
        A=-torch.exp(_randn(d, n, gen=g, scale=0.5)),
        B=_randn(b, n, length, gen=g, dtype=dtype),
        C=_randn(b, n, length, gen=g, dtype=dtype),
        D=_randn(d, gen=g),
        z=_randn(b, d, length, gen=g, dtype=dtype),
        delta_bias=_randn(d, gen=g, scale=0.5) - 2.0,
    )


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("optional", [True, False])
@pytest.mark.parametrize("shape", [(1, 3, 4, 6), (2, 5, 3, 1), (2, 2, 1, 7)])
def test_selective_scan_ref_matches_loop(shape, optional, softplus):
    b, d, n, length = shape
    inp = _scan_inputs(b, d, n, length)
    if not softplus:  # keep Δ positive without softplus
        inp["delta"], inp["delta_bias"] = inp["delta"].abs(), inp["delta_bias"].abs()
    if not optional:
        inp.update(D=None, z=None, delta_bias=None)
    h0 = _randn(b, d, n, gen=_gen(9))
    y, final = selective_scan_ref(**inp, delta_softplus=softplus, initial_state=h0)

    L = {k: (v.tolist() if v is not None else None) for k, v in inp.items()}
    expected, expected_final = torch.zeros(b, d, length), torch.zeros(b, d, n)
    for bi in range(b):
        for di in range(d):
            h = h0[bi, di].tolist()
            for t in range(length):
                dt = L["delta"][bi][di][t] + (L["delta_bias"][di] if optional else 0.0)
                dt = _softplus(dt) if softplus else dt
                u = L["u"][bi][di][t]
                h = [math.exp(dt * L["A"][di][j]) * h[j] + dt * L["B"][bi][j][t] * u for j in range(n)]
                out = sum(L["C"][bi][j][t] * h[j] for j in range(n))
                if optional:
                    out = (out + L["D"][di] * u) * _silu(L["z"][bi][di][t])
                expected[bi, di, t] = out
            expected_final[bi, di] = torch.tensor(h)
    assert_close(y, expected, rtol_max=1e-5)
    assert final.dtype == torch.float32
    assert_close(final, expected_final, rtol_max=1e-5)


def test_selective_scan_state_passing_and_update():
    b, d, n, length = 2, 5, 4, 11
    inp = _scan_inputs(b, d, n, length, seed=3)
    y_full, h_full = selective_scan_ref(**inp)

    ys, h = [], None
    for start, stop in ((0, 4), (4, 5), (5, 11)):
        piece = {k: (v[..., start:stop] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inp.items()}
        y, h = selective_scan_ref(**piece, initial_state=h)
        ys.append(y)
    assert_close(torch.cat(ys, dim=-1), y_full, rtol_max=1e-6)
    assert_close(h, h_full, rtol_max=1e-6)

    state = torch.zeros(b, d, n)
    steps = []
    for t in range(length):
        steps.append(selective_state_update_ref(
            state, inp["u"][..., t], inp["delta"][..., t], inp["A"], inp["B"][..., t], inp["C"][..., t],
            inp["D"], inp["z"][..., t], dt_bias=inp["delta_bias"],
        ))
    assert_close(torch.stack(steps, dim=-1), y_full, rtol_max=1e-6)
    assert_close(state, h_full, rtol_max=1e-6)


def test_selective_state_update_is_one_step_of_the_scan_in_low_precision():
    b, d, n = 3, 6, 5
    inp = _scan_inputs(b, d, n, 1, seed=4, dtype=torch.bfloat16)
    h0 = _randn(b, d, n, gen=_gen(5))
    y_scan, h_scan = selective_scan_ref(**inp, initial_state=h0)
    state = h0.clone()
    y = selective_state_update_ref(
        state, inp["u"][..., 0], inp["delta"][..., 0], inp["A"], inp["B"][..., 0], inp["C"][..., 0],
        inp["D"], inp["z"][..., 0], dt_bias=inp["delta_bias"],
    )
    assert y.dtype == torch.bfloat16 and y_scan.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert_close(y, y_scan[..., 0], rtol_max=1e-2)
    assert_close(state, h_scan, rtol_max=1e-6)


# --------------------------------------------------------------------------------------------
# Mamba-2 SSD
# --------------------------------------------------------------------------------------------


def _ssd_inputs(b, length, h, p, g, n, seed=0, dtype=torch.float32):
    gen = _gen(seed)
    return dict(
        x=_randn(b, length, h, p, gen=gen, dtype=dtype),
        dt=_randn(b, length, h, gen=gen, scale=0.5, dtype=dtype),
        A=-torch.exp(_randn(h, gen=gen, scale=0.5)),
        B=_randn(b, length, g, n, gen=gen, dtype=dtype),
        C=_randn(b, length, g, n, gen=gen, dtype=dtype),
        D=_randn(h, gen=gen),
        dt_bias=_randn(h, gen=gen, scale=0.5) - 1.0,
    )


SSD_CASES = [  # (batch, length, heads, headdim, groups, d_state, chunk)
    (1, 37, 4, 3, 2, 5, 16),  # L not a multiple of the chunk, two groups
    (2, 32, 6, 4, 3, 4, 16),  # L a multiple of the chunk, three groups
    (2, 5, 3, 2, 1, 7, 8),  # L shorter than one chunk
    (1, 9, 4, 5, 4, 3, 1),  # chunk of one position, one head per group
    (3, 20, 2, 8, 1, 16, 7),  # odd chunk size
]


@pytest.mark.parametrize("with_initial", [True, False])
@pytest.mark.parametrize("case", SSD_CASES)
def test_ssd_chunked_matches_recurrence(case, with_initial):
    b, length, h, p, g, n, chunk = case
    inp = _ssd_inputs(b, length, h, p, g, n)
    h0 = _randn(b, h, p, n, gen=_gen(7)) if with_initial else None
    y, final = ssd_scan_ref(**inp, chunk_size=chunk, initial_state=h0)
    y_rec, final_rec = ssd_recurrent_ref(**inp, initial_state=h0)
    assert final.dtype == torch.float32
    assert_close(y, y_rec, rtol_max=1e-5)
    assert_close(final, final_rec, rtol_max=1e-5)


@pytest.mark.parametrize("case", SSD_CASES[:3])
def test_ssd_recurrence_equals_per_group_selective_scan(case):
    """Each head is a Mamba-1 scan whose P channels share one A and the B/C of the head's group."""
    b, length, h, p, g, n, _ = case
    inp = _ssd_inputs(b, length, h, p, g, n, seed=2)
    y, final = ssd_recurrent_ref(**inp)
    heads_per_group = h // g
    for head in range(h):
        grp = head // heads_per_group  # heads [grp * H/G, (grp+1) * H/G) read group grp
        y_head, final_head = selective_scan_ref(
            inp["x"][:, :, head].transpose(1, 2),  # [B, P, L]
            inp["dt"][:, :, head, None].expand(b, length, p).transpose(1, 2),
            inp["A"][head].expand(p, n),
            inp["B"][:, :, grp].transpose(1, 2),  # [B, N, L]
            inp["C"][:, :, grp].transpose(1, 2),
            D=inp["D"][head].expand(p),
            delta_bias=inp["dt_bias"][head].expand(p),
        )
        assert_close(y[:, :, head], y_head.transpose(1, 2), rtol_max=1e-5, name=f"head {head}")
        assert_close(final[:, head], final_head, rtol_max=1e-5, name=f"head {head} state")


def test_ssd_without_optional_inputs():
    inp = _ssd_inputs(2, 19, 4, 3, 2, 5, seed=6)
    inp.update(D=None, dt_bias=None)
    inp["dt"] = inp["dt"].abs()
    for softplus in (True, False):
        y, final = ssd_scan_ref(**inp, chunk_size=8, dt_softplus=softplus)
        y_rec, final_rec = ssd_recurrent_ref(**inp, dt_softplus=softplus)
        assert_close(y, y_rec, rtol_max=1e-5)
        assert_close(final, final_rec, rtol_max=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_state_passing_and_update(dtype):
    b, length, h, p, g, n, chunk = 2, 29, 4, 3, 2, 5, 8
    inp = _ssd_inputs(b, length, h, p, g, n, seed=8, dtype=dtype)
    y_full, final_full = ssd_scan_ref(**inp, chunk_size=chunk)
    assert y_full.dtype == dtype and final_full.dtype == torch.float32

    ys, state = [], None
    for start, stop in ((0, 10), (10, 11), (11, 29)):  # split across chunk boundaries
        piece = {k: (v[:, start:stop] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
        y, state = ssd_scan_ref(**piece, chunk_size=chunk, initial_state=state)
        ys.append(y)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(torch.cat(ys, dim=1), y_full, rtol_max=tol)
    assert_close(state, final_full, rtol_max=1e-5)

    state = torch.zeros(b, h, p, n)
    steps = []
    for t in range(length):
        steps.append(ssd_state_update_ref(
            state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
            inp["D"], dt_bias=inp["dt_bias"],
        ))
    assert steps[0].dtype == dtype
    assert_close(torch.stack(steps, dim=1), y_full, rtol_max=tol)
    assert_close(state, final_full, rtol_max=1e-5)


def test_ssd_state_update_is_one_step_of_the_scan():
    b, h, p, g, n = 3, 6, 4, 3, 5
    inp = _ssd_inputs(b, 1, h, p, g, n, seed=9)
    s0 = _randn(b, h, p, n, gen=_gen(10))
    y_scan, s_scan = ssd_scan_ref(**inp, chunk_size=4, initial_state=s0)
    state = s0.clone()
    y = ssd_state_update_ref(state, inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0],
                             inp["D"], dt_bias=inp["dt_bias"])
    assert_close(y, y_scan[:, 0], rtol_max=1e-6)
    assert_close(state, s_scan, rtol_max=1e-6)


def test_ssd_rejects_bad_shapes():
    inp = _ssd_inputs(1, 4, 4, 2, 3, 2)  # 4 heads cannot be split into 3 groups
    with pytest.raises(ValueError, match="multiple of the number of groups"):
        ssd_scan_ref(**inp, chunk_size=4)
    inp = _ssd_inputs(1, 4, 4, 2, 2, 2)
    with pytest.raises(ValueError, match="initial_state must be"):
        ssd_scan_ref(**inp, chunk_size=4, initial_state=torch.zeros(1, 4, 2, 3))


# --------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_rms", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_norm_ref_matches_formula(is_rms, with_residual):
    g = _gen(11)
    x, residual = _randn(3, 5, 24, gen=g), _randn(3, 5, 24, gen=g)
    weight, bias = 1 + _randn(24, gen=g, scale=0.3), _randn(24, gen=g)
    eps = 1e-5
    out, new_residual = add_rmsnorm_ref(
        x, residual if with_residual else None, weight, None if is_rms else bias, eps, True, is_rms
    )
    r = x + residual if with_residual else x
    if is_rms:
        expected = r / torch.sqrt((r * r).mean(-1, keepdim=True) + eps) * weight
    else:
        expected = F.layer_norm(r, (24,), weight, bias, eps)
    assert_close(out, expected, rtol_max=1e-6)
    assert_close(new_residual, r, rtol_max=0)


def test_add_norm_ref_dtypes():
    g = _gen(12)
    x, residual, weight = _randn(4, 16, gen=g, dtype=torch.bfloat16), _randn(4, 16, gen=g), _randn(16, gen=g)
    out, r = add_rmsnorm_ref(x, residual, weight, None, 1e-5, residual_in_fp32=True)
    assert out.dtype == torch.bfloat16 and r.dtype == torch.float32
    assert_close(r, x.float() + residual, rtol_max=0)  # the sum is not rounded to bf16
    _, r = add_rmsnorm_ref(x, None, weight, None, 1e-5, residual_in_fp32=True)
    assert r.dtype == torch.float32
    _, r = add_rmsnorm_ref(x, None, weight, None, 1e-5, residual_in_fp32=False)
    assert r.dtype == torch.bfloat16
    _, r = add_rmsnorm_ref(x, residual.to(torch.float16), weight, None, 1e-5, residual_in_fp32=False)
    assert r.dtype == torch.float16


@pytest.mark.parametrize("group_size", [None, 24, 8, 6])
def test_gated_rmsnorm_ref_matches_loop(group_size):
    g = _gen(13)
    y, z, weight = _randn(2, 3, 24, gen=g), _randn(2, 3, 24, gen=g), 1 + _randn(24, gen=g, scale=0.3)
    eps = 1e-5
    out = gated_rmsnorm_ref(y, z, weight, eps, group_size)
    size = group_size or 24
    v = y * z * torch.sigmoid(z)
    expected = torch.empty_like(v)
    for start in range(0, 24, size):
        part = v[..., start:start + size]
        expected[..., start:start + size] = part / torch.sqrt((part * part).mean(-1, keepdim=True) + eps)
    assert_close(out, expected * weight, rtol_max=1e-6)
    out_bf16 = gated_rmsnorm_ref(y.to(torch.bfloat16), z.to(torch.bfloat16), weight, eps, group_size)
    assert out_bf16.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        gated_rmsnorm_ref(y, z, weight, eps, 7)
