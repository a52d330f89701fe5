"""Errors that describe bad input in one line.

Every error raised for a user's mistake (a path, a config field, a model_args key, a weight
shape) derives from ``MambaEvalError``. When such an error ends the process, the hook below
prints ``mamba-eval: error: <message>`` instead of a traceback; any other exception keeps
Python's normal report. ``MAMBA_EVAL_TRACEBACK=1`` restores full tracebacks.
"""

from __future__ import annotations

import os
import sys


class MambaEvalError(ValueError):
    """Bad input, described in one line that names the problem."""


class ModelArgsError(MambaEvalError):
    """An unknown or malformed ``--model_args`` value."""


_previous_hook = sys.excepthook


def _excepthook(exc_type, exc, tb):
    if isinstance(exc, MambaEvalError) and os.environ.get("MAMBA_EVAL_TRACEBACK", "0") in ("", "0"):
        print(f"mamba-eval: error: {exc}", file=sys.stderr)
        return
    _previous_hook(exc_type, exc, tb)


def install_excepthook() -> None:
    """Report ``MambaEvalError`` as one line when it ends the process (idempotent)."""
    global _previous_hook
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook
