"""Depthwise causal 1-D convolution over time, with an optional SiLU (Mamba paper, Sec. 3.4, Fig. 3).

Each channel c is filtered by its own width-K kernel, looking only at the present and past::

    y[b, c, t] = act( bias[c] + sum_{k=0}^{K-1} weight[c, k] * xx[b, c, t + k] )

where ``xx = concat(initial_state, x)`` along time, i.e. the K-1 inputs that precede position 0
come from ``initial_state`` (zeros when it is None). After the sequence, the last K-1 inputs of
``xx`` are the state a continuation needs.

Shapes (glossary in ``mamba_eval.kernels``; here C is the number of channels):
    x [B, C, L], weight [C, K], bias [C] or None, state [B, C, K-1], y [B, C, L].

Arithmetic is fp32; ``y`` is returned in ``x.dtype``, the state in ``x.dtype`` (it holds raw
inputs, so no precision is lost). ``causal_conv1d_update_ref`` writes ``conv_state`` IN PLACE.

The Triton kernels ``causal_conv1d`` and ``causal_conv1d_update`` have the signatures of the
references (forward only, no host synchronisation, no autotuning). They read every tensor through
its strides: ``x`` may be ``[B, C, L]`` contiguous ("channel-first") or the transposed view of a
``[B, L, C]`` tensor ("channel-last": what ``in_proj`` produces, including a column slice of it such
as Mamba-2's ``[x; B; C]`` with ``C = d_inner + 2*G*N`` channels), with no copy; ``y`` is allocated
in the layout of ``x`` unless ``out`` says otherwise. Channel-last is the fast layout: each tap is
an aligned, vectorised row load, whereas channel-first taps shifted by 1..K-1 positions are
unaligned (scalar loads; same DRAM bytes, more load instructions). Outputs (``out``,
``final_state_out``, the update's ``out``) must not overlap the inputs they are computed from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import jit, new_output, require_triton, silu, tl, triton

_ACTIVATIONS = (None, "silu", "swish")


def _check_activation(activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")


def causal_conv1d_ref(
    x: torch.Tensor,  # [B, C, L]
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None = None,  # [C]
    initial_state: torch.Tensor | None = None,  # [B, C, K-1]
    activation: str | None = "silu",
    *,
    out: torch.Tensor | None = None,  # [B, C, L]
    final_state_out: torch.Tensor | None = None,  # like the returned final state
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over the whole sequence.

    Returns ``(y [B, C, L] in x.dtype, final_state [B, C, K-1] in x.dtype)``; ``final_state`` is the
    last K-1 inputs (taken from ``initial_state`` too when L < K-1), ready to continue the sequence.
    ``out`` and ``final_state_out``, when given, receive the results (and are returned).
    """
    _check_activation(activation)
    batch, channels, length = x.shape
    width = weight.shape[-1]
    if weight.shape != (channels, width):
        raise ValueError(f"weight must be [C={channels}, K], got {tuple(weight.shape)}")
    if initial_state is None:
        initial_state = x.new_zeros(batch, channels, width - 1)
    elif initial_state.shape != (batch, channels, width - 1):
        raise ValueError(
            f"initial_state must be [B, C, K-1] = {(batch, channels, width - 1)}, got {tuple(initial_state.shape)}"
        )
    xx = torch.cat([initial_state.to(x.dtype), x], dim=-1)  # [B, C, K-1+L]
    if length == 0:
        y = x.new_zeros(x.shape, dtype=torch.float32)
    else:
        y = F.conv1d(xx.float(), weight.float().unsqueeze(1), None if bias is None else bias.float(), groups=channels)
    if activation is not None:
        y = F.silu(y)
    y = y.to(x.dtype)
    final_state = xx[:, :, xx.shape[-1] - (width - 1):].clone()  # the last K-1 inputs

    if out is not None:
        out.copy_(y)
        y = out
    if final_state_out is not None:
        final_state_out.copy_(final_state)
        final_state = final_state_out
    return y, final_state


