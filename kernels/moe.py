"""The routed experts of a mixture-of-experts layer (``MoE`` in ``mamba_eval.models.layers``) as
grouped products, with each token's result bitwise independent of the other tokens.

Each of the N tokens picks ``k`` experts: ``top_idx [N, k]`` (expert indices in [0, E), distinct
within a token) with routing weights ``weights [N, k]``. Expert e is an MLP of width I::

    gated:  [y; g] = fc1[e] x,   h = y * silu(g),   expert_e(x) = fc2[e] h     (fc1 [E, 2I, D])
    relu2:  a      = fc1[e] x,   h = relu(a)^2,     expert_e(x) = fc2[e] h     (fc1 [E, I, D])

    out[t] = sum over the token's experts e, in ascending order, of (expert_e(x_t) * w_{t,e})

with fc2 [E, D, I], x [N, D], out [N, D] in fp32 (the caller adds the shared expert and rounds).
The roundings are those of ``MoE.forward``, which calls ``linear`` (F.linear semantics: the
product accumulated in fp32, rounded once to x.dtype) and torch's elementwise ops in x.dtype:
fc1's output is rounded to x.dtype; silu(g), y * silu(g) (or relu(a)^2) each rounded to x.dtype;
fc2's output rounded to x.dtype; the product with the weight rounded to the type torch promotes
the two to (x.dtype for 16-bit weights of the same type, fp32 for the sigmoid router's fp32
weights); the sum over a token's experts in fp32, from 0, in ascending expert order
(``index_add_`` per expert). ``moe_experts_ref`` is that loop, with F.linear or any other linear.

Why a kernel: the loop launches two products and a few elementwise kernels per expert, after
host synchronisations (which experts are used, which rows each gets), so it cannot be captured
in a CUDA graph, and each expert's products run on a handful of rows. ``moe_experts`` runs all experts in two grouped
products on the device:

1. ``moe_align`` (torch ops, no host synchronisation, sizes set by (N, k, E, BLOCK_M) only): the
   N*k (token, slot) pairs sorted by expert, stably (a token's rows stay in ascending order), each
   expert's run padded to a multiple of BLOCK_M with a sentinel, so that a block of BLOCK_M rows
   belongs to one expert; the expert of each block (E for the blocks past the used ones, which
   the worst-case grid still launches and which return at once); and where each pair's product
   goes for the sum (``combine_row``: row t*k + r for the token's r-th expert in ascending order).
2. ``_moe_fc1_kernel``: per block and column tile, h = act(x[rows] fc1[e]^T), with y and the gate
   of a column in the same program; h [rows, I] kept in x.dtype.
3. ``_moe_fc2_kernel``: per block and column tile, the weighted product
   (h fc2[e]^T rounded to x.dtype) * w, stored at its ``combine_row`` of a [N*k, D] buffer in
   the promoted type: storing it there is the rounding ``MoE.forward`` applies, and the buffer
   then holds the product exactly (half the bytes of fp32 for 16-bit products).
4. ``_moe_sum_kernel``: out[t] = ((0 + p[t*k]) + p[t*k + 1]) + ... in fp32, the additions of the
   ``index_add_`` loop in the same order, so the same bits. (No atomics: their order would vary.)

Batch invariance: the launch configuration (BLOCK_M/N/K, warps, stages) is a function of
(D, I, E, activation, dtype) only (``_moe_config``), K is walked in BLOCK_K steps in order and
never split, and a row of a tile does not enter another row's arithmetic (rows of other tokens,
and padding rows, which read as zeros, are only other rows of the same products). So a token's
bits do not depend on N, on the other tokens, or on where its rows sit in their tiles. BLOCK_K is
the one ``matmul.linear`` takes for the same weight (``_linear_block_k``): under Triton's
interpreter, whose products (``dot_acc``) depend on BLOCK_K only, each fp32 sum is then the very
sum ``linear`` forms, and with fp32 or fp16 inputs the result has the bits of ``moe_experts_ref``
with ``linear`` (relu2; gated up to silu's last bits against torch's). Not with bf16 there: the
interpreter truncates ``linear``'s bf16 outputs, where this file rounds to nearest even as a GPU
does (``_rounded``). On a GPU a product is a chain of tensor-core steps over BLOCK_K in order,
but the instruction Triton picks depends on the tile, so agreement with ``linear`` there is not
promised; invariance is.

Cost: ``2*N*k*D*I*(3 if gated else 2)`` flops, plus those of the padding rows, which are masked
(their loads move no bytes) but still go through the tensor cores; every used expert's weights
are read (from HBM once, then from L2 by its other blocks). With few tokens per expert (decoding)
a block is mostly padding and the products are bound by reading the weights. h and the product
buffer add ``N*k*(2*I + 2*D)`` elements of traffic (written once, read once).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .utils import dot_acc, jit, new_output, require_triton, silu, tl, triton

ACTIVATIONS = ("gated", "relu2")


def moe_experts_ref(
    x: torch.Tensor,  # [N, D]
    fc1: torch.Tensor,  # [E, 2I, D] (gated: rows [y; gate]) or [E, I, D] (relu2)
    fc2: torch.Tensor,  # [E, D, I]
    top_idx: torch.Tensor,  # [N, k] int, experts in [0, E), distinct within a row
    weights: torch.Tensor,  # [N, k] float
    activation: str,  # "gated" | "relu2"
    linear=F.linear,
) -> torch.Tensor:
    """``MoE.forward``'s loop over the experts without the shared expert: out [N, D] in fp32.

    ``linear``: the product ``linear(x, W)`` (F.linear by default; ``matmul.linear`` gives the
    bits of the model's forward)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(fc1.shape[0]):  # ascending: every token sums its experts in one order
        rows, slot = torch.nonzero(top_idx == e, as_tuple=True)
        if rows.numel() == 0:
            continue
        if activation == "relu2":
            h = torch.square(F.relu(linear(x[rows], fc1[e])))
        else:
            y, gate = linear(x[rows], fc1[e]).chunk(2, dim=-1)
            h = y * F.silu(gate)
        out.index_add_(0, rows, (linear(h, fc2[e]) * weights[rows, slot, None]).float())
    return out


# ---------------------------------------------------------------------------------------------
# Routing: the (token, slot) pairs grouped by expert, on the device
# ---------------------------------------------------------------------------------------------


class MoEAlignment(NamedTuple):
    """Where the grouped products read and write (``moe_align``); S = N*k pairs, slot s = t*k + j
    being token t's j-th choice. All int32, on top_idx's device."""

    sorted_slots: torch.Tensor  # [max_blocks * BLOCK_M]: slots by expert (stable), runs padded with S
    block_expert: torch.Tensor  # [max_blocks]: the expert of each block of BLOCK_M rows; E past the used ones
    num_blocks: torch.Tensor  # [1]: the used blocks (the first ones)
    combine_row: torch.Tensor  # [S]: t*k + (rank of slot s's expert among token t's, ascending)


def max_blocks(n_slots: int, num_experts: int, block_m: int) -> int:
    """Blocks of ``block_m`` rows that ``n_slots`` pairs can need, whatever the routing: each of the
    at most min(E, S) experts used pads its run by at most block_m - 1 rows."""
    return (n_slots + min(num_experts, n_slots) * (block_m - 1)) // block_m


def moe_align(top_idx: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Group the (token, slot) pairs of ``top_idx [N, k]`` by expert in runs of whole blocks of
    ``block_m`` rows (``MoEAlignment``).

    Torch ops only, none of which waits for the device (no ``.item()``, ``nonzero``, ``unique``)
    and every size a function of (N, k, E, block_m): a CUDA graph can hold it, and replaying it
    on other routings fills the same buffers. A stable sort keeps each expert's pairs in ascending
    token order. Indices outside [0, E) are not checked (that would wait for the device)."""
    if top_idx.dim() != 2:
        raise ValueError(f"top_idx must be [N, k], got {tuple(top_idx.shape)}")
    if num_experts < 1 or block_m < 1:
        raise ValueError(f"num_experts and block_m must be positive, got {num_experts} and {block_m}")
    n, k = top_idx.shape
    s, dev = n * k, top_idx.device
    blocks = max_blocks(s, num_experts, block_m)
    expert, slot = torch.sort(top_idx.reshape(-1), stable=True)  # [S]: experts ascending, slots within
    ids = torch.arange(num_experts, device=dev, dtype=expert.dtype)
    first = torch.searchsorted(expert, ids)  # [E] each expert's first position in the sorted pairs
    count = torch.searchsorted(expert, ids, right=True) - first
    n_blocks = (count + block_m - 1) // block_m  # [E]
    block_end = torch.cumsum(n_blocks, 0)  # [E] blocks of experts 0..e
    padded_first = (block_end - n_blocks) * block_m  # [E] each expert's first row in sorted_slots
    dest = (padded_first - first)[expert] + torch.arange(s, device=dev)  # [S] the sorted pairs' rows
    sorted_slots = torch.full((blocks * block_m,), s, dtype=torch.int32, device=dev)
    sorted_slots.scatter_(0, dest, slot.to(torch.int32))
    block_ids = torch.arange(blocks, device=dev, dtype=block_end.dtype)
    block_expert = torch.searchsorted(block_end, block_ids, right=True).to(torch.int32)
    # A slot's rank among its token's k choices by (expert, slot): a permutation of 0..k-1 per
    # token, ascending in expert, the order in which MoE.forward adds the experts.
    e_j, e_other = top_idx[:, :, None], top_idx[:, None, :]  # [N, k, k]: slot j against slot j'
    j = torch.arange(k, device=dev)
    before = (e_other < e_j) | ((e_other == e_j) & (j[None, :] < j[:, None]))
    combine_row = (torch.arange(n, device=dev)[:, None] * k + before.sum(-1)).reshape(-1).to(torch.int32)
    return MoEAlignment(sorted_slots, block_expert, block_end[-1:].to(torch.int32), combine_row)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
#
# Both products run one program per (block of BLOCK_M sorted rows, tile of BLOCK_N columns),
# row blocks along grid axis 0: the programs that run together are mostly consecutive blocks of
# one expert on one column tile, and share that tile of the expert's weights in L2. A program
# first reads its block's expert and returns if the block is past the used ones. Padding rows
# (sentinel slot S) are masked: they read zeros and store nothing. Columns past the width are
# read as copies of valid ones (index modulo the width, no mask) and not stored; only the last
# K step of a K that is not a multiple of BLOCK_K is masked (zeros add nothing), as in
# ``matmul.linear``.


@jit
def _rounded(x, DTYPE: tl.constexpr):
    """x (fp32) rounded to nearest, ties to even, in DTYPE, returned in fp32 (exactly representable
    in DTYPE, so a store to a DTYPE tensor does not round again).

    bf16 is rounded on the bits: on a GPU that is what converting does, but Triton's interpreter
    truncates fp32 to bf16 (it emulates the conversion and drops the low bits), which would leave
    each rounding of the reference up to one ulp off there. NaN stays NaN."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000  # a NaN's payload could carry into the sign
        return tl.where(is_nan, x, rounded.to(tl.float32, bitcast=True))
    else:
        return x.to(DTYPE).to(tl.float32)


@jit(do_not_specialize=["S"])  # the number of pairs varies per call: one compiled variant
def _moe_fc1_kernel(
    x_ptr,  # [N, D]
    w_ptr,  # fc1 [E, I or 2I, D]
    h_ptr,  # [rows, I] in x.dtype, contiguous
    slots_ptr,  # [rows] int32 sorted slots (S: padding)
    block_expert_ptr,  # [rows / BLOCK_M] int32 (E: unused block)
    S, TOP_K, D, I, E,
    stride_x_m, stride_x_k,
    stride_w_e, stride_w_n, stride_w_k,
    GATED: tl.constexpr,  # fc1 rows [y; gate]: h = y * silu(gate); else h = relu(y)^2
    EVEN_K: tl.constexpr,  # D is a multiple of BLOCK_K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= E:
        return
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    slot = tl.load(slots_ptr + rows)
    valid = slot < S
    token = tl.where(valid, slot // TOP_K, 0).to(tl.int64)
    offs_n = (pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)) % I  # [BN]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = x_ptr + token[:, None] * stride_x_m + offs_k[None, :] * stride_x_k  # [BM, BK]
    wy_ptrs = w_ptr + e.to(tl.int64) * stride_w_e + offs_n[None, :] * stride_w_n + offs_k[:, None] * stride_w_k
    wg_ptrs = wy_ptrs + I * stride_w_n  # [BK, BN] the gate rows (read if GATED)

    acc_y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(tl.cdiv(D, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=valid[:, None], other=0.0)
            b = tl.load(wy_ptrs)
            if GATED:
                g = tl.load(wg_ptrs)
        else:
            k_ok = offs_k < D - i * BLOCK_K
            a = tl.load(x_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(wy_ptrs, mask=k_ok[:, None], other=0.0)
            if GATED:
                g = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
        acc_y = dot_acc(acc_y, a, b, "ieee")  # "ieee" only matters for fp32 operands
        if GATED:
            acc_g = dot_acc(acc_g, a, g, "ieee")
        x_ptrs += BLOCK_K * stride_x_k
        wy_ptrs += BLOCK_K * stride_w_k
        wg_ptrs += BLOCK_K * stride_w_k

    # The linear's output rounded to x.dtype, then each elementwise op of the reference computed
    # in fp32 and rounded to x.dtype, as torch does for 16-bit tensors.
    dt: tl.constexpr = h_ptr.dtype.element_ty
    y = _rounded(acc_y, dt)
    if GATED:
        h = y * _rounded(silu(_rounded(acc_g, dt)), dt)
    else:
        r = tl.maximum(y, 0.0)
        h = r * r
    out_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(h_ptr + rows[:, None] * I + out_n[None, :], _rounded(h, dt).to(dt),
             mask=valid[:, None] & (out_n[None, :] < I))


@jit(do_not_specialize=["S"])
def _moe_fc2_kernel(
    h_ptr,  # [rows, I] in x.dtype, contiguous
    w_ptr,  # fc2 [E, D, I]
    p_ptr,  # [S, D] weighted products in the promoted type, row combine_row[s], contiguous
    route_w_ptr,  # [S] routing weights
    slots_ptr,  # [rows] int32 sorted slots (S: padding)
    combine_row_ptr,  # [S] int32
    block_expert_ptr,  # [rows / BLOCK_M] int32 (E: unused block)
    S, D, I, E,
    stride_w_e, stride_w_n, stride_w_k,
    EVEN_K: tl.constexpr,  # I is a multiple of BLOCK_K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= E:
        return
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    slot = tl.load(slots_ptr + rows)
    valid = slot < S
    safe = tl.where(valid, slot, 0)
    offs_n = (pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)) % D  # [BN]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    h_ptrs = h_ptr + rows[:, None] * I + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + e.to(tl.int64) * stride_w_e + offs_n[None, :] * stride_w_n + offs_k[:, None] * stride_w_k

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(tl.cdiv(I, BLOCK_K)):
        if EVEN_K:
            a = tl.load(h_ptrs, mask=valid[:, None], other=0.0)
            b = tl.load(w_ptrs)
        else:
            k_ok = offs_k < I - i * BLOCK_K
            a = tl.load(h_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = dot_acc(acc, a, b, "ieee")
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_w_k

    y = _rounded(acc, h_ptr.dtype.element_ty)  # the linear's output in x.dtype
    w = tl.load(route_w_ptr + safe, mask=valid, other=0.0).to(tl.float32)  # [BM]
    dest = tl.load(combine_row_ptr + safe, mask=valid, other=0).to(tl.int64)  # [BM]
    out_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # A product of two 16-bit values is exact in fp32; it is rounded once, to the promoted type.
    p_dt: tl.constexpr = p_ptr.dtype.element_ty
    tl.store(p_ptr + dest[:, None] * D + out_n[None, :], _rounded(y * w[:, None], p_dt).to(p_dt),
             mask=valid[:, None] & (out_n[None, :] < D))


@jit
def _moe_sum_kernel(
    p_ptr,  # [N * TOP_K, D] weighted products, a token's in ascending expert order, contiguous
    out_ptr,  # [N, D] fp32, contiguous (one program per token and BLOCK_D columns)
    D, TOP_K,
    BLOCK_D: tl.constexpr,
):
    """out[t] = ((0 + p[t*k]) + p[t*k + 1]) + ... + p[t*k + k-1] in fp32, in that order."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r in range(TOP_K):
        acc += tl.load(p_ptr + (t * TOP_K + r) * D + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + offs, acc, mask=mask)


# ---------------------------------------------------------------------------------------------
# Public wrapper (the reference's signature, without ``linear``)
# ---------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUM_BLOCK = 1024


def _linear_block_k(n: int, k: int, dtype: torch.dtype, hip: bool = False) -> int:
    """The BLOCK_K of ``matmul.linear`` for a weight [n, k] (its ``_linear_config``): 32 for fp32;
    64, or the next power of two >= k (at least 16) for k < 64; on AMD at most 32 for n > 256."""
    if dtype == torch.float32:
        return 32
    block_k = 64 if k >= 64 else max(16, triton.next_power_of_2(max(k, 1)))
    return min(block_k, 32) if hip and n > 256 else block_k


def _moe_config(d: int, i: int, e: int, dtype: torch.dtype, gated: bool, hip: bool = False) -> dict:
    """Launch configuration of ``moe_experts`` for experts of shape (D, I), E of them, in ``dtype``:
    a function of these only, never of the number of tokens.

    - BLOCK_M 64: the M of one Hopper warpgroup product. Decoding batches leave most rows of a
      block padding, but the product is then bound by reading the weights, which the padding does
      not add to; prefill gives an expert hundreds of rows.
    - BLOCK_N: 16-bit fc1 64 when gated (two fp32 accumulators, y and the gate), else 128; fc2 128;
      fp32 64 (exact products on the FMA units, as ``linear``); at most the next power of two of
      the width (at least 16).
    - BLOCK_K: ``linear``'s for the same weight (``_linear_block_k``).
    - 4 warps, 3 stages (AMD: 2, 64 KiB of shared memory a program); the sum: up to 1024 columns
      a program.

    ``e`` enters nothing yet; it is an argument so that a configuration by expert count needs no
    change of callers."""
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"moe_experts supports float16, bfloat16 and float32, got {dtype}")
    del e

    def width(n: int, cap: int) -> int:
        return min(cap, max(16, triton.next_power_of_2(max(n, 1))))

    fp32 = dtype == torch.float32
    stages = 2 if hip else 3
    fc1_n = width(i, 64 if fp32 or gated else 128)
    fc2_n = width(d, 64 if fp32 else 128)
    return {
        "block_m": 64,
        "fc1": {"block_n": fc1_n, "block_k": _linear_block_k((2 if gated else 1) * i, d, dtype, hip),
                "num_warps": 4, "num_stages": stages},
        "fc2": {"block_n": fc2_n, "block_k": _linear_block_k(d, i, dtype, hip), "num_warps": 4, "num_stages": stages},
        "sum_block": width(d, _SUM_BLOCK),
    }


def moe_experts(
    x: torch.Tensor,  # [N, D]
    fc1: torch.Tensor,  # [E, 2I, D] (gated: rows [y; gate]) or [E, I, D] (relu2)
    fc2: torch.Tensor,  # [E, D, I]
    top_idx: torch.Tensor,  # [N, k] int, experts in [0, E), distinct within a row
    weights: torch.Tensor,  # [N, k] float16, bfloat16 or float32
    activation: str,  # "gated" | "relu2"
    linear=None,
) -> torch.Tensor:
    """The Triton version of ``moe_experts_ref``: out [N, D] in fp32, each row bitwise independent
    of the number and contents of the other rows (see the module docstring). ``linear`` is
    accepted for the reference's signature and ignored (the kernels form the products).

    x, fc1 and fc2 share one dtype and may have any strides. No host synchronisation, no
    autotuning, buffers sized by (N, k, E, D, I) only: CUDA-graph safe."""
    require_triton("moe_experts")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    gated = activation == "gated"
    if x.dim() != 2 or fc1.dim() != 3 or fc2.dim() != 3:
        raise ValueError(f"x must be [N, D], fc1 [E, {'2I' if gated else 'I'}, D] and fc2 [E, D, I], got "
                         f"x {tuple(x.shape)}, fc1 {tuple(fc1.shape)}, fc2 {tuple(fc2.shape)}")
    n, d = x.shape
    num_experts, i = fc2.shape[0], fc2.shape[2]
    if tuple(fc2.shape) != (num_experts, d, i) or tuple(fc1.shape) != (num_experts, (2 if gated else 1) * i, d):
        raise ValueError(f"fc1 must be [E, {'2I' if gated else 'I'}, D] and fc2 [E, D, I] for x [N, D={d}] "
                         f"({activation}), got fc1 {tuple(fc1.shape)}, fc2 {tuple(fc2.shape)}")
    if top_idx.dim() != 2 or top_idx.shape[0] != n or tuple(weights.shape) != tuple(top_idx.shape):
        raise ValueError(f"top_idx and weights must be [N={n}, k], got {tuple(top_idx.shape)} and "
                         f"{tuple(weights.shape)}")
    if top_idx.dtype.is_floating_point or top_idx.dtype.is_complex or top_idx.dtype == torch.bool:
        raise ValueError(f"top_idx must hold integers, got {top_idx.dtype}")
    if weights.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weights must be float16, bfloat16 or float32, got {weights.dtype}")
    for name, t in (("fc1", fc1), ("fc2", fc2)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype}, x is {x.dtype}: moe_experts needs one dtype")
    for name, t in (("fc1", fc1), ("fc2", fc2), ("top_idx", top_idx), ("weights", weights)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    cfg = _moe_config(d, i, num_experts, x.dtype, gated, hip=x.is_cuda and torch.version.hip is not None)
    k = top_idx.shape[1]
    out = new_output((n, d), torch.float32, x.device)
    if n == 0 or d == 0:
        return out
    if k == 0 or i == 0:
        return out.zero_()
    s = n * k
    bm = cfg["block_m"]
    align = moe_align(top_idx, num_experts, bm)
    blocks = align.block_expert.shape[0]
    h = new_output((blocks * bm, i), x.dtype, x.device)
    products = new_output((s, d), torch.promote_types(x.dtype, weights.dtype), x.device)
    c1, c2 = cfg["fc1"], cfg["fc2"]
    _moe_fc1_kernel[(blocks, triton.cdiv(i, c1["block_n"]))](
        x, fc1, h, align.sorted_slots, align.block_expert,
        s, k, d, i, num_experts,
        x.stride(0), x.stride(1),
        fc1.stride(0), fc1.stride(1), fc1.stride(2),
        GATED=gated, EVEN_K=d % c1["block_k"] == 0,
        BLOCK_M=bm, BLOCK_N=c1["block_n"], BLOCK_K=c1["block_k"],
        num_warps=c1["num_warps"], num_stages=c1["num_stages"],
    )
    _moe_fc2_kernel[(blocks, triton.cdiv(d, c2["block_n"]))](
        h, fc2, products, weights.reshape(-1), align.sorted_slots, align.combine_row, align.block_expert,
        s, d, i, num_experts,
        fc2.stride(0), fc2.stride(1), fc2.stride(2),
        EVEN_K=i % c2["block_k"] == 0,
        BLOCK_M=bm, BLOCK_N=c2["block_n"], BLOCK_K=c2["block_k"],
        num_warps=c2["num_warps"], num_stages=c2["num_stages"],
    )
    _moe_sum_kernel[(n, triton.cdiv(d, cfg["sum_block"]))](
        products, out, d, k, BLOCK_D=cfg["sum_block"], num_warps=4,
    )
    return out
