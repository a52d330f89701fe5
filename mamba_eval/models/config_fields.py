"""Reading a checkpoint's config fields with errors that name the file and the field; shared by
the checkpoint dialects (``mamba_eval.models.formats`` and ``mamba_eval.models.hf_hybrids``)."""

from __future__ import annotations

import math
from pathlib import Path

from mamba_eval.errors import MambaEvalError


class CheckpointError(MambaEvalError):
    """A checkpoint cannot be used; the message (one line) names the path and the problem."""


class Fields:
    """Reads fields of one config dict, naming the file and the field in every error."""

    def __init__(self, raw: dict, where: Path, prefix: str = ""):
        self.raw, self.where, self.prefix = raw, where, prefix

    def fail(self, key, msg):
        raise CheckpointError(f"{self.where}: field {self.prefix + key!r} {msg}")

    def get(self, key, default=None, *, required=False):
        if key not in self.raw or self.raw[key] is None:
            if required:
                self.fail(key, "is required but missing")
            return default
        return self.raw[key]

    def int(self, key, default=None, *, required=False) -> int:
        value = self.get(key, default, required=required)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(key, f"must be an integer, got {value!r}")
        return value

    def bool(self, key, default) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}")
        return value

    def float(self, key, default) -> float:
        value = self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.fail(key, f"must be a number, got {value!r}")
        return float(value)

    def unsupported_unless(self, key, ok, what: str):
        if key in self.raw and not ok(self.raw[key]):
            self.fail(key, f"= {self.raw[key]!r} ({what}) is not supported yet")


def as_float(value) -> float | None:
    """A JSON number, or transformers' encoding of non-finite floats ({"__float__": "Infinity"})."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def is_default_dt_limit(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and [as_float(v) for v in value] == [0.0, math.inf]


def generic_config_keys() -> set:
    """What transformers' ``PretrainedConfig`` writes into every config.json (architectures,
    torch_dtype, transformers_version, generation defaults, ...), taken from the installed version."""
    from transformers import PretrainedConfig

    return set(PretrainedConfig().to_dict()) | {"architectures", "model_type", "transformers_version", "torch_dtype",
                                                 "dtype", "_name_or_path", "auto_map"}
