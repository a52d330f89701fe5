"""``batch_invariant=True``: a row's results do not depend on the other rows of the call.

Two kinds of checks:

- Launch configurations at the real shapes (pure Python, with the H200's 132 SMs): for every
  length and width, the configuration with ``batch_invariant=True`` is the same for batches of 1,
  7, 64 and 256 rows, and it is the one the kernels pick for large batches anyway. The same
  functions without the flag do change with the batch (so these checks can fail).
- Small runs (Triton's interpreter without a GPU): each row computed alone, among several rows or
  in another order gives the same bits, and the kernels were launched with the same parameters.
  The interpreter's arithmetic is numpy's, so there these runs check the logic, not the GPU's
  rounding; on a GPU they run on the hardware.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from mamba_eval.kernels import conv1d, matmul, norm, ssd  # noqa: E402
from mamba_eval.kernels import selective_scan as ss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCHES = (1, 7, 64, 256)
LENGTHS = (1, 7, 100, 511, 2048, 4100, 16384, 100_000)
H200_SMS = 132


@pytest.fixture
def h200(monkeypatch):
    """The SM count the scans plan their launches with, as on an H200."""
    monkeypatch.setattr(ss, "sm_count", lambda device: H200_SMS)
    monkeypatch.setattr(ssd, "sm_count", lambda device: H200_SMS)


# --------------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, op", [(ss, "selective_scan"), (ssd, "ssd_scan"), (norm, "add_rmsnorm"),
                                        (norm, "gated_rmsnorm")])
def test_kernel_and_reference_take_batch_invariant(module, op):
    """Both backends accept ``batch_invariant`` (keyword, default False); the reference's other
    parameters are all the kernel's too."""
    kernel, ref = inspect.signature(getattr(module, op)), inspect.signature(getattr(module, op + "_ref"))
    for sig in (kernel, ref):
        param = sig.parameters["batch_invariant"]
        assert param.default is False and param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)
    assert set(ref.parameters) <= set(kernel.parameters)


def test_matmul_signatures_agree():
    assert list(inspect.signature(matmul.linear).parameters) == list(inspect.signature(matmul.linear_ref).parameters)


# --------------------------------------------------------------------------------------------
# Configurations at the real shapes
# --------------------------------------------------------------------------------------------

def _assert_invariant(config, label, large=BATCHES[-1]):
    """config(batch, invariant) for the BATCHES: one configuration with the flag, the one a batch of
    ``large`` gets without it. Returns the configurations without the flag."""
    configs = [config(b, True) for b in BATCHES]
    assert all(c == configs[0] for c in configs), f"{label}: {configs}"
    assert configs[0] == config(large, False), f"{label}: not the configuration of a large batch"
    return [config(b, False) for b in BATCHES]


@pytest.mark.parametrize("channel_contiguous", [True, False], ids=["model-layout", "contiguous"])
def test_selective_scan_config(h200, channel_contiguous):
    """Mamba-1 (d_inner 1536 and 5120, N 16): rows are never split along L."""
    varies = False
    for dim in (1536, 5120):
        for length in LENGTHS:
            def config(batch, invariant):
                return ss._launch_config(batch, dim, length, 16, channel_contiguous, torch.device("cuda"), invariant)

            plain = _assert_invariant(config, f"D={dim} L={length}")
            varies |= any(c != plain[0] for c in plain)
            assert config(1, True)["n_chunks"] == 1
    assert varies  # without the flag, few long rows are split


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_ssd_scan_config(h200, dtype):
    """Mamba-2 (24 and 80 heads of 64, N 128, chunk 256): one walk per row and head, no state pass."""
    varies = False
    for nheads in (24, 80):
        for length in LENGTHS:
            def config(batch, invariant):
                return ssd._scan_config(batch, length, nheads, 64, 128, 256, dtype, torch.device("cuda"), invariant)

            plain = _assert_invariant(config, f"H={nheads} L={length}")
            varies |= any(c != plain[0] for c in plain)
            assert config(1, True)["seg"] >= triton.cdiv(length, 256)
    assert varies


