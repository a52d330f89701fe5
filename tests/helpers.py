"""The one numerical-comparison helper of the test suite."""

from __future__ import annotations

import torch


def rel_max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` in float64 (absolute error when expected is all zero)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    return err / scale if scale > 0 else err


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol_max: float = 1e-5, name: str = "") -> None:
    """Assert equal shapes, no NaN/inf where ``expected`` is finite, and a relative max error <= ``rtol_max``.

    The relative max error is ``max|actual - expected| / max|expected|``: one number per tensor, robust
    to elements near zero, strict on the large ones.
    """
    label = f"{name}: " if name else ""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{label}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    finite = torch.isfinite(expected)
    bad = ~torch.isfinite(actual) & finite
    assert not bad.any(), f"{label}{int(bad.sum())} non-finite values where the expected ones are finite"
    a, e = actual[finite], expected[finite]
    err = rel_max_error(a, e)
    if err > rtol_max:
        diff = (actual.double() - expected.double()).abs().nan_to_num(0.0)
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{label}relative max error {err:.3e} > {rtol_max:.1e} "
            f"(max |a-e| = {diff.max().item():.3e} at {where}: actual {actual[where].item():.6g}, "
            f"expected {expected[where].item():.6g}; max |e| = {e.abs().max().item():.3e})"
        )
