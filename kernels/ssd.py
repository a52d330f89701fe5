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

Packed sequences: with batch 1, ``cu_seqlens`` ([S + 1] int32 sequence starts, ending with L) and/or
``seq_idx`` ([1, L] int32 sequence of each position) mark S sequences concatenated along L. The
state restarts at each sequence start from ``initial_state[s]`` ([S, H, P, N], zeros when None),
and the final state of every sequence is returned ([S, H, P, N]).

Triton kernels (``ssd_scan``, ``ssd_state_update``; same signatures as the references, plus
optional output buffers). ``ssd_scan`` runs three kernels (four for packed sequences):

1. ``_ssd_state_fwd_kernel`` walks each (batch row, head, P block, N block) along the sequence with
   the state in fp32 registers, Δ and Δ·A computed on the fly (bias + softplus fused); it writes
   the state at every chunk end (in the activation dtype), the final state, and Δ and the
   cumulative sum of Δ·A inside each chunk. This fuses the paper's "chunk states" and "state
   passing" steps, so chunk states are written once and read once.
2. ``_ssd_chunk_cb_kernel``: C B^T inside each chunk, once per group (fp32, lower triangle).
3. ``_ssd_chunk_scan_fwd_kernel``: y = C·(state entering the chunk)·decay + (C B^T ∘ decay mask) Δx
   + D x, for BLOCK_M positions of one chunk and one head; heads vary fastest over the program ids
   so that programs running together share the group's C and C B^T tiles in L2.
4. ``_ssd_varlen_final_state_kernel`` (packed sequences only): the final state of each sequence.

Matrix products run on tensor cores with fp32 accumulation: operands in the activation dtype
(bf16/fp16 inputs round Δ-weighted B and the masked C B^T weights to it, as mamba_ssm does), fp32
operands multiply in full precision. ``ssd_state_update`` updates the state IN PLACE with no
autotuning and no host synchronisation, so it can be captured in a CUDA graph.

Cost of one ``ssd_scan`` (e: bytes per activation element; s: bytes per chunk-state element, e for
16-bit activations, 4 for fp32; c = ceil(L / C) chunks). It must move ``B*L*(2*H*P + H + 2*G*N)*e``
bytes (read x, Δ, B, C; write y), plus ``2*B*(c-1)*H*P*N*s`` for the chunk-end states written and
read back, plus the final state ``B*H*P*N*4``. Beyond that it reads x a second time, writes and
reads Δ and Σ Δ·A (``B*H*c*C*4`` bytes each) and C B^T (``B*c*G*C*C*4``, re-read by the group's heads,
mostly from L2). Tensor-core flops: ``B*L*H*(4*P*N + P*(C + 64)) + B*L*G*N*(C + 64)``; exponentials:
about ``B*L*H*(C + 64)/2``. ``ssd_state_update`` moves ``2*B*H*P*N*4`` bytes of fp32 state.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ._triton import require_triton, tl, triton
from .selective_scan import _discretise_dt

# Without Triton the kernels below are plain (never called) functions, so the module still imports.
_jit = triton.jit if triton is not None else (lambda fn: fn)


