"""The Mamba-3 mixer (Lahoti, Li, Chen, Wang, Bick, Kolter, Dao, Gu 2026, arXiv 2603.15569), SISO
and MIMO, forward and one-token step. The SSM itself (paper symbols, equations) is
``kernels/mamba3.py``; this module projects, discretises, gates and contracts.

Parameters (mamba_ssm's ``Mamba3`` names and layouts; H heads of P channels, R ranks, G groups,
N = d_state, S rotary angles)::

    in_proj   [d_in_proj, D]     rows [z (d_inner); x (d_inner); B (R G N); C (R G N);
                                       dd_dt (H); dd_A (H); trap (H); angles (S)]
    dt_bias   [H] fp32           Δ = softplus(dd_dt + dt_bias)
    B_bias, C_bias [H, R, N] fp32   added to the normed B, C per head and rank
    B_norm, C_norm [N]           RMSNorm of B and C over N (eps ``norm_eps``)
    mimo_x, mimo_z, mimo_o [H, R, P] fp32   MIMO only: v_r = x ⊙ mimo_x[:, r],
                                 z_r = z ⊙ mimo_z[:, r], y = Σ_r mimo_o[:, r] ⊙ y_r
    D         [H] fp32           skip: y_r += D v_r
    norm      [d_inner]          only with ``is_outproj_norm``: RMSNorm per head before the gate
    out_proj  [D, d_inner]

Discretisation, per head and position, in fp32: Δ = softplus(dd_dt + dt_bias) (Δ = 0 at padded
positions: the state is left unchanged), A = min(-f(dd_A), -A_floor) with f the config's
``A_activation``, λ = sigmoid(trap). Output: ``y_r = SSM_r * silu(z_r)`` (or
``RMSNorm_head(SSM_r) * weight * silu(z_r)``), contracted over r for MIMO, then out_proj.
No causal conv: the state is :class:`~mamba_eval.models.state.Mamba3State`.

Verified in state-spaces/mamba at e9594ce (``mamba_ssm/modules/mamba3.py``) and
flash-linear-attention at bc3b101 (``fla/layers/mamba3.py``, the same layout and names).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamba_eval.models.config import Mamba3Config
from mamba_eval.models.layers import Norm
from mamba_eval.models.mixers.ssm import inverse_softplus_dt, mask_padded_dt, padding_mask
from mamba_eval.models.ops import Ops
from mamba_eval.models.state import Mamba3State


def _rmsnorm(t: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension in fp32 (returned in fp32)."""
    t = t.float()
    return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + eps) * weight.float()


