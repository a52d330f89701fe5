"""The comparison helpers of the test suite: tensors (one relative-error rule) and lm-eval runs; and
``perturb``, which moves a freshly initialised transformers model off its constant parameters."""

from __future__ import annotations

import math

import torch


def rel_max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` in float64 (absolute error when expected is all zero)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    return err / scale if scale > 0 else err


# Relative max error of a matrix product against F.linear's in fp32 on the same (rounded) inputs:
# fp32 differs in summation order only; 16-bit outputs are rounded once (bf16 step 2^-8, fp16
# 2^-11). The GEMM kernels' tests (matmul, matmul_hopper, moe) share it.
GEMM_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


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


def seeded_randn(*shape, dtype: torch.dtype, seed: int, scale: float = 1.0, device="cpu") -> torch.Tensor:
    """Normal values drawn on the CPU from ``seed`` (the same on every device), then cast and moved."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def gemm_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` [..., K] in another memory layout (the GEMM tests' inputs)."""
    if layout == "contiguous":
        return x
    if layout == "column slice":  # rows K + 13 apart and the start 10 bytes off: copied for TMA
        wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 13, dtype=x.dtype, device=x.device)
        wide[..., 5:5 + x.shape[-1]] = x
        return wide[..., 5:5 + x.shape[-1]]
    if layout == "aligned slice":  # rows K + 8 apart, start 16-byte aligned: read in place
        wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 16, dtype=x.dtype, device=x.device)
        wide[..., 8:8 + x.shape[-1]] = x
        return wide[..., 8:8 + x.shape[-1]]
    if layout == "misaligned":  # contiguous, its start one element past a 16-byte boundary
        flat = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
        flat[1:] = x.reshape(-1)
        return flat[1:].view(x.shape)
    if layout == "transposed":  # leading dims swapped: rows are (outer, inner) pairs
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "k strided":  # K not contiguous
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "permuted":  # three leading dims no two strides describe: copied
        return x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    raise AssertionError(layout)


def assert_same_lm_eval_run(ours: dict, theirs: dict, task: str, rtol: float = 1e-4) -> None:
    """Two lm-eval runs of ``task`` (``simple_evaluate`` results with ``log_samples``, e.g.
    ``--model mamba`` and ``--model hf``) agree sample by sample: the same documents and request
    arguments (prompts), log-likelihoods within ``rtol`` (relative; absolute below 1) with the
    same is_greedy, equal generated texts; and equal metrics (perplexities within ``rtol``)."""
    r_ours, r_theirs = ours["results"][task], theirs["results"][task]
    for key, value in r_theirs.items():
        if key.endswith(",none") and "stderr" not in key and isinstance(value, float):
            if "perplexity" in key or "bits_per_byte" in key:
                assert math.isclose(r_ours[key], value, rel_tol=rtol), (task, key, r_ours[key], value)
            else:
                assert r_ours[key] == value, (task, key, r_ours[key], value)
    s_ours, s_theirs = ours["samples"][task], theirs["samples"][task]
    assert len(s_ours) == len(s_theirs) > 0
    for a, b in zip(s_ours, s_theirs):
        assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"], (task, a["doc_id"])
        for ra, rb in zip(a["resps"], b["resps"]):
            va = ra[0][0] if isinstance(ra[0], (list, tuple)) else ra[0]
            vb = rb[0][0] if isinstance(rb[0], (list, tuple)) else rb[0]
            if isinstance(vb, str):  # generate_until
                assert va == vb, (task, a["doc_id"], va, vb)
                continue
            assert abs(va - vb) <= rtol * max(1.0, abs(vb)), (task, a["doc_id"], va, vb)
            if isinstance(ra[0], (list, tuple)):  # loglikelihood: is_greedy must agree too
                assert ra[0][1] == rb[0][1], (task, a["doc_id"])


@torch.no_grad()
def perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Move the parameters transformers initialises to constants (norm weights 1, D 1, biases 0) off
    those constants, so that a mix-up of any of them shows in the logits. A_log and the Δ bias keep
    transformers' realistic values, jittered."""

    def noise(p, scale):
        return torch.randn(p.shape, generator=gen) * scale

    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "norm_f.weight", "layernorm.weight")):
            p.copy_(1 + noise(p, 0.3))
        elif name.endswith(".D"):
            p.copy_(1 + noise(p, 0.5))
        elif name.endswith("A_log"):
            p.add_(noise(p, 0.1))
        elif name.endswith(("dt_bias", "dt_proj.bias")):
            p.add_(noise(p, 0.2))
        elif name.endswith("bias"):  # conv and projection biases
            p.copy_(noise(p, 0.2))