def causal_conv1d_update_ref(
    x: torch.Tensor,  # [B, C]
    conv_state: torch.Tensor,  # [B, C, K-1], updated in place
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None = None,  # [C]
    activation: str | None = "silu",
    *,
    out: torch.Tensor | None = None,  # [B, C]
) -> torch.Tensor:
    """One decoding step: convolve ``x`` with the K-1 previous inputs held in ``conv_state``.

    Shifts ``x`` into ``conv_state`` IN PLACE (dropping the oldest input) and returns
    ``y [B, C]`` in ``x.dtype`` (written into ``out`` when given).
    """
    _check_activation(activation)
    width = weight.shape[-1]
    if conv_state.shape != (*x.shape, width - 1):
        raise ValueError(f"conv_state must be [B, C, K-1] = {(*x.shape, width - 1)}, got {tuple(conv_state.shape)}")
    window = torch.cat([conv_state.float(), x.float().unsqueeze(-1)], dim=-1)  # [B, C, K]
    y = (window * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    if activation is not None:
        y = F.silu(y)
    conv_state.copy_(window[:, :, 1:])
    if out is not None:
        return out.copy_(y)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@jit
def _add_initial_state(
    acc,  # [BLOCK_C, BLOCK_L] fp32 accumulator of the tile
    offs_l,  # [BLOCK_L] positions of the tile
    extra_mask,  # [BLOCK_L] further condition on the positions that receive the contributions
    init_rows,  # [BLOCK_C] pointers to initial_state[b, c, 0]
    offs_c64,
    mask_c,
    w_ptr,
    seq_start,  # first position of the sequence
    seq_end,
    stride_wc, stride_wk, stride_ik,
    K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Adds what the initial state contributes to the sequence's first K-1 outputs.

    Output ``start + i`` (i < K-1) reaches K-1-i inputs back into the state, tap k reading state
    column i + k; the contribution is a [BLOCK_C] vector per i, added where the tile holds that
    position (so no [BLOCK_C, BLOCK_L] gather is needed)."""
    for i in tl.static_range(K - 1):
        contrib = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k in tl.static_range(K - 1 - i):
            w_k = tl.load(w_ptr + offs_c64 * stride_wc + k * stride_wk, mask=mask_c, other=0.0).to(tl.float32)
            contrib += w_k * tl.load(init_rows + (i + k) * stride_ik, mask=mask_c, other=0.0).to(tl.float32)
        here = extra_mask & (offs_l == seq_start + i) & (seq_start + i < seq_end)  # [BLOCK_L]
        acc += tl.where(here[None, :], contrib[:, None], 0.0)
    return acc


@jit
def _conv_tile(
    x_rows,  # [BLOCK_C] pointers to x[b, c, 0]
    offs_c64,  # [BLOCK_C] channels
    mask_c,
    pid_l,
    pid_b,
    w_ptr, bias_ptr, init_ptr, y_ptr,
    L,
    stride_xl, stride_wc, stride_wk, stride_ib, stride_ic, stride_ik,
    stride_yb, stride_yc, stride_yl,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One [BLOCK_C, BLOCK_L] tile of y. Tap k is a load of the x tile shifted by K-1-k positions
    (the shifted loads hit L1/L2, so DRAM sees x about once); inputs before position 0 count as
    zero, then the initial state's share is added for the first K-1 positions."""
    l0 = pid_l * BLOCK_L
    offs_l = l0 + tl.arange(0, BLOCK_L)  # [BLOCK_L] positions
    mask_l = offs_l < L
    start = 0

    acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)  # [BLOCK_C, BLOCK_L]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c64, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(K):
        w_k = tl.load(w_ptr + offs_c64 * stride_wc + k * stride_wk, mask=mask_c, other=0.0).to(tl.float32)
        p = offs_l - (K - 1) + k  # [BLOCK_L] input position of tap k
        in_x = mask_l & (p >= start)
        x_k = tl.load(
            x_rows[:, None] + p.to(tl.int64)[None, :] * stride_xl, mask=mask_c[:, None] & in_x[None, :], other=0.0
        )  # [BLOCK_C, BLOCK_L]
        acc += w_k[:, None] * x_k.to(tl.float32)

    if HAS_INIT:
        if l0 < K - 1:  # only the first tile of a row reaches before position 0
            acc = _add_initial_state(
                acc, offs_l, mask_l, init_ptr + pid_b * stride_ib + offs_c64 * stride_ic,
                offs_c64, mask_c, w_ptr, 0, L,
                stride_wc, stride_wk, stride_ik, K, BLOCK_C,
            )
    if SILU:
        acc = silu(acc)
    y_ptrs = y_ptr + pid_b * stride_yb + offs_c64[:, None] * stride_yc + offs_l.to(tl.int64)[None, :] * stride_yl
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_l[None, :])


