"""One Mamba-1 decoding step after ``in_proj``, fused into two kernels (Mamba paper, Sec. 3.4, Alg. 2, Fig. 3).

For one new token of every batch row b, with ``x, z`` the two halves of ``in_proj``'s output::

    window  = [conv_state[b, d, 0 .. K-2], x[b, d]]                         (shifted into conv_state)
    u       = silu(<conv_weight[d], window> + conv_bias[d])                  the SSM input x_t
    [δ; B; C] = x_proj_weight @ u                                            δ: the rank-R low-rank Δ
    (Falcon-Mamba, bcdt_eps given: δ, B, C each replaced by δ / rms(δ), ... with rms(v) = sqrt(mean(v²) + eps))
    Δ       = softplus(dt_proj_weight @ δ + dt_bias)
    h       = exp(Δ[d] A[d, :]) * h + Δ[d] B u[d]                            ssm_state, in place
    y[b, d] = (<C, h> + D[d] u[d]) * silu(z[b, d])

This is what ``Mamba1Mixer.step`` computes between ``in_proj`` and ``out_proj``: the causal-conv
update, ``x_proj``, the split into Δ/B/C (and the optional norms), ``dt_proj`` and the selective
state update, in one call.

Shapes (glossary in ``mamba_eval.kernels``; D = d_inner, R = dt_rank, J = R + 2N):
    x, z [B, D] (any strides: the model passes the two halves of one [B, 2D] tensor);
    conv_state [B, D, K-1] and ssm_state [B, D, N], both updated IN PLACE;
    conv_weight [D, K], conv_bias [D] or None; x_proj_weight [J, D]; dt_proj_weight [D, R];
    dt_bias, D [D] fp32; A [D, N] fp32 (already ``-exp(A_log)``). Returns y [B, D] in x's dtype.

Numerics
--------
``mamba1_decode_ref`` is the model's op sequence itself (``causal_conv1d_update_ref``, two
``F.linear``, ``selective_state_update_ref``), so it rounds as the model does: the convolved ``u``,
the ``x_proj`` output (δ, B, C), the normalised δ/B/C and the ``dt_proj`` output are all in the
activation dtype before the state update. The Triton kernels keep every intermediate in fp32 (``u``,
the ``x_proj`` sums, the norms, Δ); only y is rounded to x's dtype and the new states to theirs.
So:

- with fp32 activations, kernel and reference differ only in fp32 summation order and the kernels'
  exp2/softplus (relative max error of y and of an fp32 state: 3.5e-7 measured, 1e-5 tested);
- with bf16 activations the kernel equals the reference evaluated in fp32 on the same bf16
  inputs (fp32 state: 2e-7 measured, 1e-5 tested; y and a bf16 state within one bf16 unit in the
  last place, 8e-3), and differs from the bf16 reference by that reference's own roundings:
  1.2e-2 relative max error of y measured per step (3.5e-3 for an fp32 state), 3e-2 tested.

State dtypes: conv_state holds raw inputs (stored in its dtype, normally the activations');
ssm_state may be fp32 or 16-bit: the math is fp32 and h is rounded once, when stored (y uses the
unrounded h, as ``selective_state_update_ref`` does).

Kernels
-------
1. ``_conv_xproj_kernel``, grid (channel blocks, J-tile groups, row groups): the conv window and
   SiLU for a block of ``BLOCK_D1`` channels, written to an fp32 workspace ``u`` [B, D]; and the
   block's share of ``x_proj``, ``sum_{d in block} W[j, d] u[d]``, into an fp32 workspace
   ``partial`` [B, n_blocks, J] (one row per block: no atomics, a fixed order).
2. ``_ssm_step_kernel``, grid (channel-tile groups, row groups): every program sums the n_blocks
   partial rows of its batch rows (a few KB), applies the norms, computes Δ for its
   ``BLOCK_D2`` channels (their rows of ``dt_proj_weight``), advances h, writes y, and shifts the
   conv window (kernel 1 only reads conv_state: its J-tile programs all read the same window).

Results do not depend on the batch: the compiled kernels (block sizes, warps) depend only on the
model's sizes, and a batch only changes how many rows and tiles a program loops over (runtime
arguments, left unspecialised), never the order of any sum. A row gives the same bits alone or
in a batch of any size (given tensors of the same strides and alignment, as a model's are).

Graph-safe: two launches, no host synchronisation, no autotuning (the updates are applied exactly
once), and one workspace allocation whose size depends only on the shapes (the caching allocator
serves it inside ``torch.cuda.graph`` capture).

Block sizes (see ``_config``) target an H100/H200 (132 SMs) at batch 1, where the step is latency
bound and about 4.6 MB (mamba-2.8b: x_proj 2 MB, dt_proj 1.6 MB, A and the fp32 state 1 MB) must
come from memory spread over as many SMs as possible: about 120-160 programs per kernel, each
moving 15-40 KB. mamba-2.8b (D 5120, R 160, N 16): kernel 1 has 10 channel blocks of 512 x 12
J-tiles of 16 (each program: a 16 KB tile of x_proj_weight; 10 partial rows, 7.7 KB a batch row);
kernel 2 has 160 tiles of 32 channels (10 KB of dt_proj_weight, 2 KB of A, 4 KB of state each).
mamba-130m (D 1536, R 48): 12 blocks of 128 x 10 J-tiles of 8, and 96 tiles of 16 channels. With
more rows (``_partition``) a program loops over up to 8 of them, and then over several tiles,
while about 2 programs per SM remain: at batch 64 (mamba-2.8b) kernel 1 runs 320 programs of 8
rows x 3 J-tiles, kernel 2 320 programs of 8 rows x 4 channel tiles, so the weight tiles are read
once per 8 rows and a row's partial sums once per 4 tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .conv1d import causal_conv1d_update_ref
from .norm import weightless_rmsnorm_ref
from .selective_scan import selective_state_update_ref
from .utils import jit, new_output, require_triton, silu, silu_approx, sm_count, softplus, tl, triton

_MAX_WIDTH = 8  # conv widths the kernels compile for (Mamba uses K = 4)
_MAX_ROWS = 65535  # grid axes 1 and 2 (row groups) of a launch


def _check_inputs(x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                  dt_bias, A, D, bcdt_eps) -> tuple[int, int, int, int, int]:
    """Shapes and devices of a step's arguments; returns (B, D, K, N, R)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [B, D], got {tuple(x.shape)}")
    batch, dim = x.shape
    if conv_weight.dim() != 2 or conv_weight.shape[0] != dim:
        raise ValueError(f"conv_weight must be [D={dim}, K], got {tuple(conv_weight.shape)}")
    width = conv_weight.shape[1]
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be [D={dim}, N], got {tuple(A.shape)}")
    d_state = A.shape[1]
    if dt_proj_weight.dim() != 2 or dt_proj_weight.shape[0] != dim:
        raise ValueError(f"dt_proj_weight must be [D={dim}, R], got {tuple(dt_proj_weight.shape)}")
    rank = dt_proj_weight.shape[1]
    if rank < 1 or d_state < 1:
        raise ValueError(f"dt_rank and d_state must be >= 1, got dt_proj_weight {tuple(dt_proj_weight.shape)}, "
                         f"A {tuple(A.shape)}")
    expected = {
        "z": (z, (batch, dim)), "conv_state": (conv_state, (batch, dim, width - 1)),
        "ssm_state": (ssm_state, (batch, dim, d_state)), "conv_bias": (conv_bias, (dim,)),
        "x_proj_weight": (x_proj_weight, (rank + 2 * d_state, dim)), "dt_bias": (dt_bias, (dim,)), "D": (D, (dim,)),
    }
    for name, (t, shape) in expected.items():
        if t is None:
            if name != "conv_bias":
                raise ValueError(f"{name} is required, got None")
            continue
        if tuple(t.shape) != shape:
            what = " (J = R + 2N rows: [dt; B; C])" if name == "x_proj_weight" else ""
            raise ValueError(f"{name} must be of shape {shape}{what}, got {tuple(t.shape)}")
    for name, t in (("x", x), ("conv_weight", conv_weight), ("A", A), ("dt_proj_weight", dt_proj_weight),
                    *((n, t) for n, (t, _) in expected.items())):
        if t is None:
            continue
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected {x.device} (the device of x)")
    if bcdt_eps is not None and not float(bcdt_eps) >= 0:
        raise ValueError(f"bcdt_eps must be None or a number >= 0, got {bcdt_eps!r}")
    return batch, dim, width, d_state, rank


