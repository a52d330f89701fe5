"""Per-layer sequence state: what a layer carries from one position to the next.

A model's state is a list with one object per layer (:data:`ModelState`). Every kind of state
offers the same methods, so the scoring engine forks states and the decoder keeps them in
preallocated buffers without knowing which mixer made them:

==================  ==========================================================================
``batch_size``      rows (sequences) held
``index_select``    a new state of the given rows, repeats allowed: this is how to fork
``clone``           a copy
``copy_``           overwrite in place from another state of the same shape (storage kept, so
                    a captured CUDA graph keeps seeing it)
``rows(n)``         the ``n`` leading rows as views: steps on the view update this state
``zero_``           back to the state before any token, in place
==================  ==========================================================================

:class:`SSMState` is the state of the Mamba-1 and Mamba-2 mixers (conv window and SSM state),
:class:`Mamba3State` that of the Mamba-3 mixer (angles, SSM state, previous key and input);
``mixers.attention.AttnState`` is the key/value cache of an attention layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SSMState:
    """The recurrent state of one Mamba layer for a batch of sequences.

    ``conv``: the last K-1 inputs of the causal conv, ``[B, conv_dim, d_conv - 1]``, model dtype.
    ``ssm``: the SSM state, fp32 unless allocated otherwise; Mamba-1 ``[B, d_inner, d_state]``,
    Mamba-2 ``[B, nheads, headdim, d_state]``.
    """

    conv: torch.Tensor
    ssm: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.conv.shape[0]

    def index_select(self, idx: torch.Tensor | list[int]) -> SSMState:
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.conv.device)
        return SSMState(self.conv.index_select(0, idx), self.ssm.index_select(0, idx))

    def clone(self) -> SSMState:
        return SSMState(self.conv.clone(), self.ssm.clone())

    def copy_(self, other: SSMState) -> SSMState:
        self.conv.copy_(other.conv)
        self.ssm.copy_(other.ssm)
        return self

    def rows(self, n: int) -> SSMState:
        return SSMState(self.conv[:n], self.ssm[:n])

    def zero_(self) -> SSMState:
        self.conv.zero_()
        self.ssm.zero_()
        return self


@dataclass
class Mamba3State:
    """The recurrent state of one Mamba-3 layer for a batch of sequences (``kernels/mamba3.py``).

    ``angle``: the cumulative rotary angles θ ``[B, nheads, n_angles]``, fp32, in [0, 2π).
    ``ssm``: the SSM state ``[B, nheads, headdim, d_state]``, fp32 unless allocated otherwise.
    ``k``: the previous position's rotated keys (B + bias) ``[B, rank, nheads, d_state]``, fp32.
    ``v``: the previous position's input x ``[B, nheads, headdim]``, model dtype.
    ``k`` and ``v`` carry the trapezoid's share of the previous position into the next one.
    """

    angle: torch.Tensor
    ssm: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    def _parts(self):
        return (self.angle, self.ssm, self.k, self.v)

    @property
    def batch_size(self) -> int:
        return self.ssm.shape[0]

    def index_select(self, idx: torch.Tensor | list[int]) -> Mamba3State:
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.ssm.device)
        return Mamba3State(*(t.index_select(0, idx) for t in self._parts()))

    def clone(self) -> Mamba3State:
        return Mamba3State(*(t.clone() for t in self._parts()))

    def copy_(self, other: Mamba3State) -> Mamba3State:
        for mine, theirs in zip(self._parts(), other._parts()):
            mine.copy_(theirs)
        return self

    def rows(self, n: int) -> Mamba3State:
        return Mamba3State(*(t[:n] for t in self._parts()))

    def zero_(self) -> Mamba3State:
        for t in self._parts():
            t.zero_()
        return self


@dataclass
class NoState:
    """The state of a layer that carries nothing from one position to the next (an MLP block):
    only its batch size, so that forking and the decoder's buffers treat it like any state."""

    batch: int

    @property
    def batch_size(self) -> int:
        return self.batch

    def index_select(self, idx) -> NoState:
        return NoState(len(idx))

    def clone(self) -> NoState:
        return NoState(self.batch)

    def copy_(self, other: NoState) -> NoState:
        return self

    def rows(self, n: int) -> NoState:
        return NoState(n)

    def zero_(self) -> NoState:
        return self


#: One state per layer, each an :class:`SSMState`, a :class:`Mamba3State`, a ``mixers.attention.AttnState`` or a
#: :class:`NoState`.
ModelState = list
