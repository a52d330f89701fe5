"""Mamba-1 selective scan: a diagonal, input-dependent linear recurrence (Mamba paper, Sec. 3.2, Alg. 2).

For every batch row b and channel d, with a state h of N entries::

    Δ_t  = softplus(delta[b, d, t] + delta_bias[d])          (softplus only if delta_softplus)
    h_t  = exp(Δ_t A[d, :]) * h_{t-1} + Δ_t B[b, :, t] u[b, d, t]
    y_t  = <C[b, :, t], h_t> + D[d] u[b, d, t]
    out  = y_t * silu(z[b, d, t])                            (only if z is given)

``A`` is the (negative) diagonal state matrix, ``A = -exp(A_log)``; B and C are shared by all
channels of a row (one N-vector per position). ``h_{-1}`` is ``initial_state`` (zeros when None).

Shapes (glossary in ``mamba_eval.kernels``; D = scanned channels = d_inner):
    u, delta, z [B, D, L]; A [D, N]; B, C [B, N, L]; D, delta_bias [D]; state [B, D, N].

All arithmetic is fp32 (Δ + bias and softplus included; softplus uses torch's threshold 20);
``y`` is returned in ``u.dtype``, the state in fp32. ``selective_state_update_ref`` advances
``state`` by one position IN PLACE.

Kernels: ``selective_scan`` and ``selective_state_update`` have the signatures of the references.
Any strides are accepted; the model's layout (u, Δ, z channel-contiguous, i.e. [B, L, D] tensors
seen as [B, D, L]; B, C with N contiguous) gives coalesced accesses, and y is then returned
channel-contiguous too. Cost of one ``selective_scan`` (e = bytes per element of the activations):
it must move ``B*L*(4*D + 2*N)*e`` bytes (read u, Δ, z, B, C; write y) and compute ``B*D*N*L``
exponentials, one per (row, channel, state, position). With N = 16 the exponentials, not the
bytes, bound it on an H200 (about 4.2e12 exp/s against 4.27 TB/s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import (
    affine_scan, discretise_dt, jit, last_row, new_output, require_triton, silu_approx, sm_count, softplus, tl, triton,
)


def selective_scan_ref(
    u: torch.Tensor,  # [B, D, L]
    delta: torch.Tensor,  # [B, D, L]
    A: torch.Tensor,  # [D, N]
    B: torch.Tensor,  # [B, N, L]
    C: torch.Tensor,  # [B, N, L]
    D: torch.Tensor | None = None,  # [D]
    z: torch.Tensor | None = None,  # [B, D, L]
    delta_bias: torch.Tensor | None = None,  # [D]
    delta_softplus: bool = True,
    initial_state: torch.Tensor | None = None,  # [B, D, N]
    *,
    batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan the whole sequence; returns ``(y [B, D, L] in u.dtype, final_state [B, D, N] fp32)``.

    ``batch_invariant`` is accepted for the kernel's signature and ignored: this loop computes
    every row the same way whatever the batch.
    """
    batch, channels, length = u.shape
    d_state = A.shape[-1]
    if A.shape != (channels, d_state):
        raise ValueError(f"A must be [D={channels}, N], got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, d_state, length):
            raise ValueError(f"{name} must be [B, N, L] = {(batch, d_state, length)}, got {tuple(t.shape)}")
    if initial_state is not None and initial_state.shape != (batch, channels, d_state):
        raise ValueError(
            f"initial_state must be [B, D, N] = {(batch, channels, d_state)}, got {tuple(initial_state.shape)}"
        )

    # Δ with its bias, in fp32: [B, D, L]; the bias broadcasts over L.
    dt = discretise_dt(delta.transpose(1, 2), delta_bias, delta_softplus).transpose(1, 2)
    A, B, C, uf = A.float(), B.float(), C.float(), u.float()
    h = u.new_zeros(batch, channels, d_state, dtype=torch.float32) if initial_state is None else initial_state.float().clone()
    ys = []
    for t in range(length):
        dt_t = dt[:, :, t, None]  # [B, D, 1]
        h = torch.exp(dt_t * A) * h + (dt_t * uf[:, :, t, None]) * B[:, None, :, t]  # [B, D, N]
        ys.append((h * C[:, None, :, t]).sum(-1))  # [B, D]
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(batch, channels, 0)  # [B, D, L]
    if D is not None:
        y = y + D.float()[:, None] * uf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), h


