"""Mamba-2 SSD scan: a selective SSM whose A is one scalar per head (Dao & Gu 2024, Sec. 6-7, Listing 1).

For every batch row b and head h, with a state of P x N entries, and group g = h // (H / G)::

    Δ_t  = softplus(dt[b, t, h] + dt_bias[h])                (softplus only if dt_softplus)
    S_t  = exp(Δ_t A[h]) S_{t-1} + Δ_t x[b, t, h, :] ⊗ B[b, t, g, :]        S_t: [P, N]
    y_t  = S_t C[b, t, g, :] + D[h] x[b, t, h, :]

``S_{-1}`` is ``initial_state`` (zeros when None). Because the decay ``exp(Δ_t A[h])`` is a scalar,
the map x -> y is a masked, attention-like matrix ("state space duality"), and the paper computes
it chunk by chunk (``ssd_scan_ref``): inside each chunk of C positions the quadratic form
(diagonal blocks), between chunks a short recurrence over the chunk states (off-diagonal
blocks). ``ssd_recurrent_ref`` is the plain loop over positions, kept as a test oracle.

Shapes (glossary in ``mamba_eval.kernels``):
    x [B, L, H, P]; dt [B, L, H]; A, D, dt_bias [H]; B, C [B, L, G, N]; state [B, H, P, N].

All arithmetic is fp32 (Δ + bias and softplus included); ``y`` is returned in ``x.dtype``, the
state in fp32. No Δ clamping (mamba_ssm's default ``dt_limit=(0, inf)``). ``ssd_state_update_ref``
advances ``state`` by one position IN PLACE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .selective_scan import _discretise_dt


def _check_shapes(x, dt, A, B, C, initial_state):
    batch, length, nheads, headdim = x.shape
    ngroups, d_state = B.shape[-2:]
    if dt.shape != (batch, length, nheads):
        raise ValueError(f"dt must be [B, L, H] = {(batch, length, nheads)}, got {tuple(dt.shape)}")
    if A.shape != (nheads,):
        raise ValueError(f"A must be [H] = ({nheads},), got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, length, ngroups, d_state):
            raise ValueError(f"{name} must be [B, L, G, N] = {(batch, length, ngroups, d_state)}, got {tuple(t.shape)}")
    if nheads % ngroups != 0:
        raise ValueError(f"the number of heads H={nheads} must be a multiple of the number of groups G={ngroups}")
    if initial_state is not None and initial_state.shape != (batch, nheads, headdim, d_state):
        raise ValueError(
            f"initial_state must be [B, H, P, N] = {(batch, nheads, headdim, d_state)}, "
            f"got {tuple(initial_state.shape)}"
        )


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for j <= i (0 on the diagonal), -inf above it.

    ``exp(_segsum(a))`` is the lower-triangular matrix of decays from position j to position i.
    Built from masked cumulative sums rather than differences of one cumsum, which would cancel
    catastrophically for long chunks.
    """
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)  # [..., T(i), T(j)] holding a[i]
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    seg = torch.cumsum(a.masked_fill(~below, 0), dim=-2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return seg.masked_fill(~causal, -torch.inf)


def ssd_scan_ref(
    x: torch.Tensor,  # [B, L, H, P]
    dt: torch.Tensor,  # [B, L, H]
    A: torch.Tensor,  # [H]
    B: torch.Tensor,  # [B, L, G, N]
    C: torch.Tensor,  # [B, L, G, N]
    chunk_size: int,
    D: torch.Tensor | None = None,  # [H]
    dt_bias: torch.Tensor | None = None,  # [H]
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,  # [B, H, P, N]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD algorithm (the paper's Listing 1, vectorised over chunks).

    Returns ``(y [B, L, H, P] in x.dtype, final_state [B, H, P, N] fp32)``. L need not be a multiple
    of ``chunk_size``: the tail is padded with Δ = 0 (decay 1, no input), which leaves the state
    unchanged, and the padded outputs are dropped.
    """
    _check_shapes(x, dt, A, B, C, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, length, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]

    dt = _discretise_dt(dt, dt_bias, dt_softplus)  # Δ [B, L, H] fp32
    xf = x.float()
    X = xf * dt[..., None]  # Δ x                                  [B, L, H, P]
    a = A.float() * dt  # log of the per-step decay, Δ A         [B, L, H]
    Bh = B.float().repeat_interleave(heads_per_group, dim=2)  # [B, L, H, N]
    Ch = C.float().repeat_interleave(heads_per_group, dim=2)  # [B, L, H, N]

    pad = (-length) % chunk_size
    if pad:
        X, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, Bh, Ch))
        a = F.pad(a, (0, 0, 0, pad))
    nchunks = (length + pad) // chunk_size
    # Split the time axis into (chunk c, position l) and put heads before chunks for the decays.
    X = X.reshape(batch, nchunks, chunk_size, nheads, headdim)  # [b, c, l, h, p]
    Bh = Bh.reshape(batch, nchunks, chunk_size, nheads, -1)  # [b, c, l, h, n]
    Ch = Ch.reshape(batch, nchunks, chunk_size, nheads, -1)  # [b, c, l, h, n]
    a = a.reshape(batch, nchunks, chunk_size, nheads).permute(0, 3, 1, 2)  # [b, h, c, l]
    a_cumsum = torch.cumsum(a, dim=-1)  # [b, h, c, l]

    # 1. Diagonal blocks: within a chunk, y = (C B^T ∘ decay mask) X, the "attention" form.
    decay = torch.exp(_segsum(a))  # [b, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bhcls", Ch, Bh) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, X)

    # 2. State of each chunk on its own (as if it started from zero), at the chunk's end.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # [b, h, c, l]
    chunk_states = torch.einsum("bclhn,bclhp->bchpn", Bh * decay_to_end.permute(0, 2, 3, 1)[..., None], X)

    # 3. Recurrence over chunks: the true state entering each chunk (plus the final state).
    if initial_state is None:
        initial_state = chunk_states.new_zeros(batch, nheads, headdim, chunk_states.shape[-1])
    chunk_states = torch.cat([initial_state.float()[:, None], chunk_states], dim=1)  # [b, c+1, h, p, n]
    chunk_decay = torch.exp(_segsum(F.pad(a_cumsum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, chunk_states)
    states, final_state = states[:, :-1], states[:, -1].clone()  # [b, c, h, p, n], [b, h, p, n]

    # 4. Off-diagonal blocks: each position reads the state entering its chunk, decayed to it.
    decay_from_start = torch.exp(a_cumsum).permute(0, 2, 3, 1)[..., None]  # [b, c, l, h, 1]
    y_off = torch.einsum("bclhn,bchpn->bclhp", Ch, states) * decay_from_start

    y = (y_diag + y_off).reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :length]
    if D is not None:
        y = y + D.float()[:, None] * xf
    return y.to(x.dtype), final_state


def ssd_recurrent_ref(
    x: torch.Tensor,  # [B, L, H, P]
    dt: torch.Tensor,  # [B, L, H]
    A: torch.Tensor,  # [H]
    B: torch.Tensor,  # [B, L, G, N]
    C: torch.Tensor,  # [B, L, G, N]
    D: torch.Tensor | None = None,  # [H]
    dt_bias: torch.Tensor | None = None,  # [H]
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,  # [B, H, P, N]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same map as ``ssd_scan_ref`` as a sequential loop over positions (slow; a test oracle)."""
    _check_shapes(x, dt, A, B, C, initial_state)
    batch, length, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    dt = _discretise_dt(dt, dt_bias, dt_softplus)
    xf = x.float()
    Bh = B.float().repeat_interleave(heads_per_group, dim=2)
    Ch = C.float().repeat_interleave(heads_per_group, dim=2)
    if initial_state is None:
        state = xf.new_zeros(batch, nheads, headdim, B.shape[-1])
    else:
        state = initial_state.float().clone()
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A.float())[:, :, None, None]  # [B, H, 1, 1]
        inp = (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # [B, H, P, N]
        state = decay * state + inp
        ys.append((state * Ch[:, t, :, None, :]).sum(-1))  # [B, H, P]
    y = torch.stack(ys, dim=1) if ys else xf.clone()
    if D is not None:
        y = y + D.float()[:, None] * xf
    return y.to(x.dtype), state


def ssd_state_update_ref(
    state: torch.Tensor,  # [B, H, P, N] fp32, updated in place
    x: torch.Tensor,  # [B, H, P]
    dt: torch.Tensor,  # [B, H]
    A: torch.Tensor,  # [H]
    B: torch.Tensor,  # [B, G, N]
    C: torch.Tensor,  # [B, G, N]
    D: torch.Tensor | None = None,  # [H]
    dt_bias: torch.Tensor | None = None,  # [H]
    dt_softplus: bool = True,
) -> torch.Tensor:
    """Advance the recurrence by one position: updates ``state`` IN PLACE, returns ``y [B, H, P]`` in x.dtype."""
    batch, nheads, headdim = x.shape
    ngroups, d_state = B.shape[-2:]
    if state.shape != (batch, nheads, headdim, d_state):
        raise ValueError(f"state must be [B, H, P, N] = {(batch, nheads, headdim, d_state)}, got {tuple(state.shape)}")
    if nheads % ngroups != 0:
        raise ValueError(f"the number of heads H={nheads} must be a multiple of the number of groups G={ngroups}")
    dt = _discretise_dt(dt, dt_bias, dt_softplus)  # [B, H]
    xf = x.float()
    Bh = B.float().repeat_interleave(nheads // ngroups, dim=1)[:, :, None, :]  # [B, H, 1, N]
    Ch = C.float().repeat_interleave(nheads // ngroups, dim=1)[:, :, None, :]  # [B, H, 1, N]
    decay = torch.exp(dt * A.float())[:, :, None, None]  # [B, H, 1, 1]
    new_state = decay * state.float() + (dt[:, :, None] * xf)[..., None] * Bh
    state.copy_(new_state)
    y = (new_state * Ch).sum(-1)
    if D is not None:
        y = y + D.float()[:, None] * xf
    return y.to(x.dtype)
