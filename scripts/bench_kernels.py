#!/usr/bin/env python
"""Benchmark the Triton kernels of ``mamba_eval.kernels`` against the roofline and mamba_ssm.

For every kernel, at the shapes of the kernel table of the reference measurements (bf16), this
script

1. checks the kernel against its ``*_ref`` on the same random inputs (the reference runs in fp32
   on the bf16-rounded values) and reports the relative max error of every output;
2. times it with ``triton.testing.do_bench`` (median; the L2 cache is flushed between runs).
   Single-step decode updates are timed inside one captured CUDA graph of many steps, cycling
   through enough distinct states that they come from memory, not L2, as the layers of a
   model do; launch cost would otherwise be all one measures;
3. counts the bytes the kernel must move (every input read once, every output written once, an
   in-place state read and written) and, for the Mamba-1 scans, the exponentials (one per batch,
   channel, state and position), for the matrix products the flops (2 M N K). The roofline time
   is the largest of bytes / copy bandwidth, exps / exp rate and flops / bf16 matmul rate, each
   measured on this GPU in this run (the copy and matmul peaks by ``bench_common.peaks``, the exp
   rate by a small Triton kernel here). Share = roofline time / measured time.

When mamba_ssm and causal_conv1d import, their kernel for the same op runs on the same inputs in
the same run (checked against our reference, timed the same way), and the table shows its time,
its share of the same roofline and our speed over it. Without them, the time stored in
``scripts/anchors.py`` is shown in a column of its own, with no ratio or share. Kernels that do
not exist (yet) are listed as "not available".

Usage::

    python scripts/bench_kernels.py [--json PATH] [--only SUBSTRING ...] [--no-check] [--graph-steps N] [--peer off]

Needs a CUDA (or ROCm) GPU; exits with status 2 otherwise. Exits with status 1 when a kernel
disagrees with its reference or fails.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402
from bench_common import Peaks, format_table, import_peer, peaks, run_info, write_json  # noqa: E402

DTYPE = torch.bfloat16
# Relative max error allowed for every output, fp32 states included: the inputs are bf16 and a
# kernel may round intermediates to bf16 for tensor-core products (as mamba_ssm's do), so what
# bf16 rounding implies (step 2^-8) is the yardstick, not fp32 summation order.
TOLERANCE = 1e-2
L2_FLUSH_BYTES = 256 * 2**20  # decode states cycled through per graph exceed this (H200 L2: 50 MiB)
MAX_STATE_COPIES = 1024  # tiny states (batch 1) stop at this many copies; they are latency bound anyway

# (batch, length) of the kernel table; tokens per call 8192 / 32768 / 16384.
SEQ_SHAPES = [(64, 128), (16, 2048), (1, 16384)]


@dataclass
class Case:
    module: str  # file of kernels/: conv1d, selective_scan, ssd, norm, mamba1_step, matmul, matmul_hopper
    op: str  # public kernel function; its reference is f"{op}_ref"
    shape: str  # label printed in the table
    make: Callable[[torch.device], tuple[tuple, dict]]  # -> (args, kwargs), bf16 activations
    exps: int = 0  # exponentials the kernel must compute
    flops: int = 0  # tensor-core flops the kernel must compute (matrix products)
    state_arg: int | None = None  # decode: index of the argument updated in place
    note: str = ""
    kernel: Callable | None = None  # runs instead of module.op (a sequence of ops); module.op_ref checks it
    cycled: tuple[int, ...] = ()  # decode: further arguments copied per graph step like the state (weights)
    in_place: bool = True  # decode: the state_arg is written (False: only cycled, e.g. a weight)


# ---------------------------------------------------------------------------------------------
# Inputs. Magnitudes follow the models: Δ = softplus(dt + dt_bias) with dt_bias the inverse
# softplus of a log-uniform Δ in [1e-3, 0.1]; A = -(1..N) (Mamba-1) or -U(1, 16) per head (Mamba-2).
# ---------------------------------------------------------------------------------------------


def _randn(*shape, device, dtype=DTYPE, scale=1.0):
    return (scale * torch.randn(*shape, device=device)).to(dtype)


def _dt_bias(n, device):
    dt = torch.exp(torch.rand(n, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus, fp32


def _conv_case(batch, length, channels=5120, width=4, channel_last=False):
    def make(device):
        if channel_last:  # [B, C, L] view of a [B, L, C] tensor, as the Mamba-2 block passes it
            x = _randn(batch, length, channels, device=device).transpose(1, 2)
        else:
            x = _randn(batch, channels, length, device=device)
        weight = _randn(channels, width, device=device, scale=0.5)
        bias = _randn(channels, device=device, scale=0.1)
        return (x, weight, bias), {"activation": "silu"}

    return make


def _selective_scan_case(batch, length, d_inner, d_state=16):
    def make(device):
        u = _randn(batch, d_inner, length, device=device)
        delta = _randn(batch, d_inner, length, device=device, scale=0.1)
        A = -torch.arange(1, d_state + 1, device=device, dtype=torch.float32).repeat(d_inner, 1)
        B = _randn(batch, d_state, length, device=device)
        C = _randn(batch, d_state, length, device=device)
        D = torch.ones(d_inner, device=device)
        z = _randn(batch, d_inner, length, device=device)
        kwargs = {"D": D, "z": z, "delta_bias": _dt_bias(d_inner, device), "delta_softplus": True}
        return (u, delta, A, B, C), kwargs

    return make


def _ssd_case(batch, length, nheads, headdim=64, d_state=128, ngroups=1, chunk_size=256):
    def make(device):
        x = _randn(batch, length, nheads, headdim, device=device)
        dt = _randn(batch, length, nheads, device=device, scale=0.1)
        A = -torch.empty(nheads, device=device).uniform_(1, 16)
        B = _randn(batch, length, ngroups, d_state, device=device)
        C = _randn(batch, length, ngroups, d_state, device=device)
        D = torch.ones(nheads, device=device)
        kwargs = {"D": D, "dt_bias": _dt_bias(nheads, device), "dt_softplus": True}
        return (x, dt, A, B, C, chunk_size), kwargs

    return make


def _add_norm_case(rows, width, with_residual=True, **extra_kwargs):
    def make(device):
        x = _randn(rows, width, device=device)
        residual = _randn(rows, width, device=device, dtype=torch.float32, scale=3.0) if with_residual else None
        weight = _randn(width, device=device, scale=0.1) + 1
        return (x, residual, weight, None, 1e-5, True, True), dict(extra_kwargs)

    return make


def _gated_norm_case(rows, d_inner, group_size, d_in_proj):
    def make(device):
        y = _randn(rows, d_inner, device=device)
        # z is a slice of the input projection [z, xBC, dt], as in the Mamba-2 block.
        z = _randn(rows, d_in_proj, device=device)[:, :d_inner]
        weight = _randn(d_inner, device=device, scale=0.1) + 1
        return (y, z, weight, 1e-5, group_size), {}

    return make


def _conv_update_case(batch, channels, width=4):
    def make(device):
        x = _randn(batch, channels, device=device)
        conv_state = _randn(batch, channels, width - 1, device=device)
        weight = _randn(channels, width, device=device, scale=0.5)
        bias = _randn(channels, device=device, scale=0.1)
        return (x, conv_state, weight, bias, "silu"), {}

    return make


def _selective_update_case(batch, d_inner, d_state=16):
    def make(device):
        state = 0.1 * torch.randn(batch, d_inner, d_state, device=device)
        x = _randn(batch, d_inner, device=device)
        dt = _randn(batch, d_inner, device=device, scale=0.1)
        A = -torch.arange(1, d_state + 1, device=device, dtype=torch.float32).repeat(d_inner, 1)
        B = _randn(batch, d_state, device=device)
        C = _randn(batch, d_state, device=device)
        D = torch.ones(d_inner, device=device)
        z = _randn(batch, d_inner, device=device)
        kwargs = {"D": D, "z": z, "dt_bias": _dt_bias(d_inner, device), "dt_softplus": True}
        return (state, x, dt, A, B, C), kwargs

    return make


def _ssd_update_case(batch, nheads, headdim=64, d_state=128, ngroups=1):
    def make(device):
        state = 0.1 * torch.randn(batch, nheads, headdim, d_state, device=device)
        x = _randn(batch, nheads, headdim, device=device)
        dt = _randn(batch, nheads, device=device, scale=0.1)
        A = -torch.empty(nheads, device=device).uniform_(1, 16)
        B = _randn(batch, ngroups, d_state, device=device)
        C = _randn(batch, ngroups, d_state, device=device)
        D = torch.ones(nheads, device=device)
        kwargs = {"D": D, "dt_bias": _dt_bias(nheads, device), "dt_softplus": True}
        return (state, x, dt, A, B, C), kwargs

    return make


def _mamba1_step_case(batch, d_inner, dt_rank, d_state=16, width=4):
    def make(device):
        xz = _randn(batch, 2 * d_inner, device=device)  # x and z: the halves of in_proj's output
        args = (
            xz[:, :d_inner], xz[:, d_inner:],
            _randn(batch, d_inner, width - 1, device=device),  # conv_state
            0.1 * torch.randn(batch, d_inner, d_state, device=device),  # ssm_state, fp32
            _randn(d_inner, width, device=device, scale=0.5), _randn(d_inner, device=device, scale=0.1),
            _randn(dt_rank + 2 * d_state, d_inner, device=device, scale=d_inner**-0.5),  # x_proj
            _randn(d_inner, dt_rank, device=device, scale=dt_rank**-0.5),  # dt_proj
            _dt_bias(d_inner, device),
            -torch.arange(1, d_state + 1, device=device, dtype=torch.float32).repeat(d_inner, 1),
            torch.ones(d_inner, device=device),
        )
        return args, {}

    return make


def _mamba1_decode_unfused(x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                           dt_bias, A, D, bcdt_eps=None, linear=None):
    """The Mamba-1 step as four ops: conv update, x_proj GEMM, dt_proj GEMM (``linear``: cuBLAS's
    F.linear by default), state update (no bcdt norms)."""
    import torch.nn.functional as F

    from mamba_eval.kernels.conv1d import causal_conv1d_update
    from mamba_eval.kernels.selective_scan import selective_state_update

    if bcdt_eps is not None:
        raise ValueError("the unfused baseline has no bcdt norms")
    linear = linear or F.linear
    u = causal_conv1d_update(x, conv_state, conv_weight, conv_bias, "silu")
    dt, B, C = linear(u, x_proj_weight).split([dt_proj_weight.shape[1], A.shape[1], A.shape[1]], dim=-1)
    return selective_state_update(ssm_state, u, linear(dt, dt_proj_weight), A, B, C, D, z,
                                  dt_bias=dt_bias, dt_softplus=True)


def _mamba1_decode_unfused_invariant(*args, **kwargs):
    """``_mamba1_decode_unfused`` with the batch-invariant ``linear_step`` for both GEMMs."""
    from mamba_eval.kernels.matmul import linear_step

    return _mamba1_decode_unfused(*args, **kwargs, linear=linear_step)


def _linear_case(rows, k, n, row_stride=None):
    """x [rows, K] (a column slice of a [rows, row_stride] tensor when given, as dt_proj reads the
    x_proj output), weight [N, K], no bias (the Mamba projections have none)."""
    def make(device):
        x = _randn(rows, row_stride or k, device=device)[:, :k]
        return (x, _randn(n, k, device=device, scale=k**-0.5)), {}

    return make


def _torch_linear(x, weight, bias=None):
    """torch's F.linear (cuBLAS): the product ``linear`` replaces."""
    import torch.nn.functional as F

    return F.linear(x, weight, bias)


