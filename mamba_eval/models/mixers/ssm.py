"""What the two Mamba mixers share: the conv parameters, the Δ initialisation, the cached A, the
handling of padded rows (per-row lengths) and their zero state and memory cost."""

from __future__ import annotations

import math

import torch
from torch import nn

from mamba_eval.models.state import SSMState


def padding_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """[B, L] bool, True at the positions at or past each row's length."""
    return torch.arange(length, device=lengths.device).view(1, -1) >= lengths.view(-1, 1)


def mask_padded_dt(dt: torch.Tensor, padded: torch.Tensor | None) -> torch.Tensor:
    """Δ before its bias and softplus, [B, L, ...], with ``-inf`` at the padded positions
    (``padded`` [B, L], True past a row's length): softplus(-inf + bias) is exactly 0, so the
    scan leaves the state unchanged there (``exp(0 A) = 1``, no input) and a row's final state
    is its state after its last real token, bit for bit.

    IN PLACE (``dt`` is, or is a view of, a projection's fresh output): the tensor keeps its
    strides, so the scan's element-wise work on it (bias, softplus) takes the same code paths,
    hence the same bits at the real positions, as without the mask."""
    if padded is None:
        return dt
    return dt.masked_fill_(padded.view(*padded.shape, *([1] * (dt.ndim - 2))), float("-inf"))


def conv_state_at(x: torch.Tensor, initial: torch.Tensor | None, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The conv state of each row after its own ``lengths[b]`` positions: the ``width - 1`` conv
    inputs before that position (``x`` [B, C, L], the conv's input), with ``initial`` ([B, C,
    width - 1], zeros when None) in front where a row is shorter, as the conv leaves it for an
    unpadded row. Returns [B, C, width - 1] in x's dtype."""
    batch, channels, _ = x.shape
    keep = width - 1
    if initial is None:
        initial = x.new_zeros(batch, channels, keep)
    full = torch.cat([initial.to(x.dtype), x], dim=-1)  # position t of x at column t + keep
    idx = lengths.view(batch, 1, 1) + torch.arange(keep, device=x.device).view(1, 1, keep)
    return full.gather(2, idx.expand(batch, channels, keep))


def conv_params(channels: int, width: int, bias: bool, **factory) -> nn.Conv1d:
    """Holder of a depthwise conv's parameters, weight ``[C, 1, K]`` as in mamba_ssm; applied by ``ops``."""
    return nn.Conv1d(channels, channels, width, groups=channels, padding=width - 1, bias=bias, **factory)


def inverse_softplus_dt(n: int, device, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4) -> torch.Tensor:
    """Δ bias whose softplus is log-uniform in [dt_min, dt_max] (mamba_ssm's initialisation)."""
    dt = torch.exp(torch.rand(n, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


class SSMMixer(nn.Module):
    """Base of the Mamba mixers: ``self.cfg`` (a Mamba1Config or Mamba2Config), ``self.A_log``.

    ``neg_A()`` is ``A = -exp(A_log)`` in fp32, computed once per parameter value and reused (a
    decoding step would otherwise spend two kernel launches per layer on it). It is recomputed
    when the parameter is written (its version counter moves) or replaced, and computed afresh
    whenever gradients flow to ``A_log`` (training)."""

    #: Rows of different lengths may share a forward (``lengths``): padded positions leave the
    #: state unchanged.
    supports_lengths = True
    #: The state does not grow with the sequence.
    state_grows = False
    state_type = SSMState

    def neg_A(self) -> torch.Tensor:
        a_log = self.A_log
        if a_log.requires_grad and torch.is_grad_enabled():
            return -torch.exp(a_log.float())
        try:
            version = a_log._version
        except RuntimeError:  # an inference tensor has no version counter: no safe cache
            return -torch.exp(a_log.float())
        key = (a_log.data_ptr(), version, a_log.device, a_log.dtype, tuple(a_log.shape))
        cached = self.__dict__.get("_neg_A_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.inference_mode(False), torch.no_grad():
            value = -torch.exp(a_log.detach().float())
        self.__dict__["_neg_A_cache"] = (key, value)
        return value

    def zero_state(self, batch_size: int, *, capacity: int | None, dtype, state_dtype, device) -> SSMState:
        """The state before any token (``capacity`` is for growing states; ignored here).
        ``state_dtype``: storage of the SSM state (the step's math is fp32 either way)."""
        c = self.cfg
        return SSMState(torch.zeros(batch_size, c.conv_dim, c.d_conv - 1, dtype=dtype, device=device),
                        torch.zeros(batch_size, *c.ssm_state_shape, dtype=state_dtype, device=device))

    def state_bytes(self, elem: int) -> int:
        """One sequence's state (conv window in the model dtype of ``elem`` bytes, fp32 SSM state)."""
        c = self.cfg
        return c.conv_dim * (c.d_conv - 1) * elem + 4 * math.prod(c.ssm_state_shape)

    def kv_bytes(self, elem: int) -> int:
        """Bytes the state grows by per position: none."""
        return 0

    def activation_bytes(self) -> int:
        """Temporaries of this mixer per token of a forward: in_proj output, conv output, scan
        output and gate in the model dtype, counted at fp32 width for the upcasts the operators
        make."""
        c = self.cfg
        return 4 * (4 * c.d_in_proj + 2 * c.d_inner)

    def convolve(self, xin: torch.Tensor, state: SSMState | None, lengths: torch.Tensor | None):
        """xin [B, L, conv_dim] -> (SiLU(causal conv) [B, conv_dim, L], the conv state after each
        row's last position, or after ``lengths[b]`` positions when given)."""
        initial = None if state is None else state.conv
        x, conv_state = self.ops.causal_conv1d(
            xin.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
            initial_state=initial, activation="silu",
        )
        if lengths is not None:
            conv_state = conv_state_at(xin.transpose(1, 2), initial, lengths, self.cfg.d_conv)
        return x, conv_state
