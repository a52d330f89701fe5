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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over the whole sequence.

    Returns ``(y [B, C, L] in x.dtype, final_state [B, C, K-1] in x.dtype)``; ``final_state`` is the
    last K-1 inputs (taken from ``initial_state`` too when L < K-1), ready to continue the sequence.
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
    y = F.conv1d(xx.float(), weight.float().unsqueeze(1), None if bias is None else bias.float(), groups=channels)
    if activation is not None:
        y = F.silu(y)
    final_state = xx[:, :, xx.shape[-1] - (width - 1):].clone()
    return y.to(x.dtype), final_state


def causal_conv1d_update_ref(
    x: torch.Tensor,  # [B, C]
    conv_state: torch.Tensor,  # [B, C, K-1], updated in place
    weight: torch.Tensor,  # [C, K]
    bias: torch.Tensor | None = None,  # [C]
    activation: str | None = "silu",
) -> torch.Tensor:
    """One decoding step: convolve ``x`` with the K-1 previous inputs held in ``conv_state``.

    Shifts ``x`` into ``conv_state`` IN PLACE (dropping the oldest input) and returns
    ``y [B, C]`` in ``x.dtype``.
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
    return y.to(x.dtype)
