"""Normalisation layers of the Mamba blocks.

``add_rmsnorm_ref``: the pre-norm residual step of every block (mamba_ssm's fused add + norm)::

    r   = x + residual                  (residual = None at the first block: r = x)
    out = r / sqrt(mean(r^2) + eps) * weight (+ bias)                       RMSNorm (is_rms=True)
    out = (r - mean(r)) / sqrt(var(r) + eps) * weight (+ bias)             LayerNorm (is_rms=False)

over the last dimension D. The sum ``r`` is formed and normalised in fp32; it is returned as the
new residual, in fp32 when ``residual_in_fp32`` (else in the residual's dtype, or x's at the first
block); ``out`` is returned in ``x.dtype``.

``gated_rmsnorm_ref``: Mamba-2's output norm (Dao & Gu 2024, Sec. 7.3; mamba_ssm's ``RMSNormGated``
with ``norm_before_gate=False``): gate first, then RMSNorm each group of ``group_size`` channels::

    v   = y * silu(z)
    out = v / sqrt(mean_group(v^2) + eps) * weight

Shapes: x, residual, y, z [..., D]; weight, bias [D]. Nothing is written in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rmsnorm_ref(
    x: torch.Tensor,  # [..., D]
    residual: torch.Tensor | None,  # [..., D]
    weight: torch.Tensor,  # [D]
    bias: torch.Tensor | None = None,  # [D]
    eps: float = 1e-5,
    residual_in_fp32: bool = True,
    is_rms: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(normed [..., D] in x.dtype, new_residual [..., D])``; see the module docstring."""
    r = x.float() if residual is None else x.float() + residual.float()
    if is_rms:
        normed = r * torch.rsqrt(r.square().mean(-1, keepdim=True) + eps)
    else:
        centred = r - r.mean(-1, keepdim=True)
        normed = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    normed = normed * weight.float()
    if bias is not None:
        normed = normed + bias.float()
    residual_dtype = torch.float32 if residual_in_fp32 else (x.dtype if residual is None else residual.dtype)
    return normed.to(x.dtype), r.to(residual_dtype)


def gated_rmsnorm_ref(
    y: torch.Tensor,  # [..., D]
    z: torch.Tensor,  # [..., D]
    weight: torch.Tensor,  # [D]
    eps: float = 1e-5,
    group_size: int | None = None,
) -> torch.Tensor:
    """``RMSNorm(y * silu(z))`` over groups of ``group_size`` channels (None: one group); in y.dtype."""
    width = y.shape[-1]
    group_size = width if group_size is None else group_size
    if width % group_size != 0:
        raise ValueError(f"the last dimension {width} is not a multiple of group_size {group_size}")
    v = y.float() * F.silu(z.float())
    v = v.unflatten(-1, (width // group_size, group_size))  # [..., groups, group_size]
    v = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)
    return (v.flatten(-2) * weight.float()).to(y.dtype)