@pytest.mark.parametrize("op", ["add_rmsnorm", "gated_rmsnorm"])
def test_norm_config(op):
    """Rows per program (and warps) no longer follow the number of rows."""
    # add_rmsnorm normalises d_model; gated_rmsnorm groups of d_inner / ngroups.
    widths = (768, 2560, 1024, 37) if op == "add_rmsnorm" else (1536, 5120, 512, 37)
    varies = False
    for width in widths:
        for length in (1, 100, 2048):
            plain = _assert_invariant(lambda batch, invariant: norm._launch_config(batch * length, width, invariant),
                                      f"{op} width={width} L={length}", large=10**6)
            varies |= any(c != plain[0] for c in plain)
    assert varies


# --------------------------------------------------------------------------------------------
# Small runs: rows alone, together and shuffled give the same bits
# --------------------------------------------------------------------------------------------

class _LaunchSpy:
    """Stands in for a Triton kernel: records each launch's scalar arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            scalars = tuple(a for a in args if not isinstance(a, torch.Tensor))
            self.launches.append((scalars, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _spy(monkeypatch, module, name):
    spy = _LaunchSpy(getattr(module, name))
    monkeypatch.setattr(module, name, spy)
    return spy


def _randn(*shape, gen, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _mamba1_inputs(batch, dim, d_state, length, gen):
    """The model's layout: u, Δ channel-contiguous, z half of a projection, B and C slices of x_proj."""
    u = _randn(batch, length, dim, gen=gen).transpose(1, 2)
    delta = _randn(batch, length, dim, gen=gen, scale=0.5).transpose(1, 2)
    z = _randn(batch, length, 2 * dim, gen=gen)[..., dim:].transpose(1, 2)
    x_dbl = _randn(batch, length, 3 + 2 * d_state, gen=gen)
    B, C = x_dbl[..., 3:3 + d_state].transpose(1, 2), x_dbl[..., 3 + d_state:].transpose(1, 2)
    return dict(u=u, delta=delta, B=B, C=C, z=z)


def test_selective_scan_rows_are_independent(monkeypatch):
    """Without the flag, batch 1 would be split along L (one SM, chunks of 8 positions), batch 5 not."""
    monkeypatch.setattr(ss, "_MIN_CHUNK", 8)
    monkeypatch.setattr(ss, "sm_count", lambda device: 1)
    batch, dim, d_state, length = 5, 6, 8, 27
    g = torch.Generator().manual_seed(0)
    rows = _mamba1_inputs(batch, dim, d_state, length, g)
    params = dict(A=-torch.exp(_randn(dim, d_state, gen=g, scale=0.5)), D=_randn(dim, gen=g),
                  delta_bias=_randn(dim, gen=g, scale=0.5))
    h0 = _randn(batch, dim, d_state, gen=g)

    def run(index, invariant):
        picked = {k: v[index] for k, v in rows.items()}
        return ss.selective_scan(**picked, **params, initial_state=h0[index], batch_invariant=invariant)

    chunks = []
    original = ss._selective_scan_fwd
    monkeypatch.setattr(ss, "_selective_scan_fwd", lambda *a, n_chunks: chunks.append(n_chunks) or original(
        *a, n_chunks=n_chunks))
    run([0], False)
    assert chunks[-1] > 1  # the flag matters here: without it, one row is split

    spy = _spy(monkeypatch, ss, "_selective_scan_fwd_kernel")
    y_all, h_all = run(list(range(batch)), True)
    for index in ([3], [4, 0, 2], [1, 0, 4, 3, 2]):
        y, h = run(index, True)
        assert torch.equal(y, y_all[index]) and torch.equal(h, h_all[index]), index
    assert chunks[-4:] == [1, 1, 1, 1]
    assert all(launch == spy.launches[0] for launch in spy.launches)


