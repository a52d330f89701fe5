"""Triton, when it is installed.

Triton is a dependency on Linux only; the ``*_ref`` references of this folder work without it.
Kernel modules take ``triton`` and ``tl`` from here (``None`` when absent), define their
``@triton.jit`` kernels only when Triton is there, and call ``require_triton`` first in each
public wrapper.
"""

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = tl = None


def require_triton(op: str) -> None:
    if triton is None:
        raise RuntimeError(f"{op} needs Triton, which is not installed; use the *_ref functions instead")