def mamba1_decode_ref(
    x: torch.Tensor,  # [B, D] the conv input (in_proj's x half)
    z: torch.Tensor,  # [B, D] the gate (in_proj's z half)
    conv_state: torch.Tensor,  # [B, D, K-1], updated in place
    ssm_state: torch.Tensor,  # [B, D, N], updated in place
    conv_weight: torch.Tensor,  # [D, K]
    conv_bias: torch.Tensor | None,  # [D]
    x_proj_weight: torch.Tensor,  # [R + 2N, D], rows [dt; B; C]
    dt_proj_weight: torch.Tensor,  # [D, R]
    dt_bias: torch.Tensor,  # [D] fp32
    A: torch.Tensor,  # [D, N] fp32, -exp(A_log)
    D: torch.Tensor,  # [D] fp32
    bcdt_eps: float | None = None,
) -> torch.Tensor:
    """One decoding step as the model's op sequence: returns y [B, D] in x.dtype; advances both
    states IN PLACE. ``bcdt_eps``: Falcon-Mamba's weightless RMSNorms of δ, B and C (None: none)."""
    _, _, _, d_state, rank = _check_inputs(x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight,
                                           dt_proj_weight, dt_bias, A, D, bcdt_eps)
    u = causal_conv1d_update_ref(x, conv_state, conv_weight, conv_bias, "silu")
    dt, B, C = F.linear(u, x_proj_weight).split([rank, d_state, d_state], dim=-1)
    if bcdt_eps is not None:
        dt, B, C = (weightless_rmsnorm_ref(t, bcdt_eps) for t in (dt, B, C))
    dt = F.linear(dt, dt_proj_weight)
    return selective_state_update_ref(ssm_state, u, dt, A, B, C, D, z, dt_bias=dt_bias, dt_softplus=True)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
