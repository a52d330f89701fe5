"""Mamba-3 SSM: exponential-trapezoidal discretisation, a rotating (complex) state and MIMO
(Lahoti, Li, Chen, Wang, Bick, Kolter, Dao, Gu 2026, "Mamba-3", arXiv 2603.15569, Sec. 3).

For every batch row and head h (group g = h // (H / G)), with a state of P x N entries, ranks
r = 1..R (R = 1: SISO), and Δ_t, A_t, λ_t given (the mixer computes them: Δ = softplus(dd_dt +
dt_bias), A = min(-f(dd_A), -A_floor), λ = sigmoid(trap))::

    θ_t   = θ_{t-1} + π tanh(angles_t) Δ_t   (mod 2π)        S angles per head, θ_{-1}: the state
    q_t,r = Rot(θ_t) (C[t, r, g] + C_bias[h, r])             the rotary form of a complex state
    k_t,r = Rot(θ_t) (B[t, r, g] + B_bias[h, r])
    v_t,r = x_t ⊙ mimo_x[h, r]   (SISO: v_t = x_t)
    α_t = exp(Δ_t A_t),   β_t = (1 - λ_t) Δ_t α_t,   γ_t = λ_t Δ_t
    S_t = α_t S_{t-1} + β_t Σ_r v_{t-1,r} k_{t-1,r}^T + γ_t Σ_r v_t,r k_t,r^T        S_t: [P, N]
    y_t,r = S_t q_t,r + D v_t,r

The β term is the trapezoid (the paper's Eq. for the exponential-trapezoidal rule): the input
enters at both ends of the step [t-1, t], weighted 1 - λ and λ; λ = 1 is Mamba-2's
exponential-Euler rule (with B C-normed and biased). ``Rot(θ)`` rotates coordinate pairs by the
angles θ_j, j < S, and leaves the other N - 2S coordinates unchanged: pairs (2j, 2j+1) in the SISO
kernels (``pairwise=True``), pairs (j, j + N/2) in the MIMO kernels. The rotation is how the paper
realises its complex-valued state (Sec. 3.2: a complex diagonal SSM equals a real one whose B and C
are rotated by the cumulative angles).

The decoding state is four tensors: θ [B, H, S] (fp32), the SSM state S [B, H, P, N] (fp32),
the previous position's rotated keys k [B, R, H, N] (fp32) and its input x [B, H, P] (x's dtype),
the last two for the β term of the next position.

Where the facts were read (state-spaces/mamba at e9594ce): the mixer
``mamba_ssm/modules/mamba3.py`` (split order, A's activation and floor, softplus Δ, B/C RMSNorm,
biases, MIMO projections, state shapes), the SISO references in
``tests/ops/triton/test_mamba3_siso.py`` (``mamba3_siso_step_ref``: the recurrence above with
pairs (2j, 2j+1), angles wrapped to [0, 2π); ``mamba3_siso_fwd_ref``: the chunked form with the
``shifted_gamma`` correction and the initial-state term ``(1 - λ_0) Δ_0 v_{-1} k_{-1}^T``), the MIMO
chunk reference in ``tests/ops/tilelang/test_mamba3_mimo.py`` (``mamba3_MIMO_chunk_ref``: pairs
(j, j + N/2), the rank sum, D on v_r) and the decode rotary kernel
``ops/triton/mamba3/mamba3_mimo_rotary_step.py`` (MIMO pairs (j, j + N/2) in decoding too).

``mamba3_scan_ref`` computes the chunked form: inside a chunk of C positions the "attention" form
``y = (q k^T ∘ W) v`` with ``W[t, s] = exp(Σ_{s<u<=t} a_u) w_s`` (a = Δ A; w_s = γ_s + (1 - λ_{s+1})
Δ_{s+1} for s < t, the two trapezoid weights of k_s v_s, and w_t = γ_t on the diagonal, the next
position's share not having arrived yet); between chunks a loop carries the state. Padded
positions (Δ = 0) add exact zeros and multiply by exp(0) = 1, so a row's final state does not
depend on padding after it. ``mamba3_recurrent_ref`` is the loop over positions (a test oracle),
``mamba3_step_ref`` one position IN PLACE (decoding).

Shapes (glossary in ``mamba_eval.kernels``; R ranks, S angles):
    x [B, L, H, P]; dt, A, lam [B, L, H] fp32; B, C [B, L, R, G, N]; angles [B, L, S];
    B_bias, C_bias [H, R, N]; D [H]; mimo_x [H, R, P] or None (SISO);
    y [B, L, R, H, P] fp32 (the mixer gates it, contracts the ranks and casts).

``mamba3_step`` is the Triton version of ``mamba3_step_ref`` (one program per batch row and
head); the chunked scan has only its reference so far.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .utils import dot, jit, new_output, require_triton, segsum, tl, triton

_TWO_PI = 2 * math.pi


def _check_shapes(x, dt, A, lam, B, C, angles, B_bias, C_bias, D, mimo_x, state):
    """x [*lead, H, P]; dt, A, lam [*lead, H]; B, C [*lead, R, G, N]; angles [*lead, S]; with lead
    [B, L] (a sequence) or [B] (a step); ``state``: (θ, S, k, v) or None."""
    *lead, nheads, headdim = x.shape
    rank, ngroups, d_state = B.shape[-3:]
    names = "B, L" if len(lead) == 2 else "B"
    for name, t in (("dt", dt), ("A", A), ("lam", lam)):
        if t.shape != (*lead, nheads):
            raise ValueError(f"{name} must be [{names}, H] = {(*lead, nheads)}, got {tuple(t.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.shape != (*lead, rank, ngroups, d_state):
            raise ValueError(f"{name} must be [{names}, R, G, N] = {(*lead, rank, ngroups, d_state)}, "
                             f"got {tuple(t.shape)}")
    if ngroups == 0 or nheads % ngroups:
        raise ValueError(f"the number of heads H={nheads} must be a multiple of the number of groups G={ngroups}")
    n_angles = angles.shape[-1]
    if angles.shape[:-1] != tuple(lead) or not 0 < 2 * n_angles <= d_state:
        raise ValueError(f"angles must be [{names}, S] with 0 < 2 S <= N = {d_state}, got {tuple(angles.shape)}")
    for name, t in (("B_bias", B_bias), ("C_bias", C_bias)):
        if t.shape != (nheads, rank, d_state):
            raise ValueError(f"{name} must be [H, R, N] = {(nheads, rank, d_state)}, got {tuple(t.shape)}")
    if D.shape != (nheads,):
        raise ValueError(f"D must be [H] = ({nheads},), got {tuple(D.shape)}")
    if mimo_x is None and rank != 1:
        raise ValueError(f"mimo_x is required for R = {rank} ranks")
    if mimo_x is not None and mimo_x.shape != (nheads, rank, headdim):
        raise ValueError(f"mimo_x must be [H, R, P] = {(nheads, rank, headdim)}, got {tuple(mimo_x.shape)}")
    if state is not None:
        batch = lead[0]
        want = ((batch, nheads, n_angles), (batch, nheads, headdim, d_state), (batch, rank, nheads, d_state),
                (batch, nheads, headdim))
        for name, t, shape in zip(("angle", "ssm", "k", "v"), state, want):
            if tuple(t.shape) != shape:
                raise ValueError(f"state {name} must be {shape}, got {tuple(t.shape)}")


def _wrap(theta: torch.Tensor) -> torch.Tensor:
    """θ reduced to [0, 2π), as the kernels keep it (cos and sin stay accurate however long the text)."""
    return theta - _TWO_PI * torch.floor(theta / _TWO_PI)


def _rotate(t: torch.Tensor, theta: torch.Tensor, pairwise: bool) -> torch.Tensor:
    """Rotate coordinate pairs of t [..., N] by θ [..., S] (broadcast): pairs (2j, 2j+1) when
    ``pairwise``, else (j, j + N/2); coordinates of no pair are unchanged."""
    n, s = t.shape[-1], theta.shape[-1]
    first = torch.arange(s, device=t.device) * (2 if pairwise else 1)
    second = first + (1 if pairwise else n // 2)
    a, b = t[..., first], t[..., second]
    cos, sin = torch.cos(theta), torch.sin(theta)
    out = t.expand(*torch.broadcast_shapes(t.shape[:-1], theta.shape[:-1]), n).clone()
    out[..., first] = a * cos - b * sin
    out[..., second] = a * sin + b * cos
    return out


def _values(x: torch.Tensor, mimo_x: torch.Tensor | None) -> torch.Tensor:
    """v [..., R, H, P] fp32 from x [..., H, P]: x ⊙ mimo_x[h, r], or x itself (R = 1)."""
    x = x.float()[..., None, :, :]
    return x if mimo_x is None else x * mimo_x.float().transpose(0, 1)


def _biased(t: torch.Tensor, bias: torch.Tensor, nheads: int) -> torch.Tensor:
    """B or C [..., R, G, N] -> per head [..., R, H, N] fp32, plus the bias [H, R, N]."""
    t = t.float().repeat_interleave(nheads // t.shape[-2], dim=-2)
    return t + bias.float().transpose(0, 1)


def _angle_steps(angles: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """The angle increments π tanh(angles) Δ [..., H, S] (angles [..., S] shared by the heads)."""
    return math.pi * torch.tanh(angles.float())[..., None, :] * dt[..., None]


def _kv(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Σ_r v_r k_r^T: v [B, R, H, P], k [B, R, H, N] -> [B, H, P, N]."""
    return torch.einsum("brhp,brhn->bhpn", v, k)


