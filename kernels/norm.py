"""Normalisation layers of the Mamba blocks.

``add_rmsnorm_ref``: the pre-norm residual step of every block (mamba_ssm's fused add + norm;
RMSNorm is Zhang & Sennrich 2019)::

    r   = x + residual                  (residual = None at the first block: r = x)
    out = r / sqrt(mean(r^2) + eps) * weight (+ bias)                       RMSNorm (is_rms=True)
    out = (r - mean(r)) / sqrt(var(r) + eps) * weight (+ bias)             LayerNorm (is_rms=False)

over the last dimension D. The sum ``r`` is formed and normalised in fp32; it is returned as the
new residual, in fp32 when ``residual_in_fp32`` (else in the residual's dtype, or x's at the first
block); ``out`` is returned in ``x.dtype``.

``gated_rmsnorm_ref``: Mamba-2's output norm (Dao & Gu 2024, Sec. 7.3; mamba_ssm's ``RMSNormGated``
with ``norm_before_gate=False``): gate first, then RMSNorm each group of ``group_size`` channels::

    v   = y * silu(z)
    out = v / sqrt(mean_group(v^2) + eps) * weight

Shapes: x, residual, y, z [..., D]; weight, bias [D]. Nothing is written in place (unless the
caller hands the kernel ``residual_out=residual``).

``add_rmsnorm`` and ``gated_rmsnorm`` are the Triton kernels, with the signatures of the
references (plus keyword-only output buffers). Rows are tokens (leading dims flattened), one
program normalises one row (or several narrow rows) and, when the row fits in registers, reads
each input once and writes each output once: the bound is memory bandwidth, 12 bytes per element
for add_rmsnorm with bf16 activations and an fp32 residual stream (read x, residual; write
normed, residual), 6 for gated_rmsnorm in bf16 (read y, z; write out).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .utils import jit, new_output, require_triton, tl, triton


def weightless_rmsnorm_ref(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight over the last dimension, in fp32, returned in x's dtype
    (Falcon-Mamba's norms of Δ, B and C)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rmsnorm_ref(
    x: torch.Tensor,  # [..., D]
    residual: torch.Tensor | None,  # [..., D]
    weight: torch.Tensor,  # [D]
    bias: torch.Tensor | None = None,  # [D]
    eps: float = 1e-5,
    residual_in_fp32: bool = True,
    is_rms: bool = True,
    return_residual: bool = True,
    *,
    batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns ``(normed [..., D] in x.dtype, new_residual [..., D])``; see the module docstring.

    ``return_residual=False`` returns ``(normed, None)``: the final norm has no use for the sum.
    ``batch_invariant`` is accepted for the kernel's signature and ignored.
    """
    r = x.float() if residual is None else x.float() + residual.float()
    if is_rms:
        normed = r * torch.rsqrt(r.square().mean(-1, keepdim=True) + eps)
    else:
        centred = r - r.mean(-1, keepdim=True)
        normed = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    normed = normed * weight.float()
    if bias is not None:
        normed = normed + bias.float()
    residual_dtype = torch.float32 if residual_in_fp32 else (x.dtype if residual is None else residual.dtype)
    return normed.to(x.dtype), (r.to(residual_dtype) if return_residual else None)


