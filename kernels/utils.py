"""What the kernel files of this folder share (as ``fla/ops/utils`` does for flash-linear-attention).

- The "Triton absent" guard. Triton is a dependency on Linux only; the ``*_ref`` references work
  without it. Kernel files take ``triton`` and ``tl`` from here (``None`` without Triton), decorate
  their kernels with ``jit`` (``triton.jit``, or the undecorated function without Triton, so that
  the module still imports) and call ``require_triton`` first in each public wrapper.
- Triton's CPU interpreter (``TRITON_INTERPRET=1``, read when this module is first imported, as
  Triton reads it when a kernel is decorated): ``INTERPRETED``, and ``dot`` / ``dot_acc``, which
  are ``tl.dot`` on a GPU and an interpreter-safe product under the interpreter.
- Activations in fp32 inside kernels: ``softplus``, ``softplus_log1p``, ``silu``, ``silu_approx``.
  Each pair differs in its last bits; every kernel keeps the one it was tuned and tested with.
- ``discretise_dt``: Δ of the references, ``softplus(dt + dt_bias)`` in fp32 (both scans).
- ``segsum``: the references' segment sums of log decays (the decay matrix of a chunk: SSD, Mamba-3).
- ``sm_count`` (streaming multiprocessors, for launch configurations) and ``new_output`` (the
  one allocation point of the wrappers' outputs, which the tests fill with NaN).
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = tl = None

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton(op: str) -> None:
    """Raise the error every Triton wrapper gives where Triton is not installed."""
    if triton is None:
        raise RuntimeError(f"{op} needs Triton, which is not installed; use the *_ref functions instead")


if triton is not None:
    jit = triton.jit
else:  # pragma: no cover - exercised only where Triton is absent

    def jit(fn=None, **kwargs):
        """Without Triton: the function itself (never launched: the wrappers call require_triton)."""
        return fn if fn is not None else (lambda f: f)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (read once per device: no cost in a forward)."""
    if device.type != "cuda":
        return 4  # Triton's CPU interpreter: a nominal small machine
    return torch.cuda.get_device_properties(device).multi_processor_count