def _advance(theta, ssm, k_prev, v_prev, q, k, v, dt, A, lam, dtheta, D, pairwise):
    """One position of the recurrence (module docstring), everything fp32; q, k unrotated.
    Returns (y [B, R, H, P], θ, S, rotated k)."""
    theta = _wrap(theta + dtheta)
    q = _rotate(q, theta[:, None], pairwise)
    k = _rotate(k, theta[:, None], pairwise)
    alpha = torch.exp(dt * A)
    beta = (1 - lam) * dt * alpha
    gamma = lam * dt
    ssm = (alpha[..., None, None] * ssm + beta[..., None, None] * _kv(v_prev, k_prev)
           + gamma[..., None, None] * _kv(v, k))
    y = torch.einsum("bhpn,brhn->brhp", ssm, q) + D.float()[:, None] * v
    return y, theta, ssm, k


def _zero_state(x, B, n_angles):
    batch, nheads, headdim = x.shape[0], x.shape[-2], x.shape[-1]
    rank, d_state = B.shape[-3], B.shape[-1]
    zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=x.device)  # noqa: E731
    return (zeros(batch, nheads, n_angles), zeros(batch, nheads, headdim, d_state),
            zeros(batch, rank, nheads, d_state), torch.zeros_like(x[:, 0] if x.ndim == 4 else x))


