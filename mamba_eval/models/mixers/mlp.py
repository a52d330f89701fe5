"""A block whose only sublayer is a plain MLP (``MLPMixerConfig``: Nemotron-H's "-" layers), with
the mixer interface so that it takes a mixer's place; it has no state (``NoState``).

Parameters::

    fc1   [d_intermediate, D] (bias optional)
    fc2   [D, d_intermediate] (bias optional)

``fc2(relu(fc1(x))^2)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamba_eval.models.config import MLPMixerConfig
from mamba_eval.models.ops import Ops
from mamba_eval.models.state import NoState


class MLPMixer(nn.Module):
    supports_lengths = True
    state_grows = False
    state_type = NoState

    def __init__(self, cfg: MLPMixerConfig, d_model: int, ops: Ops, **factory):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.fc1 = nn.Linear(d_model, cfg.d_intermediate, bias=cfg.bias, **factory)
        self.fc2 = nn.Linear(cfg.d_intermediate, d_model, bias=cfg.bias, **factory)

    def init_parameters(self):
        pass  # nn.Linear's own initialisation

    def zero_state(self, batch_size: int, *, capacity, dtype, state_dtype, device) -> NoState:
        return NoState(batch_size)

    def state_bytes(self, elem: int) -> int:
        return 0

    def kv_bytes(self, elem: int) -> int:
        return 0

    def activation_bytes(self) -> int:
        return 4 * 2 * self.cfg.d_intermediate

    def _mlp(self, h, linear):
        return linear(torch.square(F.relu(linear(h, self.fc1.weight, self.fc1.bias))), self.fc2.weight, self.fc2.bias)

    def forward(self, h, state=None, lengths=None, padded=None):
        return self._mlp(h, self.ops.linear), NoState(h.shape[0])

    def step(self, h, state):
        return self._mlp(h, self.ops.step_linear)
