"""Mamba-2 SSD scan: a selective SSM whose A is one scalar per head (Dao & Gu 2024, Sec. 6-7, Listing 1).

For every batch row b and head h, with a state of P x N entries, and group g = h // (H / G)::

    Δ_t  = softplus(dt[b, t, h] + dt_bias[h])                (softplus only if dt_softplus)
    S_t  = exp(Δ_t A[h]) S_{t-1} + Δ_t x[b, t, h, :] ⊗ B[b, t, g, :]        S_t: [P, N]
    y_t  = S_t C[b, t, g, :] + D[h] x[b, t, h, :]

``S_{-1}`` is ``initial_state`` (zeros when None). Because the decay ``exp(Δ_t A[h])`` is a scalar,
the map x -> y is a masked, attention-like matrix ("state space duality"), and the paper computes
it chunk by chunk (``ssd_scan_ref``): inside each chunk of C positions the quadratic form
(diagonal blocks), between chunks a short recurrence over the chunk states (off-diagonal
blocks). ``ssd_recurrent_ref`` is the plain loop over positions, kept as a test oracle.

Shapes (glossary in ``mamba_eval.kernels``):
    x [B, L, H, P]; dt [B, L, H]; A, D, dt_bias [H]; B, C [B, L, G, N]; state [B, H, P, N].

All arithmetic is fp32 (Δ + bias and softplus included); ``y`` is returned in ``x.dtype``, the
state in fp32. No Δ clamping (mamba_ssm's default ``dt_limit=(0, inf)``). ``ssd_state_update_ref``
advances ``state`` by one position IN PLACE.

Triton kernels (``ssd_scan``, ``ssd_state_update``; same signatures as the references, plus
optional output buffers). ``ssd_scan`` runs one or two kernels:

1. ``_ssd_chunk_fwd_kernel`` (always): one program per (batch row, segment of ``seg`` chunks, head,
   P block) walks its segment in steps of T = 64 positions with the full [P, N] state in fp32
   registers. Each step computes the step's B C^T on tensor cores, then
   ``y = exp(s) C·S + (B C^T ∘ decay mask)^T Δx + D x`` and ``S <- exp(s_last) S + (Δx·decay)^T B``
   (Δ, bias and softplus fused; the decay mask is exact, one exp per (k <= m) pair of the T x T
   tile). No intermediate touches memory when ``seg`` covers the whole sequence, which the wrapper
   chooses when batch x heads fills the GPU; the last segment writes the final state.
2. ``_ssd_state_fwd_kernel`` (only when there are several segments: few batch rows and heads, long
   sequences): walks each (batch row, head, P block, N block) along the sequence, stores the state
   entering every segment (in the activation dtype), so that the output programs run in
   parallel over segments.

Matrix products run on tensor cores with fp32 accumulation: operands in the activation dtype
(bf16/fp16 inputs round the carried state, Δ-weighted x and the masked B C^T weights to it, as
mamba_ssm does), fp32 operands multiply in full precision. ``chunk_size`` sets where states are
stored between segments; results match the reference up to rounding. ``ssd_state_update`` updates
the state IN PLACE with no autotuning and no host synchronisation, so it can be captured in a CUDA graph.

Cost of one ``ssd_scan`` (e: bytes per activation element; T = 64). It must move
``B*L*(2*H*P + H + 2*G*N)*e`` bytes (read x, Δ, B, C; write y) plus the final state ``B*H*P*N*4``
(and the initial state when given). With a state pass (k segments) it also reads x again and moves
``2*B*(k-1)*H*P*N*e`` bytes of segment states; B and C tiles are re-read by every head of a group,
mostly from L2. Tensor-core flops: ``B*L*H*(4*P*N + 2*T*(N + P))``, plus ``2*B*L*H*P*N`` for the
state pass; exponentials: about ``B*L*H*(T + 3)``. Measured on the H200 (bf16, P 64, N 128), the
output kernel is bound neither by bytes nor by flops but by the latency of its dependent
per-step chain (about 3 us per step and program), which is why batch x heads, not bytes, sets
its speed. ``ssd_state_update`` moves ``2*B*H*P*N*4`` bytes of fp32 state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import discretise_dt, dot, jit, new_output, require_triton, segsum, sm_count, softplus_log1p, tl, triton


def _check_shapes(x, dt, A, B, C, D, dt_bias, state, state_name="initial_state"):
    """x [*lead, H, P], dt [*lead, H], B and C [*lead, G, N] with lead [B, L] (a scan) or [B] (a
    step); A, D, dt_bias [H]; ``state`` (called ``state_name`` in errors) [B, H, P, N]."""
    *lead, nheads, headdim = x.shape
    ngroups, d_state = B.shape[-2:]
    lead_names = "B, L" if len(lead) == 2 else "B"
    if dt.shape != (*lead, nheads):
        raise ValueError(f"dt must be [{lead_names}, H] = {(*lead, nheads)}, got {tuple(dt.shape)}")
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if t is not None and t.shape != (nheads,):
            raise ValueError(f"{name} must be [H] = ({nheads},), got {tuple(t.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.shape != (*lead, ngroups, d_state):
            raise ValueError(
                f"{name} must be [{lead_names}, G, N] = {(*lead, ngroups, d_state)}, got {tuple(t.shape)}"
            )
    if ngroups == 0 or nheads % ngroups != 0:
        raise ValueError(f"the number of heads H={nheads} must be a multiple of the number of groups G={ngroups}")
    if state is not None and state.shape != (lead[0], nheads, headdim, d_state):
        raise ValueError(
            f"{state_name} must be [B, H, P, N] = {(lead[0], nheads, headdim, d_state)}, got {tuple(state.shape)}"
        )


def ssd_scan_ref(
    x: torch.Tensor,  # [B, L, H, P]
    dt: torch.Tensor,  # [B, L, H]
    A: torch.Tensor,  # [H]
    B: torch.Tensor,  # [B, L, G, N]
    C: torch.Tensor,  # [B, L, G, N]
    chunk_size: int,
    D: torch.Tensor | None = None,  # [H]
    dt_bias: torch.Tensor | None = None,  # [H]
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,  # [B, H, P, N]
    *,
    batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD algorithm (the paper's Listing 1, vectorised over chunks).

    Returns ``(y [B, L, H, P] in x.dtype, final_state [B, H, P, N] fp32)``. L need not be a multiple
    of ``chunk_size``: the tail is padded with Δ = 0 (decay 1, no input), which leaves the state
    unchanged, and the padded outputs are dropped. ``batch_invariant`` is accepted for the
    kernel's signature and ignored.
    """
    _check_shapes(x, dt, A, B, C, D, dt_bias, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, length, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]

    dt = discretise_dt(dt, dt_bias, dt_softplus)  # Δ [B, L, H] fp32
    xf = x.float()
    X = xf * dt[..., None]  # Δ x                                  [B, L, H, P]
    a = A.float() * dt  # log of the per-step decay, Δ A         [B, L, H]
    Bh = B.float().repeat_interleave(heads_per_group, dim=2)  # [B, L, H, N]
    Ch = C.float().repeat_interleave(heads_per_group, dim=2)  # [B, L, H, N]

    pad = (-length) % chunk_size
    if pad:
        X, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, Bh, Ch))
        a = F.pad(a, (0, 0, 0, pad))
    nchunks = (length + pad) // chunk_size
    # Split the time axis into (chunk c, position l) and put heads before chunks for the decays.
    X = X.reshape(batch, nchunks, chunk_size, nheads, headdim)  # [b, c, l, h, p]
    Bh = Bh.reshape(batch, nchunks, chunk_size, nheads, -1)  # [b, c, l, h, n]
    Ch = Ch.reshape(batch, nchunks, chunk_size, nheads, -1)  # [b, c, l, h, n]
    a = a.reshape(batch, nchunks, chunk_size, nheads).permute(0, 3, 1, 2)  # [b, h, c, l]
    a_cumsum = torch.cumsum(a, dim=-1)  # [b, h, c, l]

    # 1. Diagonal blocks: within a chunk, y = (C B^T ∘ decay mask) X, the "attention" form.
    decay = torch.exp(segsum(a))  # [b, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bhcls", Ch, Bh) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, X)

    # 2. State of each chunk on its own (as if it started from zero), at the chunk's end.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # [b, h, c, l]
    chunk_states = torch.einsum("bclhn,bclhp->bchpn", Bh * decay_to_end.permute(0, 2, 3, 1)[..., None], X)

    # 3. Recurrence over chunks: the true state entering each chunk (plus the final state).
    if initial_state is None:
        initial_state = chunk_states.new_zeros(batch, nheads, headdim, chunk_states.shape[-1])
    chunk_states = torch.cat([initial_state.float()[:, None], chunk_states], dim=1)  # [b, c+1, h, p, n]
    chunk_decay = torch.exp(segsum(F.pad(a_cumsum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, chunk_states)
    states, final_state = states[:, :-1], states[:, -1].clone()  # [b, c, h, p, n], [b, h, p, n]

    # 4. Off-diagonal blocks: each position reads the state entering its chunk, decayed to it.
    decay_from_start = torch.exp(a_cumsum).permute(0, 2, 3, 1)[..., None]  # [b, c, l, h, 1]
    y_off = torch.einsum("bclhn,bchpn->bclhp", Ch, states) * decay_from_start

    y = (y_diag + y_off).reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :length]
    if D is not None:
        y = y + D.float()[:, None] * xf
    return y.to(x.dtype), final_state


def ssd_recurrent_ref(
    x: torch.Tensor,  # [B, L, H, P]
    dt: torch.Tensor,  # [B, L, H]
    A: torch.Tensor,  # [H]
    B: torch.Tensor,  # [B, L, G, N]
    C: torch.Tensor,  # [B, L, G, N]
    D: torch.Tensor | None = None,  # [H]
    dt_bias: torch.Tensor | None = None,  # [H]
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,  # [B, H, P, N]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same map as ``ssd_scan_ref`` as a sequential loop over positions (slow; a test oracle)."""
    _check_shapes(x, dt, A, B, C, D, dt_bias, initial_state)
    batch, length, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    dt = discretise_dt(dt, dt_bias, dt_softplus)
    xf = x.float()
    Bh = B.float().repeat_interleave(heads_per_group, dim=2)
    Ch = C.float().repeat_interleave(heads_per_group, dim=2)
    if initial_state is None:
        state = xf.new_zeros(batch, nheads, headdim, B.shape[-1])
    else:
        state = initial_state.float().clone()
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A.float())[:, :, None, None]  # [B, H, 1, 1]
        inp = (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # [B, H, P, N]
        state = decay * state + inp
        ys.append((state * Ch[:, t, :, None, :]).sum(-1))  # [B, H, P]
    y = torch.stack(ys, dim=1) if ys else xf.clone()
    if D is not None:
        y = y + D.float()[:, None] * xf
    return y.to(x.dtype), state


def ssd_state_update_ref(
    state: torch.Tensor,  # [B, H, P, N] fp32, updated in place
    x: torch.Tensor,  # [B, H, P]
    dt: torch.Tensor,  # [B, H]
    A: torch.Tensor,  # [H]
    B: torch.Tensor,  # [B, G, N]
    C: torch.Tensor,  # [B, G, N]
    D: torch.Tensor | None = None,  # [H]
    dt_bias: torch.Tensor | None = None,  # [H]
    dt_softplus: bool = True,
) -> torch.Tensor:
    """Advance the recurrence by one position: updates ``state`` IN PLACE, returns ``y [B, H, P]`` in x.dtype."""
    _check_shapes(x, dt, A, B, C, D, dt_bias, state, "state")
    nheads, ngroups = x.shape[1], B.shape[1]
    dt = discretise_dt(dt, dt_bias, dt_softplus)  # [B, H]
    xf = x.float()
    Bh = B.float().repeat_interleave(nheads // ngroups, dim=1)[:, :, None, :]  # [B, H, 1, N]
    Ch = C.float().repeat_interleave(nheads // ngroups, dim=1)[:, :, None, :]  # [B, H, 1, N]
    decay = torch.exp(dt * A.float())[:, :, None, None]  # [B, H, 1, 1]
    new_state = decay * state.float() + (dt[:, :, None] * xf)[..., None] * Bh
    state.copy_(new_state)
    y = (new_state * Ch).sum(-1)
    if D is not None:
        y = y + D.float()[:, None] * xf
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@jit(do_not_specialize=["L", "nchunks", "n_steps", "store_every"])
def _ssd_state_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, dt_bias_ptr, B_ptr, h0_ptr,  # inputs
    states_ptr,  # output
    L, H, P, N, Q, nchunks, n_steps, store_every, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_h0_s, stride_h0_h, stride_h0_p, stride_h0_n,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr,
    NSUB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Carry the state of one (batch row, head, P block, N block) along the first n_steps / NSUB chunks.

    Each step takes BLOCK_T positions of one chunk (NSUB steps per chunk):
    ``S <- exp(Σ Δ·A) S + Σ_t exp(Δ·A summed after t) Δ_t x_t ⊗ B_t``, starting from the initial
    state at position 0. At the end of chunk c, when ``c + 1`` is a multiple of ``store_every``,
    S goes to ``states[b, c]``.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_pblocks = tl.cdiv(P, BLOCK_P)
    n_nblocks = tl.cdiv(N, BLOCK_N)
    pid_pn = pid % (n_pblocks * n_nblocks)
    pid_bh = pid // (n_pblocks * n_nblocks)
    pid_b = pid_bh // H
    pid_h = pid_bh % H
    pid_g = pid_h // heads_per_group
    offs_p = (pid_pn // n_nblocks) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    offs_n = (pid_pn % n_nblocks) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]

    x_ptr += pid_b * stride_x_b + pid_h * stride_x_h
    dt_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h
    B_ptr += pid_b * stride_B_b + pid_g * stride_B_g
    states_ptr += (pid_b * (nchunks - 1) * H + pid_h) * P * N  # [B, nchunks - 1, H, P, N]
    A = tl.load(A_ptr + pid_h).to(tl.float32)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + pid_h).to(tl.float32)
    dot_dtype = x_ptr.dtype.element_ty

    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)  # S[p, n]
    for i in range(n_steps):
        c = i // NSUB
        sub = i % NSUB
        offs_q = sub * BLOCK_T + tl.arange(0, BLOCK_T)  # position inside the chunk   [BLOCK_T]
        offs_t = (c * Q + offs_q).to(tl.int64)  # position in the sequence      [BLOCK_T]
        valid = (offs_q < Q) & (offs_t < L)
        step_start = c * Q + sub * BLOCK_T

        dt = tl.load(dt_ptr + offs_t * stride_dt_l, mask=valid, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            dt += dt_bias
        if DT_SOFTPLUS:
            dt = softplus_log1p(dt)
        dt = tl.where(valid, dt, 0.0)  # Δ
        dA = dt * A
        cs = tl.cumsum(dA, axis=0)  # Σ Δ·A from the step start
        total = tl.sum(dA, axis=0)
        seq = pid_b
        seq_start = 0  # the row's first position, where the initial state enters
        w = tl.exp(total - cs) * dt  # decay to the step end, × Δ: 0 where not valid (Δ = 0 there)

        x_t = tl.load(
            x_ptr + offs_t[None, :] * stride_x_l + offs_p[:, None] * stride_x_p,
            mask=valid[None, :] & (offs_p[:, None] < P), other=0.0,
        )  # [BLOCK_P, BLOCK_T]
        B_t = tl.load(
            B_ptr + offs_t[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
            mask=valid[:, None] & (offs_n[None, :] < N), other=0.0,
        )  # [BLOCK_T, BLOCK_N]
        update = dot((x_t * w[None, :]).to(dot_dtype), B_t.to(dot_dtype), DOT_PRECISION)  # [BLOCK_P, BLOCK_N]

        carried = seq_start < step_start  # the row was running before this step
        state = tl.where(carried, state * tl.exp(total), 0.0)
        if HAS_H0:
            before = tl.sum(tl.where(offs_t < seq_start, dA, 0.0), axis=0)  # Σ Δ·A before the start
            h0 = tl.load(
                h0_ptr + seq * stride_h0_s + pid_h * stride_h0_h
                + offs_p[:, None] * stride_h0_p + offs_n[None, :] * stride_h0_n,
                mask=(offs_p[:, None] < tl.where(carried, 0, P)) & (offs_n[None, :] < N), other=0.0,
            ).to(tl.float32)
            state += h0 * tl.exp(total - before)
        state += update

        stored = (sub == NSUB - 1) & (c < nchunks - 1) & ((c + 1) % store_every == 0)
        tl.store(
            states_ptr + c * H * P * N + offs_p[:, None] * N + offs_n[None, :],
            state.to(states_ptr.dtype.element_ty),
            mask=(offs_p[:, None] < tl.where(stored, P, 0)) & (offs_n[None, :] < N),
        )


@jit(do_not_specialize=["L", "nchunks", "seg_chunks"])
def _ssd_chunk_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, dt_bias_ptr, B_ptr, C_ptr, D_ptr, states_ptr, h0_ptr,
    y_ptr, final_ptr,
    L, H, P, N, Q, nchunks, seg_chunks, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_h0_s, stride_h0_h, stride_h0_p, stride_h0_n,
    stride_y_b, stride_y_l, stride_y_h, stride_y_p,
    stride_f_s, stride_f_h, stride_f_p, stride_f_n,
    HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y for one (batch row, segment of seg_chunks chunks, head, P block), walking the segment in steps of BLOCK_T.

    The program starts from the state entering its segment (``states`` written by the state pass,
    or the initial state / zeros for the first segment) and keeps the full [P block, N] state in
    fp32 registers. For the positions m of a step, with s the cumulative Δ·A from the step start::

        y_m = exp(s_m) C_m · S + Σ_{k <= m} (B_k · C_m) exp(s_m - s_k) Δ_k x_k + D x_m
        S  <- exp(s_last) S + Σ_k exp(s_last - s_k) Δ_k x_k ⊗ B_k

    Products run transposed, [P, *] on the left, so that every tensor-core product has 64 or more
    rows. The last segment writes the final state.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_pblocks = tl.cdiv(P, BLOCK_P)
    n_segs = tl.cdiv(nchunks, seg_chunks)
    pid_h = pid % H  # heads vary fastest: programs running together share B and C tiles in L2
    rest = pid // H
    pid_p = rest % n_pblocks
    rest = rest // n_pblocks
    pid_s = rest % n_segs
    pid_b = rest // n_segs
    pid_g = pid_h // heads_per_group
    t_begin = pid_s * seg_chunks * Q
    t_end = tl.minimum(t_begin + seg_chunks * Q, L)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_p = offs_p < P
    mask_n = offs_n < N

    x_ptr += pid_b * stride_x_b + pid_h * stride_x_h
    y_ptr += pid_b * stride_y_b + pid_h * stride_y_h
    dt_ptr += pid_b * stride_dt_b + pid_h * stride_dt_h
    B_ptr += pid_b * stride_B_b + pid_g * stride_B_g
    C_ptr += pid_b * stride_C_b + pid_g * stride_C_g
    A = tl.load(A_ptr + pid_h).to(tl.float32)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + pid_h).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + pid_h).to(tl.float32)
    dot_dtype = x_ptr.dtype.element_ty

    # The state entering the segment: written by the state pass, or the initial state.
    state = tl.load(
        states_ptr + ((pid_b * (nchunks - 1) + pid_s * seg_chunks - 1) * H + pid_h) * P * N
        + offs_p[:, None] * N + offs_n[None, :],
        mask=(offs_p[:, None] < tl.where(pid_s > 0, P, 0)) & mask_n[None, :], other=0.0,
    ).to(tl.float32)  # [BLOCK_P, BLOCK_N]
    if HAS_H0:
        state += tl.load(
            h0_ptr + pid_b * stride_h0_s + pid_h * stride_h0_h
            + offs_p[:, None] * stride_h0_p + offs_n[None, :] * stride_h0_n,
            mask=(offs_p[:, None] < tl.where(pid_s == 0, P, 0)) & mask_n[None, :], other=0.0,
        ).to(tl.float32)

    offs_r = tl.arange(0, BLOCK_T)
    causal = offs_r[:, None] <= offs_r[None, :]  # [k, m]: k at or before m
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + offs_r  # [BLOCK_T]
        valid = offs_t < t_end
        dt = tl.load(dt_ptr + offs_t * stride_dt_l, mask=valid, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            dt += dt_bias
        if DT_SOFTPLUS:
            dt = softplus_log1p(dt)
        dt = tl.where(valid, dt, 0.0)  # Δ
        dA = dt * A
        cs = tl.cumsum(dA, axis=0)  # Σ Δ·A from the step start, inclusive   [BLOCK_T]
        total = tl.sum(dA, axis=0)

        x_t = tl.load(
            x_ptr + offs_t[None, :] * stride_x_l + offs_p[:, None] * stride_x_p,
            mask=mask_p[:, None] & valid[None, :], other=0.0,
        )  # [BLOCK_P, BLOCK_T]
        C_t = tl.load(
            C_ptr + offs_t[None, :] * stride_C_l + offs_n[:, None] * stride_C_n,
            mask=mask_n[:, None] & valid[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_T]
        B_t = tl.load(
            B_ptr + offs_t[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
            mask=valid[:, None] & mask_n[None, :], other=0.0,
        )  # [BLOCK_T, BLOCK_N]
        cbT = dot(B_t.to(dot_dtype), C_t.to(dot_dtype), DOT_PRECISION)  # B C^T, transposed: [k, m]

        # 1. What the state entering the step contributes to y.
        inflow = dot(state.to(dot_dtype), C_t.to(dot_dtype), DOT_PRECISION)  # [BLOCK_P, BLOCK_T]
        acc = inflow * tl.exp(cs)[None, :]
        keep = causal & valid[:, None]

        # 2. The step's own inputs: (B C^T ∘ decay)^T weights, k <= m.
        decay = tl.exp(tl.where(keep, cs[None, :] - cs[:, None], float("-inf")))  # [k, m]
        weights = tl.where(keep, cbT * decay * dt[:, None], 0.0)
        acc += dot(x_t.to(dot_dtype), weights.to(dot_dtype), DOT_PRECISION)  # [BLOCK_P, BLOCK_T]
        if HAS_D:
            acc += D * x_t.to(tl.float32)
        tl.store(
            y_ptr + offs_t[None, :] * stride_y_l + offs_p[:, None] * stride_y_p,
            acc.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & valid[None, :],
        )

        # 3. The state at the step end.
        w = tl.exp(total - cs) * dt  # decay to the step end, × Δ (0 where not valid)
        state = state * tl.exp(total)
        state += dot((x_t * w[None, :]).to(dot_dtype), B_t.to(dot_dtype), DOT_PRECISION)  # [BLOCK_P, BLOCK_N]

    tl.store(
        final_ptr + pid_b * stride_f_s + pid_h * stride_f_h
        + offs_p[:, None] * stride_f_p + offs_n[None, :] * stride_f_n,
        state, mask=(offs_p[:, None] < tl.where(pid_s == n_segs - 1, P, 0)) & mask_n[None, :],
    )


@jit
def _ssd_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, y_ptr,
    H, P, N, heads_per_group,
    stride_s_b, stride_s_h, stride_s_p, stride_s_n,
    stride_x_b, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_h,
    stride_B_b, stride_B_g, stride_B_n,
    stride_C_b, stride_C_g, stride_C_n,
    stride_y_b, stride_y_h, stride_y_p,
    HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One position for one (batch row, head, P block): S <- exp(Δ A) S + Δ x ⊗ B; y = S C + D x."""
    pid = tl.program_id(0).to(tl.int64)
    n_pblocks = tl.cdiv(P, BLOCK_P)
    pid_p = pid % n_pblocks
    pid_bh = pid // n_pblocks
    pid_b = pid_bh // H
    pid_h = pid_bh % H
    pid_g = pid_h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_p = offs_p < P
    mask_n = offs_n < N
    state_ptrs = (
        state_ptr + pid_b * stride_s_b + pid_h * stride_s_h
        + offs_p[:, None] * stride_s_p + offs_n[None, :] * stride_s_n
    )  # [BLOCK_P, BLOCK_N]
    mask = mask_p[:, None] & mask_n[None, :]
    state = tl.load(state_ptrs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * stride_x_b + pid_h * stride_x_h + offs_p * stride_x_p, mask=mask_p, other=0.0)
    x = x.to(tl.float32)  # [BLOCK_P]
    dt = tl.load(dt_ptr + pid_b * stride_dt_b + pid_h * stride_dt_h).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + pid_h).to(tl.float32)
    if DT_SOFTPLUS:
        dt = softplus_log1p(dt)
    A = tl.load(A_ptr + pid_h).to(tl.float32)
    B = tl.load(B_ptr + pid_b * stride_B_b + pid_g * stride_B_g + offs_n * stride_B_n, mask=mask_n, other=0.0)
    C = tl.load(C_ptr + pid_b * stride_C_b + pid_g * stride_C_g + offs_n * stride_C_n, mask=mask_n, other=0.0)
    state = tl.exp(dt * A) * state + (dt * x)[:, None] * B.to(tl.float32)[None, :]
    tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(state * C.to(tl.float32)[None, :], axis=1)  # [BLOCK_P]
    if HAS_D:
        y += tl.load(D_ptr + pid_h).to(tl.float32) * x
    tl.store(y_ptr + pid_b * stride_y_b + pid_h * stride_y_h + offs_p * stride_y_p, y.to(y_ptr.dtype.element_ty),
             mask=mask_p)


# --------------------------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------------------------


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def ssd_scan(
    x: torch.Tensor,  # [B, L, H, P]
    dt: torch.Tensor,  # [B, L, H]
    A: torch.Tensor,  # [H]
    B: torch.Tensor,  # [B, L, G, N]
    C: torch.Tensor,  # [B, L, G, N]
    chunk_size: int,
    D: torch.Tensor | None = None,  # [H]
    dt_bias: torch.Tensor | None = None,  # [H]
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,  # [B, H, P, N]
    *,
    out: torch.Tensor | None = None,  # [B, L, H, P] x.dtype: written instead of a new y
    final_state_out: torch.Tensor | None = None,  # [B, H, P, N] fp32: written instead of a new one
    batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``ssd_scan_ref``: returns ``(y [B, L, H, P] in x.dtype, final_state fp32)``.

    Any strides are accepted (contiguous last dimensions load fastest). No host sync, no autotuning.
    ``batch_invariant``: launch with a configuration that does not depend on the batch size, so
    that every row's outputs and final state are bitwise independent of the other rows of the
    call (``_scan_config``); slower for few rows and heads with long sequences.
    """
    require_triton("ssd_scan")
    if x.dim() != 4 or B.dim() != 4:
        raise ValueError(f"x must be [B, L, H, P] and B [B, L, G, N], got {tuple(x.shape)} and {tuple(B.shape)}")
    _check_shapes(x, dt, A, B, C, D, dt_bias, initial_state)
    batch, length, nheads, headdim = x.shape
    d_state = B.shape[3]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    tensors = dict(dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, initial_state=initial_state, out=out,
                   final_state_out=final_state_out)
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: all tensors must be on one device")
    state_shape = (batch, nheads, headdim, d_state)
    if out is None:
        out = new_output(x.shape, x.dtype, x.device)
    elif out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if final_state_out is None:
        final_state_out = new_output(state_shape, torch.float32, x.device)
    elif final_state_out.shape != state_shape or final_state_out.dtype != torch.float32:
        raise ValueError(
            f"final_state_out must be {state_shape} float32, got {tuple(final_state_out.shape)} {final_state_out.dtype}"
        )
    if initial_state is not None and final_state_out.data_ptr() == initial_state.data_ptr():
        raise ValueError("final_state_out must not be initial_state: the output kernel reads it after it is written")
    if length == 0 or batch == 0:
        if initial_state is None:
            final_state_out.zero_()
        else:
            final_state_out.copy_(initial_state)
        return out, final_state_out

    cfg = _scan_config(batch, length, nheads, headdim, d_state, chunk_size, x.dtype, x.device, batch_invariant)
    _launch_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state, out, final_state_out, cfg)
    return out, final_state_out


def _scan_config(
    batch, length, nheads, headdim, d_state, chunk_size, dtype, device, batch_invariant=False
) -> dict:
    """Launch parameters of ``ssd_scan`` for these shapes (chosen by timings on an H200).

    ``seg``: chunks walked by one output program. With enough (batch row, head) pairs to fill the
    GPU, one program walks the whole sequence and the state pass is skipped; otherwise the state
    pass stores the state every ``seg`` chunks and the output programs run in parallel over
    segments (at batch 1, 4 chunks timed best against 1, 2 and 9). The output kernel runs 4 warps
    (up to 1.7x faster than 8); one program per head keeps its tensor-core products 64 rows tall
    (splitting P into 32-wide blocks was 1.6-1.9x slower).

    What depends on the batch: ``seg`` (a row whose later segments start from states of the state
    pass, stored in the activation dtype, gets other bits than a row walked in one go) and the
    state pass's tiles ``s_block_p, s_block_n, s_block_t, s_num_warps`` (its step length and
    tensor-core tile shapes change a stored state's rounding). The output kernel's tiles depend on
    P, N and the dtype only. With ``batch_invariant=True`` everything is a function of the shapes
    but the batch: ``seg`` covers the whole sequence (no state pass, as for large batches), so a
    row's outputs and final state do not depend on the other rows (nor on padding after it); the
    state pass's tiles are those of large batches too.
    """
    Q = chunk_size
    nchunks = triton.cdiv(length, Q)
    wide = dtype not in (torch.float16, torch.bfloat16)  # fp32 (or wider): smaller tiles, exact products
    sms = sm_count(device)
    block_p = _pow2(headdim)
    block_n = _pow2(d_state)
    if wide:
        block_p = min(block_p, 32)
    while block_p * block_n > 64 * 256 and block_p > 16:  # keep the fp32 state within the registers
        block_p //= 2
    rows = batch * nheads * triton.cdiv(headdim, block_p)  # output programs per segment
    if batch_invariant or rows >= 2 * sms:
        seg = nchunks  # one walk per (row, head): no state pass
    else:
        seg = 4
    cfg = dict(
        seg=seg, block_t=min(32 if wide else 64, _pow2(Q)), block_p=block_p, block_n=block_n,
        num_warps=4, num_stages=1 if wide else 2,
    )
    # The state pass: enough programs to fill the GPU: split P (x is read once either way), then N.
    s_block_p, s_block_n = min(64, _pow2(headdim)), min(128, block_n)

    def state_programs():
        return batch * nheads * triton.cdiv(headdim, s_block_p) * triton.cdiv(d_state, s_block_n)

    while not batch_invariant and state_programs() < 2 * sms:
        if s_block_p > 16:
            s_block_p //= 2
        elif s_block_n > 32:
            s_block_n //= 2
        else:
            break
    # Positions per sequential step: with few programs (few rows and heads, long sequences) the
    # walk is latency-bound, so take fewer, longer steps.
    few = not batch_invariant and state_programs() < 4 * sms
    cfg.update(
        s_block_p=s_block_p, s_block_n=s_block_n, s_block_t=min(128 if few and not wide else 64, _pow2(Q)),
        s_num_warps=8 if s_block_p * s_block_n >= 64 * 128 else 4, s_num_stages=3 if not wide else 1,
    )
    return cfg


def _launch_scan(
    x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state, out, final_state_out, cfg,
):
    """The kernels of ``ssd_scan`` on checked arguments (``cfg`` from ``_scan_config``)."""
    batch, length, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2:]
    device, Q = x.device, chunk_size
    nchunks = triton.cdiv(length, Q)
    heads_per_group = nheads // ngroups
    wide = x.dtype not in (torch.float16, torch.bfloat16)
    dot_precision = "ieee"  # only affects fp32 operands
    h0 = initial_state if initial_state is not None else final_state_out  # never read when absent
    h0_strides = initial_state.stride() if initial_state is not None else (0, 0, 0, 0)
    absent = A  # pointer argument standing in for an absent optional tensor (never read)
    seg = min(cfg["seg"], nchunks)
    n_segs = triton.cdiv(nchunks, seg)

    # 1. The state pass: the state entering every segment after the first.
    states = torch.empty(  # states[b, c]: the state after chunk c, for c + 1 a multiple of seg
        batch, max(nchunks - 1, 1), nheads, headdim, d_state, device=device,
        dtype=torch.float32 if wide else x.dtype,
    )
    walked = (n_segs - 1) * seg  # chunks the state pass walks
    s_block_p, s_block_n, s_block_t = cfg["s_block_p"], cfg["s_block_n"], cfg["s_block_t"]
    nsub = triton.cdiv(Q, s_block_t)
    n_steps = (walked - 1) * nsub + triton.cdiv(min(length, walked * Q) - (walked - 1) * Q, s_block_t)
    if walked > 0:
        grid = (batch * nheads * triton.cdiv(headdim, s_block_p) * triton.cdiv(d_state, s_block_n),)
        _ssd_state_fwd_kernel[grid](
            x, dt, A, dt_bias if dt_bias is not None else absent, B, h0, states,
            length, nheads, headdim, d_state, Q, nchunks, n_steps, seg, heads_per_group,
            *x.stride(), *dt.stride(), *B.stride(), *h0_strides,
            HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, HAS_H0=initial_state is not None,
            NSUB=nsub, BLOCK_T=s_block_t,
            BLOCK_P=s_block_p, BLOCK_N=s_block_n,
            DOT_PRECISION=dot_precision, num_warps=cfg["s_num_warps"], num_stages=cfg["s_num_stages"],
        )

    # 2. The output, segment by segment, and the final state.
    block_p = cfg["block_p"]
    grid = (batch * n_segs * triton.cdiv(headdim, block_p) * nheads,)
    _ssd_chunk_fwd_kernel[grid](
        x, dt, A, dt_bias if dt_bias is not None else absent, B, C, D if D is not None else absent, states, h0,
        out, final_state_out,
        length, nheads, headdim, d_state, Q, nchunks, seg, heads_per_group,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *h0_strides, *out.stride(), *final_state_out.stride(),
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        HAS_H0=initial_state is not None,
        BLOCK_T=cfg["block_t"], BLOCK_P=block_p, BLOCK_N=cfg["block_n"], DOT_PRECISION=dot_precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def ssd_state_update(
    state: torch.Tensor,  # [B, H, P, N], updated in place
    x: torch.Tensor,  # [B, H, P]
    dt: torch.Tensor,  # [B, H]
    A: torch.Tensor,  # [H]
    B: torch.Tensor,  # [B, G, N]
    C: torch.Tensor,  # [B, G, N]
    D: torch.Tensor | None = None,  # [H]
    dt_bias: torch.Tensor | None = None,  # [H]
    dt_softplus: bool = True,
    *,
    out: torch.Tensor | None = None,  # [B, H, P] x.dtype: written instead of a new y
) -> torch.Tensor:
    """Triton ``ssd_state_update_ref``: advances ``state`` IN PLACE (any strides, e.g. a slice of a
    cache) and returns ``y [B, H, P]`` in x.dtype. No autotuning, no host sync: CUDA-graph safe."""
    require_triton("ssd_state_update")
    if x.dim() != 3 or B.dim() != 3:
        raise ValueError(f"x must be [B, H, P] and B [B, G, N], got {tuple(x.shape)} and {tuple(B.shape)}")
    _check_shapes(x, dt, A, B, C, D, dt_bias, state, "state")
    batch, nheads, headdim = x.shape
    ngroups, d_state = B.shape[1:]
    for name, t in dict(state=state, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, out=out).items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: all tensors must be on one device")
    if out is None:
        out = new_output(x.shape, x.dtype, x.device)
    elif out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if x.numel() == 0:
        return out
    block_n = triton.next_power_of_2(d_state)
    block_p = min(triton.next_power_of_2(headdim), max(1, 2048 // block_n))  # ~2048 state entries a program
    absent = A
    _ssd_state_update_kernel[(triton.cdiv(headdim, block_p) * batch * nheads,)](
        state, x, dt, A, B, C, D if D is not None else absent, dt_bias if dt_bias is not None else absent, out,
        nheads, headdim, d_state, nheads // ngroups,
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *out.stride(),
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4,
    )
    return out
