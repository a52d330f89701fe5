"""Mamba-1 selective scan: a diagonal, input-dependent linear recurrence (Mamba paper, Sec. 3.2, Alg. 2).

For every batch row b and channel d, with a state h of N entries::

    Δ_t  = softplus(delta[b, d, t] + delta_bias[d])          (softplus only if delta_softplus)
    h_t  = exp(Δ_t A[d, :]) * h_{t-1} + Δ_t B[b, :, t] u[b, d, t]
    y_t  = <C[b, :, t], h_t> + D[d] u[b, d, t]
    out  = y_t * silu(z[b, d, t])                            (only if z is given)

``A`` is the (negative) diagonal state matrix, ``A = -exp(A_log)``; B and C are shared by all
channels of a row (one N-vector per position). ``h_{-1}`` is ``initial_state`` (zeros when None).

Shapes (glossary in ``mamba_eval.kernels``; D = scanned channels = d_inner):
    u, delta, z [B, D, L]; A [D, N]; B, C [B, N, L]; D, delta_bias [D]; state [B, D, N].

All arithmetic is fp32 (Δ + bias and softplus included; softplus uses torch's threshold 20);
``y`` is returned in ``u.dtype``, the state in fp32. ``selective_state_update_ref`` advances
``state`` by one position IN PLACE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _discretise_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, softplus: bool) -> torch.Tensor:
    """Δ in fp32: ``dt + dt_bias`` (bias broadcast over the leading dims), then softplus."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    return F.softplus(dt) if softplus else dt


def selective_scan_ref(
    u: torch.Tensor,  # [B, D, L]
    delta: torch.Tensor,  # [B, D, L]
    A: torch.Tensor,  # [D, N]
    B: torch.Tensor,  # [B, N, L]
    C: torch.Tensor,  # [B, N, L]
    D: torch.Tensor | None = None,  # [D]
    z: torch.Tensor | None = None,  # [B, D, L]
    delta_bias: torch.Tensor | None = None,  # [D]
    delta_softplus: bool = True,
    initial_state: torch.Tensor | None = None,  # [B, D, N]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan the whole sequence; returns ``(y [B, D, L] in u.dtype, final_state [B, D, N] fp32)``."""
    batch, channels, length = u.shape
    d_state = A.shape[-1]
    if A.shape != (channels, d_state):
        raise ValueError(f"A must be [D={channels}, N], got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, d_state, length):
            raise ValueError(f"{name} must be [B, N, L] = {(batch, d_state, length)}, got {tuple(t.shape)}")
    if initial_state is not None and initial_state.shape != (batch, channels, d_state):
        raise ValueError(
            f"initial_state must be [B, D, N] = {(batch, channels, d_state)}, got {tuple(initial_state.shape)}"
        )

    # Δ with its bias, in fp32: [B, D, L]; the bias broadcasts over L.
    dt = _discretise_dt(delta.transpose(1, 2), delta_bias, delta_softplus).transpose(1, 2)
    A, B, C, uf = A.float(), B.float(), C.float(), u.float()
    if initial_state is None:
        h = u.new_zeros(batch, channels, d_state, dtype=torch.float32)  # [B, D, N]
    else:
        h = initial_state.float().clone()
    ys = []
    for t in range(length):
        dt_t = dt[:, :, t, None]  # [B, D, 1]
        h = torch.exp(dt_t * A) * h + (dt_t * uf[:, :, t, None]) * B[:, None, :, t]  # [B, D, N]
        ys.append((h * C[:, None, :, t]).sum(-1))  # [B, D]
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(batch, channels, 0)  # [B, D, L]
    if D is not None:
        y = y + D.float()[:, None] * uf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), h


def selective_state_update_ref(
    state: torch.Tensor,  # [B, D, N] fp32, updated in place
    x: torch.Tensor,  # [B, D]
    dt: torch.Tensor,  # [B, D]
    A: torch.Tensor,  # [D, N]
    B: torch.Tensor,  # [B, N]
    C: torch.Tensor,  # [B, N]
    D: torch.Tensor | None = None,  # [D]
    z: torch.Tensor | None = None,  # [B, D]
    dt_bias: torch.Tensor | None = None,  # [D]
    dt_softplus: bool = True,
) -> torch.Tensor:
    """Advance the recurrence by one position: updates ``state`` IN PLACE, returns ``y [B, D]`` in x.dtype."""
    if state.shape != (*x.shape, A.shape[-1]):
        raise ValueError(f"state must be [B, D, N] = {(*x.shape, A.shape[-1])}, got {tuple(state.shape)}")
    dt = _discretise_dt(dt, dt_bias, dt_softplus)[..., None]  # [B, D, 1]
    xf = x.float()
    h = torch.exp(dt * A.float()) * state.float() + (dt * xf[..., None]) * B.float()[:, None, :]
    state.copy_(h)
    y = (h * C.float()[:, None, :]).sum(-1)
    if D is not None:
        y = y + D.float() * xf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)
