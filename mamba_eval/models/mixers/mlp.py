"""Blocks whose only sublayer is a plain MLP (``MLPMixerConfig``: Nemotron-H's "-" layers) or a
mixture of experts (``MoEMixerConfig``: its "E" layers), with the mixer interface so that they
take a mixer's place; they have no state (``NoState``).

Parameters::

    fc1   [d_intermediate, D] (bias optional)
    fc2   [D, d_intermediate] (bias optional)

``fc2(relu(fc1(x))^2)``.
"""

from __future__ import annotations

from mamba_eval.models.config import MLPMixerConfig, MoEMixerConfig
from mamba_eval.models.layers import MoE, ReluSquaredMLP
from mamba_eval.models.ops import Ops
from mamba_eval.models.state import NoState


class _Stateless:
    """The state half of the mixer interface for a sublayer that carries nothing between positions."""

    supports_lengths = True
    state_grows = False
    state_type = NoState

    def zero_state(self, batch_size: int, *, capacity, dtype, state_dtype, device) -> NoState:
        return NoState(batch_size)

    def state_bytes(self, elem: int) -> int:
        return 0

    def kv_bytes(self, elem: int) -> int:
        return 0


class MLPMixer(_Stateless, ReluSquaredMLP):
    def __init__(self, cfg: MLPMixerConfig, d_model: int, ops: Ops, **factory):
        super().__init__(d_model, cfg.d_intermediate, cfg.bias, **factory)
        self.cfg, self.ops = cfg, ops

    def init_parameters(self):
        pass  # nn.Linear's own initialisation

    def activation_bytes(self) -> int:
        return 4 * 2 * self.cfg.d_intermediate

    def forward(self, h, state=None, lengths=None, padded=None):
        return super().forward(h, self.ops.linear), NoState(h.shape[0])

    def step(self, h, state):
        return super().forward(h, self.ops.step_linear)


class MoEMixer(_Stateless, MoE):
    """``layers.MoE`` as a stateless mixer (parameters ``router``, ``router_bias``, ``fc1``, ``fc2``,
    ``shared``); on the CPU under the invariance policy every expert runs on every row (MoE's
    ``dense``)."""

    def __init__(self, cfg: MoEMixerConfig, d_model: int, ops: Ops, **factory):
        super().__init__(d_model, cfg.moe, ops, **factory)
        self.ops = ops

    def init_parameters(self):
        self.reset_parameters()

    def activation_bytes(self) -> int:
        return 4 * 3 * (self.fc1.shape[1] + (self.shared.fc1.out_features if self.shared is not None else 0))

    def forward(self, h, state=None, lengths=None, padded=None):
        return super().forward(h, self.ops.linear), NoState(h.shape[0])

    def step(self, h, state):
        return MoE.step(self, h, self.ops.step_linear)
