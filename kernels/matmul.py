"""Linear layers, ``y = x W^T + b``, with a tiling fixed by the layer's shape (batch-invariant products).

For every row m of x (its leading dimensions flattened)::

    y[m, n] = sum_k x[m, k] * W[n, k]  (+ b[n])

Shapes: x [..., K]; weight [N, K]; bias [N] or None; y [..., N] in x.dtype. The sum is accumulated
in fp32 (fp32 inputs multiply in full precision, no TF32), the bias is added in fp32 and the
result rounded once to x.dtype. Nothing is written in place.

Why a kernel of our own: torch's ``F.linear`` calls cuBLAS, which chooses its algorithm (tile
shape, split-K, ...) per problem, the number of rows M included. A row's sum over K is then cut
and ordered differently when it is computed alone, among 64 rows or among 64 000, and its last
bits change. ``linear`` takes its configuration (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
num_stages; never a split of K) from (N, K, dtype) only (``_linear_config``): every output
element is the same chain of BLOCK_K-wide tensor-core products accumulated in k order, whichever
tile holds its row and whatever the other rows are, so each output row is bitwise independent of
M and of the other rows. The order in which programs run tiles (grouped along M for L2 reuse) does
not enter a tile's arithmetic. ``linear_ref`` is ``F.linear``.

Cost: a product of M rows moves ``(M*K + N*K + M*N) * e`` bytes (e bytes per element; more when
tiles re-read x or W from L2) and does ``2*M*N*K`` flops; the model's projections at thousands of
rows are bound by the tensor cores, the narrow ones (x_proj, N = 80 or 192; dt_proj, K = 48 or
160) by memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import dot_acc, jit, new_output, require_triton, tl, triton


def linear_ref(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``y [..., N]`` in x.dtype (for the CPU: MKL's own choices)."""
    return F.linear(x, weight, bias)


# The reference of ``linear_step`` (the few-row products of decoding steps) is that of ``linear``.
linear_step_ref = linear_ref


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
#
# One program computes one [BLOCK_M, BLOCK_N] tile of y, walking K in BLOCK_K steps with an fp32
# accumulator: acc += x[tile rows, k:k+BK] @ W[tile cols, k:k+BK]^T. Columns past N are read as
# copies of valid ones (index modulo N, so the loads need no mask) and never stored. Rows past M
# likewise, or, with MASK_M (few rows, where a tile is mostly past M), read as zeros: a masked
# load moves no bytes, where copies of the one row of a decoding step would re-read it BLOCK_M
# times from L2. Only the last K step of a K that is not a multiple of BLOCK_K is masked (zeros,
# which add nothing). Programs are numbered in groups of GROUP_M row blocks, so that programs that
# run together share W's and x's tiles in L2 (Triton tutorial 03). Under Triton's CPU interpreter,
# ``dot_acc`` forms the products so that a row's bits do not depend on where it sits in the tile
# there either (``utils``).