def selective_state_update_ref(
    state: torch.Tensor,  # [B, D, N] fp32, updated in place
    x: torch.Tensor,  # [B, D]
    dt: torch.Tensor,  # [B, D]
    A: torch.Tensor,  # [D, N]
    B: torch.Tensor,  # [B, N]
    C: torch.Tensor,  # [B, N]
    D: torch.Tensor | None = None,  # [D]
    z: torch.Tensor | None = None,  # [B, D]
    dt_bias: torch.Tensor | None = None,  # [D]
    dt_softplus: bool = True,
) -> torch.Tensor:
    """Advance the recurrence by one position: updates ``state`` IN PLACE, returns ``y [B, D]`` in x.dtype."""
    if state.shape != (*x.shape, A.shape[-1]):
        raise ValueError(f"state must be [B, D, N] = {(*x.shape, A.shape[-1])}, got {tuple(state.shape)}")
    dt = discretise_dt(dt, dt_bias, dt_softplus)[..., None]  # [B, D, 1]
    xf = x.float()
    h = torch.exp(dt * A.float()) * state.float() + (dt * xf[..., None]) * B.float()[:, None, :]
    state.copy_(h)
    y = (h * C.float()[:, None, :]).sum(-1)
    if D is not None:
        y = y + D.float() * xf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
#
# Work decomposition of the sequence scan. One program (one warp) owns one segment of positions
# (a batch row, or a chunk of a row: see below) for BLOCK_D <= 32
# channels, and keeps their state h [BLOCK_N, BLOCK_D] in fp32 registers while it walks the segment
# in tiles of BLOCK_L positions. The channels lie across lanes and all N states of a channel within
# one thread (for N <= 16). A tile is computed as [BLOCK_L, BLOCK_N, BLOCK_D] tensors:
#   - dA = exp2(Δ A log2(e)) and Δ u B for every (t, n, d) of the tile at once: the exps do not
#     depend on the state, so they issue back to back, off the recurrence's dependency chain;
#   - h_t = dA_t h_{t-1} + (Δ u B)_t along the tile (an in-thread scan: one FMA per element), the
#     incoming state folded into the first position;
#   - y_t = <C_t, h_t>, an in-thread chain of FMAs over N.
# Per (t, n, d) that is one exp2 on the special-function unit (16 per SM and clock on an H200),
# two multiplies and two FMAs, and a quarter of a 16-byte shared-memory load for B and C, which
# every lane needs: they are widened to fp32 before they are shared (tl.join below), not after.
# The per-(t, d) work (loads, softplus, D skip, silu gate, store) is shared by the N states. The
# exps (and the issue slots, nearly as busy) bound the kernel.
#
# Rows with few channels (B * D small) and long L leave most of the GPU idle if one program walks
# a whole row. Then L is split into chunks (never with batch_invariant=True: ``_launch_config``):
# pass 1 scans every chunk from a zero state and keeps only its end state and sum of Δ; a small
# kernel chains the chunks (h_in[k+1] = exp(A ΣΔ_k) h_in[k] + h_end[k]); pass 2 re-scans every
# chunk from its true initial state and writes y. The exps are paid twice, in exchange for
# B * D * chunks parallel programs. (Carrying the state in without re-scanning would need
# prod(dA) per (t, n, d), one exp each again: no cheaper.)




@jit
def _load_tile(
    u_tile, dt_tile, z_tile, B_tile, C_tile,  # pointers to position 0 of the tile
    off_u, off_dt, off_z, off_B, off_C,  # [BL, BD] / [BL, BN] int32 offsets within a tile
    mask_l, mask_d, mask_n,  # [BL], [BD], [BN]
    LOAD_C: tl.constexpr, LOAD_Z: tl.constexpr,
    MASK_L: tl.constexpr, MASK_D: tl.constexpr, MASK_N: tl.constexpr,
):
    """The inputs of one tile, in their storage dtype: u, Δ, z [BL, BD]; B, C [BL, BN]
    (z and C stand in for themselves when not loaded)."""
    mask = mask_l[:, None] & mask_d[None, :]  # [BL, BD]
    mask_bc = mask_l[:, None] & mask_n[None, :]  # [BL, BN]
    if MASK_L or MASK_D:
        u = tl.load(u_tile + off_u, mask=mask, other=0.0)
        dt = tl.load(dt_tile + off_dt, mask=mask, other=0.0)
        z = u
        if LOAD_Z:
            z = tl.load(z_tile + off_z, mask=mask, other=0.0)
    else:
        u = tl.load(u_tile + off_u)
        dt = tl.load(dt_tile + off_dt)
        z = u
        if LOAD_Z:
            z = tl.load(z_tile + off_z)
    if MASK_L or MASK_N:
        Bt = tl.load(B_tile + off_B, mask=mask_bc, other=0.0)
        Ct = Bt
        if LOAD_C:
            Ct = tl.load(C_tile + off_C, mask=mask_bc, other=0.0)
    else:
        Bt = tl.load(B_tile + off_B)
        Ct = Bt
        if LOAD_C:
            Ct = tl.load(C_tile + off_C)
    return u, dt, z, Bt, Ct