# The model's projections: (layer, K, N, row stride of x when x is a slice). Mamba-1 130m and 2.8b,
# Mamba-2 130m and 2.7b in_proj (out_proj is Mamba-1's), the LM head over the 50280-row vocabulary.
LINEAR_SHAPES = [
    ("in_proj 130m", 768, 3072, None), ("x_proj 130m", 1536, 80, None), ("dt_proj 130m", 48, 1536, 80),
    ("out_proj 130m", 1536, 768, None), ("lm_head 130m", 768, 50280, None),
    ("in_proj 2.8b", 2560, 10240, None), ("x_proj 2.8b", 5120, 192, None), ("dt_proj 2.8b", 160, 5120, 192),
    ("out_proj 2.8b", 5120, 2560, None), ("lm_head 2.8b", 2560, 50280, None),
    ("in_proj mamba2-130m", 768, 3352, None), ("in_proj mamba2-2.7b", 2560, 10576, None),
]


def build_cases() -> list[Case]:
    """The kernel table of the reference measurements, plus the rows our model adds."""
    cases = []
    for b, l in SEQ_SHAPES:
        cases.append(Case("conv1d", "causal_conv1d", f"C=5120 K=4 B={b} L={l}", _conv_case(b, l)))
    for b, l in SEQ_SHAPES:
        cases.append(Case(
            "conv1d", "causal_conv1d", f"C=5120 K=4 B={b} L={l} channel-last", _conv_case(b, l, channel_last=True),
            note="channel-last: x is a [B, L, C] tensor seen as [B, C, L]",
        ))
    for d in (1536, 5120):
        for b, l in SEQ_SHAPES:
            cases.append(Case(
                "selective_scan", "selective_scan", f"D={d} N=16 B={b} L={l}", _selective_scan_case(b, l, d),
                exps=b * d * 16 * l,
            ))
    for h in (24, 80):
        for b, l in SEQ_SHAPES:
            cases.append(Case("ssd", "ssd_scan", f"H={h} P=64 N=128 B={b} L={l}", _ssd_case(b, l, h)))
    cases += [
        Case("norm", "add_rmsnorm", "32768 x 2560, fp32 residual", _add_norm_case(32768, 2560)),
        Case("norm", "add_rmsnorm", "32768 x 768, fp32 residual", _add_norm_case(32768, 768)),
        Case("norm", "add_rmsnorm", "32768 x 2560, first layer", _add_norm_case(32768, 2560, with_residual=False)),
        Case("norm", "add_rmsnorm", "32768 x 2560, final (no residual out)",
             _add_norm_case(32768, 2560, return_residual=False)),
        Case("norm", "gated_rmsnorm", "32768 x 5120, 1 group", _gated_norm_case(32768, 5120, 5120, 10576)),
        Case("norm", "gated_rmsnorm", "32768 x 1536, 1 group", _gated_norm_case(32768, 1536, 1536, 3352)),
    ]
    for b in (64, 1):
        cases.append(Case(
            "selective_scan", "selective_state_update", f"D=5120 N=16 B={b}", _selective_update_case(b, 5120),
            exps=b * 5120 * 16, state_arg=0,
        ))
        cases.append(Case("ssd", "ssd_state_update", f"H=80 P=64 N=128 B={b}", _ssd_update_case(b, 80), state_arg=0))
        cases.append(Case("conv1d", "causal_conv1d_update", f"C=5120 K=4 B={b}", _conv_update_case(b, 5120),
                          state_arg=1))
        cases.append(Case("conv1d", "causal_conv1d_update", f"C=5376 K=4 B={b}", _conv_update_case(b, 5376),
                          state_arg=1))
        # One Mamba-1 decoding step between in_proj and out_proj (mamba-2.8b and mamba-130m layers):
        # the fused two-kernel op against the op sequence it replaces, each step with its own copy of
        # the weights and states (a model's layers do not find them in L2).
        for d_inner, dt_rank in ((5120, 160), (1536, 48)):
            shape = f"D={d_inner} R={dt_rank} N=16 K=4 B={b}"
            step = dict(exps=b * d_inner * 16, state_arg=3, cycled=(2, 4, 5, 6, 7, 8, 9, 10))
            make = _mamba1_step_case(b, d_inner, dt_rank)
            cases.append(Case("mamba1_step", "mamba1_decode", shape, make, **step,
                              note="mamba1_decode: conv update + x_proj + dt_proj + state update in 2 launches"))
            cases.append(Case("mamba1_step", "mamba1_decode", f"{shape}, unfused", make, **step,
                              kernel=_mamba1_decode_unfused,
                              note="unfused: conv update, x_proj and dt_proj GEMMs (cuBLAS), state update: "
                                   "4 kernels + cuBLAS's split-K reduce; rounds u, dt, B, C to bf16"))
            cases.append(Case("mamba1_step", "mamba1_decode", f"{shape}, unfused invariant", make, **step,
                              kernel=_mamba1_decode_unfused_invariant,
                              note="unfused invariant: the same 4 ops with linear_step for x_proj and dt_proj"))
    # The batch-invariant matrix product (a tiling fixed per (N, K)) against torch's F.linear, whose
    # cuBLAS algorithm is chosen per shape; M = tokens of a forward.
    for m in (4096, 65536):
        for layer, k, n, row_stride in LINEAR_SHAPES:
            shape = f"{layer} M={m} K={k} N={n}"
            make, flops = _linear_case(m, k, n, row_stride), 2 * m * n * k
            cases.append(Case("matmul", "linear", shape, make, flops=flops,
                              note="linear: Triton, tiles fixed per (N, K), rows bitwise independent of M"))
            cases.append(Case("matmul", "linear", f"{shape}, torch", make, flops=flops, kernel=_torch_linear,
                              note="torch: F.linear (cuBLAS, algorithm chosen per shape, M included)"))
            cases.append(Case("matmul_hopper", "linear_hopper", shape, make, flops=flops,
                              note="linear_hopper: TMA loads, persistent tiles fixed per (N, K) (Hopper)"))
    # The decoding steps' products (batch 1 and 64) in a CUDA graph, each call reading another
    # copy of the weight (as each layer reads its own from memory): linear_step against F.linear.
    for m in (1, 64):
        for layer, k, n, _ in LINEAR_SHAPES:
            shape = f"{layer} M={m} K={k} N={n}"
            make, flops = _linear_case(m, k, n), 2 * m * n * k
            cases.append(Case("matmul", "linear_step", shape, make, flops=flops, state_arg=1, in_place=False,
                              note="linear_step: Triton, 16-row tiles fixed per (N, K), rows bitwise "
                                   "independent of the batch"))
            cases.append(Case("matmul", "linear_step", f"{shape}, torch", make, flops=flops, state_arg=1,
                              in_place=False, kernel=_torch_linear, note="torch: F.linear (cuBLAS)"))
    return cases


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _as_fp32(obj):
    """Floating tensors -> fp32 copies (never the same storage: in-place references stay apart)."""
    if isinstance(obj, torch.Tensor):
        return obj.float().clone() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_as_fp32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _as_fp32(v) for k, v in obj.items()}
    return obj