def mamba3_recurrent_ref(
    x: torch.Tensor,  # [B, L, H, P]
    dt: torch.Tensor,  # [B, L, H] Δ
    A: torch.Tensor,  # [B, L, H]
    lam: torch.Tensor,  # [B, L, H] λ
    B: torch.Tensor,  # [B, L, R, G, N]
    C: torch.Tensor,  # [B, L, R, G, N]
    angles: torch.Tensor,  # [B, L, S]
    B_bias: torch.Tensor,  # [H, R, N]
    C_bias: torch.Tensor,  # [H, R, N]
    D: torch.Tensor,  # [H]
    mimo_x: torch.Tensor | None = None,  # [H, R, P]
    *,
    pairwise: bool = True,
    initial_state: tuple | None = None,  # (θ, S, k, v)
) -> tuple[torch.Tensor, tuple]:
    """The recurrence of the module docstring, one position at a time (slow; a test oracle).
    Returns (y [B, L, R, H, P] fp32, final (θ, S, k, v))."""
    _check_shapes(x, dt, A, lam, B, C, angles, B_bias, C_bias, D, mimo_x, initial_state)
    nheads = x.shape[2]
    theta, ssm, k_prev, x_prev = initial_state or _zero_state(x, B, angles.shape[-1])
    theta, ssm, k_prev = theta.float(), ssm.float(), k_prev.float()
    q, k, v = _biased(C, C_bias, nheads), _biased(B, B_bias, nheads), _values(x, mimo_x)
    dt, A, lam = dt.float(), A.float(), lam.float()
    dtheta = _angle_steps(angles, dt)
    v_prev, ys = _values(x_prev, mimo_x), []
    for t in range(x.shape[1]):
        y, theta, ssm, k_prev = _advance(theta, ssm, k_prev, v_prev, q[:, t], k[:, t], v[:, t], dt[:, t], A[:, t],
                                         lam[:, t], dtheta[:, t], D, pairwise)
        v_prev = v[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), (theta, ssm, k_prev, x[:, -1].clone())


