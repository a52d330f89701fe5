"""The Mamba-2 mixer (Dao & Gu 2024, Fig. 6), forward and one-token step.

Parameters (mamba_ssm's names and layouts)::

    in_proj   [d_in_proj, D]           rows [z (d_inner); x (d_inner); B (G N); C (G N); Δ (H)]
    conv1d    [conv_dim, 1, K], bias   depthwise causal conv over [x; B; C]
    dt_bias   [H] fp32                 A_log [H] fp32 (A = -exp(A_log)), D [H] fp32
    norm      [d_inner]                gated RMSNorm, per group of d_inner / G channels
    out_proj  [D, d_inner]

``[x; B; C] -> conv -> SiLU``; the SSD scan with one scalar A per head, in chunks of C
positions; ``y = RMSNorm(y * silu(z))`` (or, by ``gate_norm``, ``RMSNorm(y) * silu(z)`` or
``y * silu(z)`` without ``norm``); out_proj. With ``dt_min > 0`` (Zamba2), Δ is formed here,
``max(softplus(dt + dt_bias), dt_min)`` in fp32, and the scans take it as it is; forward and step
both clamp (transformers clamps in its sequence forward only), so decoding equals the forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamba_eval.kernels.utils import discretise_dt
from mamba_eval.models.config import Mamba2Config
from mamba_eval.models.layers import Norm
from mamba_eval.models.mixers.ssm import (
    SSMMixer, conv_params, inverse_softplus_dt, mask_padded_dt, padding_mask,
)
from mamba_eval.models.ops import Ops
from mamba_eval.models.state import SSMState


class Mamba2Mixer(SSMMixer):
    def __init__(self, cfg: Mamba2Config, d_model: int, ops: Ops, **factory):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        fp32 = {**factory, "dtype": torch.float32}
        self.in_proj = nn.Linear(d_model, cfg.d_in_proj, bias=cfg.proj_bias, **factory)
        self.conv1d = conv_params(cfg.conv_dim, cfg.d_conv, cfg.conv_bias, **factory)
        self.dt_bias = nn.Parameter(torch.empty(cfg.nheads, **fp32))
        self.A_log = nn.Parameter(torch.empty(cfg.nheads, **fp32))
        self.D = nn.Parameter(torch.empty(cfg.nheads, **fp32))
        # gated, per group (none for gate_norm "none")
        self.norm = None if cfg.gate_norm == "none" else Norm(cfg.d_inner, is_rms=True, eps=cfg.norm_eps, **factory)
        self.out_proj = nn.Linear(cfg.d_inner, d_model, bias=cfg.proj_bias, **factory)

    @torch.no_grad()
    def init_parameters(self):
        """The SSM parameters as mamba_ssm initialises them (A uniform in [1, 16], D = 1, log-uniform Δ)."""
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(1, 16)))
        self.D.fill_(1.0)
        self.dt_bias.copy_(inverse_softplus_dt(self.D.shape[0], self.D.device))

    def activation_bytes(self) -> int:
        """As the Mamba-1 mixer's, plus the reference scan's decay and score blocks of a chunk."""
        extra = 4 * 3 * self.cfg.nheads * self.cfg.chunk_size if self.ops.name == "ref" else 0
        return super().activation_bytes() + extra

    def _dt(self, dt: torch.Tensor, padded: torch.Tensor | None = None):
        """(Δ before or after discretisation, the scans' ``dt_bias``, ``dt_softplus``). The clamp of
        ``dt_min`` is applied here, and padded positions (Δ exactly 0 after the softplus of -inf)
        are set back to 0 after it so that they still leave the state unchanged."""
        if self.cfg.dt_min == 0:
            return dt, self.dt_bias, True
        delta = discretise_dt(dt, self.dt_bias, True).clamp_min(self.cfg.dt_min)
        if padded is not None:
            delta = delta.masked_fill(padded.view(*padded.shape, *([1] * (delta.ndim - 2))), 0.0)
        return delta, None, False

    def _split(self, zxbcdt: torch.Tensor):
        c = self.cfg
        return zxbcdt.split([c.d_inner, c.conv_dim, c.nheads], dim=-1)

    def _split_xbc(self, xbc: torch.Tensor):
        """[..., conv_dim] -> x [..., H, P], B [..., G, N], C [..., G, N]."""
        c = self.cfg
        x, B, C = xbc.split([c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        groups = (c.ngroups, c.d_state)
        return x.unflatten(-1, (c.nheads, c.headdim)), B.unflatten(-1, groups), C.unflatten(-1, groups)

    def _gated_norm_out(self, y: torch.Tensor, z: torch.Tensor, linear) -> torch.Tensor:
        c = self.cfg
        if c.gate_norm == "after_gate":
            y = self.ops.gated_rmsnorm(y, z, self.norm.weight, c.norm_eps, c.d_inner // c.ngroups)
        elif c.gate_norm == "none":
            y = (y.float() * F.silu(z.float())).to(y.dtype)
        else:  # before_gate: the norm of y per group, then the gate (both in fp32)
            v = y.float().unflatten(-1, (c.ngroups, -1))
            v = (v * torch.rsqrt(v.square().mean(-1, keepdim=True) + c.norm_eps)).flatten(-2)
            y = (v * self.norm.weight.float() * F.silu(z.float())).to(y.dtype)
        return linear(y, self.out_proj.weight, self.out_proj.bias)

    def forward(self, h: torch.Tensor, state: SSMState | None = None, lengths: torch.Tensor | None = None,
                padded: torch.Tensor | None = None) -> tuple[torch.Tensor, SSMState]:
        """h [B, L, D] -> (out [B, L, D], final SSMState); ``state`` (if given) is read, not written.
        ``lengths`` and ``padded`` as in :meth:`Mamba1Mixer.forward`."""
        if lengths is not None and padded is None:
            padded = padding_mask(lengths, h.shape[1])
        ops = self.ops
        z, xbc_in, dt = self._split(ops.linear(h, self.in_proj.weight, self.in_proj.bias))
        xbc, conv_state = self.convolve(xbc_in, state, lengths)  # [B, conv_dim, L]
        dt, dt_bias, softplus = self._dt(mask_padded_dt(dt, padded), padded)
        x, B, C = self._split_xbc(xbc.transpose(1, 2))
        y, ssm_state = ops.ssd_scan(
            x, dt, self.neg_A(), B, C, self.cfg.chunk_size, self.D,
            dt_bias=dt_bias, dt_softplus=softplus, initial_state=None if state is None else state.ssm,
        )  # [B, L, H, P]
        return self._gated_norm_out(y.flatten(-2), z, ops.linear), SSMState(conv_state, ssm_state)

    def step(self, h: torch.Tensor, state: SSMState) -> torch.Tensor:
        """h [B, D] -> out [B, D]; advances ``state`` IN PLACE."""
        ops = self.ops
        z, xbc, dt = self._split(ops.step_linear(h, self.in_proj.weight, self.in_proj.bias))
        xbc = ops.causal_conv1d_update(xbc, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        x, B, C = self._split_xbc(xbc)
        dt, dt_bias, softplus = self._dt(dt)
        y = ops.ssd_state_update(
            state.ssm, x, dt, self.neg_A(), B, C, self.D, dt_bias=dt_bias, dt_softplus=softplus,
        )  # [B, H, P]
        return self._gated_norm_out(y.flatten(-2), z, ops.step_linear)
