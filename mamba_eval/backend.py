"""Kernel backends: the one place where an implementation of each operator is chosen.

A model asks for its ``Ops`` once, at construction (``get_ops(name)``), and calls them in its
forward without further branching. Every backend provides the same functions with the signatures
of the ``*_ref`` references in ``mamba_eval.kernels``:

=========================  =====================================================
``causal_conv1d``          ``kernels.conv1d.causal_conv1d_ref``
``causal_conv1d_update``   ``kernels.conv1d.causal_conv1d_update_ref``
``selective_scan``         ``kernels.selective_scan.selective_scan_ref``
``selective_state_update`` ``kernels.selective_scan.selective_state_update_ref``
``ssd_scan``               ``kernels.ssd.ssd_scan_ref``
``ssd_state_update``       ``kernels.ssd.ssd_state_update_ref``
``add_norm``               ``kernels.norm.add_rmsnorm_ref``
``gated_rmsnorm``          ``kernels.norm.gated_rmsnorm_ref``
``mamba1_decode``          ``kernels.mamba1_step.mamba1_decode_ref``
=========================  =====================================================
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from mamba_eval.errors import MambaEvalError


@dataclass(frozen=True)
class Ops:
    """The operator implementations one model uses (a frozen namespace of functions)."""

    name: str
    causal_conv1d: Callable
    causal_conv1d_update: Callable
    selective_scan: Callable
    selective_state_update: Callable
    ssd_scan: Callable
    ssd_state_update: Callable
    add_norm: Callable
    gated_rmsnorm: Callable
    mamba1_decode: Callable


# Ops field -> (module of mamba_eval.kernels, name of the Triton wrapper); the reference of each
# is the same name with ``_ref`` appended.
_FUNCTIONS = {
    "causal_conv1d": ("conv1d", "causal_conv1d"),
    "causal_conv1d_update": ("conv1d", "causal_conv1d_update"),
    "selective_scan": ("selective_scan", "selective_scan"),
    "selective_state_update": ("selective_scan", "selective_state_update"),
    "ssd_scan": ("ssd", "ssd_scan"),
    "ssd_state_update": ("ssd", "ssd_state_update"),
    "add_norm": ("norm", "add_rmsnorm"),
    "gated_rmsnorm": ("norm", "gated_rmsnorm"),
    "mamba1_decode": ("mamba1_step", "mamba1_decode"),
}


def _build(name: str, suffix: str) -> Ops:
    functions = {}
    for field, (module, function) in _FUNCTIONS.items():
        mod = importlib.import_module(f"mamba_eval.kernels.{module}")
        functions[field] = getattr(mod, function + suffix)
    return Ops(name=name, **functions)


# name -> builder; builders import lazily (the kernels modules are only imported when used).
_BACKENDS: dict[str, Callable[[], Ops]] = {
    "ref": lambda: _build("ref", "_ref"),
    "triton": lambda: _build("triton", ""),
}


def default_backend(device) -> str:
    """``triton`` on a GPU, ``ref`` elsewhere (Triton's CPU interpreter is for tests only)."""
    return "triton" if str(device).startswith("cuda") else "ref"


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_ops(name: str) -> Ops:
    """The ``Ops`` of backend ``name`` ("ref": plain PyTorch, any device; "triton": our Triton
    kernels, for GPUs, or the CPU under ``TRITON_INTERPRET=1``)."""
    if name not in _BACKENDS:
        raise MambaEvalError(f"unknown kernel backend {name!r}; available: {', '.join(_BACKENDS)}")
    return _BACKENDS[name]()