@jit
def _final_state(
    x_rows,  # [BLOCK_C] pointers to x[b, c, 0]
    offs_c64,  # [BLOCK_C] channels
    mask_c,
    pid_b,
    init_ptr, final_ptr,
    L,
    stride_xl, stride_ib, stride_ic, stride_ik, stride_fb, stride_fc, stride_fk,
    K: tl.constexpr,
    KP: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    """final[b, :, j] = xx[L - (K-1) + j] for j < K-1, where xx is row b preceded by its initial
    state: the last K-1 inputs, reaching into the state when the sequence is short."""
    offs_j = tl.arange(0, KP)  # [KP]
    mask_j = offs_j < K - 1
    seq = pid_b
    start = 0
    end = L
    p = end - (K - 1) + offs_j  # [KP]
    in_x = mask_j & (p >= start)
    in_init = mask_j & (p < start)
    mask = mask_c[:, None] & mask_j[None, :]  # [BLOCK_C, KP]
    v = tl.load(x_rows[:, None] + p.to(tl.int64)[None, :] * stride_xl, mask=mask & in_x[None, :], other=0.0)
    if HAS_INIT:
        v_init = tl.load(
            init_ptr + seq * stride_ib + offs_c64[:, None] * stride_ic + (p - start + (K - 1)).to(tl.int64)[None, :] * stride_ik,
            mask=mask & in_init[None, :],
            other=0.0,
        )
        v = tl.where(in_init[None, :], v_init.to(v.dtype), v)
    f_ptrs = final_ptr + seq * stride_fb + offs_c64[:, None] * stride_fc + offs_j.to(tl.int64)[None, :] * stride_fk
    tl.store(f_ptrs, v.to(final_ptr.dtype.element_ty), mask=mask)


@jit(do_not_specialize=["L"])  # lengths: one compiled variant
def _causal_conv1d_fwd_kernel(
    x_ptr,  # [B, C, L], any strides
    w_ptr,  # [C, K]
    bias_ptr,  # [C] (read if HAS_BIAS)
    init_ptr,  # [B, C, K-1] (read if HAS_INIT)
    y_ptr,  # [B, C, L], any strides
    final_ptr,  # [B, C, K-1]
    C,
    L,
    stride_xb, stride_xc, stride_xl,  # the channel and time strides of x and y are passed
    stride_wc, stride_wk,  # divided by X_ALIGN_C, X_ALIGN_L, Y_ALIGN_C, Y_ALIGN_L: powers
    stride_ib, stride_ic, stride_ik,  # of two that the kernel multiplies back, so that the
    stride_yb, stride_yc, stride_yl,  # compiler knows rows are aligned and vectorises loads
    stride_fb, stride_fc, stride_fk,  # even when a stride is not a multiple of 16 (e.g. a
    # [x; B; C] slice of Mamba-2's in_proj output)
    K: tl.constexpr,
    KP: tl.constexpr,  # power of two >= K-1: width of the final-state tile
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    SILU: tl.constexpr,
    X_ALIGN_C: tl.constexpr,
    X_ALIGN_L: tl.constexpr,
    Y_ALIGN_C: tl.constexpr,
    Y_ALIGN_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # Grid (cdiv(L, BLOCK_L) + 1, cdiv(C, BLOCK_C), B). Along axis 0, the first programs compute
    # tiles of y, the last one the final state.
    stride_xc = stride_xc * X_ALIGN_C
    stride_xl = stride_xl * X_ALIGN_L
    stride_yc = stride_yc * Y_ALIGN_C
    stride_yl = stride_yl * Y_ALIGN_L
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    n_ltiles = tl.cdiv(L, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = offs_c < C
    offs_c64 = offs_c.to(tl.int64)
    x_rows = x_ptr + pid_b * stride_xb + offs_c64 * stride_xc  # [BLOCK_C]
    if pid_l < n_ltiles:
        _conv_tile(
            x_rows, offs_c64, mask_c, pid_l, pid_b,
            w_ptr, bias_ptr, init_ptr, y_ptr,
            L,
            stride_xl, stride_wc, stride_wk, stride_ib, stride_ic, stride_ik,
            stride_yb, stride_yc, stride_yl,
            K, HAS_BIAS, HAS_INIT, SILU, BLOCK_C, BLOCK_L,
        )
    else:
        _final_state(
            x_rows, offs_c64, mask_c, pid_b,
            init_ptr, final_ptr,
            L,
            stride_xl, stride_ib, stride_ic, stride_ik, stride_fb, stride_fc, stride_fk,
            K, KP, HAS_INIT,
        )


@jit
def _causal_conv1d_update_kernel(
    x_ptr,  # [B, C]
    state_ptr,  # [B, C, K-1], updated in place
    w_ptr,  # [C, K]
    bias_ptr,  # [C] (read if HAS_BIAS)
    y_ptr,  # [B, C]
    C,
    stride_xb, stride_xc,
    stride_sb, stride_sc, stride_sk,
    stride_wc, stride_wk,
    stride_yb, stride_yc,
    K: tl.constexpr,
    KP: tl.constexpr,  # power of two >= K: width of the window tile
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # window = [state[0], ..., state[K-2], x]; y = act(bias + <weight, window>); the new state is
    # window[1:], read as a second (shifted) load. The compiler may give loads and stores different
    # thread layouts, so a barrier separates every read of conv_state from the first write.
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = offs_c < C
    offs_c64 = offs_c.to(tl.int64)
    offs_j = tl.arange(0, KP)  # [KP] window column
    state_rows = state_ptr + pid_b * stride_sb + offs_c64 * stride_sc  # [BLOCK_C]

    x = tl.load(x_ptr + pid_b * stride_xb + offs_c64 * stride_xc, mask=mask_c, other=0.0)  # [BLOCK_C]
    in_state = offs_j < K - 1
    window = tl.load(
        state_rows[:, None] + offs_j[None, :] * stride_sk, mask=mask_c[:, None] & in_state[None, :], other=0.0
    )  # [BLOCK_C, KP]
    window = tl.where(in_state[None, :], window, x[:, None])  # columns >= K are zero-weighted below
    shifted_in_state = offs_j + 1 < K - 1
    shifted = tl.load(
        state_rows[:, None] + (offs_j + 1)[None, :] * stride_sk,
        mask=mask_c[:, None] & shifted_in_state[None, :],
        other=0.0,
    )
    new_state = tl.where(shifted_in_state[None, :], shifted, x[:, None])  # [BLOCK_C, KP] window[:, 1:]

    w = tl.load(
        w_ptr + offs_c64[:, None] * stride_wc + offs_j[None, :] * stride_wk,
        mask=mask_c[:, None] & (offs_j < K)[None, :],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_C, KP]
    acc = tl.sum(w * window.to(tl.float32), axis=1)  # [BLOCK_C]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c64, mask=mask_c, other=0.0).to(tl.float32)
    if SILU:
        acc = silu(acc)
    tl.store(y_ptr + pid_b * stride_yb + offs_c64 * stride_yc, acc.to(y_ptr.dtype.element_ty), mask=mask_c)
    tl.debug_barrier()  # all reads of conv_state before any write
    tl.store(
        state_rows[:, None] + offs_j[None, :] * stride_sk,
        new_state.to(state_ptr.dtype.element_ty),
        mask=mask_c[:, None] & in_state[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Public wrappers (same signatures as the references)
# ---------------------------------------------------------------------------------------------
_MAX_WIDTH = 8  # any K in 1.._MAX_WIDTH compiles; Mamba uses K = 4
_MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2


def _fwd_config(channel_first: bool, channels: int, length: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_L, num_warps) of the prefill kernel.

    Tiles of up to 4096 elements (8 KiB of bf16), 16 elements a thread (about 70 registers, so
    three 8-warp programs fit on an SM), wide along the contiguous axis of x: 256 positions (512 B
    rows) channel-first, 256 channels channel-last.
    """
    if channel_first:
        block_l = min(max(triton.next_power_of_2(length), 16), 256)
        block_c = min(4096 // block_l, triton.next_power_of_2(channels))
    else:
        block_c = min(max(triton.next_power_of_2(channels), 16), 256)
        block_l = min(4096 // block_c, max(triton.next_power_of_2(length), 4))
    return block_c, block_l, max(1, min(8, block_c * block_l // 512))


def _alignment_hint(stride: int) -> int:
    """Largest power of two (2, 4 or 8) dividing ``stride``: the kernel gets ``stride // hint`` and
    multiplies by the constant hint, which tells the compiler that rows start at multiples of it
    (so it can vectorise); 1 when Triton knows by itself (stride 1 or a multiple of 16) or when
    nothing can be said (odd strides)."""
    if stride == 1 or stride % 16 == 0:
        return 1
    return min(stride & -stride, 8)


def _check_weight(weight: torch.Tensor, bias: torch.Tensor | None, channels: int) -> int:
    """Checks weight [C, K] (K within the compiled range) and bias [C]; returns K."""
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"weight must be [C={channels}, K], got {tuple(weight.shape)}")
    width = weight.shape[1]
    if not 1 <= width <= _MAX_WIDTH:
        raise ValueError(f"conv width K must be in 1..{_MAX_WIDTH}, got weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"bias must be [C={channels}], got {tuple(bias.shape)}")
    return width


def _check_same_device(device, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, x is on {device}")


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) bytes a tensor's elements can occupy (a superset for non-dense views)."""
    span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def _check_no_overlap(written: dict, read: dict):
    """Outputs must not overlap inputs: programs read what other programs may already have written."""
    for out_name, out in written.items():
        for in_name, inp in read.items():
            if out is None or inp is None or out.numel() == 0 or inp.numel() == 0:
                continue
            (a0, a1), (b0, b1) = _byte_range(out), _byte_range(inp)
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{out_name} must not share memory with {in_name}")


def causal_conv1d(
    x: torch.Tensor,  # [B, C, L]
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None = None,  # [C]
    initial_state: torch.Tensor | None = None,  # [B, C, K-1]
    activation: str | None = "silu",
    *,
    out: torch.Tensor | None = None,  # [B, C, L]
    final_state_out: torch.Tensor | None = None,  # [B, C, K-1]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``causal_conv1d_ref`` (same arguments and results).

    ``x`` may have any strides (see the module docstring); ``y`` is allocated channel-last when
    ``x`` is (``x.stride(1) == 1``), channel-first otherwise. No host synchronisation, no autotuning.
    """
    require_triton("causal_conv1d")
    _check_activation(activation)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, C, L], got {tuple(x.shape)}")
    batch, channels, length = x.shape
    width = _check_weight(weight, bias, channels)
    _check_same_device(
        x.device, weight=weight, bias=bias, initial_state=initial_state, out=out, final_state_out=final_state_out
    )
    state_shape = (batch, channels, width - 1)
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must be [B, C, K-1] = {state_shape}, got {tuple(initial_state.shape)}")
    if initial_state is not None and initial_state.dtype != x.dtype:
        initial_state = initial_state.to(x.dtype)  # as the reference does (a small copy, no sync)
    if length == 0:
        raise ValueError(f"x must have at least one position, got {tuple(x.shape)}")
    if batch > _MAX_GRID_YZ:
        raise ValueError(f"batch {batch} exceeds the kernel's grid limit {_MAX_GRID_YZ}")

    channel_first = length > 1 and x.stride(2) == 1
    if out is None:
        if channel_first:
            out = new_output((batch, channels, length), x.dtype, x.device)
        else:
            out = new_output((batch, length, channels), x.dtype, x.device).transpose(1, 2)
    elif tuple(out.shape) != (batch, channels, length) or out.dtype != x.dtype:
        raise ValueError(f"out must be {x.dtype} [B, C, L] = {(batch, channels, length)}, got {out.dtype} {tuple(out.shape)}")
    if final_state_out is None:
        final_state_out = new_output(state_shape, x.dtype, x.device)
    elif tuple(final_state_out.shape) != state_shape or final_state_out.dtype != x.dtype:
        raise ValueError(
            f"final_state_out must be {x.dtype} {state_shape}, got {final_state_out.dtype} {tuple(final_state_out.shape)}"
        )

    _check_no_overlap(
        {"out": out, "final_state_out": final_state_out}, {"x": x, "initial_state": initial_state}
    )

    block_c, block_l, num_warps = _fwd_config(channel_first, channels, length)
    n_ctiles = triton.cdiv(channels, block_c)
    if n_ctiles > _MAX_GRID_YZ:
        raise ValueError(f"C={channels} needs {n_ctiles} channel blocks, over the grid limit {_MAX_GRID_YZ}")
    grid = (triton.cdiv(length, block_l) + 1, n_ctiles, batch)  # the last program along axis 0: final state
    init = initial_state if initial_state is not None else final_state_out  # placeholder pointer when absent
    init_strides = initial_state.stride() if initial_state is not None else (0, 0, 0)
    x_align_c, x_align_l = _alignment_hint(x.stride(1)), _alignment_hint(x.stride(2))
    y_align_c, y_align_l = _alignment_hint(out.stride(1)), _alignment_hint(out.stride(2))
    _causal_conv1d_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, init, out, final_state_out,
        channels, length,
        x.stride(0), x.stride(1) // x_align_c, x.stride(2) // x_align_l,
        *weight.stride(),
        *init_strides,
        out.stride(0), out.stride(1) // y_align_c, out.stride(2) // y_align_l,
        *final_state_out.stride(),
        K=width,
        KP=triton.next_power_of_2(max(width - 1, 1)),
        HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None,
        SILU=activation is not None,
        X_ALIGN_C=x_align_c,
        X_ALIGN_L=x_align_l,
        Y_ALIGN_C=y_align_c,
        Y_ALIGN_L=y_align_l,
        BLOCK_C=block_c,
        BLOCK_L=block_l,
        num_warps=num_warps,
    )
    return out, final_state_out


def causal_conv1d_update(
    x: torch.Tensor,  # [B, C]
    conv_state: torch.Tensor,  # [B, C, K-1], updated in place
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None = None,  # [C]
    activation: str | None = "silu",
    *,
    out: torch.Tensor | None = None,  # [B, C]
) -> torch.Tensor:
    """Triton version of ``causal_conv1d_update_ref``: one token, ``conv_state`` updated IN PLACE.

    One launch, no host synchronisation and no autotuning, so it can be captured in a CUDA graph.
    ``x``, ``conv_state`` and ``out`` may have any strides.
    """
    require_triton("causal_conv1d_update")
    _check_activation(activation)
    if x.dim() != 2:
        raise ValueError(f"x must be [B, C], got {tuple(x.shape)}")
    batch, channels = x.shape
    width = _check_weight(weight, bias, channels)
    if tuple(conv_state.shape) != (batch, channels, width - 1):
        raise ValueError(f"conv_state must be [B, C, K-1] = {(batch, channels, width - 1)}, got {tuple(conv_state.shape)}")
    _check_same_device(x.device, conv_state=conv_state, weight=weight, bias=bias, out=out)
    if batch > _MAX_GRID_YZ:
        raise ValueError(f"batch {batch} exceeds the kernel's grid limit {_MAX_GRID_YZ}")
    if out is None:
        out = new_output((batch, channels), x.dtype, x.device)
    elif tuple(out.shape) != (batch, channels) or out.dtype != x.dtype:
        raise ValueError(f"out must be {x.dtype} [B, C] = {(batch, channels)}, got {out.dtype} {tuple(out.shape)}")

    _check_no_overlap({"out": out}, {"x": x, "conv_state": conv_state})

    block_c = min(max(triton.next_power_of_2(channels), 32), 256)
    grid = (triton.cdiv(channels, block_c), batch)
    _causal_conv1d_update_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight, out,
        channels,
        *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
        K=width,
        KP=triton.next_power_of_2(width),
        HAS_BIAS=bias is not None,
        SILU=activation is not None,
        BLOCK_C=block_c,
        num_warps=4 if block_c >= 256 else 1,
    )
    return out
