"""The Triton causal conv1d kernels (``causal_conv1d``, ``causal_conv1d_update``) against the references.

Without a GPU these run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py) at tiny
sizes; on a GPU, ``MAMBA_EVAL_TEST_SIZES=real`` adds the published model sizes. Outputs are poisoned
with NaN before the kernel runs, so an element the kernel fails to write shows up. The final state
holds raw inputs, so it must match the reference exactly.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_close

from mamba_eval.kernels import conv1d
from mamba_eval.kernels.conv1d import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REAL = os.environ.get("MAMBA_EVAL_TEST_SIZES") == "real"
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # bf16: the rounding of the bf16 output (2^-8)

LAYOUTS = ["channel_first", "channel_last", "slice"]

SHAPES = [  # (batch, channels, length, width)
    (2, 37, 70, 4),  # odd C, L not a multiple of any block
    (1, 300, 40, 4),  # two channel blocks channel-last; L % 16 == 8 (alignment hint channel-first)
    (1, 12, 300, 4),  # two time blocks channel-first
    (3, 20, 1, 3),  # L = 1
    (2, 7, 2, 4),  # L < K - 1: the final state keeps part of the initial state
    (2, 9, 6, 2),
    (2, 9, 6, 1),  # K = 1: no state
]
if REAL:
    SHAPES += [
        (2, 5120, 2048, 4),  # mamba-2.8b d_inner
        (16, 1536, 1000, 4),  # mamba-370m/mamba2-130m d_inner, L not a multiple of the block
        (1, 5376, 4096, 4),  # mamba2-2.7b conv over [x; B; C]: 5120 + 2 * 1 * 128
        (64, 1792, 128, 4),  # mamba2-130m [x; B; C]: 1536 + 256
    ]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def _make_x(batch, channels, length, layout, dtype, gen):
    """x [B, C, L] stored channel-first, channel-last, or as a column slice of a wider [B, L, W]
    tensor (Mamba-2's [x; B; C] inside in_proj's output; W % 16 == 8 exercises the alignment hint)."""
    if layout == "channel_first":
        return _randn(batch, channels, length, gen=gen, dtype=dtype)
    if layout == "channel_last":
        return _randn(batch, length, channels, gen=gen, dtype=dtype).transpose(1, 2)
    width = (channels + 8 + 15) // 16 * 16 + 8
    return _randn(batch, length, width, gen=gen, dtype=dtype)[:, :, 8 : 8 + channels].transpose(1, 2)


def _nan_like_layout(x):
    """A NaN-filled [B, C, L] tensor with the memory layout ``causal_conv1d`` gives ``y``."""
    b, c, length = x.shape
    if length > 1 and x.stride(2) == 1:
        return torch.full((b, c, length), float("nan"), device=x.device, dtype=x.dtype)
    return torch.full((b, length, c), float("nan"), device=x.device, dtype=x.dtype).transpose(1, 2)


def _ref(x, w, bias, state, activation):
    """The reference in fp32 on the same (rounded) inputs."""
    def f32(t):
        return None if t is None else t.float()

    return causal_conv1d_ref(f32(x), f32(w), f32(bias), f32(state), activation)


def _check(x, w, bias, state, activation):
    """Runs the kernel into NaN-poisoned outputs and compares it with the reference."""
    dtype = x.dtype
    out = _nan_like_layout(x)
    final_out = torch.full((x.shape[0], x.shape[1], w.shape[1] - 1), float("nan"), device=x.device, dtype=dtype)
    y, final = causal_conv1d(x, w, bias, state, activation, out=out, final_state_out=final_out)
    assert y is out and final is final_out
    y_ref, final_ref = _ref(x, w, bias, state, activation)
    assert_close(y.float(), y_ref, RTOL[dtype], name="y")
    assert torch.equal(final, final_ref.to(dtype)), "final state differs from the reference"


# --------------------------------------------------------------------------------------------
# full sequences
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_conv1d_matches_ref(shape, layout, dtype):
    b, c, length, k = shape
    g = _gen()
    x = _make_x(b, c, length, layout, dtype, g)
    w, bias, state = _randn(c, k, gen=g, dtype=dtype), _randn(c, gen=g, dtype=dtype), _randn(b, c, k - 1, gen=g, dtype=dtype)
    _check(x, w, bias, state, "silu")


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("layout", ["channel_first", "channel_last"])
def test_conv1d_options(layout, with_state, with_bias, activation):
    b, c, length, k = 2, 19, 23, 4
    g = _gen(1)
    x = _make_x(b, c, length, layout, torch.float32, g)
    w = _randn(c, k, gen=g)
    bias = _randn(c, gen=g) if with_bias else None
    state = _randn(b, c, k - 1, gen=g) if with_state else None
    _check(x, w, bias, state, activation)


def test_conv1d_mixed_dtypes():
    """bf16 activations with fp32 weights and an fp32 initial state (rounded to bf16, as the reference does)."""
    g = _gen(14)
    x = _make_x(2, 19, 9, "channel_last", torch.bfloat16, g)
    w, bias, state = _randn(19, 4, gen=g), _randn(19, gen=g), _randn(2, 19, 3, gen=g)
    y, final = causal_conv1d(x, w, bias, state)
    y_ref, final_ref = causal_conv1d_ref(x, w, bias, state)
    assert y.dtype == final.dtype == torch.bfloat16
    assert_close(y.float(), y_ref.float(), RTOL[torch.bfloat16], name="y")
    assert torch.equal(final, final_ref)


@pytest.mark.parametrize("layout", ["channel_first", "channel_last"])
def test_conv1d_output_layout_follows_input(layout):
    """Without ``out``, y is allocated in x's layout (no copy for the model's channel-last views)."""
    g = _gen(2)
    x = _make_x(2, 24, 10, layout, torch.float32, g)
    w = _randn(24, 4, gen=g)
    y, final = causal_conv1d(x, w)
    assert (y.stride(1) == 1) == (layout == "channel_last")
    assert final.shape == (2, 24, 3) and final.is_contiguous()
    y_ref, final_ref = _ref(x, w, None, None, "silu")
    assert_close(y, y_ref, RTOL[torch.float32], name="y")
    assert torch.equal(final, final_ref)


def test_conv1d_output_in_another_layout():
    """A channel-last x can write a channel-first y (the transpose comes free with the conv)."""
    g = _gen(3)
    x = _make_x(2, 40, 33, "channel_last", torch.float32, g)
    w, bias = _randn(40, 4, gen=g), _randn(40, gen=g)
    out = torch.full((2, 40, 33), float("nan"), device=DEVICE)
    y, _ = causal_conv1d(x, w, bias, out=out)
    assert_close(y, _ref(x, w, bias, None, "silu")[0], RTOL[torch.float32], name="y")


@pytest.mark.parametrize("layout", ["channel_first", "channel_last"])
def test_conv1d_small_tiles(monkeypatch, layout):
    """Tiles of 8 channels x 4 positions: many tiles along both axes (13 channels: a partial one),
    rows longer than a tile, and rows shorter than K - 1 (the final state then reaches into the
    initial state)."""
    monkeypatch.setattr(conv1d, "_fwd_config", lambda *args: (8, 4, 1))
    g = _gen(8)
    c, k = 13, 4
    w, bias = _randn(c, k, gen=g), _randn(c, gen=g)
    for batch, length in ((2, 10), (1, 17), (3, 2), (2, 1)):
        x = _make_x(batch, c, length, layout, torch.float32, g)
        _check(x, w, bias, _randn(batch, c, k - 1, gen=g), "silu")


# --------------------------------------------------------------------------------------------
# one-token update
# --------------------------------------------------------------------------------------------

UPDATE_SHAPES = [(2, 37, 4), (1, 300, 4), (3, 5, 3), (2, 6, 2), (2, 6, 1)]  # (batch, channels, width)
if REAL:
    UPDATE_SHAPES += [(64, 5120, 4), (1, 5376, 4), (256, 1792, 4)]


@pytest.mark.parametrize("state_layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", UPDATE_SHAPES)
def test_conv1d_update_matches_ref(shape, dtype, state_layout):
    b, c, k = shape
    g = _gen(9)
    x_wide = _randn(b, c + 8, gen=g, dtype=dtype)
    x = x_wide[:, 3 : 3 + c]  # a column slice, like the decode step's [x; B; C]
    w, bias = _randn(c, k, gen=g, dtype=dtype), _randn(c, gen=g, dtype=dtype)
    if state_layout == "contiguous":
        state = _randn(b, c, k - 1, gen=g, dtype=dtype)
    else:  # a view with room around it: the kernel must write inside the view only
        holder = _randn(b, c, k + 2, gen=g, dtype=dtype)
        state = holder[:, :, 1:k]
        holder_before = holder.clone()
    state_ref = state.clone().float()  # a copy: the reference updates it in place
    out = torch.full((b, c), float("nan"), device=DEVICE, dtype=dtype)
    y = causal_conv1d_update(x, state, w, bias, "silu", out=out)
    assert y is out
    y_ref = causal_conv1d_update_ref(x.float(), state_ref, w.float(), bias.float(), "silu")
    assert_close(y.float(), y_ref, RTOL[dtype], name="y")
    assert torch.equal(state, state_ref.to(dtype)), "conv_state not shifted as the reference shifts it"
    if state_layout == "strided":
        assert torch.equal(holder[:, :, 0], holder_before[:, :, 0])
        assert torch.equal(holder[:, :, k:], holder_before[:, :, k:])


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv1d_update_options(with_bias, activation):
    g = _gen(10)
    x, w = _randn(2, 11, gen=g), _randn(11, 4, gen=g)
    bias = _randn(11, gen=g) if with_bias else None
    state = _randn(2, 11, 3, gen=g)
    state_ref = state.clone()
    y = causal_conv1d_update(x, state, w, bias, activation)
    assert_close(y, causal_conv1d_update_ref(x, state_ref, w, bias, activation), RTOL[torch.float32], name="y")
    assert torch.equal(state, state_ref)


@pytest.mark.parametrize("layout", ["channel_first", "channel_last"])
def test_conv1d_prefill_then_steps_equal_one_pass(layout):
    """Kernel prefill of a prefix, then kernel steps: the same outputs and state as one kernel pass."""
    b, c, length, k, prefix = 2, 21, 12, 4, 5
    g = _gen(11)
    x = _make_x(b, c, length, layout, torch.float32, g)
    w, bias = _randn(c, k, gen=g), _randn(c, gen=g)
    y_full, final_full = causal_conv1d(x, w, bias)
    y_pre, state = causal_conv1d(x[:, :, :prefix], w, bias)
    steps = [causal_conv1d_update(x[:, :, t], state, w, bias) for t in range(prefix, length)]
    y = torch.cat([y_pre, torch.stack(steps, dim=-1)], dim=-1)
    assert_close(y, y_full, RTOL[torch.float32], name="y")
    assert torch.equal(state, final_full)


def test_conv1d_state_cache_slices():
    """Initial and final states may be disjoint slices of one cache tensor (a static decode cache)."""
    g = _gen(13)
    x, w = _make_x(2, 10, 7, "channel_last", torch.float32, g), _randn(10, 4, gen=g)
    cache = _randn(2, 2, 10, 3, gen=g)  # [slot, B, C, K-1]
    expected = _ref(x, w, None, cache[0], "silu")
    y, final = causal_conv1d(x, w, None, cache[0], final_state_out=cache[1])
    assert final.data_ptr() == cache[1].data_ptr()
    assert_close(y, expected[0], RTOL[torch.float32], name="y")
    assert torch.equal(cache[1], expected[1])


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_conv1d_update_in_cuda_graph():
    """The update captures in a CUDA graph (no host sync, no autotuning) and replays correctly."""
    g = _gen(12)
    b, c, k = 8, 1792, 4
    x, w, bias = _randn(b, c, gen=g, dtype=torch.bfloat16), _randn(c, k, gen=g, dtype=torch.bfloat16), _randn(c, gen=g, dtype=torch.bfloat16)
    state = _randn(b, c, k - 1, gen=g, dtype=torch.bfloat16)
    state_ref = state.clone()
    y_ref = causal_conv1d_update(x, state_ref, w, bias)  # compiles outside the capture
    state_ref = state.clone()
    out = torch.empty(b, c, device=DEVICE, dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        causal_conv1d_update(x, state, w, bias, out=out)
    state.copy_(state_ref)
    for _ in range(3):
        graph.replay()
        y_ref = causal_conv1d_update(x, state_ref, w, bias)
        torch.cuda.synchronize()
        assert torch.equal(out, y_ref) and torch.equal(state, state_ref)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_conv1d_rejects_bad_input():
    x = torch.zeros(2, 3, 5, device=DEVICE)
    w = torch.zeros(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, torch.zeros(4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="conv width"):
        causal_conv1d(x, torch.zeros(3, 9, device=DEVICE))
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, w, initial_state=torch.zeros(2, 3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(ValueError, match="out must not share memory with x"):
        causal_conv1d(x, w, out=x)
    state = torch.zeros(2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="final_state_out must not share memory with initial_state"):
        causal_conv1d(x, w, initial_state=state, final_state_out=state)
    with pytest.raises(ValueError, match="out must not share memory"):
        causal_conv1d_update(x[:, :, 0], state, w, out=x[:, :, 0])
    with pytest.raises(ValueError, match="out must be"):
        causal_conv1d(x, w, out=torch.zeros(2, 3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(x[:, :, 0], torch.zeros(2, 3, 2, device=DEVICE), w)
    with pytest.raises(ValueError, match="x must be"):
        causal_conv1d_update(x, torch.zeros(2, 3, 3, device=DEVICE), w)
