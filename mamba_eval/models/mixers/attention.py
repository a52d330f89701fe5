"""Causal multi-head attention as mamba_ssm's ``MHA`` builds it, forward and one-token step.

mamba_ssm's ``MixerModel`` builds the layers listed in ``attn_layer_idx`` with its ``MHA`` module
instead of a Mamba mixer. Parameter names are mamba_ssm's, so its checkpoints load as they are::

    mixer.in_proj    [qkv_dim + mlp_dim, D]   rows [q (H x P); k (Hkv x P); v (Hkv x P); up; gate]
    mixer.conv1d     [qkv_dim, 1, K], bias     optional depthwise causal conv over q/k/v (no activation)
    mixer.out_proj   [D, H x P + mlp_dim / 2]  over [attention output; up * silu(gate)]

Attention (H query heads, Hkv key/value heads, head size P; query head h reads key/value head
``h // (H / Hkv)``) is ``softmax(q k^T * scale + causal mask) v`` by PyTorch's
``scaled_dot_product_attention`` (flash / memory-efficient kernels on a GPU, nothing to compile).
Rotary embeddings (Su et al. 2021) rotate the first ``rotary_emb_dim`` channels of every q and
k head by the angle ``position * base^(-2i / rotary_emb_dim)`` for pair i; pairs are the two halves
of those channels (GPT-NeoX) or even/odd neighbours (``rotary_emb_interleaved``, GPT-J). As in the
flash-attn tables mamba_ssm uses, the angles are fp32 and cos/sin are rounded to the model dtype
before the rotation, which is computed in fp32.

The state of an attention layer is its key/value cache, :class:`AttnState`, with the methods of
every layer state (``mamba_eval.models.state``), so the scoring engine forks it like a recurrent
state and the decoder keeps it in preallocated buffers. Unlike a recurrent state it grows: a
forward returns a cache holding every position seen so far; :meth:`Attention.step` writes one
position into a preallocated cache and reads the fill level from a device tensor, so a decoding
step has no host synchronisation and fixed shapes (it can be captured in a CUDA graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mamba_eval.models.config import AttnConfig
from mamba_eval.models.ops import Ops


@dataclass
class AttnState:
    """The key/value cache of one attention layer for a batch of sequences of equal length.

    ``k``, ``v``: ``[B, Hkv, T, P]`` in the model dtype, rotary embedding applied to ``k``; the
    first ``length`` of the T positions are filled (T > length only in a preallocated cache).
    ``length``: int64 ``[1]`` on the device, the same for every row. ``conv``: the last K-1 inputs
    of the q/k/v conv, ``[B, qkv_dim, K-1]``, or None when the layer has no conv.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: torch.Tensor
    conv: torch.Tensor | None = None

    @classmethod
    def zeros(cls, batch_size: int, attn: AttnConfig, capacity: int, *, dtype, device) -> AttnState:
        """An empty cache with room for ``capacity`` positions (zeros, so that masked reads stay finite)."""
        if capacity < 1:
            raise ValueError(f"a key/value cache needs room for at least one position, got capacity {capacity}")
        shape = (batch_size, attn.num_heads_kv, capacity, attn.head_dim)
        conv = None
        if attn.d_conv > 0:
            conv = torch.zeros(batch_size, attn.qkv_dim, attn.d_conv - 1, dtype=dtype, device=device)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(1, dtype=torch.long, device=device),
            conv,
        )

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def filled(self) -> int:
        """Positions held (reads ``length`` back to the host: a synchronisation on a GPU)."""
        return int(self.length.item())

    def index_select(self, idx: torch.Tensor | list[int]) -> AttnState:
        """A new state holding rows ``idx`` of the batch (repeats allowed: this is how to fork)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.k.device)
        conv = None if self.conv is None else self.conv.index_select(0, idx)
        return AttnState(self.k.index_select(0, idx), self.v.index_select(0, idx), self.length.clone(), conv)

    def clone(self) -> AttnState:
        conv = None if self.conv is None else self.conv.clone()
        return AttnState(self.k.clone(), self.v.clone(), self.length.clone(), conv)

    def copy_(self, other: AttnState) -> AttnState:
        """Overwrite this cache in place with ``other``'s filled positions (storage kept, e.g. for
        CUDA graphs); ``other`` may have less room than this one, not more positions."""
        if not isinstance(other, AttnState):
            raise ValueError(f"cannot copy a {type(other).__name__} into an attention layer's AttnState")
        if other.batch_size != self.batch_size or other.k.shape[1::2] != self.k.shape[1::2]:
            raise ValueError(
                f"AttnState.copy_: cache {tuple(other.k.shape)} does not match {tuple(self.k.shape)} (B, Hkv, P)"
            )
        n = other.filled()
        if n > self.capacity:
            raise ValueError(f"AttnState.copy_: {n} cached positions do not fit a cache of {self.capacity}")
        self.k[:, :, :n].copy_(other.k[:, :, :n])
        self.v[:, :, :n].copy_(other.v[:, :, :n])
        self.length.copy_(other.length)
        if self.conv is not None:
            self.conv.copy_(other.conv)
        return self

    def rows(self, n: int) -> AttnState:
        """The ``n`` leading rows as views (same storage, same ``length`` tensor): steps on the view
        update this state."""
        conv = None if self.conv is None else self.conv[:n]
        return AttnState(self.k[:n], self.v[:n], self.length, conv)

    def zero_(self) -> AttnState:
        """Empty the cache in place."""
        self.k.zero_()
        self.v.zero_()
        self.length.zero_()
        if self.conv is not None:
            self.conv.zero_()
        return self


def attn_zero_state(cfg: AttnConfig, batch_size: int, capacity: int | None, *, dtype, device) -> AttnState:
    """An empty cache of an attention layer for ``capacity`` positions (required)."""
    if capacity is None or capacity < 1:
        raise ValueError(
            f"this model has attention layers: a state for decoding needs the number of positions their "
            f"key/value caches must hold (got {capacity!r})"
        )
    return AttnState.zeros(batch_size, cfg, capacity, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Rotary embedding


def rotary_cos_sin(positions: torch.Tensor, dim: int, base: float, dtype: torch.dtype):
    """``cos, sin [..., dim / 2]`` of the angles ``position * base^(-2i / dim)``: fp32 angles,
    values rounded to ``dtype`` (the tables mamba_ssm's flash-attn rotary embedding uses)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` channels of ``x [B, L, heads, P]`` (cos, sin
    ``[L, dim / 2]``), in fp32; the other channels pass through. Returns x's dtype."""
    half = cos.shape[-1]
    rot = x[..., : 2 * half].float()
    c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)  # [L, 1, half]: broadcast over heads
    if interleaved:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
    else:
        x0, x1 = rot[..., :half], rot[..., half:]
    o0, o1 = x0 * c - x1 * s, x0 * s + x1 * c
    out = torch.stack((o0, o1), dim=-1).flatten(-2) if interleaved else torch.cat((o0, o1), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., 2 * half:]), dim=-1)