def _clone_state(args: tuple, index: int | None) -> tuple:
    if index is None:
        return args
    return args[:index] + (args[index].clone(),) + args[index + 1:]


def rel_max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` in fp64 (inf when actual has NaN/inf)."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return math.inf
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    return err / scale if scale > 0 else err


def _load(case: Case):
    """(kernel, reference) or a string saying why the kernel is not available."""
    try:
        module = importlib.import_module(f"mamba_eval.kernels.{case.module}")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"not available (import mamba_eval.kernels.{case.module}: {type(exc).__name__}: {exc})"
    kernel, ref = case.kernel or getattr(module, case.op, None), getattr(module, f"{case.op}_ref", None)
    if kernel is None:
        return f"not available (no {case.op} in mamba_eval.kernels.{case.module})"
    if ref is None:
        return f"not available (no {case.op}_ref in mamba_eval.kernels.{case.module})"
    return kernel, ref


def check(case: Case, kernel, ref, args, kwargs, fewer_ok: bool = False) -> tuple[float, bool, list]:
    """Kernel vs reference (fp32, same rounded inputs): (worst relative max error, ok, kernel outputs).
    ``fewer_ok``: a peer may return only the leading outputs (causal_conv1d's channel-first
    forward has no final state); those are compared."""
    k_args = _clone_state(args, case.state_arg)
    r_args = _as_fp32(args)
    got = kernel(*k_args, **kwargs)
    want = ref(*r_args, **_as_fp32(kwargs))
    got_t, want_t = _tensors(got), _tensors(want)
    if fewer_ok and 0 < len(got_t) < len(want_t):
        want_t = want_t[:len(got_t)]
    if len(got_t) != len(want_t):
        raise RuntimeError(f"the kernel returned {len(got_t)} tensors, the reference {len(want_t)}")
    if case.state_arg is not None:  # the updated state is an output too
        got_t.append(k_args[case.state_arg])
        want_t.append(r_args[case.state_arg])
    worst, ok = 0.0, True
    for g, w in zip(got_t, want_t):
        if g.shape != w.shape:
            raise RuntimeError(f"output shape {tuple(g.shape)} != reference {tuple(w.shape)}")
        err = rel_max_error(g, w)
        worst = max(worst, err)
        ok &= err <= TOLERANCE
    return worst, ok, _tensors(got)


def moved_bytes(case: Case, args, kwargs, outputs: list[torch.Tensor]) -> int:
    """Every input read once, every output written once, the in-place state read and written."""
    read = sum(_nbytes(t) for t in _tensors(args) + _tensors(kwargs))
    written = sum(_nbytes(t) for t in outputs)
    if case.state_arg is not None and case.in_place:
        written += _nbytes(args[case.state_arg])
    return read + written


def time_prefill(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median")


def time_decode(case: Case, kernel, args, kwargs, steps: int) -> float:
    """ms per call inside one CUDA graph of ``steps`` calls cycling through distinct states."""
    import triton.testing

    per_copy = (case.state_arg, *case.cycled)
    copies = min(MAX_STATE_COPIES, max(1, math.ceil(L2_FLUSH_BYTES / sum(_nbytes(args[i]) for i in per_copy))))
    steps = max(steps, copies)
    arg_sets = []
    for _ in range(copies):
        copy = args
        for index in per_copy:
            copy = _clone_state(copy, index)
        arg_sets.append(copy)

    def run_all():
        for i in range(steps):
            kernel(*arg_sets[i % copies], **kwargs)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation) outside the capture
        for _ in range(2):
            kernel(*arg_sets[0], **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    torch.cuda.synchronize()
    return triton.testing.do_bench(graph.replay, return_mode="median") / steps


def _exp_chain_kernel():
    """A Triton kernel that only chains exps: v <- exp(-v), ``ITERS`` times per element."""
    import triton
    import triton.language as tl

    @triton.jit
    def exp_chain(X, OUT, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(X + offs)
        for _ in range(ITERS):
            v = tl.exp(-v)  # converges to 0.567... (v = exp(-v)) but cannot be folded away
        tl.store(OUT + offs, v)

    return exp_chain


def measure_exp_rate(device, iters: int = 2048) -> float:
    """Exponentials per second of the chip (each thread chains 8 independent exps)."""
    import triton.testing

    kernel, block = _exp_chain_kernel(), 1024
    programs = 16 * torch.cuda.get_device_properties(device).multi_processor_count
    x = torch.rand(programs * block, device=device)
    out = torch.empty_like(x)

    def run():
        kernel[(programs,)](x, out, ITERS=iters, BLOCK=block, num_warps=4)

    run()
    torch.cuda.synchronize()
    if not torch.isfinite(out).all() or (out - 0.5671).abs().max() > 1e-2:
        raise RuntimeError("the exp-rate kernel computed wrong values")
    ms = triton.testing.do_bench(run, return_mode="median")
    return programs * block * iters / (ms * 1e-3)


# ---------------------------------------------------------------------------------------------
# Peers: mamba_ssm's and causal_conv1d's kernels called with our kernels' arguments, so that they
# run on the same inputs in the same run. Each asks for the outputs ours produce (final states
# included) where the peer can return them.
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _peer_causal_conv1d(x, weight, bias=None, activation="silu"):
    from causal_conv1d import causal_conv1d_fn

    # causal_conv1d returns the final state for channel-last x only.
    return causal_conv1d_fn(x, weight, bias, activation=activation, return_final_states=x.stride(1) == 1)


def _peer_causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu"):
    from causal_conv1d import causal_conv1d_update

    return causal_conv1d_update(x, conv_state, weight, bias, activation)


@torch.no_grad()
def _peer_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)


@torch.no_grad()
def _peer_ssd_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=True):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                     return_final_states=True)


@torch.no_grad()
def _peer_add_rmsnorm(x, residual, weight, bias=None, eps=1e-5, residual_in_fp32=True, is_rms=True,
                      return_residual=True):
    from mamba_ssm.ops.triton.layer_norm import layer_norm_fn

    return layer_norm_fn(x, weight, bias, residual=residual, eps=eps, prenorm=return_residual,
                         residual_in_fp32=residual_in_fp32, is_rms_norm=is_rms)


@torch.no_grad()
def _peer_gated_rmsnorm(y, z, weight, eps=1e-5, group_size=None):
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

    # RMSNorm(y * silu(z)), as the Mamba-2 block applies it.
    return rmsnorm_fn(y, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)


def _peer_selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    return selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


def _peer_ssd_state_update(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True):
    """As mamba_ssm's Mamba2.step calls it: the per-head dt, A, D and dt_bias broadcast over the
    head and state dimensions with stride 0 (its kernel's fast path for tied values)."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    p, n = state.shape[2], state.shape[3]
    return selective_state_update(
        state, x, dt[..., None].expand(-1, -1, p), A[:, None, None].expand(-1, p, n), B, C,
        D=None if D is None else D[:, None].expand(-1, p),
        dt_bias=None if dt_bias is None else dt_bias[:, None].expand(-1, p), dt_softplus=dt_softplus)


def _peer_mamba1_decode(x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                        dt_bias, A, D, bcdt_eps=None):
    """mamba_ssm's ``Mamba.step`` between in_proj and out_proj: causal_conv1d's update, the x_proj
    and dt_proj products (cuBLAS), mamba_ssm's Triton state update."""
    import torch.nn.functional as F
    from causal_conv1d import causal_conv1d_update
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    if bcdt_eps is not None:
        raise ValueError("mamba_ssm's step has no bcdt norms")
    u = causal_conv1d_update(x, conv_state, conv_weight, conv_bias, "silu")
    dt, B, C = F.linear(u, x_proj_weight).split([dt_proj_weight.shape[1], A.shape[1], A.shape[1]], dim=-1)
    return selective_state_update(ssm_state, u, F.linear(dt, dt_proj_weight), A, B, C, D, z=z, dt_bias=dt_bias,
                                  dt_softplus=True)


#: our op -> (the peer packages it needs, the peer with our op's arguments)
PEERS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "causal_conv1d": (("causal_conv1d",), _peer_causal_conv1d),
    "causal_conv1d_update": (("causal_conv1d",), _peer_causal_conv1d_update),
    "selective_scan": (("mamba_ssm",), _peer_selective_scan),
    "ssd_scan": (("mamba_ssm",), _peer_ssd_scan),
    "add_rmsnorm": (("mamba_ssm",), _peer_add_rmsnorm),
    "gated_rmsnorm": (("mamba_ssm",), _peer_gated_rmsnorm),
    "selective_state_update": (("mamba_ssm",), _peer_selective_state_update),
    "ssd_state_update": (("mamba_ssm",), _peer_ssd_state_update),
    "mamba1_decode": (("mamba_ssm", "causal_conv1d"), _peer_mamba1_decode),
}


def peer_for(case: Case, importable: set[str]) -> tuple[str, Callable] | None:
    """(the peer packages' names, the peer) for a case's own kernel (not for the op sequences and
    torch rows beside it), when they import."""
    if case.kernel is not None or case.op not in PEERS:
        return None
    needs, fn = PEERS[case.op]
    return (" + ".join(needs), fn) if set(needs) <= importable else None


def roofline(nbytes: int, exps: int, flops: int, exp_rate: float, chip: Peaks) -> tuple[str, float]:
    """(the binding limit, its time in ms): the largest of bytes, exps and flops over this chip's rates."""
    limits_ms = {"bytes": nbytes / chip.copy_bytes_per_s * 1e3, "exp": exps / exp_rate * 1e3,
                 "flops": flops / chip.matmul_flops * 1e3}
    bound = max(limits_ms, key=limits_ms.get)
    return bound, limits_ms[bound]


# ---------------------------------------------------------------------------------------------


def _time(case: Case, kernel, args, kwargs, graph_steps: int) -> float:
    if case.state_arg is None:
        return time_prefill(lambda: kernel(*args, **kwargs))
    return time_decode(case, kernel, args, kwargs, graph_steps)


def run_case(case: Case, device, exp_rate: float, chip: Peaks, do_check: bool, graph_steps: int,
             peer: tuple[str, Callable] | None, gpu: str) -> dict:
    row = {"kernel": case.op, "shape": case.shape, "note": case.note}
    loaded = _load(case)
    if isinstance(loaded, str):
        return {**row, "status": loaded}
    kernel, ref = loaded
    torch.manual_seed(0)
    try:
        args, kwargs = case.make(device)
        if do_check:
            err, ok, outputs = check(case, kernel, ref, args, kwargs)
            row.update(max_rel_err=err, status="ok" if ok else "MISMATCH")
        else:
            outputs = _tensors(kernel(*_clone_state(args, case.state_arg), **kwargs))
            row.update(max_rel_err=None, status="unchecked")
        nbytes = moved_bytes(case, args, kwargs, outputs)
        del outputs
        torch.cuda.empty_cache()
        ms = _time(case, kernel, args, kwargs, graph_steps)
    except Exception as exc:  # noqa: BLE001 - report and go on with the other kernels
        traceback.print_exc()
        return {**row, "status": f"error: {type(exc).__name__}: {exc}"}
    finally:
        torch.cuda.empty_cache()
    bound, roofline_ms = roofline(nbytes, case.exps, case.flops, exp_rate, chip)
    row.update(ms=ms, bytes=nbytes, exps=case.exps, flops=case.flops, gbps=nbytes / (ms * 1e-3) / 1e9,
               bound=bound, roofline_ms=roofline_ms, share=roofline_ms / ms)
    if peer is not None:
        row["peer"], peer_fn = peer
        try:
            peer_err, peer_ok, _ = check(case, peer_fn, ref, args, kwargs, fewer_ok=True)
            peer_ms = _time(case, peer_fn, args, kwargs, graph_steps)
            row.update(peer_ms=peer_ms, peer_share=roofline_ms / peer_ms, speed_vs_peer=peer_ms / ms,
                       peer_max_rel_err=peer_err, peer_status="ok" if peer_ok else "MISMATCH")
        except Exception as exc:  # noqa: BLE001 - the peer's failure is reported, ours stands
            traceback.print_exc()
            row["peer_status"] = f"error: {type(exc).__name__}: {exc}"
        finally:
            torch.cuda.empty_cache()
    else:
        found = anchors.stored("kernels", (case.op, case.shape), gpu)
        if found:
            row["stored_peer_ms"], source = found
            row["stored_source"] = source.label
            row["note"] = "; ".join(filter(None, [case.note, anchors.KERNEL_NOTES.get(case.op)]))
    return row


def _fmt(value, spec: str) -> str | None:
    return None if value is None else format(value, spec)


def print_table(rows: list[dict], measured_peer: bool) -> None:
    header = ["kernel", "shape", "check", "ms", "GB/s", "bound", "roofline ms", "share"]
    header += ["peer", "peer ms", "peer share", "speed vs peer", "peer check"] if measured_peer \
        else ["stored mamba_ssm ms"]
    lines = []
    for r in rows:
        if "ms" not in r:
            continue
        check_text = r["status"] if r["max_rel_err"] is None else f"{r['status']} {r['max_rel_err']:.1e}"
        line = [r["kernel"], r["shape"], check_text, f"{r['ms']:.4f}", f"{r['gbps']:.0f}", r["bound"],
                f"{r['roofline_ms']:.4f}", f"{100 * r['share']:.0f}%"]
        if measured_peer:
            peer_check = r.get("peer_status")
            if r.get("peer_max_rel_err") is not None:
                peer_check = f"{peer_check} {r['peer_max_rel_err']:.1e}"
            peer_share = None if "peer_share" not in r else f"{100 * r['peer_share']:.0f}%"
            line += [r.get("peer"), _fmt(r.get("peer_ms"), ".4f"), peer_share,
                     _fmt(r.get("speed_vs_peer"), ".2f"), peer_check]
        else:
            line += [_fmt(r.get("stored_peer_ms"), ".3f")]
        lines.append(line)
    print(format_table(header, lines))
    for r in rows:
        if "ms" not in r:  # below the table: a long reason would widen its column
            print(f"{r['kernel']} {r['shape']}: {r['status']}")
    for note in sorted({r["note"] for r in rows if r.get("note")}):
        print(f"note: {note}")
    for label in sorted({r["stored_source"] for r in rows if r.get("stored_source")}):
        print(label)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--only", nargs="+", metavar="SUBSTRING", help="run the cases whose kernel name contains one")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the references")
    parser.add_argument("--graph-steps", type=int, default=128, help="decode calls per captured CUDA graph")
    parser.add_argument("--peer", choices=["auto", "off"], default="auto",
                        help="auto: time mamba_ssm's and causal_conv1d's kernels in the same run when they import")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py: no CUDA/ROCm GPU visible to torch (torch.cuda.is_available() is False); "
              "this benchmark times GPU kernels and cannot run here.", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    cases = [c for c in build_cases() if not args.only or any(s in c.op for s in args.only)]
    importable = set() if args.peer == "off" else {n for n in ("mamba_ssm", "causal_conv1d") if import_peer(n)}
    info = run_info(device, with_peaks=True)
    chip = peaks()
    exp_rate = measure_exp_rate(device)
    print(f"device: {info['gpu']}; torch {info['torch']}, triton {info['triton']}; peers: "
          f"{', '.join(sorted(importable)) or 'none'}")
    print(f"measured now: copy {chip.copy_bytes_per_s:.3g} B/s, bf16 matmul {chip.matmul_flops:.3g} FLOP/s, "
          f"exp rate {exp_rate:.3g} /s")
    rows = []
    for case in cases:
        print(f"... {case.op} {case.shape}", file=sys.stderr, flush=True)
        rows.append(run_case(case, device, exp_rate, chip, not args.no_check, args.graph_steps,
                             peer_for(case, importable), info["gpu"]))
    print()
    print_table(rows, measured_peer=any("peer_status" in r for r in rows))
    if args.json:
        info["exp_rate_per_s"] = exp_rate
        info["peers"] = sorted(importable)
        write_json(args.json, {"meta": info, "rows": rows})
        print(f"wrote {args.json}")
    failed = [r for r in rows if r["status"] == "MISMATCH" or r["status"].startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