def _scan_inputs(x, dt, A, lam, B, C, angles, B_bias, C_bias, D, mimo_x, chunk_size, pairwise, initial_state,
                 lengths) -> dict:
    """What the chunked form consumes, shared by ``mamba3_scan_ref`` and ``mamba3_scan``: the rotated
    q, k and the values v [b, L', R, H, *] fp32, the log-decay a, the diagonal weight γ and the
    off-diagonal weight w [b, L', H] (L' = L padded to a multiple of ``chunk_size`` with Δ = 0), the
    initial SSM state with the carried key and input folded in, and the final θ, k and x."""
    _check_shapes(x, dt, A, lam, B, C, angles, B_bias, C_bias, D, mimo_x, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, length, nheads, _ = x.shape
    n_angles = angles.shape[-1]
    theta0, ssm0, k0, x0 = initial_state or _zero_state(x, B, n_angles)

    q, k, v = _biased(C, C_bias, nheads), _biased(B, B_bias, nheads), _values(x, mimo_x)  # [b, L, R, H, *]
    dt, A, lam = dt.float(), A.float(), lam.float()
    dtheta = _angle_steps(angles, dt)  # [b, L, H, S]
    a = dt * A  # log α                                                              [b, L, H]
    gamma = lam * dt
    shifted = F.pad(((1 - lam) * dt)[:, 1:], (0, 0, 0, 1))  # (1 - λ_{s+1}) Δ_{s+1}, 0 after the end
    # The state's key and input enter the first position through β_0 = (1 - λ_0) Δ_0 α_0; α_0 is
    # applied with the decays.
    ssm0 = ssm0.float() + ((1 - lam[:, 0]) * dt[:, 0])[..., None, None] * _kv(_values(x0, mimo_x), k0.float())

    pad = (-length) % chunk_size
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        dtheta = F.pad(dtheta, (0, 0, 0, 0, 0, pad))
        a, gamma, shifted = (F.pad(t, (0, 0, 0, pad)) for t in (a, gamma, shifted))
    nchunks, T = (length + pad) // chunk_size, chunk_size

    # Angles: cumulative within each chunk, plus the angle entering it (carried, wrapped), so that
    # θ stays accurate however long the sequence.
    within = dtheta.view(batch, nchunks, T, nheads, n_angles).cumsum(2)
    starts, carry = [], theta0.float()
    for c in range(nchunks):
        starts.append(carry)
        carry = _wrap(carry + within[:, c, -1])
    theta = _wrap(torch.stack(starts, 1)[:, :, None] + within).view(batch, nchunks * T, nheads, n_angles)
    q = _rotate(q, theta[:, :, None], pairwise)
    k = _rotate(k, theta[:, :, None], pairwise)
    if lengths is None:
        last = torch.full((batch,), length - 1, dtype=torch.long, device=x.device)
    else:
        last = lengths.to(device=x.device, dtype=torch.long) - 1
    rows = torch.arange(batch, device=x.device)
    return dict(q=q, k=k, v=v, a=a, gamma=gamma, weight=gamma + shifted, ssm0=ssm0, nchunks=nchunks,
                final_theta=theta[rows, last], final_k=k[rows, last], final_x=x[rows, last].clone())


def mamba3_scan_ref(
    x: torch.Tensor,  # [B, L, H, P]
    dt: torch.Tensor,  # [B, L, H] Δ
    A: torch.Tensor,  # [B, L, H]
    lam: torch.Tensor,  # [B, L, H] λ
    B: torch.Tensor,  # [B, L, R, G, N]
    C: torch.Tensor,  # [B, L, R, G, N]
    angles: torch.Tensor,  # [B, L, S]
    B_bias: torch.Tensor,  # [H, R, N]
    C_bias: torch.Tensor,  # [H, R, N]
    D: torch.Tensor,  # [H]
    mimo_x: torch.Tensor | None = None,  # [H, R, P]
    chunk_size: int = 64,
    *,
    pairwise: bool = True,
    initial_state: tuple | None = None,  # (θ, S, k, v)
    lengths: torch.Tensor | None = None,  # [B]
) -> tuple[torch.Tensor, tuple]:
    """The chunked form (module docstring). Returns (y [B, L, R, H, P] fp32, final (θ, S, k, v)).

    L need not be a multiple of ``chunk_size`` (the tail is padded with Δ = 0). ``lengths`` (a
    LongTensor [B], 1 <= lengths[b] <= L): row b's final state is taken after its own
    ``lengths[b]`` positions; the caller sets Δ = 0 at the positions past them, which leaves θ and
    S unchanged there, and θ, k and x are read at position ``lengths[b] - 1``."""
    inp = _scan_inputs(x, dt, A, lam, B, C, angles, B_bias, C_bias, D, mimo_x, chunk_size, pairwise,
                       initial_state, lengths)
    batch, length, nheads, headdim = x.shape
    rank, nchunks, T = B.shape[2], inp["nchunks"], chunk_size

    # Chunks, heads first; a chunk's T positions x R ranks flattened position-major: [b, h, c, T R, *].
    def chunked(t):
        return t.view(batch, nchunks, T, rank, nheads, -1).permute(0, 4, 1, 2, 3, 5).reshape(
            batch, nheads, nchunks, T * rank, t.shape[-1])

    def per_head(t):  # [b, L', H] -> [b, h, c, T]
        return t.view(batch, nchunks, T, nheads).permute(0, 3, 1, 2)

    qc, kc, vc = chunked(inp["q"]), chunked(inp["k"]), chunked(inp["v"])
    a, gamma, weight = per_head(inp["a"]), per_head(inp["gamma"]), per_head(inp["weight"])
    cum = a.cumsum(-1)  # [b, h, c, T]

    # 1. Inside a chunk: y = (q k^T ∘ W) v, W[t, s] = exp(Σ_{s<u<=t} a_u) (w_s for s < t, γ_t for s = t).
    diagonal = torch.eye(T, dtype=torch.bool, device=x.device)
    W = torch.exp(segsum(a)) * torch.where(diagonal, gamma[..., :, None], weight[..., None, :])
    W = W.repeat_interleave(rank, -1).repeat_interleave(rank, -2)  # every rank pair of (t, s)
    y = ((qc @ kc.transpose(-1, -2)) * W) @ vc  # [b, h, c, T R, P]

    # 2. Each chunk's own contribution to the state after it (as if it started from zero).
    to_end = (torch.exp(cum[..., -1:] - cum) * weight).repeat_interleave(rank, -1)  # [b, h, c, T R]
    chunk_states = vc.transpose(-1, -2) @ (kc * to_end[..., None])  # [b, h, c, P, N]

    # 3. Between chunks: the state entering each chunk. A padded chunk decays by exp(0) = 1 and
    # adds zeros, so the final state is exactly the state after the last real position.
    entering, state = [], inp["ssm0"]
    for c in range(nchunks):
        entering.append(state)
        state = torch.exp(cum[:, :, c, -1])[..., None, None] * state + chunk_states[:, :, c]
    entering = torch.stack(entering, 2)  # [b, h, c, P, N]

    # 4. Each position reads the state entering its chunk, decayed to it.
    y = y + (qc @ entering.transpose(-1, -2)) * torch.exp(cum).repeat_interleave(rank, -1)[..., None]
    y = y.view(batch, nheads, nchunks, T, rank, headdim).permute(0, 2, 3, 4, 1, 5)
    y = y.reshape(batch, nchunks * T, rank, nheads, headdim)[:, :length]
    y = y + D.float()[:, None] * inp["v"][:, :length]
    return y, (inp["final_theta"], state, inp["final_k"], inp["final_x"])


# ---------------------------------------------------------------------------------------------
# Triton: the chunked scan (prefill)
# ---------------------------------------------------------------------------------------------
#
# ``_scan_inputs`` prepares the rotated q, k, the values v and the per-position a, γ, w (element-
# wise work and a cumulative sum of the angles). One program per (batch row, head, P block) then
# walks the whole sequence in steps of BLOCK_T positions x R ranks (flattened position-major, as
# in the reference's chunks), with the [P block, N] state in fp32 registers. For the flattened
# indices m of a step (position t_m), with s the cumulative a from the step start (a counted once
# per position)::
#
#     y_m = exp(s_m) q_m · S + Σ_{t_k <= t_m} (k_k · q_m) exp(s_m - s_k) W_km v_k + D v_m
#     S  <- exp(s_last) S + Σ_k exp(s_last - s_k) w_k v_k ⊗ k_k
#
# W_km = γ_k where t_k = t_m (every rank pair of one position), w_k where t_k < t_m. The state
# carries w_k, which already holds the next position's trapezoid share (1 - λ) Δ of v_k k_k, as the
# reference's chunk states do. Products run on tensor cores in the activation dtype with fp32
# accumulation (fp32 operands: full precision); the step is a chunk of the reference's form.


@jit(do_not_specialize=["L"])
def _mamba3_scan_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, g_ptr, w_ptr, d_ptr, h0_ptr,  # inputs
    y_ptr, final_ptr,  # outputs
    L, H, P, N,
    s_q_b, s_q_l, s_q_r, s_q_h, s_q_n,
    s_k_b, s_k_l, s_k_r, s_k_h, s_k_n,
    s_v_b, s_v_l, s_v_r, s_v_h, s_v_p,
    s_a_b, s_a_l, s_a_h,
    s_h0_b, s_h0_h, s_h0_p, s_h0_n,
    s_y_b, s_y_l, s_y_r, s_y_h, s_y_p,
    s_f_b, s_f_h, s_f_p, s_f_n,
    R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_pblocks = tl.cdiv(P, BLOCK_P)
    pid_h = pid % H  # heads vary fastest
    rest = pid // H
    pid_p = rest % n_pblocks
    pid_b = rest // n_pblocks
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    TR: tl.constexpr = BLOCK_T * R
    idx = tl.arange(0, TR)
    step_of = idx // R  # position inside the step of each flattened index
    rank_of = idx % R

    q_ptr += pid_b * s_q_b + pid_h * s_q_h
    k_ptr += pid_b * s_k_b + pid_h * s_k_h
    v_ptr += pid_b * s_v_b + pid_h * s_v_h
    y_ptr += pid_b * s_y_b + pid_h * s_y_h
    a_ptr += pid_b * s_a_b + pid_h * s_a_h
    g_ptr += pid_b * s_a_b + pid_h * s_a_h
    w_ptr += pid_b * s_a_b + pid_h * s_a_h
    d = tl.load(d_ptr + pid_h).to(tl.float32)
    dot_dtype = q_ptr.dtype.element_ty

    state = tl.load(
        h0_ptr + pid_b * s_h0_b + pid_h * s_h0_h + offs_p[:, None] * s_h0_p + offs_n[None, :] * s_h0_n,
        mask=mask_p[:, None] & mask_n[None, :], other=0.0,
    ).to(tl.float32)  # [BLOCK_P, BLOCK_N]
    same_or_before = step_of[:, None] <= step_of[None, :]  # [k, m]
    same = step_of[:, None] == step_of[None, :]
    for t0 in range(0, L, BLOCK_T):
        t = t0 + step_of  # [TR]
        valid = t < L
        a = tl.load(a_ptr + t * s_a_l, mask=valid & (rank_of == 0), other=0.0)  # once per position
        gam = tl.load(g_ptr + t * s_a_l, mask=valid, other=0.0)
        w = tl.load(w_ptr + t * s_a_l, mask=valid, other=0.0)
        cs = tl.cumsum(a, axis=0)  # [TR]
        total = tl.sum(a, axis=0)

        qT = tl.load(
            q_ptr + t[None, :] * s_q_l + rank_of[None, :] * s_q_r + offs_n[:, None] * s_q_n,
            mask=mask_n[:, None] & valid[None, :], other=0.0,
        )  # [BLOCK_N, TR]
        k = tl.load(
            k_ptr + t[:, None] * s_k_l + rank_of[:, None] * s_k_r + offs_n[None, :] * s_k_n,
            mask=valid[:, None] & mask_n[None, :], other=0.0,
        )  # [TR, BLOCK_N]
        vT = tl.load(
            v_ptr + t[None, :] * s_v_l + rank_of[None, :] * s_v_r + offs_p[:, None] * s_v_p,
            mask=mask_p[:, None] & valid[None, :], other=0.0,
        )  # [BLOCK_P, TR]

        acc = dot(state.to(dot_dtype), qT, DOT_PRECISION) * tl.exp(cs)[None, :]  # [BLOCK_P, TR]
        kq = dot(k, qT, DOT_PRECISION)  # [k, m]
        keep = same_or_before & valid[:, None]
        decay = tl.exp(tl.where(keep, cs[None, :] - cs[:, None], float("-inf")))
        weights = tl.where(keep, kq * decay * tl.where(same, gam[:, None], w[:, None]), 0.0)
        acc += dot(vT, weights.to(dot_dtype), DOT_PRECISION)
        acc += d * vT.to(tl.float32)
        tl.store(
            y_ptr + t[None, :] * s_y_l + rank_of[None, :] * s_y_r + offs_p[:, None] * s_y_p,
            acc, mask=mask_p[:, None] & valid[None, :],
        )

        to_end = tl.exp(total - cs) * w  # 0 where not valid
        state = state * tl.exp(total)
        state += dot((vT.to(tl.float32) * to_end[None, :]).to(dot_dtype), k, DOT_PRECISION)

    tl.store(
        final_ptr + pid_b * s_f_b + pid_h * s_f_h + offs_p[:, None] * s_f_p + offs_n[None, :] * s_f_n,
        state, mask=mask_p[:, None] & mask_n[None, :],
    )


def mamba3_scan(
    x: torch.Tensor,  # [B, L, H, P]
    dt: torch.Tensor,  # [B, L, H] Δ
    A: torch.Tensor,  # [B, L, H]
    lam: torch.Tensor,  # [B, L, H] λ
    B: torch.Tensor,  # [B, L, R, G, N]
    C: torch.Tensor,  # [B, L, R, G, N]
    angles: torch.Tensor,  # [B, L, S]
    B_bias: torch.Tensor,  # [H, R, N]
    C_bias: torch.Tensor,  # [H, R, N]
    D: torch.Tensor,  # [H]
    mimo_x: torch.Tensor | None = None,  # [H, R, P]
    chunk_size: int = 64,
    *,
    pairwise: bool = True,
    initial_state: tuple | None = None,  # (θ, S, k, v)
    lengths: torch.Tensor | None = None,  # [B]
) -> tuple[torch.Tensor, tuple]:
    """Triton version of ``mamba3_scan_ref`` (same arguments and results): the preparation in
    PyTorch, then one kernel. The launch depends on the shapes but the batch (one program per
    row, head and P block walks the whole sequence), so a row's results do not depend on the other
    rows. With bf16/fp16 x the products take q, k and v rounded to x's dtype, as mamba_ssm's
    kernels do; the state, decays and sums stay fp32."""
    require_triton("mamba3_scan")
    inp = _scan_inputs(x, dt, A, lam, B, C, angles, B_bias, C_bias, D, mimo_x, chunk_size, pairwise,
                       initial_state, lengths)
    batch, length, nheads, headdim = x.shape
    rank, d_state = B.shape[2], B.shape[-1]
    if rank & (rank - 1):
        raise ValueError(f"mamba3_scan needs a power-of-two MIMO rank, got R={rank}")
    narrow = x.dtype in (torch.float16, torch.bfloat16)
    operand = x.dtype if narrow else torch.float32
    q, k, v = (inp[n].to(operand) for n in ("q", "k", "v"))
    a, gamma, weight = (inp[n].contiguous() for n in ("a", "gamma", "weight"))
    y = new_output((batch, length, rank, nheads, headdim), torch.float32, x.device)
    final = new_output((batch, nheads, headdim, d_state), torch.float32, x.device)
    h0 = inp["ssm0"]
    block_t = max(1, (64 if narrow else 32) // rank)
    block_p = min(64 if narrow else 32, max(16, triton.next_power_of_2(headdim)))
    block_n = max(16, triton.next_power_of_2(d_state))
    grid = (batch * triton.cdiv(headdim, block_p) * nheads,)
    _mamba3_scan_kernel[grid](
        q, k, v, a, gamma, weight, D.float().contiguous(), h0, y, final,
        length, nheads, headdim, d_state,
        *q.stride(), *k.stride(), *v.stride(), *a.stride(), *h0.stride(), *y.stride(), *final.stride(),
        R=rank, BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_N=block_n, DOT_PRECISION="ieee",
        num_warps=4, num_stages=1 if not narrow else 2,
    )
    return y, (inp["final_theta"], final, inp["final_k"], inp["final_x"])


def mamba3_step_ref(
    angle_state: torch.Tensor,  # [B, H, S] fp32, updated in place
    ssm_state: torch.Tensor,  # [B, H, P, N], updated in place
    k_state: torch.Tensor,  # [B, R, H, N] fp32, updated in place
    v_state: torch.Tensor,  # [B, H, P], updated in place
    x: torch.Tensor,  # [B, H, P]
    dt: torch.Tensor,  # [B, H] Δ
    A: torch.Tensor,  # [B, H]
    lam: torch.Tensor,  # [B, H] λ
    B: torch.Tensor,  # [B, R, G, N]
    C: torch.Tensor,  # [B, R, G, N]
    angles: torch.Tensor,  # [B, S]
    B_bias: torch.Tensor,  # [H, R, N]
    C_bias: torch.Tensor,  # [H, R, N]
    D: torch.Tensor,  # [H]
    mimo_x: torch.Tensor | None = None,  # [H, R, P]
    *,
    pairwise: bool = True,
) -> torch.Tensor:
    """Advance the recurrence by one position: updates the four state tensors IN PLACE, returns
    y [B, R, H, P] fp32."""
    state = (angle_state, ssm_state, k_state, v_state)
    _check_shapes(x, dt, A, lam, B, C, angles, B_bias, C_bias, D, mimo_x, state)
    nheads = x.shape[1]
    dt, A, lam = dt.float(), A.float(), lam.float()
    y, theta, ssm, k = _advance(
        angle_state.float(), ssm_state.float(), k_state.float(), _values(v_state, mimo_x),
        _biased(C, C_bias, nheads), _biased(B, B_bias, nheads), _values(x, mimo_x), dt, A, lam,
        _angle_steps(angles, dt), D, pairwise)
    angle_state.copy_(theta)
    ssm_state.copy_(ssm)
    k_state.copy_(k)
    v_state.copy_(x)
    return y


# ---------------------------------------------------------------------------------------------
# Triton: the decoding step
# ---------------------------------------------------------------------------------------------
#
# One program per (batch row, head) holds the head's state S [P, N] in registers, split by the
# rotation's pairs into the first and the second coordinate of every pair j < N/2 (pairs (2j,
# 2j+1) when PAIRWISE, else (j, j + N/2)): a rotation is then element-wise on the two halves.
# Pairs j >= S get the angle 0, whose cosine 1 and sine 0 leave them exactly unchanged. Every
# value is fp32; the state is rounded once when stored, the previous input kept in x's dtype.


@jit
def _tanh(x):
    """tanh in fp32 from one exp2: sign(x) (1 - e) / (1 + e), e = exp(-2|x|) (absolute error ~1e-7)."""
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # 2 log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@jit
def _mamba3_step_kernel(
    theta_ptr, ssm_ptr, k_ptr, v_ptr,  # states: [B, H, S], [B, H, P, N], [B, R, H, N], [B, H, P]
    x_ptr, dt_ptr, a_ptr, lam_ptr, b_ptr, c_ptr, ang_ptr,  # [B, H, P], [B, H] x3, [B, R, G, N] x2, [B, S]
    bb_ptr, cb_ptr, d_ptr, mx_ptr,  # [H, R, N] x2, [H], [H, R, P] (MIMO)
    y_ptr,  # [B, R, H, P] fp32 out
    H, P, N, S, HEADS_PER_GROUP,
    s_th_b, s_th_h, s_th_s,
    s_ss_b, s_ss_h, s_ss_p, s_ss_n,
    s_k_b, s_k_r, s_k_h, s_k_n,
    s_v_b, s_v_h, s_v_p,
    s_x_b, s_x_h, s_x_p,
    s_dt_b, s_dt_h, s_a_b, s_a_h, s_l_b, s_l_h,
    s_b_b, s_b_r, s_b_g, s_b_n,
    s_c_b, s_c_r, s_c_g, s_c_n,
    s_ang_b, s_ang_s,
    R: tl.constexpr, PAIRWISE: tl.constexpr, MIMO: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    g = h // HEADS_PER_GROUP
    half = N // 2
    j = tl.arange(0, BLOCK_J)  # pair index
    mask_j = j < half
    if PAIRWISE:
        first = 2 * j
        second = first + 1
    else:
        first = j
        second = j + half
    p = tl.arange(0, BLOCK_P)
    mask_p = p < P
    mask_pj = mask_p[:, None] & mask_j[None, :]

    dt = tl.load(dt_ptr + b * s_dt_b + h * s_dt_h).to(tl.float32)
    a = tl.load(a_ptr + b * s_a_b + h * s_a_h).to(tl.float32)
    lam = tl.load(lam_ptr + b * s_l_b + h * s_l_h).to(tl.float32)
    alpha = tl.exp(dt * a)
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt

    # The states are read, then overwritten in place. A vector of BLOCK_J or BLOCK_P elements is
    # held by more threads than it has elements (replicated across warps), and warps do not run in
    # step: without a barrier between the reads and the writes of the same addresses, a warp can
    # read a value another warp has already replaced.
    mask_s = j < S
    theta = tl.load(theta_ptr + b * s_th_b + h * s_th_h + j * s_th_s, mask=mask_s, other=0.0)
    ss = ssm_ptr + b * s_ss_b + h * s_ss_h + p[:, None] * s_ss_p
    s1 = alpha * tl.load(ss + first[None, :] * s_ss_n, mask=mask_pj, other=0.0).to(tl.float32)  # [BP, BJ]
    s2 = alpha * tl.load(ss + second[None, :] * s_ss_n, mask=mask_pj, other=0.0).to(tl.float32)
    x_prev = tl.load(v_ptr + b * s_v_b + h * s_v_h + p * s_v_p, mask=mask_p, other=0.0).to(tl.float32)
    tl.debug_barrier()

    # θ_t = wrap(θ_{t-1} + π tanh(angles) Δ) for the S rotated pairs; 0 (no rotation) for the rest.
    ang = tl.load(ang_ptr + b * s_ang_b + j * s_ang_s, mask=mask_s, other=0.0).to(tl.float32)
    theta = theta + 3.141592653589793 * _tanh(ang) * dt
    theta = theta - 6.283185307179586 * tl.floor(theta / 6.283185307179586)
    theta = tl.where(mask_s, theta, 0.0)
    tl.store(theta_ptr + b * s_th_b + h * s_th_h + j * s_th_s, theta, mask=mask_s)
    cos = tl.cos(theta)
    sin = tl.sin(theta)

    x = tl.load(x_ptr + b * s_x_b + h * s_x_h + p * s_x_p, mask=mask_p, other=0.0)
    xf = x.to(tl.float32)
    for r in tl.static_range(R):
        v = xf
        v_prev = x_prev
        if MIMO:
            mx = tl.load(mx_ptr + (h * R + r) * P + p, mask=mask_p, other=0.0).to(tl.float32)
            v = xf * mx
            v_prev = x_prev * mx
        kp = k_ptr + b * s_k_b + r * s_k_r + h * s_k_h
        k1_prev = tl.load(kp + first * s_k_n, mask=mask_j, other=0.0)
        k2_prev = tl.load(kp + second * s_k_n, mask=mask_j, other=0.0)
        tl.debug_barrier()  # every read of this rank's keys before they are replaced below
        bp = b_ptr + b * s_b_b + r * s_b_r + g * s_b_g
        bias = bb_ptr + (h * R + r) * N
        kb1 = tl.load(bp + first * s_b_n, mask=mask_j, other=0.0).to(tl.float32) + \
            tl.load(bias + first, mask=mask_j, other=0.0).to(tl.float32)
        kb2 = tl.load(bp + second * s_b_n, mask=mask_j, other=0.0).to(tl.float32) + \
            tl.load(bias + second, mask=mask_j, other=0.0).to(tl.float32)
        k1 = kb1 * cos - kb2 * sin
        k2 = kb1 * sin + kb2 * cos
        tl.store(kp + first * s_k_n, k1, mask=mask_j)
        tl.store(kp + second * s_k_n, k2, mask=mask_j)
        s1 += beta * v_prev[:, None] * k1_prev[None, :] + gamma * v[:, None] * k1[None, :]
        s2 += beta * v_prev[:, None] * k2_prev[None, :] + gamma * v[:, None] * k2[None, :]
    tl.store(ss + first[None, :] * s_ss_n, s1.to(ssm_ptr.dtype.element_ty), mask=mask_pj)
    tl.store(ss + second[None, :] * s_ss_n, s2.to(ssm_ptr.dtype.element_ty), mask=mask_pj)
    tl.store(v_ptr + b * s_v_b + h * s_v_h + p * s_v_p, x, mask=mask_p)

    d = tl.load(d_ptr + h).to(tl.float32)
    for r in tl.static_range(R):
        v = xf
        if MIMO:
            v = xf * tl.load(mx_ptr + (h * R + r) * P + p, mask=mask_p, other=0.0).to(tl.float32)
        cp = c_ptr + b * s_c_b + r * s_c_r + g * s_c_g
        bias = cb_ptr + (h * R + r) * N
        qb1 = tl.load(cp + first * s_c_n, mask=mask_j, other=0.0).to(tl.float32) + \
            tl.load(bias + first, mask=mask_j, other=0.0).to(tl.float32)
        qb2 = tl.load(cp + second * s_c_n, mask=mask_j, other=0.0).to(tl.float32) + \
            tl.load(bias + second, mask=mask_j, other=0.0).to(tl.float32)
        q1 = qb1 * cos - qb2 * sin
        q2 = qb1 * sin + qb2 * cos
        y = tl.sum(s1 * q1[None, :], axis=1) + tl.sum(s2 * q2[None, :], axis=1) + d * v
        tl.store(y_ptr + ((b * R + r) * H + h) * P + p, y, mask=mask_p)


def mamba3_step(
    angle_state: torch.Tensor,  # [B, H, S] fp32, updated in place
    ssm_state: torch.Tensor,  # [B, H, P, N], updated in place
    k_state: torch.Tensor,  # [B, R, H, N] fp32, updated in place
    v_state: torch.Tensor,  # [B, H, P], updated in place
    x: torch.Tensor,  # [B, H, P]
    dt: torch.Tensor,  # [B, H] Δ
    A: torch.Tensor,  # [B, H]
    lam: torch.Tensor,  # [B, H] λ
    B: torch.Tensor,  # [B, R, G, N]
    C: torch.Tensor,  # [B, R, G, N]
    angles: torch.Tensor,  # [B, S]
    B_bias: torch.Tensor,  # [H, R, N]
    C_bias: torch.Tensor,  # [H, R, N]
    D: torch.Tensor,  # [H]
    mimo_x: torch.Tensor | None = None,  # [H, R, P]
    *,
    pairwise: bool = True,
) -> torch.Tensor:
    """Triton version of ``mamba3_step_ref`` (same arguments, results and in-place updates): one
    launch, no host synchronisation (CUDA-graph safe). Any strides for every tensor but the
    weights (B_bias, C_bias, D, mimo_x are made contiguous: they are small)."""
    require_triton("mamba3_step")
    state = (angle_state, ssm_state, k_state, v_state)
    _check_shapes(x, dt, A, lam, B, C, angles, B_bias, C_bias, D, mimo_x, state)
    batch, nheads, headdim = x.shape
    rank, ngroups, d_state = B.shape[-3:]
    n_angles = angles.shape[-1]
    if d_state % 2:
        raise ValueError(f"mamba3_step needs an even d_state (coordinate pairs), got N={d_state}")
    if angle_state.dtype != torch.float32 or k_state.dtype != torch.float32:
        raise ValueError("the angle and key states must be float32")
    y = new_output((batch, rank, nheads, headdim), torch.float32, x.device)
    if batch == 0:
        return y
    B_bias, C_bias, D = B_bias.contiguous(), C_bias.contiguous(), D.contiguous()
    mimo = mimo_x is not None
    mx = mimo_x.contiguous() if mimo else x
    _mamba3_step_kernel[(batch, nheads)](
        angle_state, ssm_state, k_state, v_state, x, dt, A, lam, B, C, angles, B_bias, C_bias, D, mx, y,
        nheads, headdim, d_state, n_angles, nheads // ngroups,
        *angle_state.stride(), *ssm_state.stride(), *k_state.stride(), *v_state.stride(), *x.stride(),
        *dt.stride(), *A.stride(), *lam.stride(), *B.stride(), *C.stride(), *angles.stride(),
        R=rank, PAIRWISE=pairwise, MIMO=mimo,
        BLOCK_P=max(2, triton.next_power_of_2(headdim)), BLOCK_J=max(2, triton.next_power_of_2(d_state // 2)),
        num_warps=4,
    )
    return y
