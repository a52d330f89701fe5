"""The package's one dtype parser: ``--model_args dtype`` and ``decode_state_dtype``, and a
checkpoint's ``torch_dtype`` field, all read through :func:`parse_dtype`.

It accepts what lm-eval's ``hf`` model accepts for its ``dtype`` (``auto``, a torch dtype name
with or without ``torch.``, a ``torch.dtype``) among the dtypes the model runs in, plus the usual
short names: ``float32``/``float``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``/``half``.
"""

from __future__ import annotations

import torch

from mamba_eval.errors import MambaEvalError

#: Every accepted name (lower case, without ``torch.``) and its dtype.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

#: ``"auto"``: the checkpoint's own dtype (for ``decode_state_dtype``: the model's dtype).
AUTO = "auto"


def parse_dtype(value, name: str = "dtype") -> torch.dtype | str:
    """``"auto"`` or a torch floating dtype the model runs in, from a name (any case, with or
    without ``torch.``) or a ``torch.dtype``. Anything else raises ``MambaEvalError`` with one
    message that names the setting (``name``), the value and the canonical choices."""
    if isinstance(value, torch.dtype):
        if value in DTYPE_NAMES.values():
            return value
    elif isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key == AUTO:
            return AUTO
        if key in DTYPE_NAMES:
            return DTYPE_NAMES[key]
    raise MambaEvalError(f"{name}={value!r} is not one of {AUTO}, float32, bfloat16, float16")