def test_ssd_scan_rows_are_independent(monkeypatch):
    """Batch 1 would run a state pass and 4-chunk segments (4 small SMs), batch 6 would not."""
    monkeypatch.setattr(ssd, "sm_count", lambda device: 4)
    batch, length, nheads, headdim, ngroups, d_state, chunk = 6, 150, 2, 16, 1, 16, 32
    assert ssd._scan_config(1, length, nheads, headdim, d_state, chunk, torch.float32, "cpu")["seg"] == 4
    g = torch.Generator().manual_seed(1)
    inp = dict(
        x=_randn(batch, length, nheads, headdim, gen=g), dt=_randn(batch, length, nheads, gen=g, scale=0.5),
        B=_randn(batch, length, ngroups, d_state, gen=g), C=_randn(batch, length, ngroups, d_state, gen=g),
        initial_state=_randn(batch, nheads, headdim, d_state, gen=g),
    )
    params = dict(A=-torch.exp(_randn(nheads, gen=g)), D=_randn(nheads, gen=g), dt_bias=_randn(nheads, gen=g) - 1)
    spy = _spy(monkeypatch, ssd, "_ssd_chunk_fwd_kernel")

    def run(index):
        return ssd.ssd_scan(**{k: v[index] for k, v in inp.items()}, **params, chunk_size=chunk, batch_invariant=True)

    y_all, h_all = run(list(range(batch)))
    for index in ([2], [5, 0], [3, 1, 4]):
        y, h = run(index)
        assert torch.equal(y, y_all[index]) and torch.equal(h, h_all[index]), index
    assert all(launch == spy.launches[0] for launch in spy.launches)


@pytest.mark.parametrize("op", ["add_rmsnorm", "gated_rmsnorm"])
def test_norm_rows_are_independent(monkeypatch, op):
    """Without the flag, 1 row and 64 rows of 37 would run 1 and 16 rows per program (64 with it)."""
    monkeypatch.setattr(norm, "_MIN_PROGRAMS", 4)
    assert norm._launch_config(1, 37)[0] == 1 and norm._launch_config(64, 37)[0] == 16
    assert norm._launch_config(1, 37, True)[0] == 64
    g = torch.Generator().manual_seed(2)
    x, res, w = _randn(64, 37, gen=g, dtype=torch.bfloat16), _randn(64, 37, gen=g), _randn(37, gen=g)
    spy = _spy(monkeypatch, norm, f"_{op}_fwd_kernel")

    def run(index):
        if op == "add_rmsnorm":
            return torch.cat(norm.add_rmsnorm(x[index], res[index], w, batch_invariant=True), dim=-1)
        return norm.gated_rmsnorm(x[index].float(), res[index], w, batch_invariant=True)

    full = run(list(range(64)))
    for index in ([9], [63, 1, 2, 40, 5, 6, 7], list(range(63, -1, -1))):
        assert torch.equal(run(index), full[index]), index
    assert all(kwargs == spy.launches[0][1] for _, kwargs in spy.launches)


def test_conv1d_rows_are_independent(monkeypatch):
    """Channel-last x (the model's layout), with initial states."""
    g = torch.Generator().manual_seed(3)
    x = _randn(5, 30, 12, gen=g, dtype=torch.bfloat16).transpose(1, 2)
    w, bias, h0 = _randn(12, 4, gen=g), _randn(12, gen=g), _randn(5, 12, 3, gen=g, dtype=torch.bfloat16)
    spy = _spy(monkeypatch, conv1d, "_causal_conv1d_fwd_kernel")
    y_all, s_all = conv1d.causal_conv1d(x, w, bias, h0)
    for index in ([4], [2, 0]):
        y, s = conv1d.causal_conv1d(x[index], w, bias, h0[index])
        assert torch.equal(y, y_all[index]) and torch.equal(s, s_all[index]), index
    assert all(kwargs == spy.launches[0][1] for _, kwargs in spy.launches)
