"""transformers' Mamba hybrid families: their ``config.json`` as a ``ModelConfig`` of blocks, and
their weight names as ours. ``mamba_eval.models.formats`` dispatches here by ``model_type``.

The families, one module each: ``bamba`` (Bamba), ``granite`` (Granite 4.0-H), ``nemotron_h``
(Nemotron-H), ``falcon_h1`` (Falcon-H1), ``jamba`` (Jamba), ``zamba2`` (Zamba2); their docstrings
say what is read and how the weights map. ``common`` holds the weight map
(:class:`~common.WeightMap`: renames, fused parts, stacked experts, swapped halves, folded
multipliers, aliases) and the rotary fields.

Each family is a reader of its config (known fields read, fields of training or of the runtime
ignored, anything else refused with one line naming it) and a table of weight names
(``common.WeightMap``).
"""

from __future__ import annotations

from mamba_eval.models.hf_hybrids.bamba import BAMBA_WEIGHTS, bamba_config
from mamba_eval.models.hf_hybrids.falcon_h1 import falcon_h1_config, falcon_h1_weights
from mamba_eval.models.hf_hybrids.granite import granite_config, granite_weights
from mamba_eval.models.hf_hybrids.jamba import JAMBA_WEIGHTS, jamba_config
from mamba_eval.models.hf_hybrids.nemotron_h import NEMOTRON_WEIGHTS, nemotron_h_config
from mamba_eval.models.hf_hybrids.zamba2 import zamba2_config, zamba2_weights

#: model_type -> (config reader, the weight map of a config and its raw config.json)
FAMILIES = {
    "bamba": (bamba_config, lambda config, raw: BAMBA_WEIGHTS),
    "granitemoehybrid": (granite_config, lambda config, raw: granite_weights(config)),
    "nemotron_h": (nemotron_h_config, lambda config, raw: NEMOTRON_WEIGHTS),
    "falcon_h1": (falcon_h1_config, falcon_h1_weights),
    "jamba": (jamba_config, lambda config, raw: JAMBA_WEIGHTS),
    "zamba2": (zamba2_config, lambda config, raw: zamba2_weights(config)),
}