def _check_shapes(x, dt, A, B, C, initial_state):
    batch, length, nheads, headdim = x.shape
    ngroups, d_state = B.shape[-2:]
    if dt.shape != (batch, length, nheads):
        raise ValueError(f"dt must be [B, L, H] = {(batch, length, nheads)}, got {tuple(dt.shape)}")
    if A.shape != (nheads,):
        raise ValueError(f"A must be [H] = ({nheads},), got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, length, ngroups, d_state):
            raise ValueError(f"{name} must be [B, L, G, N] = {(batch, length, ngroups, d_state)}, got {tuple(t.shape)}")
    if nheads % ngroups != 0:
        raise ValueError(f"the number of heads H={nheads} must be a multiple of the number of groups G={ngroups}")
    if initial_state is not None and initial_state.shape != (batch, nheads, headdim, d_state):
        raise ValueError(
            f"initial_state must be [B, H, P, N] = {(batch, nheads, headdim, d_state)}, "
            f"got {tuple(initial_state.shape)}"
        )


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for j <= i (0 on the diagonal), -inf above it.

    ``exp(_segsum(a))`` is the lower-triangular matrix of decays from position j to position i.
    Built from masked cumulative sums rather than differences of one cumsum, which would cancel
    catastrophically for long chunks.
    """
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)  # [..., T(i), T(j)] holding a[i]
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    seg = torch.cumsum(a.masked_fill(~below, 0), dim=-2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return seg.masked_fill(~causal, -torch.inf)


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
    initial_state: torch.Tensor | None = None,  # [B, H, P, N], or [S, H, P, N] when packed
    *,
    cu_seqlens: torch.Tensor | None = None,  # [S + 1] int, packed sequences (B = 1)
    seq_idx: torch.Tensor | None = None,  # [1, L] int, packed sequences (B = 1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD algorithm (the paper's Listing 1, vectorised over chunks).

    Returns ``(y [B, L, H, P] in x.dtype, final_state [B, H, P, N] fp32)``. L need not be a multiple
    of ``chunk_size``: the tail is padded with Δ = 0 (decay 1, no input), which leaves the state
    unchanged, and the padded outputs are dropped. Packed sequences (``cu_seqlens`` / ``seq_idx``)
    are scanned one at a time, and the final state is ``[S, H, P, N]``.
    """
    if cu_seqlens is not None or seq_idx is not None:
        return _ssd_scan_packed_ref(
            x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state, cu_seqlens, seq_idx
        )
    _check_shapes(x, dt, A, B, C, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, length, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]

    dt = _discretise_dt(dt, dt_bias, dt_softplus)  # Δ [B, L, H] fp32
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
    decay = torch.exp(_segsum(a))  # [b, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bhcls", Ch, Bh) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, X)

    # 2. State of each chunk on its own (as if it started from zero), at the chunk's end.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # [b, h, c, l]
    chunk_states = torch.einsum("bclhn,bclhp->bchpn", Bh * decay_to_end.permute(0, 2, 3, 1)[..., None], X)

    # 3. Recurrence over chunks: the true state entering each chunk (plus the final state).
    if initial_state is None:
        initial_state = chunk_states.new_zeros(batch, nheads, headdim, chunk_states.shape[-1])
    chunk_states = torch.cat([initial_state.float()[:, None], chunk_states], dim=1)  # [b, c+1, h, p, n]
    chunk_decay = torch.exp(_segsum(F.pad(a_cumsum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, chunk_states)
    states, final_state = states[:, :-1], states[:, -1].clone()  # [b, c, h, p, n], [b, h, p, n]

    # 4. Off-diagonal blocks: each position reads the state entering its chunk, decayed to it.
    decay_from_start = torch.exp(a_cumsum).permute(0, 2, 3, 1)[..., None]  # [b, c, l, h, 1]
    y_off = torch.einsum("bclhn,bchpn->bclhp", Ch, states) * decay_from_start

    y = (y_diag + y_off).reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :length]
    if D is not None:
        y = y + D.float()[:, None] * xf
    return y.to(x.dtype), final_state


def _seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """[1, L] int32 sequence index of each position, from the sequence starts (no host sync)."""
    positions = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:-1].contiguous(), positions, right=True).to(torch.int32)[None]


def _cu_seqlens_from_seq_idx(seq_idx: torch.Tensor) -> torch.Tensor:
    """[S + 1] int32 sequence starts from a non-decreasing [1, L] ``seq_idx`` (one host sync, to learn S)."""
    nseqs = int(seq_idx[0, -1]) + 1 if seq_idx.shape[1] else 1
    ids = torch.arange(nseqs + 1, device=seq_idx.device, dtype=seq_idx.dtype)
    return torch.searchsorted(seq_idx[0].contiguous(), ids).to(torch.int32)


def _packed_starts(length: int, cu_seqlens: torch.Tensor | None, seq_idx: torch.Tensor | None) -> list[int]:
    """The checked sequence starts ``[0, ..., L]`` of a packed batch."""
    if seq_idx is not None:
        if seq_idx.shape != (1, length):
            raise ValueError(f"seq_idx must be [1, L] = (1, {length}), got {tuple(seq_idx.shape)}")
        ids = seq_idx[0].long()
        if length and (ids[0] < 0 or (ids.diff() < 0).any()):
            raise ValueError("seq_idx must be non-negative and non-decreasing along L")
    if cu_seqlens is None:
        cu_seqlens = _cu_seqlens_from_seq_idx(seq_idx)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be [S + 1] with S >= 1, got {tuple(cu_seqlens.shape)}")
    starts = [int(v) for v in cu_seqlens.tolist()]
    if starts[0] != 0 or starts[-1] != length or any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to L={length}, got {starts}")
    if seq_idx is not None and not torch.equal(
        seq_idx.cpu().int(), _seq_idx_from_cu_seqlens(cu_seqlens.cpu().int(), length)
    ):
        raise ValueError("seq_idx and cu_seqlens describe different sequences")
    return starts


def _ssd_scan_packed_ref(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state, cu_seqlens, seq_idx):
    """``ssd_scan_ref`` over packed sequences: one plain scan per sequence."""
    _check_shapes(x, dt, A, B, C, None)
    batch, length, nheads, headdim = x.shape
    if batch != 1:
        raise ValueError(f"packed sequences (cu_seqlens / seq_idx) need batch size 1, got x {tuple(x.shape)}")
    starts = _packed_starts(length, cu_seqlens, seq_idx)
    state_shape = (len(starts) - 1, nheads, headdim, B.shape[-1])
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"initial_state must be [S, H, P, N] = {state_shape}, got {tuple(initial_state.shape)}")
    ys, finals = [x[:, :0]], []
    for s, (start, stop) in enumerate(zip(starts[:-1], starts[1:])):
        h0 = None if initial_state is None else initial_state[s : s + 1]
        if stop == start:  # an empty sequence keeps its initial state
            finals.append(x.new_zeros(1, *state_shape[1:], dtype=torch.float32) if h0 is None else h0.float())
            continue
        y, final = ssd_scan_ref(
            x[:, start:stop], dt[:, start:stop], A, B[:, start:stop], C[:, start:stop], chunk_size, D, dt_bias,
            dt_softplus, h0,
        )
        ys.append(y)
        finals.append(final)
    return torch.cat(ys, dim=1), torch.cat(finals, dim=0)


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
    _check_shapes(x, dt, A, B, C, initial_state)
    batch, length, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    dt = _discretise_dt(dt, dt_bias, dt_softplus)
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
    batch, nheads, headdim = x.shape
    ngroups, d_state = B.shape[-2:]
    if state.shape != (batch, nheads, headdim, d_state):
        raise ValueError(f"state must be [B, H, P, N] = {(batch, nheads, headdim, d_state)}, got {tuple(state.shape)}")
    if nheads % ngroups != 0:
        raise ValueError(f"the number of heads H={nheads} must be a multiple of the number of groups G={ngroups}")
    dt = _discretise_dt(dt, dt_bias, dt_softplus)  # [B, H]
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

