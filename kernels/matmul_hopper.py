"""Linear layers on Hopper GPUs, ``y = x W^T + b``: TMA loads, a persistent grid, a tiling fixed by the
layer's shape (batch-invariant products, as ``matmul.linear``).

For every row m of x (its leading dimensions flattened)::

    y[m, n] = sum_k x[m, k] * W[n, k]  (+ b[n])

Shapes: x [..., K]; weight [N, K]; bias [N] or None; y [..., N] in x.dtype. The sum is accumulated
in fp32, the bias is added in fp32 and the result rounded once to x.dtype. Nothing is written in
place. The contract is that of ``matmul.linear``; ``linear_hopper_ref`` is its reference, ``F.linear``.

Why a second kernel: ``linear`` loads its tiles with pointer arithmetic, one program per output tile.
On an H100 the large products of a prefill (thousands of rows through in_proj, out_proj and the LM
head) are bound by the tensor cores, and Triton's fastest Hopper matmuls (its tutorial 09,
"persistent matmul") owe their speed to two features that ``linear`` does not use:

- TMA (the Tensor Memory Accelerator) copies a whole [rows, BLOCK_K] tile of x or W from global to
  shared memory in one instruction, issued by one thread, with no address arithmetic in registers;
  the warps are left to the wgmma instructions. A box that reaches past the tensor's bounds reads
  zeros (rows past M, columns past N or K) and a store past them is clipped, so no load or store
  needs a mask and the last K step needs no special case.
- A persistent grid: one program per SM (``sm_count``), each walking the output tiles
  ``pid, pid + NUM_SMS, ...`` in GROUP_M-swizzled order (row blocks numbered in groups, so that the
  tiles running side by side share x's and W's tiles in L2). With the loop nest flattened
  (``tl.range(..., flatten=True)``) the compiler pipelines the next tile's first loads under the
  current tile's epilogue, where with one program per tile an SM idles between one program's end
  and the next one's start.

Batch invariance holds exactly as for ``linear``: the launch configuration (tiles, warps, stages,
epilogue, loop attributes) comes from (N, K, dtype) only (``_hopper_config``), never from M; K is
never split; every output element is the same chain of BLOCK_K-wide tensor-core products
accumulated in k order, wherever its row sits in a tile, whichever program runs the tile and
whenever. A tile's arithmetic does not see M: rows past M are TMA zeros, and M enters only the
number of tiles and the bounds of the boxes. Each output row is therefore bitwise independent of M
and of the other rows. (They need not be ``linear``'s bits: other tiles, another compiled loop.)

Which layers run ``linear`` instead (``_hopper_config`` returns None, or the weight or the machine
do not allow TMA), a choice fixed per layer and machine, never per call:

- fp32 inputs: exact fp32 products (no TF32) run on the FMA units, where neither TMA nor the large
  tiles help, and a 128 x 256 fp32 tile would not fit.
- K * element size not a multiple of 16 bytes (K % 8 != 0 in 16-bit), or K = 0: TMA needs 16-byte
  aligned row strides, for x and W alike.
- A weight whose rows are not contiguous, 16-byte aligned and a multiple of 16 bytes apart.
- No Hopper-class GPU (compute capability 9 or more, CUDA rather than ROCm), or a Triton without
  ``tl.make_tensor_descriptor``, ``triton.set_allocator`` or ``tl.range(flatten=, warp_specialize=)``
  (3.6 has them all). Under Triton's CPU interpreter the kernel runs (the interpreter checks TMA's
  alignment rules and applies its bounds).

x in any other layout (its last dimension strided, rows not one stride apart, its start or row
stride not 16-byte aligned) is copied into a fresh contiguous tensor first, rather than sent to
``linear``: so which kernel computes a row, and so its bits, never depends on x's memory layout.
The output's rows are N elements apart; where N * element size is not a multiple of 16 bytes the
output tile is stored with masked stores instead of TMA (the values are the same).

Cost: a product of M rows moves ``(M*K + N*K + M*N) * e`` bytes (e bytes per element; more when
tiles re-read x or W from L2, plus ``2*M*K*e`` when x has to be copied) and does ``2*M*N*K``
flops. The tiles are sized for prefills of thousands of rows; at a few rows (a decoding step) a
product reads W once with only ``cdiv(N, BLOCK_N)`` programs, which is what ``linear_step`` is for.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .matmul import check_linear_args, linear, linear_ref
from .utils import INTERPRETED, dot_acc, jit, new_output, sm_count, tl, triton

# The reference is ``linear``'s: this is the same operation, only computed on other tiles.
linear_hopper_ref = linear_ref

# What the kernel needs of Triton (all in 3.6): descriptors made inside the kernel (they need a
# global scratch allocator on a GPU) and the loop attributes of persistent kernels. Without them
# ``linear_hopper`` is ``linear``.
_HAS_TMA_API = (
    triton is not None
    and hasattr(tl, "make_tensor_descriptor")
    and hasattr(triton, "set_allocator")
    and {"flatten", "warp_specialize"} <= set(inspect.signature(tl.range.__init__).parameters)
)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
#
# min(NUM_SMS, tiles) programs; program p computes the tiles p, p + NUM_SMS, ... of y, each as
# acc = sum over K steps of x[tile rows, k:k+BK] @ W[tile cols, k:k+BK]^T in fp32, both operands
# brought into shared memory by TMA (a box past M, N or K reads zeros, which add nothing). The
# epilogue adds the bias in fp32, rounds once and stores the tile through TMA (clipped at M and
# N), in two halves with EPILOGUE_SPLIT (half the shared memory of the store's staging buffer,
# which goes to pipeline stages instead), or with masked stores where y's rows are not 16-byte
# aligned (TMA_STORE off). The epilogue recomputes its tile's coordinates from a counter of its
# own, as Triton's persistent-matmul tutorial does: with the loop flattened and pipelined, the
# loads run ahead of the epilogue, and a value shared by both has been mishandled by the pipeliner.


@jit
def _tile_coords(tile, n_blocks_m, per_group, GROUP_M: tl.constexpr):
    """(row block, column block) of tile number ``tile``: tiles numbered in groups of GROUP_M row
    blocks, down the rows of a group first (Triton tutorial 03), so that running tiles share L2."""
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(n_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_rows
    pid_n = (tile % per_group) // group_rows
    return pid_m, pid_n


@jit(do_not_specialize=["M"])  # row counts vary per call: one compiled variant
def _linear_hopper_kernel(
    x_ptr,  # [M, K], rows stride_x_m apart, unit column stride, 16-byte aligned
    w_ptr,  # [N, K], rows stride_w_n apart, unit column stride, 16-byte aligned
    b_ptr,  # [N] (read if HAS_BIAS)
    y_ptr,  # [M, N] contiguous
    M, N, K,
    stride_x_m, stride_w_n,
    HAS_BIAS: tl.constexpr,
    TMA_STORE: tl.constexpr,  # y's rows are 16-byte aligned: store tiles through TMA
    EPILOGUE_SPLIT: tl.constexpr,  # store through TMA in two [BLOCK_M, BLOCK_N / 2] halves
    FLATTEN: tl.constexpr,  # flatten the tile and K loops into one pipelined loop
    WARP_SPECIALIZE: tl.constexpr,  # the compiler's producer / consumer warp groups
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,  # programs of the grid at most, and the stride of a program's tiles
):
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_x_m, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_w_n, 1], block_shape=[BLOCK_N, BLOCK_K])
    if TMA_STORE:
        if EPILOGUE_SPLIT:
            y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1],
                                               block_shape=[BLOCK_M, BLOCK_N // 2])
        else:
            y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])

    start = tl.program_id(0)
    n_blocks_m = tl.cdiv(M, BLOCK_M)
    n_blocks_n = tl.cdiv(N, BLOCK_N)
    n_tiles = n_blocks_m * n_blocks_n
    k_steps = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * n_blocks_n
    out_tile = start - NUM_SMS  # the epilogue's own counter (see above)

    for tile in tl.range(start, n_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coords(tile, n_blocks_m, per_group, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_steps):
            a = x_desc.load([off_m, ki * BLOCK_K])  # [BM, BK]
            b = w_desc.load([off_n, ki * BLOCK_K])  # [BN, BK]
            acc = dot_acc(acc, a, b.T, "ieee")  # "ieee" only matters for fp32 operands

        out_tile += NUM_SMS
        pid_m, pid_n = _tile_coords(out_tile, n_blocks_m, per_group, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_n = off_n + tl.arange(0, BLOCK_N)  # [BN]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if TMA_STORE:
            if EPILOGUE_SPLIT:
                halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                left, right = tl.split(halves)  # columns [0, BN/2) and [BN/2, BN)
                y_desc.store([off_m, off_n], left.to(y_ptr.dtype.element_ty))
                y_desc.store([off_m, off_n + BLOCK_N // 2], right.to(y_ptr.dtype.element_ty))
            else:
                y_desc.store([off_m, off_n], acc.to(y_ptr.dtype.element_ty))
        else:
            offs_m = off_m + tl.arange(0, BLOCK_M)  # [BM]
            y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ---------------------------------------------------------------------------------------------
# Launch configuration: a function of the layer's shape only
# ---------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, EPILOGUE_SPLIT). Shared memory per program:
# num_stages x and W tiles, (BM + BN) * BK * 2 bytes each, plus the staging buffer of the TMA
# store, BM * BN * 2 bytes (half with EPILOGUE_SPLIT); an H100 gives a program 227 KiB.
# _WIDE: Triton's largest Hopper matmul tile, 3 stages (144 KiB) + half the output tile (32 KiB).
# _SQUARE: half as wide, twice the tiles; 4 stages (128 KiB) + the output tile (32 KiB).
_WIDE = (128, 256, 64, 8, 3, True)
_SQUARE = (128, 128, 64, 8, 4, False)

# The model's projections, (N, K) -> tiles. Chosen for prefills of 4096 to 16384 rows on the 132
# SMs of an H100 (the choice depends on the layer, never on the call's M): the widest tile unless
# its column blocks leave the last wave of tiles of a 4096-row prefill mostly idle, in which case
# the 128-wide one (wave counts for 4096 rows below). Starting values, to be measured on the GPU.
_HOPPER_TABLE: dict[tuple[int, int], tuple[int, int, int, int, int, bool]] = {
    (3072, 768): _WIDE,  # Mamba-1 130m in_proj: 384 tiles, 2.9 waves
    (10240, 2560): _WIDE,  # Mamba-1 2.8b in_proj: 1280 tiles, 9.7 waves
    (10576, 2560): _WIDE,  # Mamba-2 2.7b in_proj: 42 column blocks (1.7% padding), 10.2 waves
    (50280, 768): _WIDE,  # LM head 130m: 197 column blocks, 47.8 waves
    (50280, 2560): _WIDE,  # LM head 2.8b
    (3352, 768): _SQUARE,  # Mamba-2 130m in_proj: 6.5 waves (3.4 with 256-wide tiles, 7% padding)
    (2560, 5120): _SQUARE,  # Mamba-1 2.8b out_proj: 4.85 waves (2.4 with 256-wide tiles)
    (768, 1536): _SQUARE,  # Mamba-1 130m out_proj: 192 tiles (96 with 256-wide tiles: 36 SMs idle)
    # dt_proj: short K, bound by writing y. K = 48: one K step (BLOCK_K 64; TMA reads the 16 columns
    # past K as zeros, moving no bytes); 12 column blocks of 128: 2.9 waves.
    (1536, 48): (128, 128, 64, 8, 3, False),  # Mamba-1 130m dt_proj
    (5120, 160): (128, 256, 32, 8, 4, True),  # Mamba-1 2.8b dt_proj: 5 K steps of 32, no zero columns
    # x_proj: tall and skinny, bound by reading x; 128 x BLOCK_N tiles with the BLOCK_N that pads N
    # least, as in linear (80 -> 3 x 32, 192 -> 3 x 64); the column blocks of a row block run
    # together (GROUP_M) and share x in L2.
    (80, 1536): (128, 32, 64, 4, 4, False),  # Mamba-1 130m x_proj
    (192, 5120): (128, 64, 64, 4, 4, False),  # Mamba-1 2.8b x_proj
}
_GROUP_M = 8


def _fit_block(size: int, candidates: tuple[int, ...]) -> int:
    """The candidate block that pads ``size`` least (ties: the larger block)."""
    return min(candidates, key=lambda b: (-(-size // b) * b, -b))


def _hopper_config(n: int, k: int, dtype: torch.dtype) -> dict | None:
    """Launch configuration of ``linear_hopper`` for weight [N, K] in ``dtype``: a function of these
    only, never of M (the number of rows), and no split of K. None where the layer runs ``linear``
    (fp32; K * element size not a multiple of 16 bytes; K = 0).

    The model's projections come from ``_HOPPER_TABLE``; any other (16-bit) shape gets, as in
    ``linear``: for N > 256, 128 x 256 tiles, 8 warps, 3 stages, the store in two halves; for N <= 256,
    128 x {32, 64} tiles (whichever pads N least), 4 warps, 4 stages. BLOCK_K is 64, or the next
    power of two >= K (at least 16) for K < 64. All of them: GROUP_M 8, the loop nest flattened, no
    warp specialisation (the compiler's Hopper warp specialisation is not yet measured here); the
    output tile stored through TMA where N * element size is a multiple of 16 bytes.
    """
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"linear supports float16, bfloat16 and float32, got {dtype}")
    elem = torch.finfo(dtype).bits // 8
    if dtype == torch.float32 or k <= 0 or (k * elem) % 16:
        return None
    if (n, k) in _HOPPER_TABLE:
        block_m, block_n, block_k, num_warps, num_stages, split = _HOPPER_TABLE[(n, k)]
    else:
        block_k = 64 if k >= 64 else max(16, triton.next_power_of_2(k))
        if n > 256:
            block_m, block_n, _, num_warps, num_stages, split = _WIDE
        else:
            block_m, block_n, num_warps, num_stages, split = 128, _fit_block(n, (64, 32)), 4, 4, False
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, group_m=_GROUP_M, num_warps=num_warps,
                num_stages=num_stages, epilogue_split=split, tma_store=(n * elem) % 16 == 0, flatten=True,
                warp_specialize=False)


# ---------------------------------------------------------------------------------------------
# Public wrapper (same signature as the reference)
# ---------------------------------------------------------------------------------------------


def _tma_ready(t: torch.Tensor) -> bool:
    """A 2-D tensor a TMA descriptor can read: unit column stride, start and row stride 16-byte aligned."""
    elem = t.element_size()
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * elem) % 16 == 0


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    """Whether ``device`` runs the TMA kernel: an NVIDIA GPU of compute capability 9 or more (Hopper,
    Blackwell), or the CPU under Triton's interpreter. Read once per device."""
    if device.type == "cuda":
        return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu" and INTERPRETED


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the descriptors the kernel builds (``triton.set_allocator``): from torch's
    caching allocator, whose blocks are aligned far beyond TMA's 128 bytes, and which a CUDA graph
    capture serves from its own pool."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def linear_hopper(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    """``linear`` for Hopper GPUs (TMA, persistent grid): ``y [..., N]`` (contiguous) in x.dtype, each
    row bitwise independent of the number and contents of the other rows (see the module docstring).

    Layers that TMA cannot serve (fp32, K % 8 != 0 in 16-bit, a weight with strided or misaligned
    rows, no Hopper-class GPU) run ``linear``, a choice fixed per layer and machine. x may have any
    strides (a layout TMA cannot read is copied first). No host synchronisation, no autotuning:
    CUDA-graph safe.
    """
    n, k = check_linear_args("linear_hopper", x, weight, bias)
    cfg = _hopper_config(n, k, x.dtype)
    if cfg is None or not _HAS_TMA_API or not _has_tma(x.device) or not _tma_ready(weight):
        return linear(x, weight, bias)

    y = new_output((*x.shape[:-1], n), x.dtype, x.device)
    m = y.numel() // n if n else 0
    if m == 0 or n == 0:
        return y
    x2 = x.reshape(m, k)  # a view where the leading dims allow one, else a contiguous copy
    if not _tma_ready(x2):
        x2 = torch.empty((m, k), dtype=x.dtype, device=x.device).copy_(x2)  # fresh, hence aligned
    if x.is_cuda:
        triton.set_allocator(_tma_scratch)
    num_sms = sm_count(x.device)
    n_tiles = triton.cdiv(m, cfg["block_m"]) * triton.cdiv(n, cfg["block_n"])
    _linear_hopper_kernel[(min(num_sms, n_tiles),)](
        x2, weight, bias if bias is not None else weight, y,
        m, n, k,
        x2.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, TMA_STORE=cfg["tma_store"], EPILOGUE_SPLIT=cfg["epilogue_split"],
        FLATTEN=cfg["flatten"], WARP_SPECIALIZE=cfg["warp_specialize"],
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], GROUP_M=cfg["group_m"],
        NUM_SMS=num_sms,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y
