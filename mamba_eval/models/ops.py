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
``mamba3_scan``            ``kernels.mamba3.mamba3_scan_ref`` (reference only, in every backend)
``mamba3_step``            ``kernels.mamba3.mamba3_step_ref`` (reference only, in every backend)
``moe_experts``            ``kernels.moe.moe_experts_ref`` (reference only, in every backend)
``linear``                 ``kernels.matmul.linear_ref`` (``F.linear``)
``step_linear``            ``kernels.matmul.linear_step_ref`` (``F.linear``)
=========================  =====================================================

``linear`` is the matrix product of the sequence forwards and the LM head, ``step_linear`` that
of decoding steps (a few rows). Both are cuBLAS in both backends, except under an enabled
batch-invariance policy (``mamba_eval.models.invariance``, which says what that means per
device): there the Triton backend uses ``kernels.matmul.linear`` and ``linear_step``, whose
tilings never depend on the number of rows, and passes ``batch_invariant=True`` to the kernels
whose launch configuration would otherwise follow the batch size (the scans and the norms). The
references have no such dependence to remove.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable

from mamba_eval.errors import MambaEvalError
from mamba_eval.models.invariance import Invariance


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
    mamba3_scan: Callable
    mamba3_step: Callable
    moe_experts: Callable
    linear: Callable
    step_linear: Callable
    invariance: Invariance = Invariance()
    #: the fields served by a Triton kernel (the others by their references)
    kernels: frozenset = frozenset()

    @property
    def batch_invariant(self) -> bool:
        return self.invariance.enabled


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
    "mamba3_scan": ("mamba3", "mamba3_scan"),
    "mamba3_step": ("mamba3", "mamba3_step"),
    "moe_experts": ("moe", "moe_experts"),
    "linear": ("matmul", "linear"),
    "step_linear": ("matmul", "linear_step"),
}
# Operators that have no Triton kernel yet: every backend uses their reference.
_REF_ONLY = ("mamba3_scan", "mamba3_step", "moe_experts")
# Kernels that take ``batch_invariant`` (their references accept and ignore it).
_INVARIANT_FIELDS = ("selective_scan", "ssd_scan", "add_norm", "gated_rmsnorm")


def _build(name: str, suffix: str, invariance: Invariance) -> Ops:
    batch_invariant = invariance.enabled
    functions = {}
    for field, (module, function) in _FUNCTIONS.items():
        mod = importlib.import_module(f"mamba_eval.kernels.{module}")
        if field in ("linear", "step_linear") and not batch_invariant:
            suffix_ = "_ref"  # cuBLAS: fastest when invariance is not asked for
        elif field in _REF_ONLY:
            suffix_ = "_ref"
        else:
            suffix_ = suffix
        functions[field] = getattr(mod, function + suffix_)
    kernels = frozenset(f for f, fn in functions.items() if not fn.__name__.endswith("_ref"))
    if batch_invariant:
        for field in _INVARIANT_FIELDS:
            functions[field] = functools.partial(functions[field], batch_invariant=True)
    return Ops(name=name, invariance=invariance, kernels=kernels, **functions)


# name -> builder; builders import lazily (the kernels modules are only imported when used).
_BACKENDS: dict[str, Callable[[Invariance], Ops]] = {
    "ref": lambda invariant: _build("ref", "_ref", invariant),
    "triton": lambda invariant: _build("triton", "", invariant),
}


def default_backend(device) -> str:
    """``triton`` on a GPU where Triton is installed, ``ref`` elsewhere (Triton's CPU interpreter
    is for tests only; Triton is not a requirement of the package, torch's CUDA builds bring it)."""
    if not str(device).startswith("cuda"):
        return "ref"
    try:
        import triton  # noqa: F401  (the kernels import it anyway once the model is built)
    except ImportError:
        return "ref"
    return "triton"


def check_backend(name: str, device) -> None:
    """Raise ``MambaEvalError`` when backend ``name`` cannot run on ``device`` (a ``torch.device``):
    the Triton kernels need Triton and a CUDA GPU, or Triton's CPU interpreter
    (``TRITON_INTERPRET=1``, which the tests use). Found here, before the weights load, rather than
    by Triton's driver lookup in the first forward."""
    if name != "triton":
        return
    from mamba_eval.kernels import utils as kernel_utils

    if kernel_utils.triton is None:
        raise MambaEvalError("backend=triton needs Triton, which is not installed; use backend=ref")
    if device.type != "cuda" and not kernel_utils.INTERPRETED:
        raise MambaEvalError(f"backend=triton needs a CUDA GPU, but the model runs on {device}; "
                             "use backend=ref (the default off the GPU)")


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_ops(name: str, invariance: Invariance | bool = False) -> Ops:
    """The ``Ops`` of backend ``name`` ("ref": plain PyTorch, any device; "triton": our Triton
    kernels, for GPUs, or the CPU under ``TRITON_INTERPRET=1``) under the batch-invariance
    policy ``invariance`` (a bool: enabled or not, the device left open)."""
    if name not in _BACKENDS:
        raise MambaEvalError(f"unknown kernel backend {name!r}; available: {', '.join(_BACKENDS)}")
    if not isinstance(invariance, Invariance):
        invariance = Invariance(enabled=bool(invariance))
    return _BACKENDS[name](invariance)