def gated_rmsnorm_ref(
    y: torch.Tensor,  # [..., D]
    z: torch.Tensor,  # [..., D]
    weight: torch.Tensor,  # [D]
    eps: float = 1e-5,
    group_size: int | None = None,
    *,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """``RMSNorm(y * silu(z))`` over groups of ``group_size`` channels (None: one group); in y.dtype.

    ``batch_invariant`` is accepted for the kernel's signature and ignored."""
    width = y.shape[-1]
    group_size = width if group_size is None else group_size
    if width % group_size != 0:
        raise ValueError(f"the last dimension {width} is not a multiple of group_size {group_size}")
    v = y.float() * F.silu(z.float())
    v = v.unflatten(-1, (width // group_size, group_size))  # [..., groups, group_size]
    v = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)
    return (v.flatten(-2) * weight.float()).to(y.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels. Rows are tokens (all leading dims flattened), columns the normalised dimension.
# Both ops are memory bound: add_rmsnorm moves x, residual in and normed, new residual out
# (12 bytes per element for bf16 activations with an fp32 residual stream); gated_rmsnorm moves
# y, z in and out back (6 bytes per element in bf16). When a row fits in registers it is read
# once (single pass); wider rows are read two or three times (statistics, then output).
# ---------------------------------------------------------------------------------------------

# Widest row (or group) kept in registers: 16384 fp32 values over 16 warps is 32 per thread.
_MAX_BLOCK_N = 16384
# Block of the loop over a wider row (read two or three times, mostly from L2).
_MULTI_PASS_BLOCK_N = 4096
# A program handles ROWS rows at once when rows are narrow, up to this many elements ...
_ELEMS_PER_PROGRAM = 4096
# ... as long as at least this many programs remain (several per SM keep loads in flight).
_MIN_PROGRAMS = 1024


@jit(do_not_specialize=["M"])  # the row count varies per call: one compiled variant
def _add_rmsnorm_fwd_kernel(
    X,  # [M, N]
    RES,  # [M, N] (unused unless HAS_RESIDUAL)
    W,  # [N]
    BIAS,  # [N] (unused unless HAS_BIAS)
    OUT,  # [M, N]
    RES_OUT,  # [M, N] (unused unless STORE_RESIDUAL); may be the same memory as RES
    M,
    N,
    stride_x_row,
    stride_res_row,
    stride_out_row,
    stride_res_out_row,
    eps,
    ALIGN: tl.constexpr,  # the row strides are these values times ALIGN
    VEC: tl.constexpr,  # elements per 16-byte access of the widest dtype
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    row_mask = rows < M
    cols = tl.max_contiguous(tl.arange(0, BLOCK_N), VEC)  # [BLOCK_N]
    x_ptrs = X + rows[:, None] * (stride_x_row * ALIGN)  # [ROWS, 1]
    res_ptrs = RES + rows[:, None] * (stride_res_row * ALIGN)
    out_ptrs = OUT + rows[:, None] * (stride_out_row * ALIGN)
    res_out_ptrs = RES_OUT + rows[:, None] * (stride_res_out_row * ALIGN)
    if SINGLE_PASS:
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]  # [ROWS, BLOCK_N]
        r = tl.load(x_ptrs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r += tl.load(res_ptrs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if STORE_RESIDUAL:
            tl.store(res_out_ptrs + cols[None, :], r.to(RES_OUT.dtype.element_ty), mask=mask)
        if IS_RMS:
            rstd = tl.rsqrt(tl.sum(r * r, axis=1) / N + eps)  # [ROWS]
            r_hat = r * rstd[:, None]
        else:
            mean = tl.sum(r, axis=1) / N
            centred = tl.where(mask, r - mean[:, None], 0.0)
            rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / N + eps)
            r_hat = centred * rstd[:, None]
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        out = r_hat * w[None, :]
        if HAS_BIAS:
            out += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    else:
        # The row does not fit in registers: accumulate the statistics block by block (the mean
        # first for LayerNorm, then the centred second moment), then normalise in a last pass.
        mean = tl.zeros([ROWS], dtype=tl.float32)
        if not IS_RMS:
            acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c < N)[None, :]
                r = tl.load(x_ptrs + c[None, :], mask=mask, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    r += tl.load(res_ptrs + c[None, :], mask=mask, other=0.0).to(tl.float32)
                acc += r
            mean = tl.sum(acc, axis=1) / N
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            r = tl.load(x_ptrs + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r += tl.load(res_ptrs + c[None, :], mask=mask, other=0.0).to(tl.float32)
            centred = tl.where(mask, r - mean[:, None], 0.0)
            acc += centred * centred
        rstd = tl.rsqrt(tl.sum(acc, axis=1) / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            col_mask = c < N
            mask = row_mask[:, None] & col_mask[None, :]
            r = tl.load(x_ptrs + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r += tl.load(res_ptrs + c[None, :], mask=mask, other=0.0).to(tl.float32)
            # Stored in the last pass only, after every read of this block: RES_OUT may alias RES.
            if STORE_RESIDUAL:
                tl.store(res_out_ptrs + c[None, :], r.to(RES_OUT.dtype.element_ty), mask=mask)
            w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)
            out = (r - mean[:, None]) * rstd[:, None] * w[None, :]
            if HAS_BIAS:
                out += tl.load(BIAS + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs + c[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@jit(do_not_specialize=["M"])
def _gated_rmsnorm_fwd_kernel(
    Y,  # [M, D]
    Z,  # [M, D]
    W,  # [D]
    OUT,  # [M, D]
    M,
    group_size,  # D = groups * group_size; program_id(1) is the group
    stride_y_row,
    stride_z_row,
    stride_out_row,
    eps,
    ALIGN: tl.constexpr,  # the row strides are these values times ALIGN
    VEC: tl.constexpr,  # elements per 16-byte access of the widest dtype
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    first_col = tl.program_id(1).to(tl.int64) * group_size
    row_mask = rows < M
    cols = tl.max_contiguous(tl.arange(0, BLOCK_N), VEC)  # [BLOCK_N]
    y_ptrs = Y + rows[:, None] * (stride_y_row * ALIGN) + first_col  # [ROWS, 1]
    z_ptrs = Z + rows[:, None] * (stride_z_row * ALIGN) + first_col
    out_ptrs = OUT + rows[:, None] * (stride_out_row * ALIGN) + first_col
    W += first_col
    if SINGLE_PASS:
        col_mask = cols < group_size
        mask = row_mask[:, None] & col_mask[None, :]  # [ROWS, BLOCK_N]
        y = tl.load(y_ptrs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptrs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        v = y * z * tl.sigmoid(z)  # y * silu(z)
        rstd = tl.rsqrt(tl.sum(v * v, axis=1) / group_size + eps)  # [ROWS]
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs + cols[None, :], (v * rstd[:, None] * w[None, :]).to(OUT.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for start in range(0, group_size, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < group_size)[None, :]
            y = tl.load(y_ptrs + c[None, :], mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptrs + c[None, :], mask=mask, other=0.0).to(tl.float32)
            v = y * z * tl.sigmoid(z)
            acc += v * v
        rstd = tl.rsqrt(tl.sum(acc, axis=1) / group_size + eps)
        for start in range(0, group_size, BLOCK_N):
            c = start + cols
            col_mask = c < group_size
            mask = row_mask[:, None] & col_mask[None, :]
            y = tl.load(y_ptrs + c[None, :], mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptrs + c[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)
            v = y * z * tl.sigmoid(z)
            tl.store(out_ptrs + c[None, :], (v * rstd[:, None] * w[None, :]).to(OUT.dtype.element_ty), mask=mask)



def _launch_config(rows: int, width: int, batch_invariant: bool = False) -> tuple[int, int, bool, int]:
    """(rows per program, BLOCK_N, single pass?, num_warps) for ``rows`` rows of ``width`` columns.

    Narrow rows are packed several to a program while enough programs remain, so rows per
    program, and num_warps with it, depend on the number of rows. That changes a row's result:
    the [ROWS, BLOCK_N] tile is spread over another number of warps, and the row's sum of
    squares is reduced in another order. With ``batch_invariant=True`` every call takes the
    packing of a large call (a function of the width only), so each row's bits are independent of
    the other rows. BLOCK_N and the number of passes depend on the width only.
    """
    block_n = triton.next_power_of_2(width)
    single_pass = block_n <= _MAX_BLOCK_N
    if not single_pass:  # blocks of a loop: smaller ones keep the accumulator in registers
        block_n = min(_MAX_BLOCK_N, _MULTI_PASS_BLOCK_N)
    rows_per_program = 1
    while (
        2 * rows_per_program * block_n <= _ELEMS_PER_PROGRAM
        and (batch_invariant or triton.cdiv(rows, 2 * rows_per_program) >= _MIN_PROGRAMS)
    ):
        rows_per_program *= 2
    # About 16 elements per thread and live tensor: enough loads in flight, no register spills.
    num_warps = min(max(rows_per_program * block_n // 512, 1), 16)
    return rows_per_program, block_n, single_pass, num_warps


def _access_hints(*tensors: torch.Tensor) -> tuple[int, int]:
    """(ALIGN, VEC) for 2-D row-major ``tensors``.

    ALIGN: the largest power of two (<= 16) dividing every row stride. The kernel receives the
    strides divided by it and multiplies them back by the constant, so the compiler knows that
    each row starts at a multiple of it and can use 16-byte accesses (Triton only detects
    multiples of 16 by itself; a slice of the Mamba-2 input projection can have a row stride
    that is a multiple of 8 only).
    VEC: elements per 16-byte access of the widest dtype. Capping the contiguity the compiler
    assumes at VEC gives all tensors one register layout: bf16 activations beside an fp32
    residual would otherwise be reshuffled through shared memory before a store.
    """
    g = 0
    for t in tensors:
        g = math.gcd(g, t.stride(0))
    align = min(g & -g, 16) if g else 16
    return align, 16 // max(t.element_size() for t in tensors)


def _as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t [..., width]`` as a [rows, width] matrix with unit column stride (a view when possible)."""
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()


def _check_out(out: torch.Tensor | None, name: str, shape, dtype, device) -> None:
    if out is None:
        return
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def _check_1d(t: torch.Tensor | None, name: str, width: int, ref: torch.Tensor) -> None:
    if t is None:
        return
    if t.shape != (width,):
        raise ValueError(f"{name} must be [D={width}] for inputs of shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}, the inputs on {ref.device}")


def add_rmsnorm(
    x: torch.Tensor,  # [..., D]
    residual: torch.Tensor | None,  # [..., D]
    weight: torch.Tensor,  # [D]
    bias: torch.Tensor | None = None,  # [D]
    eps: float = 1e-5,
    residual_in_fp32: bool = True,
    is_rms: bool = True,
    *,
    return_residual: bool = True,
    out: torch.Tensor | None = None,  # [..., D] in x.dtype
    residual_out: torch.Tensor | None = None,  # [..., D]; may be ``residual`` itself (updated in place)
    batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of ``add_rmsnorm_ref`` (same arguments and results).

    ``out`` / ``residual_out`` receive the results when given (``residual_out=residual`` updates the
    residual stream in place when the dtypes agree). Inputs that can be viewed as [rows, D] with a
    unit stride along D are read where they are; other layouts are copied first. Outputs the
    function allocates are contiguous. ``batch_invariant``: every row's results are bitwise
    independent of the number of rows (``_launch_config``).
    """
    require_triton("add_rmsnorm")
    width = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual is not None and residual.device != x.device:
        raise ValueError(f"residual is on {residual.device}, x on {x.device}")
    _check_1d(weight, "weight", width, x)
    _check_1d(bias, "bias", width, x)
    if width == 0:
        raise ValueError(f"cannot normalise over an empty last dimension (x of shape {tuple(x.shape)})")
    residual_dtype = torch.float32 if residual_in_fp32 else (x.dtype if residual is None else residual.dtype)
    _check_out(out, "out", x.shape, x.dtype, x.device)
    if return_residual:
        _check_out(residual_out, "residual_out", x.shape, residual_dtype, x.device)
    elif residual_out is not None:
        raise ValueError("residual_out was given but return_residual=False")
    if out is None:
        out = new_output(x.shape, x.dtype, x.device)
    if return_residual and residual_out is None:
        residual_out = new_output(x.shape, residual_dtype, x.device)

    x2 = _as_rows(x, width)
    res2 = None if residual is None else _as_rows(residual, width)
    out2 = _as_rows(out, width)
    res_out2 = None if residual_out is None else _as_rows(residual_out, width)
    if out2.data_ptr() != out.data_ptr() or (res_out2 is not None and res_out2.data_ptr() != residual_out.data_ptr()):
        raise ValueError("out and residual_out must be viewable as [rows, D] with a unit stride along D")
    n_rows = x2.shape[0]
    if n_rows > 0:
        rows_per_program, block_n, single_pass, num_warps = _launch_config(n_rows, width, batch_invariant)
        matrices = [t for t in (x2, res2, out2, res_out2) if t is not None]
        align, vec = _access_hints(*matrices)
        _add_rmsnorm_fwd_kernel[(triton.cdiv(n_rows, rows_per_program),)](
            x2, x2 if res2 is None else res2, weight, weight if bias is None else bias,
            out2, out2 if res_out2 is None else res_out2,
            n_rows, width,
            x2.stride(0) // align, 0 if res2 is None else res2.stride(0) // align,
            out2.stride(0) // align, 0 if res_out2 is None else res_out2.stride(0) // align,
            eps,
            ALIGN=align, VEC=vec, IS_RMS=is_rms, HAS_RESIDUAL=res2 is not None, HAS_BIAS=bias is not None,
            STORE_RESIDUAL=res_out2 is not None,
            ROWS=rows_per_program, BLOCK_N=block_n, SINGLE_PASS=single_pass, num_warps=num_warps,
        )
    return out, residual_out


def gated_rmsnorm(
    y: torch.Tensor,  # [..., D]
    z: torch.Tensor,  # [..., D]
    weight: torch.Tensor,  # [D]
    eps: float = 1e-5,
    group_size: int | None = None,
    *,
    out: torch.Tensor | None = None,  # [..., D] in y.dtype
    batch_invariant: bool = False,
) -> torch.Tensor:
    """Triton version of ``gated_rmsnorm_ref`` (same arguments and result).

    ``z`` may be a strided view (e.g. a slice of the input projection) as long as its last
    dimension has unit stride; ``out`` receives the result when given. ``batch_invariant``: every
    row's result is bitwise independent of the number of rows (``_launch_config``).
    """
    require_triton("gated_rmsnorm")
    width = y.shape[-1]
    group_size = width if group_size is None else group_size
    if z.shape != y.shape:
        raise ValueError(f"z must have the shape of y {tuple(y.shape)}, got {tuple(z.shape)}")
    if z.device != y.device:
        raise ValueError(f"z is on {z.device}, y on {y.device}")
    _check_1d(weight, "weight", width, y)
    if group_size <= 0 or width % group_size != 0:
        raise ValueError(f"the last dimension {width} is not a multiple of group_size {group_size}")
    _check_out(out, "out", y.shape, y.dtype, y.device)
    if out is None:
        out = new_output(y.shape, y.dtype, y.device)
    y2, z2, out2 = _as_rows(y, width), _as_rows(z, width), _as_rows(out, width)
    if out2.data_ptr() != out.data_ptr():
        raise ValueError("out must be viewable as [rows, D] with a unit stride along D")
    n_rows = y2.shape[0]
    if n_rows > 0:
        rows_per_program, block_n, single_pass, num_warps = _launch_config(n_rows, group_size, batch_invariant)
        align, vec = _access_hints(y2, z2, out2)
        _gated_rmsnorm_fwd_kernel[(triton.cdiv(n_rows, rows_per_program), width // group_size)](
            y2, z2, weight, out2,
            n_rows, group_size,
            y2.stride(0) // align, z2.stride(0) // align, out2.stride(0) // align,
            eps,
            ALIGN=align, VEC=vec, ROWS=rows_per_program, BLOCK_N=block_n, SINGLE_PASS=single_pass, num_warps=num_warps,
        )
    return out
