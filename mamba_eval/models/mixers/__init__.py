"""Sequence mixers, one module per kind, and the registry that builds them from their configs.

Every mixer is an ``nn.Module`` built as ``Mixer(cfg, d_model, ops, **factory)`` with this
interface, which is all the blocks, the model and (through the model) the engine and generation
ever use:

==========================  ===================================================================
``forward(h, state=None,    h [B, L, D] -> (out [B, L, D], final state); ``state`` is read, not
lengths=None, padded=None)``  written; ``lengths`` [B]: rows of different lengths (the final
                            state of each row after its own last token), if ``supports_lengths``
``step(h, state)``          h [B, D] -> out [B, D]; advances ``state`` in place
``zero_state(batch, *,      the state before any token (``mamba_eval.models.state``);
capacity, dtype,            ``capacity``: positions a growing state must hold
state_dtype, device)``
``init_parameters()``       random values for what ``nn.Linear``/``nn.Conv1d`` do not initialise
``supports_lengths``        whether padded rows of different lengths may share a forward
``state_grows``             whether the state grows with the sequence (a key/value cache)
``state_bytes(elem)``,      one sequence's state in bytes, and its growth per position, for
``kv_bytes(elem)``          activations of ``elem`` bytes
``activation_bytes()``      temporaries per token of a forward (the engine's memory model)
==========================  ===================================================================

A new kind of mixer is a config class in ``mamba_eval.models.config`` (with a ``kind``), a module
here, and one line in :data:`MIXERS`; the engine, generation and the lm-eval class do not change.
"""

from __future__ import annotations

from mamba_eval.models.mixers.attention import Attention
from mamba_eval.models.mixers.mamba1 import Mamba1Mixer
from mamba_eval.models.mixers.mamba2 import Mamba2Mixer
from mamba_eval.models.mixers.mamba3 import Mamba3Mixer
from mamba_eval.models.mixers.mlp import MLPMixer, MoEMixer
from mamba_eval.models.mixers.parallel import ParallelMixer

#: Mixer class of each config ``kind``.
MIXERS = {
    "mamba1": Mamba1Mixer,
    "mamba2": Mamba2Mixer,
    "mamba3": Mamba3Mixer,
    "attention": Attention,
    "mlp": MLPMixer,
    "moe": MoEMixer,
    "parallel": ParallelMixer,
}


def build_mixer(cfg, d_model: int, ops, **factory):
    """The mixer module for the mixer config ``cfg``."""
    try:
        cls = MIXERS[cfg.kind]
    except (AttributeError, KeyError):
        raise ValueError(f"no mixer for {cfg!r} (known kinds: {', '.join(MIXERS)})") from None
    return cls(cfg, d_model, ops, **factory)
