"""Attention and a Mamba-2 SSM side by side (``ParallelConfig``: Falcon-H1's blocks): both read the
block's normed input and their outputs are summed. Parameters ``attn.*`` (the attention mixer's)
and ``ssm.*`` (the Mamba-2 mixer's); the state is a :class:`PairState` of theirs, so forking, the
decoder's buffers and CUDA graphs treat it like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mamba_eval.models.config import ParallelConfig
from mamba_eval.models.mixers.attention import Attention, AttnState
from mamba_eval.models.mixers.mamba2 import Mamba2Mixer
from mamba_eval.models.ops import Ops
from mamba_eval.models.state import SSMState


@dataclass
class PairState:
    """The attention's key/value cache and the SSM's state of one parallel layer."""

    attn: AttnState
    ssm: SSMState

    @property
    def batch_size(self) -> int:
        return self.ssm.batch_size

    def index_select(self, idx) -> PairState:
        return PairState(self.attn.index_select(idx), self.ssm.index_select(idx))

    def clone(self) -> PairState:
        return PairState(self.attn.clone(), self.ssm.clone())

    def copy_(self, other: PairState) -> PairState:
        self.attn.copy_(other.attn)
        self.ssm.copy_(other.ssm)
        return self

    def rows(self, n: int) -> PairState:
        return PairState(self.attn.rows(n), self.ssm.rows(n))

    def zero_(self) -> PairState:
        self.attn.zero_()
        self.ssm.zero_()
        return self


class ParallelMixer(nn.Module):
    supports_lengths = False  # the attention's cache would hold the padding
    state_grows = True
    state_type = PairState

    def __init__(self, cfg: ParallelConfig, d_model: int, ops: Ops, **factory):
        super().__init__()
        self.cfg = cfg
        self.attn = Attention(cfg.attn, d_model, ops, **factory)
        self.ssm = Mamba2Mixer(cfg.ssm, d_model, ops, **factory)

    def init_parameters(self):
        self.attn.init_parameters()
        self.ssm.init_parameters()

    def zero_state(self, batch_size: int, **kwargs) -> PairState:
        return PairState(self.attn.zero_state(batch_size, **kwargs), self.ssm.zero_state(batch_size, **kwargs))

    def state_bytes(self, elem: int) -> int:
        return self.attn.state_bytes(elem) + self.ssm.state_bytes(elem)

    def kv_bytes(self, elem: int) -> int:
        return self.attn.kv_bytes(elem)

    def activation_bytes(self) -> int:
        return self.attn.activation_bytes() + self.ssm.activation_bytes()

    def forward(self, h, state: PairState | None = None, lengths=None, padded=None):
        a, attn_state = self.attn(h, None if state is None else state.attn)
        m, ssm_state = self.ssm(h, None if state is None else state.ssm)
        return m + a, PairState(attn_state, ssm_state)

    def step(self, h, state: PairState):
        return self.ssm.step(h, state.ssm) + self.attn.step(h, state.attn)
