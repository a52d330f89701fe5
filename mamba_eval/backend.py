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
=========================  =====================================================
"""

from __future__ import annotations

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


def _ref_ops() -> Ops:
    from mamba_eval.kernels.conv1d import causal_conv1d_ref, causal_conv1d_update_ref
    from mamba_eval.kernels.norm import add_rmsnorm_ref, gated_rmsnorm_ref
    from mamba_eval.kernels.selective_scan import selective_scan_ref, selective_state_update_ref
    from mamba_eval.kernels.ssd import ssd_scan_ref, ssd_state_update_ref

    return Ops(
        name="ref",
        causal_conv1d=causal_conv1d_ref,
        causal_conv1d_update=causal_conv1d_update_ref,
        selective_scan=selective_scan_ref,
        selective_state_update=selective_state_update_ref,
        ssd_scan=ssd_scan_ref,
        ssd_state_update=ssd_state_update_ref,
        add_norm=add_rmsnorm_ref,
        gated_rmsnorm=gated_rmsnorm_ref,
    )


def _triton_ops() -> Ops:
    from mamba_eval.kernels.conv1d import causal_conv1d, causal_conv1d_update
    from mamba_eval.kernels.norm import add_rmsnorm, gated_rmsnorm
    from mamba_eval.kernels.selective_scan import selective_scan, selective_state_update
    from mamba_eval.kernels.ssd import ssd_scan, ssd_state_update

    return Ops(
        name="triton",
        causal_conv1d=causal_conv1d,
        causal_conv1d_update=causal_conv1d_update,
        selective_scan=selective_scan,
        selective_state_update=selective_state_update,
        ssd_scan=ssd_scan,
        ssd_state_update=ssd_state_update,
        add_norm=add_rmsnorm,
        gated_rmsnorm=gated_rmsnorm,
    )


# name -> builder; builders import lazily (the kernels modules are only imported when used).
_BACKENDS: dict[str, Callable[[], Ops]] = {"ref": _ref_ops, "triton": _triton_ops}


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