# Triton's CPU interpreter (TRITON_INTERPRET=1) multiplies 16-bit floats as raw integers in tl.dot;
# there the operands, already rounded to their 16-bit type as on the GPU, are widened to fp32 first.
_WIDEN_DOT_OPERANDS = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1") if tl else False


@_jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b accumulated in fp32; with DOT_PRECISION "ieee", fp32 operands multiply in full precision."""
    if _WIDEN_DOT_OPERANDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@_jit
def _softplus(v):
    """softplus in fp32 as torch computes it: log1p(exp(v)), and v itself above 20."""
    u = tl.exp(tl.minimum(v, 20.0))
    w = 1.0 + u
    lp = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))  # log1p(u), exact for tiny u too
    return tl.where(v > 20.0, v, lp)


@_jit
def _ssd_state_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, dt_bias_ptr, B_ptr, h0_ptr, cu_ptr, seq_idx_ptr,  # inputs
    dacs_ptr, dtsp_ptr, states_ptr, final_ptr,  # outputs
    L, H, P, N, Q, nchunks, n_steps, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_h0_s, stride_h0_h, stride_h0_p, stride_h0_n,
    stride_f_s, stride_f_h, stride_f_p, stride_f_n,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
    NSUB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Carry the state of one (batch row, head, P block, N block) along the sequence.

    Each step takes BLOCK_T positions of one chunk (NSUB steps per chunk):
    ``S <- exp(Σ Δ·A) S + Σ_t exp(Δ·A summed after t) Δ_t x_t ⊗ B_t``, restarting from the initial
    state where a packed sequence starts. At the end of every chunk but the last, S (the state of
    the sequence of the chunk's last position) goes to ``states[b, c]``; programs of the first P/N
    block also store Δ and the cumulative sum of Δ·A from the chunk start (``dtsp``, ``dacs``).
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
    dacs_ptr += pid_bh * nchunks * Q  # [B, H, nchunks, Q]
    dtsp_ptr += pid_bh * nchunks * Q  # [B, H, nchunks, Q]
    states_ptr += (pid_b * (nchunks - 1) * H + pid_h) * P * N  # [B, nchunks - 1, H, P, N]
    A = tl.load(A_ptr + pid_h).to(tl.float32)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + pid_h).to(tl.float32)
    dot_dtype = x_ptr.dtype.element_ty
    q_store = tl.where(pid_pn == 0, Q, 0)  # only the first P/N block stores Δ and Σ Δ·A

    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)  # S[p, n]
    s_prefix = 0.0  # Σ Δ·A from the chunk start to the current step
    for i in range(n_steps):
        c = i // NSUB
        sub = i % NSUB
        offs_q = sub * BLOCK_T + tl.arange(0, BLOCK_T)  # position inside the chunk   [BLOCK_T]
        offs_t = (c * Q + offs_q).to(tl.int64)  # position in the sequence      [BLOCK_T]
        valid = (offs_q < Q) & (offs_t < L)
        step_start = c * Q + sub * BLOCK_T
        step_last = tl.minimum(tl.minimum(step_start + BLOCK_T, c * Q + Q), L) - 1

        dt = tl.load(dt_ptr + offs_t * stride_dt_l, mask=valid, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            dt += dt_bias
        if DT_SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(valid, dt, 0.0)  # Δ
        dA = dt * A
        cs = tl.cumsum(dA, axis=0)  # Σ Δ·A from the step start
        total = tl.sum(dA, axis=0)
        s_prefix = tl.where(sub == 0, 0.0, s_prefix)
        tl.store(dacs_ptr + c * Q + offs_q, s_prefix + cs, mask=offs_q < q_store)
        tl.store(dtsp_ptr + c * Q + offs_q, dt, mask=offs_q < q_store)
        s_prefix += total

        # S follows the sequence of the step's last position; earlier positions do not feed it.
        if IS_VARLEN:
            seq = tl.load(seq_idx_ptr + step_last).to(tl.int64)
            seq_start = tl.load(cu_ptr + seq).to(tl.int64)
        else:
            seq = pid_b
            seq_start = 0
        w = tl.where(valid & (offs_t >= seq_start), tl.exp(total - cs) * dt, 0.0)  # decay to step end, × Δ
        before = tl.sum(tl.where(offs_t < seq_start, dA, 0.0), axis=0)  # Σ Δ·A before the start

        x_t = tl.load(
            x_ptr + offs_t[None, :] * stride_x_l + offs_p[:, None] * stride_x_p,
            mask=valid[None, :] & (offs_p[:, None] < P), other=0.0,
        )  # [BLOCK_P, BLOCK_T]
        B_t = tl.load(
            B_ptr + offs_t[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
            mask=valid[:, None] & (offs_n[None, :] < N), other=0.0,
        ).to(tl.float32)  # [BLOCK_T, BLOCK_N]
        update = _dot(x_t.to(dot_dtype), (B_t * w[:, None]).to(dot_dtype), DOT_PRECISION)  # [BLOCK_P, BLOCK_N]

        carried = seq_start < step_start  # the sequence was running before this step
        state = tl.where(carried, state * tl.exp(total), 0.0)
        if HAS_H0:
            h0 = tl.load(
                h0_ptr + seq * stride_h0_s + pid_h * stride_h0_h
                + offs_p[:, None] * stride_h0_p + offs_n[None, :] * stride_h0_n,
                mask=(offs_p[:, None] < tl.where(carried, 0, P)) & (offs_n[None, :] < N), other=0.0,
            ).to(tl.float32)
            state += h0 * tl.exp(total - before)
        state += update

        chunk_end = (sub == NSUB - 1) & (c < nchunks - 1)
        tl.store(
            states_ptr + c * H * P * N + offs_p[:, None] * N + offs_n[None, :],
            state.to(states_ptr.dtype.element_ty),
            mask=(offs_p[:, None] < tl.where(chunk_end, P, 0)) & (offs_n[None, :] < N),
        )

    if not IS_VARLEN:
        tl.store(
            final_ptr + pid_b * stride_f_s + pid_h * stride_f_h
            + offs_p[:, None] * stride_f_p + offs_n[None, :] * stride_f_n,
            state, mask=(offs_p[:, None] < P) & (offs_n[None, :] < N),
        )


@_jit
def _ssd_chunk_cb_kernel(
    C_ptr, B_ptr, cb_ptr,
    L, G, N, Q, nchunks,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """cb[b, c, g, m, k] = <C[b, cQ + m, g], B[b, cQ + k, g]>, fp32, for the blocks on or below the diagonal."""
    pid = tl.program_id(0).to(tl.int64)
    n_kblocks = tl.cdiv(Q, BLOCK_K)
    n_mblocks = tl.cdiv(Q, BLOCK_M)
    pid_k = pid % n_kblocks
    pid_m = (pid // n_kblocks) % n_mblocks
    pid_bcg = pid // (n_kblocks * n_mblocks)
    pid_g = pid_bcg % G
    pid_bc = pid_bcg // G
    pid_b = pid_bc // nchunks
    pid_c = pid_bc % nchunks
    chunk_len = tl.minimum(Q, L - pid_c * Q)
    m0 = pid_m * BLOCK_M
    k0 = pid_k * BLOCK_K
    if (k0 < m0 + BLOCK_M) & (m0 < chunk_len) & (k0 < chunk_len):
        offs_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
        C_ptr += pid_b * stride_C_b + (pid_c * Q) * stride_C_l + pid_g * stride_C_g
        B_ptr += pid_b * stride_B_b + (pid_c * Q) * stride_B_l + pid_g * stride_B_g
        dot_dtype = C_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            C_m = tl.load(
                C_ptr + offs_m[:, None] * stride_C_l + (n0 + offs_n[None, :]) * stride_C_n,
                mask=(offs_m[:, None] < chunk_len) & (n0 + offs_n[None, :] < N), other=0.0,
            )  # [BLOCK_M, BLOCK_N]
            B_k = tl.load(
                B_ptr + offs_k[None, :] * stride_B_l + (n0 + offs_n[:, None]) * stride_B_n,
                mask=(offs_k[None, :] < chunk_len) & (n0 + offs_n[:, None] < N), other=0.0,
            )  # [BLOCK_N, BLOCK_K]
            acc += _dot(C_m, B_k.to(dot_dtype), DOT_PRECISION)
        tl.store(
            cb_ptr + pid_bcg * Q * Q + offs_m[:, None] * Q + offs_k[None, :], acc,
            mask=(offs_m[:, None] < chunk_len) & (offs_k[None, :] < chunk_len),
        )


@_jit
def _ssd_chunk_scan_fwd_kernel(
    x_ptr, C_ptr, cb_ptr, dacs_ptr, dtsp_ptr, states_ptr, h0_ptr, D_ptr, cu_ptr, seq_idx_ptr, y_ptr,
    L, H, G, P, N, Q, nchunks, heads_per_group,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_h0_s, stride_h0_h, stride_h0_p, stride_h0_n,
    stride_y_b, stride_y_l, stride_y_h, stride_y_p,
    HAS_D: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y for BLOCK_M positions m of chunk c and one head (positions counted from the chunk start):

    ``y_m = exp(s_m - s_before) C_m · S_in + Σ_{k<=m, same sequence} cb[m, k] exp(s_m - s_k) Δ_k x_k + D x_m``

    with ``s`` the cumulative Δ·A inside the chunk and ``S_in`` the state the position's sequence
    brings in: the state after the previous chunk if the sequence was already running, else its
    initial state (decayed from the sequence start, ``s_before``).
    """
    pid = tl.program_id(0).to(tl.int64)
    n_pblocks = tl.cdiv(P, BLOCK_P)
    n_mblocks = tl.cdiv(Q, BLOCK_M)
    pid_h = pid % H  # heads vary fastest: the programs that run together share C and cb tiles
    rest = pid // H
    pid_p = rest % n_pblocks
    rest = rest // n_pblocks
    pid_m = rest % n_mblocks
    pid_bc = rest // n_mblocks
    pid_b = pid_bc // nchunks
    pid_c = pid_bc % nchunks
    pid_g = pid_h // heads_per_group
    c0 = pid_c * Q
    chunk_len = tl.minimum(Q, L - c0)
    m0 = pid_m * BLOCK_M
    if m0 < chunk_len:
        offs_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
        mask_m = offs_m < chunk_len
        dot_dtype = x_ptr.dtype.element_ty
        x_ptr += pid_b * stride_x_b + c0 * stride_x_l + pid_h * stride_x_h
        C_ptr += pid_b * stride_C_b + c0 * stride_C_l + pid_g * stride_C_g
        dacs_ptr += ((pid_b * H + pid_h) * nchunks + pid_c) * Q
        dtsp_ptr += ((pid_b * H + pid_h) * nchunks + pid_c) * Q
        cb_ptr += ((pid_b * nchunks + pid_c) * G + pid_g) * Q * Q
        states_ptr += (((pid_b * (nchunks - 1) + pid_c - 1) * H + pid_h) * P) * N  # state after chunk c - 1

        s_m = tl.load(dacs_ptr + offs_m, mask=mask_m, other=0.0)  # [BLOCK_M]
        if IS_VARLEN:
            seq_m = tl.load(seq_idx_ptr + c0 + offs_m, mask=mask_m, other=-1)  # [BLOCK_M]
            seq_lo = tl.load(seq_idx_ptr + c0 + m0).to(tl.int64)
            seq_hi = tl.load(seq_idx_ptr + c0 + tl.minimum(m0 + BLOCK_M, chunk_len) - 1).to(tl.int64)
        else:
            seq_lo = pid_b
            seq_hi = pid_b

        # 1. The states the sequences of these rows bring into the chunk. Without initial states,
        # only a sequence already running at the chunk start brings one.
        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        seq_stop = seq_hi + 1
        if not HAS_H0:
            seq_stop = seq_lo + 1
        for seq in range(seq_lo, seq_stop):
            if IS_VARLEN:
                seq_start = tl.load(cu_ptr + seq).to(tl.int64)
            else:
                seq_start = 0
            p_carried = tl.where(seq_start < c0, P, 0)  # load the previous chunk's state ...
            p_initial = tl.where(seq_start < c0, 0, P)  # ... or the sequence's initial state
            inflow = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
                C_m = tl.load(
                    C_ptr + offs_m[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
                    mask=mask_m[:, None] & (offs_n[None, :] < N), other=0.0,
                )  # [BLOCK_M, BLOCK_N]
                s_in = tl.load(
                    states_ptr + offs_p[None, :] * N + offs_n[:, None],
                    mask=(offs_n[:, None] < N) & (offs_p[None, :] < p_carried), other=0.0,
                )  # [BLOCK_N, BLOCK_P]
                if HAS_H0:
                    s_in = s_in.to(tl.float32) + tl.load(
                        h0_ptr + seq * stride_h0_s + pid_h * stride_h0_h
                        + offs_p[None, :] * stride_h0_p + offs_n[:, None] * stride_h0_n,
                        mask=(offs_n[:, None] < N) & (offs_p[None, :] < p_initial), other=0.0,
                    ).to(tl.float32)
                inflow += _dot(C_m.to(dot_dtype), s_in.to(dot_dtype), DOT_PRECISION)
            # Σ Δ·A of the chunk positions before the sequence start (0 if it started earlier)
            before = tl.load(dacs_ptr + seq_start - c0 - 1, mask=seq_start > c0, other=0.0)
            if IS_VARLEN:
                rows = seq_m == seq
            else:
                rows = mask_m
            scale = tl.exp(tl.where(rows, s_m - before, float("-inf")))
            acc += inflow * scale[:, None]

        # 2. The chunk's own inputs, up to the diagonal.
        k_lo = 0
        if IS_VARLEN:  # skip blocks before the first sequence of these rows starts
            k_lo = tl.maximum(tl.load(cu_ptr + seq_lo) - c0, 0) // BLOCK_K * BLOCK_K
        k_hi = tl.minimum(m0 + BLOCK_M, chunk_len)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            mask_k = offs_k < chunk_len
            cb = tl.load(
                cb_ptr + offs_m[:, None] * Q + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            )  # [BLOCK_M, BLOCK_K]
            s_k = tl.load(dacs_ptr + offs_k, mask=mask_k, other=0.0)
            dt_k = tl.load(dtsp_ptr + offs_k, mask=mask_k, other=0.0)
            keep = (offs_k[None, :] <= offs_m[:, None]) & mask_k[None, :] & mask_m[:, None]
            if IS_VARLEN:
                seq_k = tl.load(seq_idx_ptr + c0 + offs_k, mask=mask_k, other=-2)
                keep = keep & (seq_m[:, None] == seq_k[None, :])
            decay = tl.exp(tl.where(keep, s_m[:, None] - s_k[None, :], float("-inf")))
            weights = tl.where(keep, cb * decay * dt_k[None, :], 0.0)  # also clears unwritten cb entries
            x_k = tl.load(
                x_ptr + offs_k[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                mask=mask_k[:, None] & (offs_p[None, :] < P), other=0.0,
            )  # [BLOCK_K, BLOCK_P]
            acc += _dot(weights.to(dot_dtype), x_k.to(dot_dtype), DOT_PRECISION)

        # 3. The skip connection.
        mask_mp = mask_m[:, None] & (offs_p[None, :] < P)
        if HAS_D:
            x_m = tl.load(
                x_ptr + offs_m[:, None] * stride_x_l + offs_p[None, :] * stride_x_p, mask=mask_mp, other=0.0,
            ).to(tl.float32)
            acc += tl.load(D_ptr + pid_h).to(tl.float32) * x_m
        y_ptr += pid_b * stride_y_b + c0 * stride_y_l + pid_h * stride_y_h
        tl.store(
            y_ptr + offs_m[:, None] * stride_y_l + offs_p[None, :] * stride_y_p,
            acc.to(y_ptr.dtype.element_ty), mask=mask_mp,
        )


@_jit
def _ssd_varlen_final_state_kernel(
    x_ptr, B_ptr, dacs_ptr, dtsp_ptr, states_ptr, h0_ptr, cu_ptr, final_ptr,
    H, P, N, Q, nchunks, heads_per_group,
    stride_x_l, stride_x_h, stride_x_p,
    stride_B_l, stride_B_g, stride_B_n,
    stride_h0_s, stride_h0_h, stride_h0_p, stride_h0_n,
    stride_f_s, stride_f_h, stride_f_p, stride_f_n,
    HAS_H0: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Final state of packed sequence s (batch row 0), one head, one P/N block: the state it brings
    into the chunk of its last position, carried through that chunk up to the last position."""
    pid = tl.program_id(0).to(tl.int64)
    n_pblocks = tl.cdiv(P, BLOCK_P)
    n_nblocks = tl.cdiv(N, BLOCK_N)
    pid_pn = pid % (n_pblocks * n_nblocks)
    pid_sh = pid // (n_pblocks * n_nblocks)
    pid_s = pid_sh // H
    pid_h = pid_sh % H
    pid_g = pid_h // heads_per_group
    offs_p = (pid_pn // n_nblocks) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    offs_n = (pid_pn % n_nblocks) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_pn = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    dot_dtype = x_ptr.dtype.element_ty
    seq_start = tl.load(cu_ptr + pid_s).to(tl.int64)
    seq_end = tl.load(cu_ptr + pid_s + 1).to(tl.int64)
    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_H0:
        h0 = tl.load(
            h0_ptr + pid_s * stride_h0_s + pid_h * stride_h0_h
            + offs_p[:, None] * stride_h0_p + offs_n[None, :] * stride_h0_n,
            mask=mask_pn, other=0.0,
        ).to(tl.float32)
    if seq_end > seq_start:
        c = (seq_end - 1) // Q
        c0 = c * Q
        dacs_ptr += (pid_h * nchunks + c) * Q
        dtsp_ptr += (pid_h * nchunks + c) * Q
        s_end = tl.load(dacs_ptr + seq_end - 1 - c0)
        for t0 in range(tl.maximum(seq_start, c0), seq_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
            valid = offs_t < seq_end
            s_t = tl.load(dacs_ptr + offs_t - c0, mask=valid, other=0.0)
            dt_t = tl.load(dtsp_ptr + offs_t - c0, mask=valid, other=0.0)
            w = tl.where(valid, tl.exp(s_end - s_t) * dt_t, 0.0)
            x_t = tl.load(
                x_ptr + pid_h * stride_x_h + offs_t[None, :] * stride_x_l + offs_p[:, None] * stride_x_p,
                mask=valid[None, :] & (offs_p[:, None] < P), other=0.0,
            )  # [BLOCK_P, BLOCK_T]
            B_t = tl.load(
                B_ptr + pid_g * stride_B_g + offs_t[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
                mask=valid[:, None] & (offs_n[None, :] < N), other=0.0,
            ).to(tl.float32)  # [BLOCK_T, BLOCK_N]
            state += _dot(x_t.to(dot_dtype), (B_t * w[:, None]).to(dot_dtype), DOT_PRECISION)
        carried = seq_start < c0
        prev = tl.load(
            states_ptr + (((c - 1) * H + pid_h) * P + offs_p[:, None]) * N + offs_n[None, :],
            mask=(offs_p[:, None] < tl.where(carried, P, 0)) & (offs_n[None, :] < N), other=0.0,
        ).to(tl.float32)
        state += prev * tl.exp(s_end)
        if HAS_H0:
            before = tl.load(dacs_ptr + seq_start - c0 - 1, mask=seq_start > c0, other=0.0)
            state += tl.where(carried, 0.0, h0 * tl.exp(s_end - before))
    else:
        if HAS_H0:  # an empty sequence keeps its initial state
            state = h0
    tl.store(
        final_ptr + pid_s * stride_f_s + pid_h * stride_f_h
        + offs_p[:, None] * stride_f_p + offs_n[None, :] * stride_f_n,
        state, mask=mask_pn,
    )


@_jit
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
        dt = _softplus(dt)
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


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's CPU interpreter: small, so that tests exercise the split into P and N blocks


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
    initial_state: torch.Tensor | None = None,  # [B, H, P, N], or [S, H, P, N] when packed
    *,
    cu_seqlens: torch.Tensor | None = None,  # [S + 1] int32, packed sequences (B = 1)
    seq_idx: torch.Tensor | None = None,  # [1, L] int32, packed sequences (B = 1)
    out: torch.Tensor | None = None,  # [B, L, H, P] x.dtype: written instead of a new y
    final_state_out: torch.Tensor | None = None,  # [B or S, H, P, N] fp32: written instead of a new one
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``ssd_scan_ref``: returns ``(y [B, L, H, P] in x.dtype, final_state fp32)``.

    Any strides are accepted (contiguous last dimensions load fastest). For packed sequences give
    ``cu_seqlens`` (and ``seq_idx`` if at hand; from ``seq_idx`` alone, learning S costs one host
    sync). Their values are not checked here (that would need a host sync): the references check them.
    """
    require_triton("ssd_scan")
    if x.dim() != 4 or B.dim() != 4:
        raise ValueError(f"x must be [B, L, H, P] and B [B, L, G, N], got {tuple(x.shape)} and {tuple(B.shape)}")
    batch, length, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2:]
    if dt.shape != (batch, length, nheads):
        raise ValueError(f"dt must be [B, L, H] = {(batch, length, nheads)}, got {tuple(dt.shape)}")
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if t is not None and t.shape != (nheads,):
            raise ValueError(f"{name} must be [H] = ({nheads},), got {tuple(t.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, length, ngroups, d_state):
            raise ValueError(f"{name} must be [B, L, G, N] = {(batch, length, ngroups, d_state)}, got {tuple(t.shape)}")
    if ngroups == 0 or nheads % ngroups != 0:
        raise ValueError(f"the number of heads H={nheads} must be a multiple of the number of groups G={ngroups}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    tensors = dict(dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, initial_state=initial_state,
                   cu_seqlens=cu_seqlens, seq_idx=seq_idx, out=out, final_state_out=final_state_out)
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: all tensors must be on one device")
    varlen = cu_seqlens is not None or seq_idx is not None
    if varlen:
        if batch != 1:
            raise ValueError(f"packed sequences (cu_seqlens / seq_idx) need batch size 1, got x {tuple(x.shape)}")
        for name, t in (("cu_seqlens", cu_seqlens), ("seq_idx", seq_idx)):
            if t is not None and t.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
        if seq_idx is not None and seq_idx.shape != (1, length):
            raise ValueError(f"seq_idx must be [1, L] = (1, {length}), got {tuple(seq_idx.shape)}")
        if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2):
            raise ValueError(f"cu_seqlens must be [S + 1] with S >= 1, got {tuple(cu_seqlens.shape)}")
        if cu_seqlens is None:
            cu_seqlens = _cu_seqlens_from_seq_idx(seq_idx)
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
        if seq_idx is None:
            seq_idx = _seq_idx_from_cu_seqlens(cu_seqlens, length)
        seq_idx = seq_idx.to(torch.int32).contiguous()
    nseqs = cu_seqlens.shape[0] - 1 if varlen else batch
    state_shape = (nseqs, nheads, headdim, d_state)
    if initial_state is not None and initial_state.shape != state_shape:
        what = "[S, H, P, N]" if varlen else "[B, H, P, N]"
        raise ValueError(f"initial_state must be {what} = {state_shape}, got {tuple(initial_state.shape)}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if final_state_out is None:
        final_state_out = torch.empty(state_shape, device=x.device, dtype=torch.float32)
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

    device, Q = x.device, chunk_size
    nchunks = triton.cdiv(length, Q)
    heads_per_group = nheads // ngroups
    wide = x.dtype not in (torch.float16, torch.bfloat16)  # fp32 (or wider): smaller tiles, exact products
    dot_precision = "ieee"  # only affects fp32 operands
    h0 = initial_state if initial_state is not None else final_state_out  # never read when absent
    h0_strides = initial_state.stride() if initial_state is not None else (0, 0, 0, 0)
    absent = A  # pointer argument standing in for an absent optional tensor (never read)
    cu_arg, seq_idx_arg = (cu_seqlens, seq_idx) if varlen else (absent, absent)

    # 1. Δ, Σ Δ·A inside each chunk, the state at every chunk end and the final state.
    dacs = torch.empty(batch, nheads, nchunks, Q, device=device, dtype=torch.float32)
    dtsp = torch.empty_like(dacs)
    states = torch.empty(  # chunk-end states, read back by the output kernel
        batch, max(nchunks - 1, 1), nheads, headdim, d_state, device=device,
        dtype=torch.float32 if wide else x.dtype,
    )
    block_p, block_n = min(64, _pow2(headdim)), min(128, _pow2(d_state))
    # Enough programs to fill the GPU: split P (x is read once either way), then N.
    while batch * nheads * triton.cdiv(headdim, block_p) * triton.cdiv(d_state, block_n) < 2 * _num_sms(device):
        if block_p > 16:
            block_p //= 2
        elif block_n > 32:
            block_n //= 2
        else:
            break
    # Positions per sequential step: with few programs (few rows and heads, long sequences) the
    # walk is latency-bound, so take fewer, longer steps.
    few = batch * nheads * triton.cdiv(headdim, block_p) * triton.cdiv(d_state, block_n) < 4 * _num_sms(device)
    block_t = min(128 if few and not wide else 64, _pow2(Q))
    nsub = triton.cdiv(Q, block_t)
    n_steps = (nchunks - 1) * nsub + triton.cdiv(length - (nchunks - 1) * Q, block_t)
    _ssd_state_fwd_kernel[(batch * nheads * triton.cdiv(headdim, block_p) * triton.cdiv(d_state, block_n),)](
        x, dt, A, dt_bias if dt_bias is not None else absent, B, h0, cu_arg, seq_idx_arg,
        dacs, dtsp, states, final_state_out,
        length, nheads, headdim, d_state, Q, nchunks, n_steps, heads_per_group,
        *x.stride(), *dt.stride(), *B.stride(), *h0_strides, *final_state_out.stride(),
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, HAS_H0=initial_state is not None,
        IS_VARLEN=varlen, NSUB=nsub, BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_N=block_n,
        DOT_PRECISION=dot_precision, num_warps=8 if block_p * block_n >= 64 * 128 else 4,
    )

    # 2. C B^T inside every chunk, once per group.
    block_m = min(32 if wide else 64, _pow2(Q))
    nmb = triton.cdiv(Q, block_m)
    cb = torch.empty(batch, nchunks, ngroups, Q, Q, device=device, dtype=torch.float32)
    _ssd_chunk_cb_kernel[(batch * nchunks * ngroups * nmb * nmb,)](
        C, B, cb, length, ngroups, d_state, Q, nchunks, *C.stride(), *B.stride(),
        BLOCK_M=block_m, BLOCK_K=block_m, BLOCK_N=min(64 if wide else 128, _pow2(d_state)),
        DOT_PRECISION=dot_precision, num_warps=4,
    )

    # 3. The output (tile sizes chosen so that sm_90 code does not spill registers).
    block_pp = min(64, _pow2(headdim))
    _ssd_chunk_scan_fwd_kernel[(batch * nchunks * nmb * triton.cdiv(headdim, block_pp) * nheads,)](
        x, C, cb, dacs, dtsp, states, h0, D if D is not None else absent, cu_arg, seq_idx_arg, out,
        length, nheads, ngroups, headdim, d_state, Q, nchunks, heads_per_group,
        *x.stride(), *C.stride(), *h0_strides, *out.stride(),
        HAS_D=D is not None, HAS_H0=initial_state is not None, IS_VARLEN=varlen,
        BLOCK_M=block_m, BLOCK_K=block_m, BLOCK_P=block_pp, BLOCK_N=min(64, _pow2(d_state)),
        DOT_PRECISION=dot_precision, num_warps=4 if wide else 8, num_stages=1 if wide else 2,
    )

    # 4. Packed sequences: the final state of each one.
    if varlen:
        grid = (nseqs * nheads * triton.cdiv(headdim, block_p) * triton.cdiv(d_state, block_n),)
        _ssd_varlen_final_state_kernel[grid](
            x, B, dacs, dtsp, states, h0, cu_seqlens, final_state_out,
            nheads, headdim, d_state, Q, nchunks, heads_per_group,
            *x.stride()[1:], *B.stride()[1:], *h0_strides, *final_state_out.stride(),
            HAS_H0=initial_state is not None, BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_N=block_n,
            DOT_PRECISION=dot_precision, num_warps=4,
        )
    return out, final_state_out


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
    batch, nheads, headdim = x.shape
    ngroups, d_state = B.shape[1:]
    if state.shape != (batch, nheads, headdim, d_state):
        raise ValueError(f"state must be [B, H, P, N] = {(batch, nheads, headdim, d_state)}, got {tuple(state.shape)}")
    if dt.shape != (batch, nheads):
        raise ValueError(f"dt must be [B, H] = {(batch, nheads)}, got {tuple(dt.shape)}")
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if t is not None and t.shape != (nheads,):
            raise ValueError(f"{name} must be [H] = ({nheads},), got {tuple(t.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, ngroups, d_state):
            raise ValueError(f"{name} must be [B, G, N] = {(batch, ngroups, d_state)}, got {tuple(t.shape)}")
    if ngroups == 0 or nheads % ngroups != 0:
        raise ValueError(f"the number of heads H={nheads} must be a multiple of the number of groups G={ngroups}")
    for name, t in dict(state=state, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, out=out).items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: all tensors must be on one device")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
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