#
# Every batch row is handled by the same code whatever the batch: a program loops over its rows
# (outer loop) and, for each row, over its tiles (inner loop); these trip counts are runtime
# arguments (do_not_specialize, so that a batch of 1 does not compile a different kernel), and
# every sum runs over a tile whose shape is fixed by the model's sizes.


@jit(do_not_specialize=["batch", "rows_per_prog", "tiles_per_prog"])
def _conv_xproj_kernel(
    x_ptr,  # [B, D] conv input
    cs_ptr,  # [B, D, K-1] conv state (only read here)
    cw_ptr,  # [D, K] conv weight
    cb_ptr,  # [D] conv bias (HAS_CONV_BIAS)
    w_ptr,  # [J, D] x_proj weight
    u_ptr,  # [B, D] fp32 out: the convolved, activated x
    part_ptr,  # [B, n_blocks, J] fp32 out: x_proj partial sums of every channel block
    batch, dim, n_out, n_blocks, rows_per_prog, tiles_per_prog,
    stride_x_b, stride_x_d,
    stride_cs_b, stride_cs_d, stride_cs_k,
    stride_cw_d, stride_cw_k,
    stride_w_j, stride_w_d,
    K: tl.constexpr, KP: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Grid (n_blocks, J-tile groups, row groups): channels [pid_d * BLOCK_D, +BLOCK_D) of
    rows [pid_b * rows_per_prog, +rows_per_prog), J-tiles [pid_j * tiles_per_prog, +tiles_per_prog)."""
    pid_d = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_b = tl.program_id(2)
    rd = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD] channels
    mask_d = rd < dim
    rk = tl.arange(0, KP)  # [KP] window columns: K-1 from the state, then x
    in_state = rk < K - 1
    w_conv = tl.load(cw_ptr + rd[:, None] * stride_cw_d + rk[None, :] * stride_cw_k,
                     mask=mask_d[:, None] & (rk < K)[None, :], other=0.0).to(tl.float32)  # [BD, KP]
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_CONV_BIAS:
        bias = tl.load(cb_ptr + rd, mask=mask_d, other=0.0).to(tl.float32)
    rj0 = tl.arange(0, BLOCK_J)
    b_lo = pid_b * rows_per_prog
    row0 = b_lo.to(tl.int64)
    for i in range(tl.minimum(rows_per_prog, batch - b_lo)):
        b64 = row0 + i
        xb = tl.load(x_ptr + b64 * stride_x_b + rd * stride_x_d, mask=mask_d, other=0.0).to(tl.float32)
        window = tl.load(cs_ptr + b64 * stride_cs_b + rd[:, None] * stride_cs_d + rk[None, :] * stride_cs_k,
                         mask=mask_d[:, None] & in_state[None, :], other=0.0).to(tl.float32)  # [BD, KP]
        window = tl.where(in_state[None, :], window, xb[:, None])  # columns >= K have weight 0
        acc = tl.sum(w_conv * window, axis=1) + bias  # [BD]
        u = silu(acc)  # padded channels give 0
        tl.store(u_ptr + b64 * dim + rd, u, mask=mask_d & (rd * 0 + pid_j == 0))  # written once
        part_row = part_ptr + (b64 * n_blocks + pid_d) * n_out
        for t in range(tiles_per_prog):
            rj = (pid_j * tiles_per_prog + t) * BLOCK_J + rj0  # [BJ] rows of x_proj
            mask_j = rj < n_out
            w = tl.load(w_ptr + rj[:, None].to(tl.int64) * stride_w_j + rd[None, :] * stride_w_d,
                        mask=mask_j[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # [BJ, BD]
            tl.store(part_row + rj, tl.sum(w * u[None, :], axis=1), mask=mask_j)

@jit(do_not_specialize=["batch", "rows_per_prog", "tiles_per_prog"])
def _ssm_step_kernel(
    x_ptr, z_ptr,  # [B, D] conv input (shifted into the window), gate
    cs_ptr,  # [B, D, K-1] conv state, shifted in place
    s_ptr,  # [B, D, N] SSM state, updated in place
    u_ptr,  # [B, D] fp32 from kernel 1
    part_ptr,  # [B, n_blocks, J] fp32 from kernel 1
    dtw_ptr, dtb_ptr, A_ptr, D_ptr,  # [D, R], [D], [D, N], [D]
    y_ptr,  # [B, D] out
    batch, dim, rank, dstate, n_blocks, rows_per_prog, tiles_per_prog, eps,
    stride_x_b, stride_x_d, stride_z_b, stride_z_d,
    stride_cs_b, stride_cs_d, stride_cs_k,
    stride_s_b, stride_s_d, stride_s_n,
    stride_dtw_d, stride_dtw_r, stride_A_d, stride_A_n,
    stride_y_b, stride_y_d,
    K: tl.constexpr, KP: tl.constexpr, HAS_NORM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid (tile groups, row groups): channel tiles [pid_d * tiles_per_prog, +tiles_per_prog)
    of BLOCK_D channels, rows [pid_b * rows_per_prog, +rows_per_prog)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    rr = tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)
    rp = tl.arange(0, BLOCK_P)
    rk = tl.arange(0, KP)
    rd0 = tl.arange(0, BLOCK_D)
    mask_r = rr < rank
    mask_n = rn < dstate
    mask_p = rp < n_blocks
    n_out = rank + 2 * dstate
    shifted_in_state = rk + 1 < K - 1  # new window column k = old column k + 1 (the last one: x)
    b_lo = pid_b * rows_per_prog
    row0 = b_lo.to(tl.int64)
    for i in range(tl.minimum(rows_per_prog, batch - b_lo)):
        b64 = row0 + i
        # x_proj's output for row b: the sum of the blocks' partial rows, always in block order.
        prow = part_ptr + b64 * n_blocks * n_out + rp[:, None] * n_out  # [BP, 1]
        dtl = tl.sum(tl.load(prow + rr[None, :], mask=mask_p[:, None] & mask_r[None, :], other=0.0), axis=0)
        Bv = tl.sum(tl.load(prow + rank + rn[None, :], mask=mask_p[:, None] & mask_n[None, :], other=0.0), axis=0)
        Cv = tl.sum(tl.load(prow + rank + dstate + rn[None, :], mask=mask_p[:, None] & mask_n[None, :],
                            other=0.0), axis=0)  # dtl [BR], Bv, Cv [BN]
        if HAS_NORM:  # weightless RMSNorm of each, over its own width (padding is 0)
            dtl = dtl * tl.rsqrt(tl.sum(dtl * dtl, axis=0) / rank + eps)
            Bv = Bv * tl.rsqrt(tl.sum(Bv * Bv, axis=0) / dstate + eps)
            Cv = Cv * tl.rsqrt(tl.sum(Cv * Cv, axis=0) / dstate + eps)
        for t in range(tiles_per_prog):
            rd = (pid_d * tiles_per_prog + t).to(tl.int64) * BLOCK_D + rd0  # [BD] channels
            mask_d = rd < dim
            mask_dn = mask_d[:, None] & mask_n[None, :]
            w = tl.load(dtw_ptr + rd[:, None] * stride_dtw_d + rr[None, :] * stride_dtw_r,
                        mask=mask_d[:, None] & mask_r[None, :], other=0.0).to(tl.float32)  # [BD, BR]
            dt = tl.sum(w * dtl[None, :], axis=1) + tl.load(dtb_ptr + rd, mask=mask_d, other=0.0).to(tl.float32)
            dt = softplus(dt)  # Δ [BD]
            A = tl.load(A_ptr + rd[:, None] * stride_A_d + rn[None, :] * stride_A_n, mask=mask_dn,
                        other=0.0).to(tl.float32)  # [BD, BN]
            u = tl.load(u_ptr + b64 * dim + rd, mask=mask_d, other=0.0)  # [BD] fp32
            s_ptrs = s_ptr + b64 * stride_s_b + rd[:, None] * stride_s_d + rn[None, :] * stride_s_n
            h = tl.load(s_ptrs, mask=mask_dn, other=0.0).to(tl.float32)  # [BD, BN]
            h = tl.exp2(dt[:, None] * A * 1.4426950408889634) * h + (dt * u)[:, None] * Bv[None, :]
            tl.store(s_ptrs, h.to(s_ptr.dtype.element_ty), mask=mask_dn)
            y = tl.sum(h * Cv[None, :], axis=1) + u * tl.load(D_ptr + rd, mask=mask_d, other=0.0).to(tl.float32)
            zv = tl.load(z_ptr + b64 * stride_z_b + rd * stride_z_d, mask=mask_d, other=0.0).to(tl.float32)
            tl.store(y_ptr + b64 * stride_y_b + rd * stride_y_d, (y * silu_approx(zv)).to(y_ptr.dtype.element_ty),
                     mask=mask_d)
            # Conv window: drop the oldest input, append x. Kernel 1 has read the old window.
            xb = tl.load(x_ptr + b64 * stride_x_b + rd * stride_x_d, mask=mask_d, other=0.0)
            c_rows = cs_ptr + b64 * stride_cs_b + rd[:, None] * stride_cs_d  # [BD, 1]
            shifted = tl.load(c_rows + (rk + 1)[None, :] * stride_cs_k,
                              mask=mask_d[:, None] & shifted_in_state[None, :], other=0.0)
            new_window = tl.where(shifted_in_state[None, :], shifted.to(tl.float32), xb.to(tl.float32)[:, None])
            tl.debug_barrier()  # every read of this tile's window before any write
            tl.store(c_rows + rk[None, :] * stride_cs_k, new_window.to(cs_ptr.dtype.element_ty),
                     mask=mask_d[:, None] & (rk < K - 1)[None, :])


# ---------------------------------------------------------------------------------------------
# Public wrapper (same signature as the reference)
# ---------------------------------------------------------------------------------------------

_PROGRAMS = 128  # programs per kernel aimed at for one row: about one per SM of an H100/H200
_MAX_BLOCK_D1 = 512  # channels per kernel-1 block (at most)
_MIN_BLOCKS = 8  # kernel 1 has at least this many channel blocks when D allows (smaller blocks)
_MIN_BLOCK_D1 = 32
_BLOCK_D2_RANGE = (16, 64)  # channels per kernel-2 tile
_TILE_ELEMENTS = 8192  # largest weight tile a program holds (fp32 elements)
_ROWS_PER_PROGRAM = 8  # most batch rows one program loops over
_PROGRAMS_PER_SM = 2  # rows, then tiles, are grouped while this many programs per SM remain


@dataclass(frozen=True)
class _Config:
    """Compile-time tile sizes: functions of the model's sizes only (never of the batch)."""

    block_d1: int  # channels per kernel-1 block
    block_j: int  # x_proj rows per kernel-1 tile
    block_d2: int  # channels per kernel-2 tile
    n_blocks: int  # kernel-1 channel blocks = partial rows per batch row
    n_jtiles: int
    n_dtiles: int


def _prev_power_of_2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _config(dim: int, rank: int, d_state: int) -> _Config:
    """Kernel 1: blocks of up to 512 channels, but at least 8 blocks where D allows, so that the
    partial rows kernel 2 sums stay few (8-16 for D = 1536..8192); x_proj's J rows are then tiled
    so that blocks x tiles is about ``_PROGRAMS``. Kernel 2: D / ``_PROGRAMS`` channels a tile,
    rounded down to a power of two within [16, 64]. Weight tiles stay within ``_TILE_ELEMENTS``
    (64 fp32 registers a thread at 4 warps). See the module docstring for the real shapes."""
    n_out = rank + 2 * d_state
    block_d1 = _MAX_BLOCK_D1
    while block_d1 > _MIN_BLOCK_D1 and dim < _MIN_BLOCKS * block_d1:
        block_d1 //= 2
    n_blocks = triton.cdiv(dim, block_d1)
    block_j = triton.next_power_of_2(triton.cdiv(n_out, triton.cdiv(_PROGRAMS, n_blocks)))
    block_j = max(2, min(64, _TILE_ELEMENTS // block_d1, block_j))
    lo, hi = _BLOCK_D2_RANGE
    block_d2 = max(lo, min(hi, _TILE_ELEMENTS // triton.next_power_of_2(rank), _prev_power_of_2(dim // _PROGRAMS)))
    return _Config(block_d1, block_j, block_d2, n_blocks, triton.cdiv(n_out, block_j), triton.cdiv(dim, block_d2))


def _partition(batch: int, tiles: int, others: int, device: torch.device) -> tuple[int, int]:
    """(rows per program, tiles per program) of one launch; ``others`` programs share each tile
    (kernel 1's channel blocks). Runtime arguments only: they change which program does the work,
    not the numbers. Rows are grouped (up to ``_ROWS_PER_PROGRAM``: a program reads its weight
    tiles once per group) only while at least ``_PROGRAMS_PER_SM`` programs per SM remain, then
    tiles likewise (kernel 1 convolves a row once per group of tiles, kernel 2 sums a row's
    partial rows once per group)."""
    enough = _PROGRAMS_PER_SM * sm_count(device)
    base = others * tiles
    rows = max(1, min(batch, _ROWS_PER_PROGRAM, batch * base // enough))
    per = base * triton.cdiv(batch, rows) // enough
    return rows, max(1, min(tiles, per))


def mamba1_decode(
    x: torch.Tensor,  # [B, D] the conv input (in_proj's x half)
    z: torch.Tensor,  # [B, D] the gate (in_proj's z half)
    conv_state: torch.Tensor,  # [B, D, K-1], updated in place
    ssm_state: torch.Tensor,  # [B, D, N], updated in place
    conv_weight: torch.Tensor,  # [D, K]
    conv_bias: torch.Tensor | None,  # [D]
    x_proj_weight: torch.Tensor,  # [R + 2N, D], rows [dt; B; C]
    dt_proj_weight: torch.Tensor,  # [D, R]
    dt_bias: torch.Tensor,  # [D] fp32
    A: torch.Tensor,  # [D, N] fp32, -exp(A_log)
    D: torch.Tensor,  # [D] fp32
    bcdt_eps: float | None = None,
) -> torch.Tensor:
    """Triton version of ``mamba1_decode_ref`` (same arguments and results, intermediates in fp32):
    two launches, both states updated IN PLACE, y [B, D] in x.dtype. Any strides. Graph-capturable."""
    require_triton("mamba1_decode")
    batch, dim, width, d_state, rank = _check_inputs(x, z, conv_state, ssm_state, conv_weight, conv_bias,
                                                     x_proj_weight, dt_proj_weight, dt_bias, A, D, bcdt_eps)
    if not 1 <= width <= _MAX_WIDTH:
        raise ValueError(f"conv width K must be in 1..{_MAX_WIDTH}, got conv_weight {tuple(conv_weight.shape)}")
    if batch > _MAX_ROWS:
        raise ValueError(f"at most {_MAX_ROWS} rows per call, got {batch}")
    y = new_output((batch, dim), x.dtype, x.device)
    if batch == 0 or dim == 0:
        return y
    n_out = rank + 2 * d_state
    cfg = _config(dim, rank, d_state)
    # Workspace: u [B, D] then partial [B, n_blocks, J], both fp32 and fully written by kernel 1;
    # partial starts 16-byte aligned whatever B (the kernels' alignment specialisation stays fixed).
    u_len = triton.cdiv(batch * dim, 4) * 4
    work = new_output((u_len + batch * cfg.n_blocks * n_out,), torch.float32, x.device)
    u, partial = work[:batch * dim], work[u_len:]
    kp = triton.next_power_of_2(width)
    num_warps = 4

    rows, tiles = _partition(batch, cfg.n_jtiles, cfg.n_blocks, x.device)
    _conv_xproj_kernel[(cfg.n_blocks, triton.cdiv(cfg.n_jtiles, tiles), triton.cdiv(batch, rows))](
        x, conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight, x_proj_weight, u, partial,
        batch, dim, n_out, cfg.n_blocks, rows, tiles,
        *x.stride(), *conv_state.stride(), *conv_weight.stride(), *x_proj_weight.stride(),
        K=width, KP=kp, HAS_CONV_BIAS=conv_bias is not None, BLOCK_D=cfg.block_d1, BLOCK_J=cfg.block_j,
        num_warps=num_warps,
    )
    rows, tiles = _partition(batch, cfg.n_dtiles, 1, x.device)
    _ssm_step_kernel[(triton.cdiv(cfg.n_dtiles, tiles), triton.cdiv(batch, rows))](
        x, z, conv_state, ssm_state, u, partial, dt_proj_weight, dt_bias, A, D, y,
        batch, dim, rank, d_state, cfg.n_blocks, rows, tiles, float(bcdt_eps or 0.0),
        *x.stride(), *z.stride(), *conv_state.stride(), *ssm_state.stride(),
        *dt_proj_weight.stride(), *A.stride(), *y.stride(),
        K=width, KP=kp, HAS_NORM=bcdt_eps is not None,
        BLOCK_D=cfg.block_d2, BLOCK_R=triton.next_power_of_2(rank), BLOCK_N=triton.next_power_of_2(d_state),
        BLOCK_P=triton.next_power_of_2(cfg.n_blocks),
        num_warps=num_warps,
    )
    return y