def heavy_tail(x: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's activation of the data-dependent A since c69aaab: 1 + x (x >= 0), 1 / (1 - x) (x < 0)."""
    return x.clamp_min(0) + torch.reciprocal(1 - x.clamp_max(0))


_A_ACTIVATIONS = {"softplus": F.softplus, "heavy_tail": heavy_tail}


class Mamba3Mixer(nn.Module):
    #: Rows of different lengths may share a forward: Δ = 0 at padded positions leaves θ and the
    #: SSM state unchanged, and the previous key and input are read at each row's last position.
    supports_lengths = True
    state_grows = False
    state_type = Mamba3State

    def __init__(self, cfg: Mamba3Config, d_model: int, ops: Ops, **factory):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        fp32 = {**factory, "dtype": torch.float32}
        H, R, N, P = cfg.nheads, cfg.rank, cfg.d_state, cfg.headdim
        self.in_proj = nn.Linear(d_model, cfg.d_in_proj, bias=cfg.proj_bias, **factory)
        self.dt_bias = nn.Parameter(torch.empty(H, **fp32))
        self.B_bias = nn.Parameter(torch.empty(H, R, N, **fp32))
        self.C_bias = nn.Parameter(torch.empty(H, R, N, **fp32))
        self.B_norm = Norm(N, is_rms=True, eps=cfg.norm_eps, **factory)
        self.C_norm = Norm(N, is_rms=True, eps=cfg.norm_eps, **factory)
        if cfg.is_mimo:
            self.mimo_x = nn.Parameter(torch.empty(H, R, P, **fp32))
            self.mimo_z = nn.Parameter(torch.empty(H, R, P, **fp32))
            self.mimo_o = nn.Parameter(torch.empty(H, R, P, **fp32))
        self.D = nn.Parameter(torch.empty(H, **fp32))
        if cfg.is_outproj_norm:
            self.norm = Norm(cfg.d_inner, is_rms=True, eps=cfg.norm_eps, **factory)
        self.out_proj = nn.Linear(cfg.d_inner, d_model, bias=cfg.proj_bias, **factory)
        self._activation = _A_ACTIVATIONS[cfg.A_activation]

    @torch.no_grad()
    def init_parameters(self):
        """As mamba_ssm initialises them: biases of B and C one, D one, log-uniform Δ, MIMO
        projections 1/R (x, o) and 1 (z)."""
        c = self.cfg
        self.dt_bias.copy_(inverse_softplus_dt(c.nheads, self.dt_bias.device))
        self.B_bias.fill_(1.0)
        self.C_bias.fill_(1.0)
        self.D.fill_(1.0)
        if c.is_mimo:
            self.mimo_x.fill_(1.0 / c.rank)
            self.mimo_z.fill_(1.0)
            self.mimo_o.fill_(1.0 / c.rank)

    # ------------------------------------------------------------------ cost

    def state_bytes(self, elem: int) -> int:
        """One sequence's state: θ, SSM state and previous keys in fp32, previous input in ``elem`` bytes."""
        c = self.cfg
        return 4 * c.nheads * (c.n_angles + c.headdim * c.d_state + c.rank * c.d_state) + elem * c.d_inner

    def kv_bytes(self, elem: int) -> int:
        """Bytes the state grows by per position: none."""
        return 0

    def activation_bytes(self) -> int:
        """Temporaries per token of a forward, counted in fp32: the in_proj output, per head and
        rank the rotated q and k, v and y, and the reference's rows of the chunk's weight and
        score matrices."""
        c = self.cfg
        per_rank = c.nheads * c.rank * (2 * c.d_state + 2 * c.headdim + 3 * c.chunk_size * c.rank)
        return 4 * (2 * c.d_in_proj + 2 * c.d_inner + per_rank)

    # ------------------------------------------------------------------ computation

    def _split(self, proj: torch.Tensor):
        c = self.cfg
        bc = c.rank * c.ngroups * c.d_state
        return proj.split([c.d_inner, c.d_inner, bc, bc, c.nheads, c.nheads, c.nheads, c.n_angles], dim=-1)

    def _ssm_inputs(self, x, B, C, dd_dt, dd_A, trap):
        """x [..., H, P]; B, C normed [..., R, G, N] in the model dtype; Δ, A, λ [..., H] fp32."""
        c = self.cfg
        dt = F.softplus(dd_dt.float() + self.dt_bias)
        A = (-self._activation(dd_A.float())).clamp(max=-c.A_floor)
        lam = torch.sigmoid(trap.float())
        groups = (c.rank, c.ngroups, c.d_state)
        B = _rmsnorm(B.unflatten(-1, groups), self.B_norm.weight, c.norm_eps).to(B.dtype)
        C = _rmsnorm(C.unflatten(-1, groups), self.C_norm.weight, c.norm_eps).to(C.dtype)
        return x.unflatten(-1, (c.nheads, c.headdim)), B, C, dt, A, lam

    def _ssm_weights(self):
        return dict(B_bias=self.B_bias, C_bias=self.C_bias, D=self.D,
                    mimo_x=self.mimo_x if self.cfg.is_mimo else None, pairwise=not self.cfg.is_mimo)

    def _output(self, y: torch.Tensor, z: torch.Tensor, linear) -> torch.Tensor:
        """y [..., R, H, P] fp32, z [..., d_inner] -> out_proj(contracted, gated y) [..., D]."""
        c = self.cfg
        z = z.unflatten(-1, (c.nheads, c.headdim)).float()[..., None, :, :]  # [..., 1, H, P]
        if c.is_mimo:
            z = z * self.mimo_z.float().transpose(0, 1)
        if c.is_outproj_norm:
            y = _rmsnorm(y, self.norm.weight.view(c.nheads, c.headdim), c.norm_eps)
        y = y * F.silu(z)
        y = (y * self.mimo_o.float().transpose(0, 1)).sum(-3) if c.is_mimo else y.squeeze(-3)
        weight = self.out_proj.weight
        return linear(y.flatten(-2).to(weight.dtype), weight, self.out_proj.bias)

    def zero_state(self, batch_size: int, *, capacity: int | None, dtype, state_dtype, device) -> Mamba3State:
        """The state before any token (``capacity`` is for growing states; ignored here).
        ``state_dtype``: storage of the SSM state; θ and the keys stay fp32 (the step's math is
        fp32 either way)."""
        c = self.cfg
        fp32 = {"dtype": torch.float32, "device": device}
        return Mamba3State(torch.zeros(batch_size, c.nheads, c.n_angles, **fp32),
                           torch.zeros(batch_size, *c.ssm_state_shape, dtype=state_dtype, device=device),
                           torch.zeros(batch_size, c.rank, c.nheads, c.d_state, **fp32),
                           torch.zeros(batch_size, c.nheads, c.headdim, dtype=dtype, device=device))

    def forward(self, h: torch.Tensor, state: Mamba3State | None = None, lengths: torch.Tensor | None = None,
                padded: torch.Tensor | None = None) -> tuple[torch.Tensor, Mamba3State]:
        """h [B, L, D] -> (out [B, L, D], final Mamba3State); ``state`` (if given) is read, not
        written. ``lengths`` [B]: each row's final state after its own ``lengths[b]`` positions
        (``padded``: the [B, L] mask of the positions past them, computed when None)."""
        if lengths is not None and padded is None:
            padded = padding_mask(lengths, h.shape[1])
        z, x, B, C, dd_dt, dd_A, trap, angles = self._split(
            self.ops.linear(h, self.in_proj.weight, self.in_proj.bias))
        dd_dt = mask_padded_dt(dd_dt, padded)  # softplus(-inf) = 0: Δ = 0 past each row's length
        x, B, C, dt, A, lam = self._ssm_inputs(x, B, C, dd_dt, dd_A, trap)
        initial = None if state is None else (state.angle, state.ssm, state.k, state.v)
        y, (angle, ssm, k, v) = self.ops.mamba3_scan(
            x, dt, A, lam, B, C, angles, chunk_size=self.cfg.chunk_size, initial_state=initial, lengths=lengths,
            **self._ssm_weights())
        return self._output(y, z, self.ops.linear), Mamba3State(angle, ssm, k, v)

    def step(self, h: torch.Tensor, state: Mamba3State) -> torch.Tensor:
        """h [B, D] -> out [B, D]; advances ``state`` IN PLACE."""
        z, x, B, C, dd_dt, dd_A, trap, angles = self._split(
            self.ops.step_linear(h, self.in_proj.weight, self.in_proj.bias))
        x, B, C, dt, A, lam = self._ssm_inputs(x, B, C, dd_dt, dd_A, trap)
        y = self.ops.mamba3_step(state.angle, state.ssm, state.k, state.v, x, dt, A, lam, B, C, angles,
                                 **self._ssm_weights())
        return self._output(y, z, self.ops.step_linear)