@jit
def _scan_tile(
    h, A, Dv, bias,  # state [BN, BD] fp32, A*log2(e) [BN, BD], D [BD], Δ bias [BD]
    u, dt, z, Bt, Ct,  # the tile's inputs from _load_tile
    y_tile, off_y, mask_l, mask_d,  # y pointer at the tile, [BL, BD] offsets, [BL], [BD]
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    WRITE_Y: tl.constexpr, MASK_L: tl.constexpr, MASK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Advance the state over one tile of BLOCK_L positions; write y if WRITE_Y.

    Returns (state after the tile [BN, BD], sum of Δ over the tile [BD])."""
    u = u.to(tl.float32)
    dt = dt.to(tl.float32)
    if HAS_DELTA_BIAS:
        dt += bias[None, :]
    if DELTA_SOFTPLUS:
        dt = softplus(dt)
    if MASK_L:
        dt = tl.where(mask_l[:, None], dt, 0.0)  # past the end: exp(0 A) = 1 and no input, h passes
    rl = tl.arange(0, BLOCK_L)
    # Every (t, n, d) of the tile at once: the exps do not depend on the state, so they all issue
    # ahead of the one-FMA-per-element chain h_t = dA_t h_{t-1} + dBu_t along the tile.
    dA = tl.exp2(dt[:, None, :] * A[None, :, :])  # [BL, BN, BD]
    # B and C widened to fp32 in their load layout: joined, so that the compiler does not move the
    # widening after the broadcast to every lane (which would widen each value once per lane).
    Bf, Cf = tl.split(tl.join(Bt.to(tl.float32), Ct.to(tl.float32)))  # [BL, BN] each
    dBu = (dt * u)[:, None, :] * Bf[:, :, None]  # [BL, BN, BD]
    dBu = tl.where((rl == 0)[:, None, None], dA * h[None, :, :] + dBu, dBu)  # carry the state in
    hs = affine_scan(dA, dBu)  # hs[t] = h_t  [BL, BN, BD]
    h = last_row(hs)  # h at the tile's last position [BN, BD]
    if WRITE_Y:
        y = tl.sum(hs * Cf[:, :, None], axis=1)  # [BL, BD]
        if HAS_D:
            y += u * Dv[None, :]
        if HAS_Z:
            y *= silu_approx(z.to(tl.float32))
        if MASK_L or MASK_D:
            tl.store(y_tile + off_y, y.to(y_tile.dtype.element_ty), mask=mask_l[:, None] & mask_d[None, :])
        else:
            tl.store(y_tile + off_y, y.to(y_tile.dtype.element_ty))
    return h, tl.sum(dt, axis=0)


# The N strides of A, h0 and hT are left unspecialised: knowing them to be 1, the compiler would
# lay the [N, D] tiles out with N across lanes (to coalesce these one-off accesses), and that layout
# would spread into the recurrence, which wants all N states of a channel in one thread.
@jit(do_not_specialize=["seqlen", "chunk_len", "n_chunks", "stride_A_n", "stride_h0_n", "stride_hT_n"])
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr,
    h0_ptr,  # [S, D, N] initial state of every segment (HAS_H0)
    y_ptr,  # [B, D, L] output (WRITE_Y)
    hT_ptr,  # [S, D, N] fp32 final state of every segment (WRITE_STATE)
    dtsum_ptr,  # [S, D] fp32 sum of Δ over every segment (WRITE_DTSUM)
    dim, seqlen, dstate, chunk_len, n_chunks,
    stride_u_b, stride_u_d, stride_u_l,
    stride_dt_b, stride_dt_d, stride_dt_l,
    stride_A_d, stride_A_n,
    stride_B_b, stride_B_n, stride_B_l,
    stride_C_b, stride_C_n, stride_C_l,
    stride_z_b, stride_z_d, stride_z_l,
    stride_y_b, stride_y_d, stride_y_l,
    stride_h0_s, stride_h0_d, stride_h0_n,
    stride_hT_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    WRITE_Y: tl.constexpr, WRITE_STATE: tl.constexpr, WRITE_DTSUM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, PREFETCH: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_N: tl.constexpr,
):
    """Grid (cdiv(D, BLOCK_D), S = B * n_chunks). Segment s is positions [start, end) of batch row
    b = s // n_chunks: its (s % n_chunks)-th chunk of chunk_len positions (n_chunks = 1,
    chunk_len = L: the whole row)."""
    pid_d = tl.program_id(0)
    seg = tl.program_id(1).to(tl.int64)
    batch = seg // n_chunks
    # chunk_len is a multiple of BLOCK_L (or the whole row: start 0). Said here, since
    # the lengths are not specialised on (one compiled variant for every length).
    start = tl.multiple_of((seg % n_chunks) * chunk_len, BLOCK_L)
    end = tl.minimum(start + chunk_len, seqlen)
    d0 = pid_d.to(tl.int64) * BLOCK_D
    rd = tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    rl = tl.arange(0, BLOCK_L)
    mask_d = rd < dim - d0  # [BD]
    mask_n = rn < dstate  # [BN]
    mask_nd = mask_n[:, None] & mask_d[None, :]  # [BN, BD]

    # A in the exp2 domain: exp(Δ A) = exp2(Δ A log2(e)).
    A = tl.load(A_ptr + (d0 + rd[None, :]) * stride_A_d + rn[:, None] * stride_A_n,
                mask=mask_nd, other=0.0).to(tl.float32) * 1.4426950408889634  # [BN, BD]
    if HAS_H0:
        h = tl.load(h0_ptr + seg * stride_h0_s + (d0 + rd[None, :]) * stride_h0_d + rn[:, None] * stride_h0_n,
                    mask=mask_nd, other=0.0).to(tl.float32)  # [BN, BD]
    else:
        h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d0 + rd, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + d0 + rd, mask=mask_d, other=0.0).to(tl.float32)
    dtsum = tl.zeros([BLOCK_D], dtype=tl.float32)

    # Offsets within a tile: int32 and loop-invariant. The int64 tile base is recomputed from the
    # tile index each iteration (cheaper than per-element pointers carried through the loop).
    off_u = rl[:, None] * stride_u_l + rd[None, :] * stride_u_d  # [BL, BD]
    off_dt = rl[:, None] * stride_dt_l + rd[None, :] * stride_dt_d
    off_z = rl[:, None] * stride_z_l + rd[None, :] * stride_z_d
    off_y = rl[:, None] * stride_y_l + rd[None, :] * stride_y_d
    off_B = rl[:, None] * stride_B_l + rn[None, :] * stride_B_n  # [BL, BN]
    off_C = rl[:, None] * stride_C_l + rn[None, :] * stride_C_n
    u_row = u_ptr + batch * stride_u_b + d0 * stride_u_d
    dt_row = delta_ptr + batch * stride_dt_b + d0 * stride_dt_d
    z_row = z_ptr + batch * stride_z_b + d0 * stride_z_d
    y_row = y_ptr + batch * stride_y_b + d0 * stride_y_d
    B_row = B_ptr + batch * stride_B_b
    C_row = C_ptr + batch * stride_C_b

    # Whole tiles run without position masks. The inputs of the next PREFETCH tiles are loaded
    # before the current one is computed, so that their latency hides behind its exps (past the
    # last whole tile, the last whole tile is loaded again instead of reading beyond it).
    n_full = (end - start) // BLOCK_L
    last_full = start + tl.maximum(n_full - 1, 0) * BLOCK_L
    whole = rl < BLOCK_L  # [BL] all true
    tile = _load_tile(
        u_row + start * stride_u_l, dt_row + start * stride_dt_l, z_row + start * stride_z_l,
        B_row + start * stride_B_l, C_row + start * stride_C_l, off_u, off_dt, off_z, off_B, off_C,
        rl < end - start, mask_d, mask_n, WRITE_Y, WRITE_Y and HAS_Z, True, not EVEN_D, True)
    tile1 = tile
    if PREFETCH > 1:
        p1 = tl.minimum(start + BLOCK_L, last_full)
        tile1 = _load_tile(
            u_row + p1 * stride_u_l, dt_row + p1 * stride_dt_l, z_row + p1 * stride_z_l,
            B_row + p1 * stride_B_l, C_row + p1 * stride_C_l, off_u, off_dt, off_z, off_B, off_C,
            rl < end - p1, mask_d, mask_n, WRITE_Y, WRITE_Y and HAS_Z, True, not EVEN_D, True)
    for i in range(n_full):
        lo = start + i * BLOCK_L
        nxt = tl.minimum(lo + PREFETCH * BLOCK_L, last_full)
        next_tile = _load_tile(
            u_row + nxt * stride_u_l, dt_row + nxt * stride_dt_l, z_row + nxt * stride_z_l,
            B_row + nxt * stride_B_l, C_row + nxt * stride_C_l, off_u, off_dt, off_z, off_B, off_C,
            whole, mask_d, mask_n, WRITE_Y, WRITE_Y and HAS_Z, False, not EVEN_D, not EVEN_N)
        u, dt, z, Bt, Ct = tile
        h, s = _scan_tile(
            h, A, Dv, bias, u, dt, z, Bt, Ct, y_row + lo * stride_y_l, off_y, whole, mask_d,
            HAS_D, HAS_Z, HAS_DELTA_BIAS, DELTA_SOFTPLUS, WRITE_Y, False, not EVEN_D, BLOCK_L)
        dtsum += s
        if PREFETCH > 1:
            tile = tile1
            tile1 = next_tile
        else:
            tile = next_tile
    lo = start + n_full * BLOCK_L
    if lo < end:  # the last, partial tile
        mask_l = rl < end - lo
        u, dt, z, Bt, Ct = _load_tile(
            u_row + lo * stride_u_l, dt_row + lo * stride_dt_l, z_row + lo * stride_z_l,
            B_row + lo * stride_B_l, C_row + lo * stride_C_l, off_u, off_dt, off_z, off_B, off_C,
            mask_l, mask_d, mask_n, WRITE_Y, WRITE_Y and HAS_Z, True, not EVEN_D, True)
        h, s = _scan_tile(
            h, A, Dv, bias, u, dt, z, Bt, Ct, y_row + lo * stride_y_l, off_y, mask_l, mask_d,
            HAS_D, HAS_Z, HAS_DELTA_BIAS, DELTA_SOFTPLUS, WRITE_Y, True, not EVEN_D, BLOCK_L)
        dtsum += s
    if WRITE_STATE:  # hT is a fresh contiguous [S, D, N] fp32 tensor (stride_hT_n = 1)
        tl.store(hT_ptr + seg * dim * dstate + (d0 + rd[None, :]) * dstate + rn[:, None] * stride_hT_n, h,
                 mask=mask_nd)
    if WRITE_DTSUM:  # dtsum is a fresh contiguous [S, D] fp32 tensor
        tl.store(dtsum_ptr + seg * dim + d0 + rd, dtsum, mask=mask_d)


@jit(do_not_specialize=["n_chunks"])
def _chunk_state_passing_kernel(
    hloc_ptr,  # [B * K, D, N] fp32: end state of each chunk scanned from a zero state
    dtsum_ptr,  # [B * K, D] fp32: sum of Δ over each chunk
    A_ptr, h0_ptr,  # [D, N], [B, D, N] (HAS_H0)
    hin_ptr,  # [B * K, D, N] fp32 out: initial state of each chunk
    hT_ptr,  # [B, D, N] fp32 out: final state of each row
    dim, dstate, n_chunks,
    stride_A_d, stride_A_n, stride_h0_b, stride_h0_d, stride_h0_n,
    HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(D, BLOCK_D), B): h_in[0] = h0, h_in[k+1] = exp(A ΣΔ_k) h_in[k] + h_end[k]."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rd = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    mask_d = rd < dim
    mask = mask_d[:, None] & (rn < dstate)[None, :]  # [BD, BN]
    A = tl.load(A_ptr + rd[:, None] * stride_A_d + rn[None, :] * stride_A_n, mask=mask, other=0.0).to(tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + b * stride_h0_b + rd[:, None] * stride_h0_d + rn[None, :] * stride_h0_n,
                    mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    off = rd[:, None] * dstate + rn[None, :]  # [BD, BN] within one [D, N] state
    for k in range(n_chunks):
        seg = b * n_chunks + k
        tl.store(hin_ptr + seg * dim * dstate + off, h, mask=mask)
        total = tl.load(dtsum_ptr + seg * dim + rd, mask=mask_d, other=0.0)  # [BD]
        h_end = tl.load(hloc_ptr + seg * dim * dstate + off, mask=mask, other=0.0)
        h = tl.exp2(total[:, None] * A * 1.4426950408889634) * h + h_end
    tl.store(hT_ptr + b * dim * dstate + off, h, mask=mask)


@jit
def _selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, y_ptr,
    dim, dstate,
    stride_s_b, stride_s_d, stride_s_n,
    stride_x_b, stride_x_d, stride_dt_b, stride_dt_d,
    stride_A_d, stride_A_n, stride_B_b, stride_B_n, stride_C_b, stride_C_n,
    stride_z_b, stride_z_d, stride_y_b, stride_y_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(D, BLOCK_D), B): one step of the recurrence for BLOCK_D channels of one row."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rd = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    mask_d = rd < dim
    mask_n = rn < dstate
    mask = mask_d[:, None] & mask_n[None, :]  # [BD, BN]
    s_ptrs = state_ptr + b * stride_s_b + rd[:, None] * stride_s_d + rn[None, :] * stride_s_n
    h = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BD, BN]
    x = tl.load(x_ptr + b * stride_x_b + rd * stride_x_d, mask=mask_d, other=0.0).to(tl.float32)  # [BD]
    dt = tl.load(dt_ptr + b * stride_dt_b + rd * stride_dt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + rd, mask=mask_d, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        dt = softplus(dt)
    A = tl.load(A_ptr + rd[:, None] * stride_A_d + rn[None, :] * stride_A_n, mask=mask, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * stride_B_b + rn * stride_B_n, mask=mask_n, other=0.0).to(tl.float32)  # [BN]
    Cv = tl.load(C_ptr + b * stride_C_b + rn * stride_C_n, mask=mask_n, other=0.0).to(tl.float32)
    h = tl.exp2(dt[:, None] * A * 1.4426950408889634) * h + (dt * x)[:, None] * Bv[None, :]
    tl.store(s_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(h * Cv[None, :], axis=1)  # [BD]
    if HAS_D:
        y += x * tl.load(D_ptr + rd, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        y *= silu_approx(tl.load(z_ptr + b * stride_z_b + rd * stride_z_d, mask=mask_d, other=0.0).to(tl.float32))
    tl.store(y_ptr + b * stride_y_b + rd * stride_y_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


# ---------------------------------------------------------------------------------------------
# Public wrappers (same signatures as the references)
# ---------------------------------------------------------------------------------------------

_MIN_CHUNK = 256  # shortest chunk worth a program of its own when a row is split along L
_MAX_TILE_OFFSET = 2**31 // 256  # strides must keep the int32 offsets within a tile in range
_MAX_ROWS = 65535  # the second grid dimension (rows or chunks) of a launch


# Tiles of the sequence kernel (N <= 16), chosen by timing on an H200 (bf16, N = 16, d_inner 1536
# and 5120). L-contiguous u ([B, D, L] tensors): 8 positions a tile, so that every lane loads 16
# bytes of its channel; the next tile is prefetched. Channel-contiguous u (the model's [B, L, D]
# activations): 4 positions a tile, two tiles prefetched (each tile's loads are scattered over
# rows, so their latency is longer), and at most 168 registers a thread, which lets 12 one-warp
# programs share an SM instead of 10. Rows split along L use the first in either layout (faster
# there: 1.47 against 1.67 ms for d_inner 5120, B = 1, L = 16384).
_TILES = {False: (8, 1, None), True: (4, 2, 168)}  # channel-contiguous u -> (BLOCK_L, PREFETCH, maxnreg)
_SPLIT_BELOW = 4  # split rows along L when they give fewer one-warp programs than this per SM ...
_SPLIT_TARGET = 48  # ... into chunks enough for about this many per SM (short waves, less tail)


def _scan_config(
    d_state: int, dim: int, channel_contiguous: bool, split: bool = False
) -> tuple[int, int, int, int, int | None]:
    """(BLOCK_D, BLOCK_N, BLOCK_L, PREFETCH, maxnreg) of the sequence kernel, which runs one warp per
    program; ``split``: rows split along L.

    BLOCK_D <= 32 channels, one per lane; for N <= 16 every thread holds all N states of its
    channel (BLOCK_D * BLOCK_N <= 512), larger N spreads over lanes."""
    block_n = triton.next_power_of_2(max(d_state, 1))
    block_d = max(2, min(32, 512 // block_n, triton.next_power_of_2(dim)))
    if block_n > 16:
        return block_d, block_n, 4, 1, None
    return (block_d, block_n, *_TILES[channel_contiguous and not split])


def _n_chunks(rows: int, dim: int, length: int, block_d: int, device: torch.device) -> int:
    """Chunks per row along L: 1 unless rows x channel blocks give too few programs to fill the GPU."""
    programs = rows * triton.cdiv(dim, block_d)
    sms = sm_count(device)
    if programs >= _SPLIT_BELOW * sms or length < 2 * _MIN_CHUNK:
        return 1
    return max(1, min(triton.cdiv(_SPLIT_TARGET * sms, programs), length // _MIN_CHUNK, _MAX_ROWS // rows))


def _chunking(length: int, n_chunks: int, block_l: int) -> tuple[int, int]:
    """(chunks, positions per chunk) of a row split into about ``n_chunks`` chunks of whole tiles."""
    if n_chunks <= 1 or length <= 1:
        return 1, max(length, 1)
    chunk_len = triton.cdiv(triton.cdiv(length, n_chunks), block_l) * block_l
    return triton.cdiv(length, chunk_len), chunk_len


def _launch_config(
    batch: int, dim: int, length: int, d_state: int, channel_contiguous: bool, device: torch.device,
    batch_invariant: bool = False,
) -> dict:
    """Launch configuration of ``selective_scan`` for these shapes.

    Returns ``n_chunks`` and ``chunk_len`` (each row is split along L into n_chunks chunks of
    chunk_len positions; 1 and L: not split) and the sequence kernel's tiles ``block_d, block_n,
    block_l, prefetch, maxnreg`` (from ``_scan_config``).

    What depends on the batch: only ``n_chunks``, which is above 1 when ``batch`` x channel blocks
    are too few to fill the GPU (and L is long). A split row is computed differently: its chunks
    are scanned from zero and chained by ``_chunk_state_passing_kernel``, and its tiles are the
    split ones, so its bits depend on how many rows share the call. With ``batch_invariant=True``
    rows are never split (what the code picks for large batches anyway): every row is then walked
    from position 0 in tiles that depend on N, D and u's layout only, and its outputs and final
    state are the same bits whatever the other rows (and whatever padding follows it).
    """
    block_d = _scan_config(d_state, dim, channel_contiguous)[0]
    if batch_invariant:
        n_chunks = 1
    else:
        n_chunks = _n_chunks(batch, dim, length, block_d, device)
    block_l = _scan_config(d_state, dim, channel_contiguous, n_chunks > 1)[2]
    n_chunks, chunk_len = _chunking(length, n_chunks, block_l)
    block_d, block_n, block_l, prefetch, maxnreg = _scan_config(d_state, dim, channel_contiguous, n_chunks > 1)
    return dict(n_chunks=n_chunks, chunk_len=chunk_len, block_d=block_d, block_n=block_n, block_l=block_l,
                prefetch=prefetch, maxnreg=maxnreg)


def _check_float(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the input)")


def _check_strides(name: str, t: torch.Tensor) -> None:
    """Offsets within a tile are int32 (the batch offset and the tile base are int64)."""
    largest = max(abs(s) for s in t.stride()[1:])
    if largest >= _MAX_TILE_OFFSET:
        raise ValueError(
            f"{name} has a stride of {largest} elements along its last two dimensions, too large for the "
            f"kernel's 32-bit tile offsets (limit {_MAX_TILE_OFFSET}); pass a contiguous tensor"
        )


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state):
    if u.dim() != 3:
        raise ValueError(f"u must be [B, D, L], got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be [D={dim}, N], got {tuple(A.shape)}")
    d_state = A.shape[1]
    expected = {
        "delta": (delta, (batch, dim, length)), "B": (B, (batch, d_state, length)),
        "C": (C, (batch, d_state, length)), "D": (D, (dim,)), "z": (z, (batch, dim, length)),
        "delta_bias": (delta_bias, (dim,)), "initial_state": (initial_state, (batch, dim, d_state)),
    }
    _check_float("u", u, u.device)
    _check_float("A", A, u.device)
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be of shape {shape}, got {tuple(t.shape)}")
        _check_float(name, t, u.device)
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None:
            _check_strides(name, t)


def _launch_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, y, hT, dtsum, n_seg, n_chunks, chunk_len,
                 write_y):
    batch, dim, length = u.shape
    d_state = A.shape[1]
    block_d, block_n, block_l, prefetch, maxnreg = _scan_config(d_state, dim, _channel_contiguous(u), n_chunks > 1)
    # maxnreg is a CUDA-only launch option (Triton's ROCm backend and interpreter reject or ignore it)
    extra = {"maxnreg": maxnreg} if maxnreg and u.is_cuda and torch.version.hip is None else {}
    dummy = u  # stands for an absent tensor (never read: its flag is off)

    def strides(t, n):
        return t.stride() if t is not None else (0,) * n

    _selective_scan_fwd_kernel[(triton.cdiv(dim, block_d), n_seg)](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, h0 if h0 is not None else dummy,
        y if y is not None else dummy, hT if hT is not None else dummy,
        dtsum if dtsum is not None else dummy,
        dim, length, d_state, chunk_len, n_chunks,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *strides(z, 3),
        *strides(y, 3), *strides(h0, 3), 1,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=bool(delta_softplus), HAS_H0=h0 is not None,
        WRITE_Y=write_y, WRITE_STATE=hT is not None, WRITE_DTSUM=dtsum is not None,
        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l, PREFETCH=prefetch,
        EVEN_D=dim % block_d == 0, EVEN_N=d_state == block_n,
        num_warps=1, **extra,
    )


def _channel_contiguous(u: torch.Tensor) -> bool:
    """Whether u is laid out channel-contiguous ([B, L, D] memory seen as [B, D, L])."""
    return u.stride(1) == 1 and u.shape[2] > 1


def _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, n_chunks: int):
    """The sequence scan on checked inputs; ``n_chunks`` > 1 splits each row along L."""
    batch, dim, length = u.shape
    d_state = A.shape[1]
    # y follows u: channel-contiguous ([B, L, D] memory) when u is, else [B, D, L] contiguous.
    if _channel_contiguous(u):
        y = new_output((batch, length, dim), u.dtype, u.device).transpose(1, 2)
    else:
        y = new_output((batch, dim, length), u.dtype, u.device)
    final_state = new_output((batch, dim, d_state), torch.float32, u.device)
    if batch == 0 or dim == 0:
        return y, final_state
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if n_chunks <= 1 or length <= 1:
        _launch_scan(*args, initial_state, y, final_state, None, batch, 1, max(length, 1), True)
        return y, final_state
    n_chunks, chunk_len = _chunking(length, n_chunks, _scan_config(d_state, dim, _channel_contiguous(u), True)[2])
    # Split rows: end states of the chunks from zero, then the chain of chunk states, then y.
    n_seg = batch * n_chunks
    h_end = torch.empty((n_seg, dim, d_state), dtype=torch.float32, device=u.device)
    dtsum = torch.empty((n_seg, dim), dtype=torch.float32, device=u.device)
    _launch_scan(*args, None, None, h_end, dtsum, n_seg, n_chunks, chunk_len, False)
    h_in = torch.empty_like(h_end)
    block_n = triton.next_power_of_2(d_state)
    block_d = max(1, min(64, 1024 // block_n))
    h0 = initial_state
    _chunk_state_passing_kernel[(triton.cdiv(dim, block_d), batch)](
        h_end, dtsum, A, h0 if h0 is not None else A, h_in, final_state, dim, d_state, n_chunks,
        *A.stride(), *(h0.stride() if h0 is not None else (0, 0, 0)),
        HAS_H0=h0 is not None, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=2,
    )
    _launch_scan(*args, h_in, y, None, None, n_seg, n_chunks, chunk_len, True)
    return y, final_state


def selective_scan(
    u: torch.Tensor,  # [B, D, L]
    delta: torch.Tensor,  # [B, D, L]
    A: torch.Tensor,  # [D, N]
    B: torch.Tensor,  # [B, N, L]
    C: torch.Tensor,  # [B, N, L]
    D: torch.Tensor | None = None,  # [D]
    z: torch.Tensor | None = None,  # [B, D, L]
    delta_bias: torch.Tensor | None = None,  # [D]
    delta_softplus: bool = True,
    initial_state: torch.Tensor | None = None,  # [B, D, N]
    *,
    batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``selective_scan_ref`` (same arguments and results).

    Any strides; y is channel-contiguous when u is. No host sync, no autotuning. Rows too few to fill the GPU are split along L (see the notes above the kernels), unless
    ``batch_invariant``: then every row's outputs and final state are bitwise independent of the
    other rows of the call (``_launch_config``), at the cost of speed for few, long rows.
    """
    require_triton("selective_scan")
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, length = u.shape
    if batch > _MAX_ROWS:
        raise ValueError(f"at most {_MAX_ROWS} rows per call, got {batch}")
    cfg = _launch_config(batch, dim, length, A.shape[1], _channel_contiguous(u), u.device, batch_invariant)
    return _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                               n_chunks=cfg["n_chunks"])