@jit(do_not_specialize=["M", "M_INNER"])  # row counts vary per call: one compiled variant
def _linear_fwd_kernel(
    x_ptr,  # [M, K], row m at (m // M_INNER) * stride_x_outer + (m % M_INNER) * stride_x_inner
    w_ptr,  # [N, K]
    b_ptr,  # [N] (read if HAS_BIAS)
    y_ptr,  # [M, N], rows stride_y_m apart, unit column stride
    part_ptr,  # [SPLIT_K, M, N] fp32 partial sums (written if SPLIT_K > 1, instead of y)
    M, N, K, M_INNER,
    stride_x_outer, stride_x_inner, stride_x_k,
    stride_w_n, stride_w_k,
    stride_y_m,
    K_PER_SPLIT,  # a multiple of BLOCK_K (with SPLIT_K > 1)
    SPLIT_K: tl.constexpr,  # programs along K (axis 1 of the grid); 1: no split
    TWO_LEVEL: tl.constexpr,  # rows of x are (outer, inner) pairs, not one stride apart
    MASK_M: tl.constexpr,  # rows past M read as zeros (else as copies of valid rows)
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K: no mask on the K steps
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks_m = tl.cdiv(M, BLOCK_M)
    n_blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    out_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] unwrapped, for the masks
    if MASK_M:
        offs_m = out_m  # past M: masked, never dereferenced
    else:
        offs_m = out_m % M  # past M: a valid row
    offs_n = (pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # [BN]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    if TWO_LEVEL:
        x_rows = (offs_m // M_INNER) * stride_x_outer + (offs_m % M_INNER) * stride_x_inner
    else:
        x_rows = offs_m * stride_x_inner
    if SPLIT_K > 1:  # this program's share of K: [k_lo, k_lo + K_PER_SPLIT)
        k_lo = tl.program_id(1).to(tl.int64) * K_PER_SPLIT
        k_len = tl.minimum(K - k_lo, K_PER_SPLIT)
    else:
        k_lo = 0
        k_len = K
    x_ptrs = x_ptr + x_rows[:, None] + (k_lo + offs_k[None, :]) * stride_x_k  # [BM, BK]
    w_ptrs = w_ptr + offs_n[None, :] * stride_w_n + (k_lo + offs_k[:, None]) * stride_w_k  # [BK, BN]

    row_ok = out_m[:, None] < M  # [BM, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(tl.cdiv(k_len, BLOCK_K)):
        if EVEN_K:
            if MASK_M:
                a = tl.load(x_ptrs, mask=row_ok, other=0.0)
            else:
                a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = k_len - i * BLOCK_K
            if MASK_M:
                a = tl.load(x_ptrs, mask=row_ok & (offs_k[None, :] < k_left), other=0.0)
            else:
                a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = dot_acc(acc, a, b, "ieee")  # "ieee" only matters for fp32 operands
        x_ptrs += BLOCK_K * stride_x_k
        w_ptrs += BLOCK_K * stride_w_k

    out_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    out_mask = row_ok & (out_n[None, :] < N)
    if SPLIT_K > 1:  # the partial sum, reduced by _split_sum_kernel
        part_ptrs = part_ptr + tl.program_id(1).to(tl.int64) * M * N + out_m[:, None] * N + out_n[None, :]
        tl.store(part_ptrs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
        tl.store(y_ptr + out_m[:, None] * stride_y_m + out_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@jit(do_not_specialize=["M"])
def _split_sum_kernel(
    part_ptr,  # [SPLIT_K, M, N] fp32
    b_ptr,  # [N] (read if HAS_BIAS)
    y_ptr,  # [M, N], unit column stride
    M, N,
    stride_y_m,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y = sum over s = 0, 1, ..., SPLIT_K - 1 of part[s] (+ bias), in that order, rounded once."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < M * N
    acc = tl.load(part_ptr + idx, mask=mask, other=0.0)
    for s in range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + idx, mask=mask, other=0.0)
    n = idx % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + (idx // N) * stride_y_m + n, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Public wrapper (same signature as the reference)
# ---------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fit_block(size: int, candidates: tuple[int, ...]) -> int:
    """The candidate block that pads ``size`` least (ties: the larger block)."""
    return min(candidates, key=lambda b: (-(-size // b) * b, -b))


def _linear_config(n: int, k: int, dtype: torch.dtype, hip: bool = False) -> dict:
    """Launch configuration of ``linear`` for weight [N, K] in ``dtype`` on an NVIDIA GPU (or, with
    ``hip``, an AMD one): a function of these only.

    Never of M (the number of rows), and no split of K, so that a row's bits do not depend on the
    other rows. One configuration per size class (16-bit inputs):

    - N > 256 (in_proj, out_proj, dt_proj's outputs, the LM head): 128 x 256 tiles, BLOCK_K 64,
      8 warps, 3 stages: the largest tile of Triton's Hopper matmul configurations, for large M.
    - N <= 256 (x_proj: N = 80 or 192, tall and skinny): 128 x BLOCK_N tiles with BLOCK_N 32 or
      64, whichever pads N least (80 -> 3 x 32, 192 -> 3 x 64), 4 warps, 4 stages: more programs
      and less wasted width than one wide tile; the tiles of a row block re-read x from L2.
    - BLOCK_K = 64, or the next power of two >= K (at least 16) for K < 64 (dt_proj's K = 48).

    fp32 inputs (exact fp32 products on the FMA units, not the tensor cores): 64 x 64 x 32 tiles,
    4 warps, 3 stages.

    AMD GPUs have 64 KiB of shared memory per program (an H200 227 KiB): there the wide tiles step
    K by 32 and every configuration keeps 2 stages (what Triton's ROCm pipeliner expects).
    """
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"linear supports float16, bfloat16 and float32, got {dtype}")
    if dtype == torch.float32:
        cfg = dict(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=3, mask_m=False,
                   split_k=1)
    else:
        block_k = 64 if k >= 64 else max(16, triton.next_power_of_2(max(k, 1)))
        if n > 256:
            cfg = dict(block_m=128, block_n=256, block_k=block_k, group_m=8, num_warps=8, num_stages=3,
                       mask_m=False, split_k=1)
            if hip:
                cfg["block_k"] = min(block_k, 32)
        else:
            cfg = dict(block_m=128, block_n=_fit_block(n, (64, 32)), block_k=block_k, group_m=8, num_warps=4,
                       num_stages=4, mask_m=False, split_k=1)
    if hip:
        cfg["num_stages"] = 2
    return cfg


# Few rows (decoding steps: one row per sequence of the batch): the products are bound by reading
# W once, and a program reads only as fast as the bytes it keeps in flight (its pipeline stages)
# allow, so what matters is that many programs stream W side by side. Tiles are 16 rows (the
# smallest tensor-core tile) and thin in N, several programs fit an SM (4 stages of a
# 16 x 32 x 128 tile take 48 KiB of shared memory), and rows past M are masked, so a one-row step
# reads its row once. A weight with few column blocks (x_proj, out_proj) is also cut along K into
# a fixed number of splits, whose fp32 partial sums a second kernel adds in split order. BLOCK_M
# stays 16 whatever M is, and the splits depend on (N, K) only: a row's arithmetic is the same at
# batch 1 and at batch 64, as in ``linear``. A larger batch runs several row blocks; GROUP_M
# covers them all, so the row blocks of one column block run together and W comes from HBM once.
_STEP_BLOCK_M = 16
_STEP_BLOCK_K = 128
_STEP_GROUP_M = 64  # row blocks numbered together: decoding batches up to 1024 rows
_STEP_MIN_PROGRAMS = 264  # about two per SM of an H100/H200
_STEP_MAX_SPLIT = 16


def _step_config(n: int, k: int, dtype: torch.dtype, hip: bool = False) -> dict:
    """Launch configuration of ``linear_step`` for weight [N, K] in ``dtype``: a function of these
    only, like ``_linear_config``.

    16-bit inputs: 16-row tiles, rows past M masked; BLOCK_N the widest of 64, 32, 16 that still
    gives at least ``_STEP_MIN_PROGRAMS`` column blocks (16 when none does); BLOCK_K 128 (the next
    power of two >= K, at least 16, for a smaller K); 4 warps, 4 stages; and, when the column
    blocks are fewer than ``_STEP_MIN_PROGRAMS``, K cut into as many splits (of whole BLOCK_K steps,
    at most ``_STEP_MAX_SPLIT``) as make up the difference. fp32 inputs: ``_linear_config``'s
    (exact products on the FMA units). AMD: BLOCK_K at most 64 and 2 stages (64 KiB of shared
    memory per program)."""
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"linear supports float16, bfloat16 and float32, got {dtype}")
    if dtype == torch.float32:
        return _linear_config(n, k, dtype, hip)
    block_n = next((b for b in (64, 32) if -(-n // b) >= _STEP_MIN_PROGRAMS), 16)
    block_k = _STEP_BLOCK_K if k >= _STEP_BLOCK_K else max(16, triton.next_power_of_2(max(k, 1)))
    cfg = dict(block_m=_STEP_BLOCK_M, block_n=block_n, block_k=block_k, group_m=_STEP_GROUP_M, num_warps=4,
               num_stages=4, mask_m=True)
    if hip:
        cfg.update(block_k=min(block_k, 64), num_stages=2)
    cfg["split_k"] = _step_splits(n, k, block_n, cfg["block_k"])
    return cfg


def _step_splits(n: int, k: int, block_n: int, block_k: int) -> int:
    """Splits of K (whole BLOCK_K steps, at most ``_STEP_MAX_SPLIT``) that bring the column blocks
    up to about ``_STEP_MIN_PROGRAMS`` programs; 1 when there are that many already."""
    wanted = min(_STEP_MAX_SPLIT, -(-_STEP_MIN_PROGRAMS // -(-max(n, 1) // block_n)))
    steps = max(1, -(-k // block_k))
    per_split = -(-steps // max(1, min(wanted, steps)))
    return -(-steps // per_split)


def _rows_view(x: torch.Tensor) -> tuple[int, int, int] | None:
    """x's leading dims as rows m = (outer, inner): (M_INNER, stride_outer, stride_inner), or None
    when they cannot be described by two strides (then x is copied).

    Adjacent leading dims merge when one steps over the other exactly; dims of size 1 drop out.
    """
    dims = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size != 1]
    merged: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if not merged:
        return 1, 0, 0
    if len(merged) == 1:
        return merged[0][0], 0, merged[0][1]
    if len(merged) == 2:
        return merged[1][0], merged[0][1], merged[1][1]
    return None


def linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    """Triton version of ``linear_ref``: ``y [..., N]`` (contiguous) in x.dtype, each row bitwise
    independent of the number and contents of the other rows (see the module docstring).

    x may have any strides (leading dims that two strides cannot describe are copied first);
    weight any strides. No host synchronisation, no autotuning: CUDA-graph safe.
    """
    return _linear(x, weight, bias, _linear_config, "linear")


def linear_step(
    x: torch.Tensor,  # [..., K], few rows
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    """``linear`` with tiles for few rows (the products of a decoding step, ``_step_config``):
    the same contract, each row bitwise independent of the other rows and of their number, so a
    sequence decodes to the same bits at batch 1 and at batch 64. (Not the same bits as
    ``linear``: another BLOCK_K cuts the sum over K differently.)"""
    return _linear(x, weight, bias, _step_config, "linear_step")


def check_linear_args(op: str, x, weight, bias) -> tuple[int, int]:
    """The checks every ``linear``-contract wrapper makes (Triton present, shapes, dtypes,
    devices), each failure a ValueError naming the argument; returns (N, K)."""
    require_triton(op)
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"x must be [..., K] and weight [N, K], got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x [..., K] and weight [N, K] disagree on K: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [N={n}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype}, x is {x.dtype}: linear needs one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    return n, k


def _linear(x, weight, bias, config, op: str) -> torch.Tensor:
    """``linear`` / ``linear_step`` with the launch configuration ``config(n, k, dtype, hip)``."""
    n, k = check_linear_args(op, x, weight, bias)
    cfg = config(n, k, x.dtype, hip=x.is_cuda and torch.version.hip is not None)
    y = new_output((*x.shape[:-1], n), x.dtype, x.device)
    m = y.numel() // n if n else 0
    if m == 0 or n == 0:
        return y
    view = _rows_view(x)
    if view is None:
        x = x.contiguous()
        view = _rows_view(x)
    m_inner, stride_outer, stride_inner = view
    split = cfg["split_k"]
    k_per_split = -(-max(k, 1) // (split * cfg["block_k"])) * cfg["block_k"]  # whole BLOCK_K steps
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else y
    grid = (triton.cdiv(m, cfg["block_m"]) * triton.cdiv(n, cfg["block_n"]), split)
    _linear_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, y, part,
        m, n, k, m_inner,
        stride_outer, stride_inner, x.stride(-1),
        weight.stride(0), weight.stride(1),
        n,
        k_per_split,
        SPLIT_K=split, TWO_LEVEL=m_inner < m, MASK_M=cfg["mask_m"], HAS_BIAS=bias is not None,
        EVEN_K=k % cfg["block_k"] == 0,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], GROUP_M=cfg["group_m"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(m * n, block),)](
            part, bias if bias is not None else weight, y, m, n, n,
            SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
        )
    return y
