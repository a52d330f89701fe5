"""Small building blocks of a layer: the norm's parameters and the gated MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamba_eval.models.ops import Ops


class Norm(nn.Module):
    """Parameters of an RMSNorm (weight) or LayerNorm (weight, bias); applied by ``ops.add_norm``
    (fused with the residual add) or, for Mamba-2's gated norm, by ``ops.gated_rmsnorm``."""

    def __init__(self, dim: int, is_rms: bool, eps: float, **factory):
        super().__init__()
        self.is_rms, self.eps = is_rms, eps
        self.weight = nn.Parameter(torch.empty(dim, **factory))
        self.bias = None if is_rms else nn.Parameter(torch.empty(dim, **factory))

    def add_norm(self, ops: Ops, x, residual, residual_in_fp32: bool):
        return ops.add_norm(x, residual, self.weight, self.bias, self.eps, residual_in_fp32, self.is_rms)


class GatedMLP(nn.Module):
    """mamba_ssm's ``GatedMLP``: ``fc2(y * silu(gate))`` with ``[y; gate] = fc1(x)``, no biases."""

    def __init__(self, d_model: int, hidden: int, **factory):
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False, **factory)
        self.fc2 = nn.Linear(hidden, d_model, bias=False, **factory)

    def forward(self, x: torch.Tensor, linear=F.linear) -> torch.Tensor:
        y, gate = linear(x, self.fc1.weight).chunk(2, dim=-1)
        return linear(y * F.silu(gate), self.fc2.weight)
