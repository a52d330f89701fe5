"""The Mamba-1 mixer (Gu & Dao 2023, Fig. 3), forward and one-token step.

Parameters (mamba_ssm's names and layouts)::

    in_proj   [2 d_inner, D]          rows [x; z]
    conv1d    [d_inner, 1, K], bias   depthwise causal conv over x
    x_proj    [R + 2N, d_inner]       rows [Δ (low rank R); B; C]
    dt_proj   [d_inner, R], bias fp32 Δ up-projection; its bias is added in fp32 inside the scan
    A_log     [d_inner, N] fp32       A = -exp(A_log)
    D         [d_inner] fp32          skip connection
    out_proj  [D, d_inner]

``x -> conv -> SiLU``; ``Δ = softplus(dt_proj(Δ_low) + bias)``; the selective scan
``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t``, ``y_t = C_t h_t + D x_t``, gated ``y * silu(z)``.
Falcon-Mamba (``bcdt_rmsnorm``) RMS-normalises the low-rank Δ, B and C (no weight) first; Jamba
(``bcdt_norm_weights``) with weights ``dt_layernorm``, ``b_layernorm``, ``c_layernorm``.
"""

from __future__ import annotations

import torch
from torch import nn

from mamba_eval.kernels.norm import weightless_rmsnorm_ref
from mamba_eval.models.config import Mamba1Config
from mamba_eval.models.layers import Norm
from mamba_eval.models.mixers.ssm import (
    SSMMixer, conv_params, inverse_softplus_dt, mask_padded_dt, padding_mask,
)
from mamba_eval.models.ops import Ops
from mamba_eval.models.state import SSMState

#: Rows x d_inner up to which a decoding step uses the fused op (``ops.mamba1_decode``). Its
#: programs loop over the rows one by one, so it wins at small batches and loses at large ones
#: (``scripts/bench_kernels.py --only mamba1_decode`` measures both inside a CUDA graph); 8192
#: elements puts the switch near the crossing point for d_inner 1536 and 5120 alike.
FUSED_DECODE_MAX_ELEMENTS = 8192


class Mamba1Mixer(SSMMixer):
    def __init__(self, cfg: Mamba1Config, d_model: int, ops: Ops, **factory):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        di, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.bcdt_eps = cfg.bcdt_rmsnorm_eps if cfg.bcdt_rmsnorm else None
        fp32 = {**factory, "dtype": torch.float32}
        self.in_proj = nn.Linear(d_model, 2 * di, bias=cfg.proj_bias, **factory)  # rows [x; z]
        self.conv1d = conv_params(di, cfg.d_conv, cfg.conv_bias, **factory)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False, **factory)  # rows [dt; B; C]
        self.dt_proj = nn.Linear(r, di, bias=False, **factory)
        self.dt_proj.bias = nn.Parameter(torch.empty(di, **fp32))  # added in fp32 inside the scan
        self.A_log = nn.Parameter(torch.empty(di, n, **fp32))
        self.D = nn.Parameter(torch.empty(di, **fp32))
        self.out_proj = nn.Linear(di, d_model, bias=cfg.proj_bias, **factory)
        if cfg.bcdt_norm_weights:  # Jamba's norms of Δ, B and C have weights
            self.dt_layernorm = Norm(r, is_rms=True, eps=cfg.bcdt_rmsnorm_eps, **factory)
            self.b_layernorm = Norm(n, is_rms=True, eps=cfg.bcdt_rmsnorm_eps, **factory)
            self.c_layernorm = Norm(n, is_rms=True, eps=cfg.bcdt_rmsnorm_eps, **factory)

    @torch.no_grad()
    def init_parameters(self):
        """The SSM parameters as mamba_ssm initialises them (S4D-real A, D = 1, log-uniform Δ)."""
        n = self.A_log.shape[-1]
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)
        self.dt_proj.bias.copy_(inverse_softplus_dt(self.D.shape[0], self.D.device))

    def _ssm_inputs(self, x: torch.Tensor, linear):
        """Δ (without its bias), B, C from the convolved x [..., d_inner]."""
        c = self.cfg
        dt, B, C = linear(x, self.x_proj.weight).split([c.dt_rank, c.d_state, c.d_state], dim=-1)
        if self.bcdt_eps is not None:
            dt, B, C = (weightless_rmsnorm_ref(t, self.bcdt_eps) for t in (dt, B, C))
            if c.bcdt_norm_weights:
                dt, B, C = (t * norm.weight for t, norm in zip(
                    (dt, B, C), (self.dt_layernorm, self.b_layernorm, self.c_layernorm)))
        return linear(dt, self.dt_proj.weight), B, C

    def forward(self, h: torch.Tensor, state: SSMState | None = None, lengths: torch.Tensor | None = None,
                padded: torch.Tensor | None = None) -> tuple[torch.Tensor, SSMState]:
        """h [B, L, D] -> (out [B, L, D], final SSMState); ``state`` (if given) is read, not written.

        ``lengths`` [B]: the returned state is each row's state after its position
        ``lengths[b] - 1``; the outputs are those of the unmasked forward at the real positions.
        ``padded``: ``lengths``' [B, L] mask (True at positions ``>= lengths``), computed here when
        not given."""
        if lengths is not None and padded is None:
            padded = padding_mask(lengths, h.shape[1])
        ops = self.ops
        xin, z = ops.linear(h, self.in_proj.weight, self.in_proj.bias).chunk(2, dim=-1)
        x, conv_state = self.convolve(xin, state, lengths)  # [B, d_inner, L]
        dt, B, C = self._ssm_inputs(x.transpose(1, 2), ops.linear)
        dt = mask_padded_dt(dt, padded)
        y, ssm_state = ops.selective_scan(
            x, dt.transpose(1, 2), self.neg_A(), B.transpose(1, 2), C.transpose(1, 2),
            self.D, z.transpose(1, 2), delta_bias=self.dt_proj.bias, delta_softplus=True,
            initial_state=None if state is None else state.ssm,
        )  # [B, d_inner, L]
        out = ops.linear(y.transpose(1, 2), self.out_proj.weight, self.out_proj.bias)
        return out, SSMState(conv_state, ssm_state)

    def step(self, h: torch.Tensor, state: SSMState) -> torch.Tensor:
        """h [B, D] -> out [B, D]; advances ``state`` IN PLACE. Between the projections: for few
        rows one fused op (conv update, x_proj, Falcon-Mamba's norms, dt_proj, state update in two
        launches), else the four ops (:data:`FUSED_DECODE_MAX_ELEMENTS`). Under a batch-invariance
        policy always the four ops: which path runs must not depend on the batch size."""
        ops = self.ops
        linear = ops.step_linear
        x, z = linear(h, self.in_proj.weight, self.in_proj.bias).chunk(2, dim=-1)
        fusable = not self.cfg.bcdt_norm_weights  # the fused step knows weightless norms only
        if fusable and not ops.invariance.enabled and x.shape[0] * x.shape[1] <= FUSED_DECODE_MAX_ELEMENTS:
            y = ops.mamba1_decode(
                x, z, state.conv, state.ssm, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.x_proj.weight,
                self.dt_proj.weight, self.dt_proj.bias, self.neg_A(), self.D, bcdt_eps=self.bcdt_eps,
            )
        else:
            x = ops.causal_conv1d_update(x, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
            dt, B, C = self._ssm_inputs(x, linear)
            y = ops.selective_state_update(
                state.ssm, x, dt, self.neg_A(), B, C, self.D, z, dt_bias=self.dt_proj.bias, dt_softplus=True,
            )
        return linear(y, self.out_proj.weight, self.out_proj.bias)