def selective_state_update(
    state: torch.Tensor,  # [B, D, N], updated in place
    x: torch.Tensor,  # [B, D]
    dt: torch.Tensor,  # [B, D]
    A: torch.Tensor,  # [D, N]
    B: torch.Tensor,  # [B, N]
    C: torch.Tensor,  # [B, N]
    D: torch.Tensor | None = None,  # [D]
    z: torch.Tensor | None = None,  # [B, D]
    dt_bias: torch.Tensor | None = None,  # [D]
    dt_softplus: bool = True,
) -> torch.Tensor:
    """Triton version of ``selective_state_update_ref``: updates ``state`` IN PLACE, returns y [B, D].

    One launch, no host sync and no autotuning (it would apply the update more than once), so it
    can be captured in a CUDA graph. Any strides; the state keeps its dtype (math in fp32).
    """
    require_triton("selective_state_update")
    if x.dim() != 2 or A.dim() != 2 or A.shape[0] != x.shape[1]:
        raise ValueError(f"x must be [B, D] and A [D, N], got x {tuple(x.shape)}, A {tuple(A.shape)}")
    batch, dim = x.shape
    d_state = A.shape[1]
    expected = {
        "state": (state, (batch, dim, d_state)), "dt": (dt, (batch, dim)), "B": (B, (batch, d_state)),
        "C": (C, (batch, d_state)), "D": (D, (dim,)), "z": (z, (batch, dim)), "dt_bias": (dt_bias, (dim,)),
    }
    _check_float("x", x, x.device)
    _check_float("A", A, x.device)
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be of shape {shape}, got {tuple(t.shape)}")
        _check_float(name, t, x.device)
    if batch > _MAX_ROWS:
        raise ValueError(f"at most {_MAX_ROWS} rows per call, got {batch}")
    y = new_output((batch, dim), x.dtype, x.device)
    if y.numel() == 0:
        return y
    block_n = triton.next_power_of_2(max(d_state, 1))
    block_d = max(1, min(64, 256 // block_n))
    dummy = x
    _selective_state_update_kernel[(triton.cdiv(dim, block_d), batch)](
        state, x, dt, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, y,
        dim, d_state, *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *(z.stride() if z is not None else (0, 0)), *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus),
        BLOCK_D=block_d, BLOCK_N=block_n, num_warps=1,
    )
    return y