# ---------------------------------------------------------------------------------------------
# Modules


class Attention(nn.Module):
    """Causal multi-head attention as mamba_ssm's ``MHA`` (module docstring); forward only.

    ``forward(h, state)`` runs a sequence after the cached positions of ``state`` (which it does
    not modify) and returns the cache of all positions; ``step(h, state)`` appends one position to a
    preallocated cache IN PLACE.
    """

    #: Rows of different lengths cannot share a forward: the cache would hold the padding.
    supports_lengths = False
    #: The key/value cache grows with the sequence: a decode cache is allocated for a capacity.
    state_grows = True
    state_type = AttnState

    def __init__(self, cfg: AttnConfig, d_model: int, ops: Ops, d_out: int | None = None, **factory):
        """``d_out``: the width of the output when it is not that of the input (Zamba2's shared
        blocks read 2 D channels and return D)."""
        super().__init__()
        a = self.cfg = cfg
        self.ops = ops
        self.in_proj = nn.Linear(d_model, a.qkv_dim + a.mlp_dim, bias=a.qkv_proj_bias, **factory)
        self.conv1d = None
        if a.d_conv > 0:
            self.conv1d = nn.Conv1d(a.qkv_dim, a.qkv_dim, a.d_conv, groups=a.qkv_dim, padding=a.d_conv - 1,
                                    bias=True, **factory)
        self.out_proj = nn.Linear(a.out_dim + a.mlp_dim // 2, d_out or d_model, bias=a.out_proj_bias, **factory)

    def init_parameters(self):
        """Nothing beyond the linear layers' defaults."""

    def zero_state(self, batch_size: int, *, capacity: int | None, dtype, state_dtype, device) -> AttnState:
        """An empty cache for ``capacity`` positions (required)."""
        return attn_zero_state(self.cfg, batch_size, capacity, dtype=dtype, device=device)

    def state_bytes(self, elem: int) -> int:
        """One sequence's state apart from its keys and values: the q/k/v conv window."""
        return self.cfg.qkv_dim * max(self.cfg.d_conv - 1, 0) * elem

    def kv_bytes(self, elem: int) -> int:
        """Bytes the cache grows by per position of a sequence."""
        return 2 * self.cfg.num_heads_kv * self.cfg.head_dim * elem

    def activation_bytes(self) -> int:
        """Temporaries per token of a forward: projections and attention output at fp32 width."""
        a = self.cfg
        return 4 * (2 * (a.qkv_dim + a.mlp_dim) + 2 * a.out_dim)

    def _project(self, h: torch.Tensor, linear, adapter=None):
        """in_proj, split into q/k/v channels and the parallel MLP's output (or None); ``adapter(h,
        linear)``, when given, is added to the q/k/v channels."""
        a = self.cfg
        proj = linear(h, self.in_proj.weight, self.in_proj.bias)
        if adapter is not None:
            proj = proj + adapter(h, linear)
        if a.mlp_dim == 0:
            return proj, None
        qkv, mlp = proj.split([a.qkv_dim, a.mlp_dim], dim=-1)
        up, gate = mlp.chunk(2, dim=-1)
        return qkv, up * F.silu(gate)

    def _split_heads(self, qkv: torch.Tensor):
        """[..., qkv_dim] -> q [..., H, P], k [..., Hkv, P], v [..., Hkv, P]."""
        a = self.cfg
        kv = a.num_heads_kv * a.head_dim
        q, k, v = qkv.split([a.out_dim, kv, kv], dim=-1)
        return (q.unflatten(-1, (a.num_heads, a.head_dim)), k.unflatten(-1, (a.num_heads_kv, a.head_dim)),
                v.unflatten(-1, (a.num_heads_kv, a.head_dim)))

    def _rotate(self, q, k, positions):
        """q, k [B, L, heads, P]; positions [L]."""
        a = self.cfg
        if a.rotary_emb_dim == 0:
            return q, k
        cos, sin = rotary_cos_sin(positions, a.rotary_emb_dim, a.rotary_emb_base, q.dtype)
        return (apply_rotary(q, cos, sin, a.rotary_emb_interleaved),
                apply_rotary(k, cos, sin, a.rotary_emb_interleaved))

    def _attend(self, q, k, v, mask):
        """q [B, H, Lq, P], k/v [B, Hkv, Lk, P]; ``mask`` None means causal with Lq == Lk."""
        a = self.cfg
        groups = a.num_heads // a.num_heads_kv
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=a.scale)

    def _out(self, ctx: torch.Tensor, mlp: torch.Tensor | None, linear) -> torch.Tensor:
        if mlp is not None:
            ctx = torch.cat([ctx, mlp], dim=-1)
        return linear(ctx, self.out_proj.weight, self.out_proj.bias)

    def forward(self, h: torch.Tensor, state: AttnState | None = None, lengths=None, padded=None, adapter=None
                ) -> tuple[torch.Tensor, AttnState]:
        """h [B, L, D] -> (out [B, L, D], cache of the ``state``'s positions and these L). Rows of
        one length only (``lengths`` must be None: :attr:`supports_lengths`). ``adapter(h, linear)``
        (optional): added to the q/k/v projection (a shared block's per-use low-rank adapters)."""
        if lengths is not None:
            raise ValueError("an attention layer cannot take rows of different lengths: its cache would hold "
                             "the padding")
        batch, length, _ = h.shape
        qkv, mlp = self._project(h, self.ops.linear, adapter)
        conv_state = None
        if self.conv1d is not None:
            y, conv_state = self.ops.causal_conv1d(
                qkv.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                initial_state=None if state is None else state.conv, activation=None,
            )
            qkv = y.transpose(1, 2)
        q, k, v = self._split_heads(qkv)
        offset = 0 if state is None else state.filled()
        q, k = self._rotate(q, k, torch.arange(offset, offset + length, device=h.device))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, L, P]
        if offset > 0:
            k = torch.cat([state.k[:, :, :offset], k], dim=2)
            v = torch.cat([state.v[:, :, :offset], v], dim=2)
            # Imported here: torch.nn.attention.bias imports torch._dynamo, seconds of start-up
            # that a model without a cached prefix never needs.
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(length, offset + length)  # query i sees keys 0 .. offset + i
        else:
            k, v = k.contiguous(), v.contiguous()
            mask = None
        ctx = self._attend(q, k, v, mask).transpose(1, 2).reshape(batch, length, -1)
        filled = torch.full((1,), offset + length, dtype=torch.long, device=h.device)
        return self._out(ctx, mlp, self.ops.linear), AttnState(k, v, filled, conv_state)

    def step(self, h: torch.Tensor, state: AttnState, adapter=None) -> torch.Tensor:
        """h [B, D] -> out [B, D]: writes the position ``state.length`` of the cache and advances
        ``state.length``, IN PLACE; attends over the filled positions by a mask over the whole
        cache (fixed shapes, no host synchronisation). ``adapter`` as in :meth:`forward`."""
        qkv, mlp = self._project(h, self.ops.step_linear, adapter)
        if self.conv1d is not None:
            qkv = self.ops.causal_conv1d_update(qkv, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                                None)
        q, k, v = self._split_heads(qkv.unsqueeze(1))  # [B, 1, heads, P]
        pos = state.length
        if h.device.type == "cpu" and int(pos) >= state.capacity:  # (free on the CPU; a GPU would have to sync)
            raise ValueError(f"the key/value cache is full ({state.capacity} positions): allocate a larger one")
        q, k = self._rotate(q, k, pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, 1, P]
        state.k.index_copy_(2, pos, k.to(state.k.dtype))
        state.v.index_copy_(2, pos, v.to(state.v.dtype))
        seen = torch.arange(state.capacity, device=h.device) <= pos  # [T]: the filled positions and this one
        ctx = self._attend(q, state.k, state.v, seen.view(1, 1, 1, -1))
        state.length.add_(1)
        return self._out(ctx.flatten(1), mlp, self.ops.step_linear)
