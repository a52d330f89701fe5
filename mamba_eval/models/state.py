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

:class:`SSMState` is the state of both Mamba mixers (conv window and SSM state);
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


#: One state per layer, each an :class:`SSMState` or a ``mixers.attention.AttnState``.
ModelState = list
