#!/usr/bin/env python
"""Benchmark the Triton kernels of ``mamba_eval.kernels`` against the roofline and mamba_ssm.

For every kernel, at the shapes of the kernel table of the reference measurements (mamba_ssm
2.3.2 on one H200, bf16), this script

1. checks the kernel against its ``*_ref`` on the same random inputs (the reference runs in fp32
   on the bf16-rounded values) and reports the relative max error of every output;
2. times it with ``triton.testing.do_bench`` (median; the L2 cache is flushed between runs).
   Single-step decode updates are timed inside one captured CUDA graph of many steps, cycling
   through enough distinct states that they come from memory, not L2, as the layers of a
   model do; launch cost would otherwise be all one measures;
3. counts the bytes the kernel must move (every input read once, every output written once, an
   in-place state read and written) and, for the Mamba-1 scans, the exponentials (one per batch,
   channel, state and position), for the matrix products the flops (2 M N K). The roofline time
   is the largest of bytes / 4.27e12 B/s (device copy bandwidth of the H200 measured with the
   references), exps / exp rate, where the exp rate is measured here by a small Triton kernel,
   and flops / 989e12 /s (the H200's dense bf16 tensor-core peak). Share = roofline time /
   measured time.

mamba_ssm's time for the same shape is printed beside ours, with its share of the same
roofline. Kernels that do not exist (yet) are listed as "not available".

Usage::

    python scripts/bench_kernels.py [--json PATH] [--only SUBSTRING ...] [--no-check] [--graph-steps N]

Needs a CUDA (or ROCm) GPU; exits with status 2 otherwise. Exits with status 1 when a kernel
disagrees with its reference or fails.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

BANDWIDTH = 4.27e12  # B/s, device copy (read + write) on the H200, measured with the anchors
EXP_RATE_LEAD = 4.2e12  # /s, 132 SMs x 1.98 GHz x 16: only a lead; the script measures its own
TENSOR_FLOPS = 989e12  # /s, dense bf16 tensor-core peak of the H200 (NVIDIA's data sheet)
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
    module: str  # file of kernels/: conv1d, selective_scan, ssd, norm, mamba1_step, matmul
    op: str  # public kernel function; its reference is f"{op}_ref"
    shape: str  # label printed in the table
    make: Callable[[torch.device], tuple[tuple, dict]]  # -> (args, kwargs), bf16 activations
    anchor_ms: float | None = None  # mamba_ssm's median time at this shape (None: not measured)
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
                           dt_bias, A, D, bcdt_eps=None):
    """The Mamba-1 step as the model ran it before ``mamba1_decode``: conv update, x_proj GEMM,
    dt_proj GEMM (cuBLAS), state update (no bcdt norms)."""
    import torch.nn.functional as F

    from mamba_eval.kernels.conv1d import causal_conv1d_update
    from mamba_eval.kernels.selective_scan import selective_state_update

    if bcdt_eps is not None:
        raise ValueError("the unfused baseline has no bcdt norms")
    u = causal_conv1d_update(x, conv_state, conv_weight, conv_bias, "silu")
    dt, B, C = F.linear(u, x_proj_weight).split([dt_proj_weight.shape[1], A.shape[1], A.shape[1]], dim=-1)
    return selective_state_update(ssm_state, u, F.linear(dt, dt_proj_weight), A, B, C, D, z,
                                  dt_bias=dt_bias, dt_softplus=True)


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
    anchors_scan = {1536: (0.309, 0.878, 0.565), 5120: (1.004, 2.883, 1.888)}
    anchors_conv = (0.296, 0.181, 0.095)
    anchors_ssd = {24: (0.463, 0.534, 0.697), 80: (0.686, 1.665, 0.794)}
    for i, (b, l) in enumerate(SEQ_SHAPES):
        cases.append(Case("conv1d", "causal_conv1d", f"C=5120 K=4 B={b} L={l}", _conv_case(b, l), anchors_conv[i]))
    for i, (b, l) in enumerate(SEQ_SHAPES):
        cases.append(Case(
            "conv1d", "causal_conv1d", f"C=5120 K=4 B={b} L={l} channel-last", _conv_case(b, l, channel_last=True),
            anchors_conv[i], note="channel-last: x is a [B, L, C] tensor seen as [B, C, L]; mamba_ssm's time is for [B, C, L]",
        ))
    for d in (1536, 5120):
        for i, (b, l) in enumerate(SEQ_SHAPES):
            cases.append(Case(
                "selective_scan", "selective_scan", f"D={d} N=16 B={b} L={l}", _selective_scan_case(b, l, d),
                anchors_scan[d][i], exps=b * d * 16 * l,
            ))
    for h in (24, 80):
        for i, (b, l) in enumerate(SEQ_SHAPES):
            cases.append(Case(
                "ssd", "ssd_scan", f"H={h} P=64 N=128 B={b} L={l}", _ssd_case(b, l, h), anchors_ssd[h][i],
                note="mamba_ssm's time includes the z gate (x, z, y read/written)",
            ))
    cases += [
        Case("norm", "add_rmsnorm", "32768 x 2560, fp32 residual", _add_norm_case(32768, 2560), 0.244),
        Case("norm", "add_rmsnorm", "32768 x 768, fp32 residual", _add_norm_case(32768, 768)),
        Case("norm", "add_rmsnorm", "32768 x 2560, first layer", _add_norm_case(32768, 2560, with_residual=False)),
        Case("norm", "add_rmsnorm", "32768 x 2560, final (no residual out)",
             _add_norm_case(32768, 2560, return_residual=False)),
        Case("norm", "gated_rmsnorm", "32768 x 5120, 1 group", _gated_norm_case(32768, 5120, 5120, 10576)),
        Case("norm", "gated_rmsnorm", "32768 x 1536, 1 group", _gated_norm_case(32768, 1536, 1536, 3352)),
    ]
    for b in (64, 1):
        anchor = 0.054 if b == 64 else None
        cases.append(Case(
            "selective_scan", "selective_state_update", f"D=5120 N=16 B={b}", _selective_update_case(b, 5120),
            anchor, exps=b * 5120 * 16, state_arg=0,
            note="state fp32 here, bf16 in mamba_ssm's measurement" if anchor else "",
        ))
        anchor = 0.151 if b == 64 else None
        cases.append(Case(
            "ssd", "ssd_state_update", f"H=80 P=64 N=128 B={b}", _ssd_update_case(b, 80), anchor, state_arg=0,
            note="state fp32 here, bf16 in mamba_ssm's measurement" if anchor else "",
        ))
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
    # The decoding steps' products (batch 1 and 64) in a CUDA graph, each call reading another
    # copy of the weight (as each layer reads its own from memory): linear_step against F.linear.
    for m in (1, 64):
        for layer, k, n, _ in LINEAR_SHAPES:
            shape = f"{layer} M={m} K={k} N={n}"
            make, flops = _linear_case(m, k, n), 2 * m * n * k
            cases.append(Case("matmul", "linear_step", shape, make, flops=flops, state_arg=1, in_place=False,
                              note="linear_step: Triton, 64-row tiles fixed per (N, K), rows bitwise "
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


def check(case: Case, kernel, ref, args, kwargs) -> tuple[float, bool, list]:
    """Kernel vs reference (fp32, same rounded inputs): (worst relative max error, ok, kernel outputs)."""
    k_args = _clone_state(args, case.state_arg)
    r_args = _as_fp32(args)
    got = kernel(*k_args, **kwargs)
    want = ref(*r_args, **_as_fp32(kwargs))
    got_t, want_t = _tensors(got), _tensors(want)
    if case.state_arg is not None:  # the updated state is an output too
        got_t.append(k_args[case.state_arg])
        want_t.append(r_args[case.state_arg])
    if len(got_t) != len(want_t):
        raise RuntimeError(f"the kernel returned {len(got_t)} tensors, the reference {len(want_t)}")
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


def measure_copy_bandwidth(device) -> float:
    """Device-to-device copy of 1 GiB, read + write bytes per second (for comparison with 4.27e12)."""
    import triton.testing

    src = torch.empty(2**28, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * _nbytes(src) / (ms * 1e-3)


# ---------------------------------------------------------------------------------------------


def run_case(case: Case, device, exp_rate: float, do_check: bool, graph_steps: int) -> dict:
    row = {"kernel": case.op, "shape": case.shape, "anchor_ms": case.anchor_ms, "note": case.note}
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
        if case.state_arg is None:
            ms = time_prefill(lambda: kernel(*args, **kwargs))
        else:
            ms = time_decode(case, kernel, args, kwargs, graph_steps)
    except Exception as exc:  # noqa: BLE001 - report and go on with the other kernels
        traceback.print_exc()
        return {**row, "status": f"error: {type(exc).__name__}: {exc}"}
    finally:
        torch.cuda.empty_cache()
    limits_ms = {"bytes": nbytes / BANDWIDTH * 1e3, "exp": case.exps / exp_rate * 1e3,
                 "flops": case.flops / TENSOR_FLOPS * 1e3}
    bound = max(limits_ms, key=limits_ms.get)
    roofline_ms = limits_ms[bound]
    row.update(
        ms=ms,
        bytes=nbytes,
        exps=case.exps,
        flops=case.flops,
        gbps=nbytes / (ms * 1e-3) / 1e9,
        bound=bound,
        roofline_ms=roofline_ms,
        share=roofline_ms / ms,
        anchor_share=None if case.anchor_ms is None else roofline_ms / case.anchor_ms,
        speedup=None if case.anchor_ms is None else case.anchor_ms / ms,
    )
    return row


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = ("kernel", "shape", "check", "ms", "mamba_ssm ms", "speedup", "GB/s", "bound", "roofline ms",
              "share", "mamba_ssm share")
    lines = []
    for r in rows:
        if "ms" not in r:
            lines.append((r["kernel"], r["shape"], r["status"]) + ("",) * (len(header) - 3))
            continue
        check_text = r["status"] if r["max_rel_err"] is None else f"{r['status']} {r['max_rel_err']:.1e}"
        lines.append((
            r["kernel"], r["shape"], check_text, f"{r['ms']:.4f}", _fmt(r["anchor_ms"], ".3f"),
            _fmt(r["speedup"], ".2f"), f"{r['gbps']:.0f}", r["bound"], f"{r['roofline_ms']:.4f}",
            f"{100 * r['share']:.0f}%", _fmt(None if r["anchor_share"] is None else 100 * r["anchor_share"], ".0f"),
        ))
    # Long texts (a "not available" reason) run past their column instead of widening it.
    widths = [max([len(h)] + [len(line[i]) for line in lines if len(line[i]) < 40]) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for line in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    notes = sorted({r["note"] for r in rows if r.get("note")})
    for note in notes:
        print(f"note: {note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--only", nargs="+", metavar="SUBSTRING", help="run the cases whose kernel name contains one")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the references")
    parser.add_argument("--graph-steps", type=int, default=128, help="decode calls per captured CUDA graph")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py: no CUDA/ROCm GPU visible to torch (torch.cuda.is_available() is False); "
              "this benchmark times GPU kernels and cannot run here.", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cuda", torch.cuda.current_device())
    cases = [c for c in build_cases() if not args.only or any(s in c.op for s in args.only)]
    exp_rate = measure_exp_rate(device)
    copy_bw = measure_copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"bandwidth for the roofline: {BANDWIDTH:.3g} B/s (device copy measured now: {copy_bw:.3g} B/s)")
    print(f"exp rate measured now: {exp_rate:.3g} /s (lead: {EXP_RATE_LEAD:.2g} /s)")
    rows = []
    for case in cases:
        print(f"... {case.op} {case.shape}", file=sys.stderr, flush=True)
        rows.append(run_case(case, device, exp_rate, not args.no_check, args.graph_steps))
    print()
    print_table(rows)
    if args.json:
        meta = {
            "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "bandwidth_Bps": BANDWIDTH, "copy_bandwidth_measured_Bps": copy_bw, "exp_rate_per_s": exp_rate,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    failed = [r for r in rows if r["status"] == "MISMATCH" or r["status"].startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