def discretise_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, softplus: bool) -> torch.Tensor:
    """Δ in fp32 for the references: ``dt + dt_bias`` (bias broadcast over the leading dims), then
    torch's softplus (threshold 20) if ``softplus``."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    return F.softplus(dt) if softplus else dt


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for j <= i (0 on the diagonal), -inf above it.

    ``exp(segsum(a))`` is the lower-triangular matrix of decays from position j to position i.
    Built from masked cumulative sums rather than differences of one cumsum, which would cancel
    catastrophically for long chunks.
    """
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)  # [..., T(i), T(j)] holding a[i]
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    seg = torch.cumsum(a.masked_fill(~below, 0), dim=-2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return seg.masked_fill(~causal, -torch.inf)


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The one allocation point of the wrappers' outputs (the tests fill it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Matrix products: tensor cores on a GPU; under the interpreter, exact and row-independent
# ---------------------------------------------------------------------------------------------
#
# The interpreter runs tl.dot as numpy's matmul, which multiplies 16-bit floats as raw integers
# and, through BLAS, rounds a row's sum differently depending on where the row sits in the tile.
# Under the interpreter a product is therefore formed as broadcast products summed over k
# (operands widened to fp32, exact for 16-bit values): the same bits for a row wherever it sits,
# as on the GPU's tensor cores. The choice is made here, once, so that no kernel carries a branch
# for the interpreter: on a GPU, ``dot`` and ``dot_acc`` are exactly ``tl.dot``.

if triton is not None and INTERPRETED:

    @triton.jit
    def _broadcast_dot(a, b):
        """a [M, K] @ b [K, N] in fp32 as broadcast products summed over k, the same way for every
        row. The even and odd k go in two halves: the interpreter caps a tensor at 2^20 elements,
        and a [128, 64, 256] product would hold 2^21."""
        BLOCK_M, BLOCK_K, BLOCK_N = a.shape[0], a.shape[1], b.shape[1]  # the interpreter runs this as Python
        a_even, a_odd = tl.split(tl.reshape(a.to(tl.float32), (BLOCK_M, BLOCK_K // 2, 2)))  # [M, K/2]
        b_even, b_odd = tl.split(tl.reshape(tl.trans(b.to(tl.float32)), (BLOCK_N, BLOCK_K // 2, 2)))  # [N, K/2]
        even = tl.sum(a_even[:, :, None] * tl.trans(b_even)[None, :, :], axis=1)  # [M, N]
        odd = tl.sum(a_odd[:, :, None] * tl.trans(b_odd)[None, :, :], axis=1)
        return even + odd

    @triton.jit
    def dot(a, b, INPUT_PRECISION: tl.constexpr):
        """``a @ b`` accumulated in fp32 (interpreter: ``_broadcast_dot``)."""
        return _broadcast_dot(a, b)

    @triton.jit
    def dot_acc(acc, a, b, INPUT_PRECISION: tl.constexpr):
        """``acc + a @ b`` in fp32 (interpreter: ``_broadcast_dot``)."""
        return acc + _broadcast_dot(a, b)

else:

    @jit
    def dot(a, b, INPUT_PRECISION: tl.constexpr):
        """``a @ b`` accumulated in fp32; with INPUT_PRECISION "ieee", fp32 operands multiply in full
        precision (no TF32)."""
        return tl.dot(a, b, input_precision=INPUT_PRECISION)

    @jit
    def dot_acc(acc, a, b, INPUT_PRECISION: tl.constexpr):
        """``acc + a @ b``, accumulated into ``acc`` by the tensor cores (not a separate sum)."""
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


# ---------------------------------------------------------------------------------------------
# The linear recurrence along a tile: a scan on a GPU; under the interpreter, a vectorised loop
# ---------------------------------------------------------------------------------------------
#
# ``affine_scan(a, b)`` over axis 0 of [L, ...] tiles returns h with h[0] = b[0] and
# h[t] = a[t] * h[t-1] + b[t]; ``last_row(x)`` is x[L-1]. On a GPU they are tl.associative_scan
# with the composition of affine maps and tl.reduce keeping the later element. The interpreter
# runs a scan or reduce with a user-defined operator one element at a time in Python (a Mamba-1
# model test spent minutes there); its loop below does the same products and sums in the same
# order, once per position for the whole tile.


@jit
def _affine(a1, b1, a2, b2):
    """Composition of x -> a1 x + b1 then x -> a2 x + b2 (the recurrence's scan operator)."""
    return a1 * a2, a2 * b1 + b2


@jit
def _right(a, b):
    """Reduction operator that keeps the later element (tl.reduce with it picks the last row)."""
    return b


if triton is not None and INTERPRETED:

    @triton.jit
    def _row(x, t):
        """x[t] of a [L, BN, BD] tile (one row selected by a mask; adding zeros is exact)."""
        rows = tl.arange(0, x.shape[0])
        return tl.sum(tl.where((rows == t)[:, None, None], x, 0.0), axis=0)

    @triton.jit
    def affine_scan(a, b):
        """h[t] = a[t] h[t-1] + b[t] along axis 0 of [L, BN, BD] tiles (interpreter: a loop over t)."""
        rows = tl.arange(0, a.shape[0])
        h = _row(b, 0)
        hs = tl.where((rows == 0)[:, None, None], h[None, :, :], 0.0)
        for t in range(1, a.shape[0]):  # the interpreter runs this as Python
            h = _row(a, t) * h + _row(b, t)
            hs = tl.where((rows == t)[:, None, None], h[None, :, :], hs)
        return hs

    @triton.jit
    def last_row(x):
        """x[L-1] of a [L, BN, BD] tile (interpreter: a masked sum)."""
        return _row(x, x.shape[0] - 1)

else:

    @jit
    def affine_scan(a, b):
        """h[t] = a[t] h[t-1] + b[t] along axis 0 (h[0] = b[0]): an associative scan."""
        _, hs = tl.associative_scan((a, b), 0, _affine)
        return hs

    @jit
    def last_row(x):
        """x[L-1] along axis 0."""
        return tl.reduce(x, 0, _right)


# ---------------------------------------------------------------------------------------------
# Activations (fp32 in, fp32 out)
# ---------------------------------------------------------------------------------------------


@jit
def softplus(x):
    """torch.nn.functional.softplus with threshold 20, in fp32, without a log or a division.

    log(1 + exp(x)) = max(x, 0) + log1p(e) with e = exp(-|x|) in (0, 1], and log1p(e) = e g(e)
    with g a degree-8 polynomial: the Chebyshev interpolant of log1p(e) / e on [0, 1] (relative
    error < 2e-7 in fp32, tiny e included), which costs FMAs instead of a log and a division on
    the special-function unit, which the exps of the Mamba-1 scan saturate. Used by the Mamba-1
    kernels (``selective_scan``, ``mamba1_step``)."""
    e = tl.exp2(-tl.abs(x) * 1.4426950408889634)
    g = e * 0.005253457929939032 - 0.02958850748836994
    g = g * e + 0.07836166769266129
    g = g * e - 0.13674770295619965
    g = g * e + 0.19111430644989014
    g = g * e - 0.24844369292259216
    g = g * e + 0.33319270610809326
    g = g * e - 0.49999502301216125
    g = g * e + 1.0
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + e * g)


@jit
def softplus_log1p(v):
    """softplus in fp32 as torch computes it: log1p(exp(v)), and v itself above 20.

    log1p(u) is formed as log(w) u / (w - 1) with w = 1 + u (exact for tiny u too). Used by the
    SSD kernels (``ssd``), whose scan is bound by latency, not by the special-function unit. Not
    interchangeable with ``softplus``: about half of all fp32 inputs give another last bit."""
    u = tl.exp(tl.minimum(v, 20.0))
    w = 1.0 + u
    lp = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(v > 20.0, v, lp)


@jit
def silu(x):
    """x * sigmoid(x) as ``x / (1 + exp(-x))`` (the convolutions' activation)."""
    return x / (1.0 + tl.exp(-x))


# tl.fdiv(..., approx=True) (div.approx.f32: a reciprocal and a multiply) is recent; older Triton
# releases get tl.fdiv's default, also approximate (div.full.f32, a few instructions more).
_APPROX_DIV = tl.constexpr("approx" in inspect.signature(tl.fdiv).parameters) if tl is not None else False


@jit
def silu_approx(z):
    """x * sigmoid(x) with exp2 and an approximate division: fewer instructions, a few ulp off
    ``silu``. The output gate ``y * silu(z)`` of the Mamba-1 kernels, whose issue slots are busy."""
    den = 1.0 + tl.exp2(-z * 1.4426950408889634)
    if _APPROX_DIV:
        out = tl.fdiv(z, den, approx=True)
    else:
        out = tl.fdiv(z, den)
    return out
