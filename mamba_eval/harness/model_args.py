"""``--model_args`` of ``--model mamba``: the accepted keys, how lm-eval's run-wide flags join
them, and the parsers of their values.

The accepted keys are the parameters of the model class's ``__init__``, read from its signature
(:func:`accepted_keys`), so the list in an error message cannot drift from the code; plus the
``hf`` keys that have no effect here (:data:`NO_EFFECT`). Every value parser raises
``ModelArgsError`` with one line that names the key and the value.
"""

from __future__ import annotations

import inspect
import logging

from mamba_eval.errors import ModelArgsError

log = logging.getLogger(__name__)

#: model_args accepted by ``hf`` that do not apply here: accepted so that scripts written for
#: ``hf`` keep working, with the reason they have no effect.
NO_EFFECT = {
    "trust_remote_code": "checkpoints are read as data; no code from them is ever executed",
    "use_fast_tokenizer": "the fast tokenizer is always used",
}

#: The settings lm-eval passes to every model beside ``--model_args`` (from ``--batch_size``,
#: ``--max_batch_size``, ``--device``, or ``simple_evaluate``'s arguments of those names).
RUN_FLAGS = ("batch_size", "max_batch_size", "device")


def accepted_keys(model_class) -> list[str]:
    """The model_args ``model_class`` accepts, sorted: its ``__init__``'s named parameters and
    :data:`NO_EFFECT`'s keys."""
    params = inspect.signature(model_class.__init__).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    return sorted(named | set(NO_EFFECT))


def check_extra_keys(model_class, extra: dict) -> None:
    """``extra``: the keys ``model_class.__init__`` took in ``**kwargs``. Those of
    :data:`NO_EFFECT` are logged; any other raises ``ModelArgsError`` naming it and the
    accepted keys."""
    unknown = sorted(key for key in extra if key not in NO_EFFECT)
    if unknown:
        raise ModelArgsError(
            f"unknown model_args key(s) for --model mamba: {', '.join(unknown)} "
            f"(accepted: {', '.join(accepted_keys(model_class))})"
        )
    for key in extra:
        log.info("model_args %s has no effect: %s", key, NO_EFFECT[key])


def merge_run_flags(model_args: dict, flags: dict | None) -> dict:
    """``model_args`` with lm-eval's run-wide settings (:data:`RUN_FLAGS`; None means not set)
    added, for lm-eval's ``create_from_arg_string``/``create_from_arg_obj``.

    lm-eval itself passes both to the constructor, so a key in both failed with Python's
    ``TypeError: got multiple values`` (as it does for ``hf``). Here the model_args value wins:
    it is the more specific setting, and lm-eval's command line passes ``--batch_size 1`` and
    ``--device cuda:0`` even when they were not typed, so the flag's value may be no choice of the
    user's. A flag that differs is logged as not used."""
    merged = dict(model_args)
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in merged:
            merged[key] = value
        elif str(merged[key]).strip() != str(value).strip():
            log.warning("model_args %s=%s is used; the run's %s=%s (lm-eval's --%s) is not",
                        key, merged[key], key, value, key)
    return merged


# -- value parsers --------------------------------------------------------------------------------

def parse_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ModelArgsError(f"{name}={value!r}: expected true or false")


def as_integer(value) -> int | None:
    """``value`` as an int when it is a whole number: an int, its text, or a float with no
    fractional part (lm-eval's parser turns ``1e3`` into 1000.0); None for anything else, bools
    included (lm-eval turns ``true`` into True, which ``int`` would take as 1)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def parse_int(name: str, value) -> int:
    number = as_integer(value)
    if number is None:
        raise ModelArgsError(f"{name}={value!r}: expected an integer")
    return number


def parse_positive(name: str, value) -> int | None:
    """A positive integer, or None for None (the key not given)."""
    if value is None:
        return None
    number = as_integer(value)
    if number is None or number < 1:
        raise ModelArgsError(f"{name}={value!r}: expected a positive integer")
    return number


def parse_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if str(value) not in choices:
        raise ModelArgsError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return str(value)


def parse_batch_size(value) -> int | str:
    """A positive integer or ``"auto"`` (``auto:N`` too: lm-eval's re-detection every 1/N of the
    requests is not needed, as the budget holds for all lengths); None is 1."""
    if value is None:
        return 1
    text = str(value)
    every = as_integer(text[len("auto:"):]) if text.startswith("auto:") else None
    if text == "auto" or (every is not None and every >= 1):
        return "auto"
    size = as_integer(value)
    if size is None:
        raise ModelArgsError(f"batch_size={value!r}: expected an integer or 'auto'")
    if size < 1:
        raise ModelArgsError(f"batch_size={value!r}: must be at least 1")
    return size


def parse_device(value: str | None):
    """A ``torch.device``: None, ``""`` and ``auto`` pick CUDA when available; a CUDA device
    without CUDA falls back to the CPU, with a warning."""
    import torch

    if value in (None, "", "auto"):
        value = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ModelArgsError(f"device={value!r} is not a device torch knows") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available; using the CPU", value)
        device = torch.device("cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelArgsError(f"device={value!r}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), numbered from 0")
    return device
