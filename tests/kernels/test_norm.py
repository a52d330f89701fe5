"""Triton norms (``kernels/norm.py``) against their references.

On a machine without CUDA the kernels run in Triton's interpreter at tiny sizes; with
``MAMBA_EVAL_TEST_SIZES=real`` on a GPU the same tests run at the widths of the released models.
Outputs are preallocated full of NaN and handed to the kernel, so unwritten elements show up.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import assert_close  # noqa: E402

from mamba_eval.kernels import norm  # noqa: E402
from mamba_eval.kernels.norm import add_rmsnorm, add_rmsnorm_ref, gated_rmsnorm, gated_rmsnorm_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REAL = os.environ.get("MAMBA_EVAL_TEST_SIZES") == "real"
# fp32: the kernel and the reference differ only in summation order. bf16: the kernel's output is
# rounded to bf16 (relative step 2^-8), the reference is evaluated in fp32 on the same inputs.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}

if REAL:
    # (leading dims, D): d_model of mamba-130m / 2.8b, and odd widths.
    ADD_SHAPES = [((4, 2048), 768), ((2, 2048), 2560), ((3, 1000), 1536), ((64,), 2560), ((5, 7), 5000)]
    # (leading dims, D, group_size): mamba2-130m, mamba2-2.7b, 8 groups, odd groups.
    GATED_SHAPES = [((4, 2048), 1536, 1536), ((2, 2048), 5120, 5120), ((3, 999), 4096, 512), ((64,), 3 * 1000, 1000)]
else:
    ADD_SHAPES = [((2, 3), 37), ((5,), 64), ((1, 1), 100)]
    GATED_SHAPES = [((2, 3), 48, 48), ((5,), 60, 20), ((1, 2), 3 * 37, 37)]


def _nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _check_add_norm(x, residual, weight, bias, residual_in_fp32, is_rms, *, eps=1e-5, in_place=False):
    """Run the kernel into NaN-filled outputs and compare with the reference in fp32."""
    normed_ref, residual_ref = add_rmsnorm_ref(x, residual, weight, bias, eps, residual_in_fp32, is_rms)
    normed_fp32, residual_fp32 = add_rmsnorm_ref(
        x.float(), None if residual is None else residual.float(), weight.float(),
        None if bias is None else bias.float(), eps, True, is_rms,
    )
    out = _nan_like(x.shape, x.dtype)
    if in_place:
        residual_out = residual
    else:
        residual_out = _nan_like(x.shape, residual_ref.dtype)
    normed, new_residual = add_rmsnorm(
        x, residual, weight, bias, eps, residual_in_fp32, is_rms, out=out, residual_out=residual_out
    )
    assert normed is out and new_residual is residual_out
    assert normed.dtype == normed_ref.dtype and new_residual.dtype == residual_ref.dtype
    assert_close(normed, normed_fp32, RTOL[x.dtype], "normed")
    assert_close(new_residual, residual_fp32, RTOL[new_residual.dtype], "residual")


@pytest.mark.parametrize("lead, width", ADD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("residual_kind", ["none", "fp32", "same"])
def test_add_rmsnorm_matches_ref(lead, width, dtype, is_rms, residual_kind):
    torch.manual_seed(0)
    x = torch.randn(*lead, width, device=DEVICE).to(dtype)
    residual = None
    if residual_kind != "none":
        residual_dtype = torch.float32 if residual_kind == "fp32" else dtype
        residual = (3 * torch.randn(*lead, width, device=DEVICE) + 1).to(residual_dtype)
    weight = (1 + 0.1 * torch.randn(width, device=DEVICE)).to(dtype)
    bias = None if is_rms else (0.1 * torch.randn(width, device=DEVICE)).to(dtype)
    _check_add_norm(x, residual, weight, bias, residual_kind == "fp32", is_rms)


@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_add_rmsnorm_first_layer_and_bias(residual_in_fp32):
    """residual=None (the first block) with an RMSNorm bias, bf16 activations."""
    torch.manual_seed(1)
    x = torch.randn(3, 37, device=DEVICE).to(torch.bfloat16)
    weight = torch.randn(37, device=DEVICE).to(torch.bfloat16)
    bias = torch.randn(37, device=DEVICE).to(torch.bfloat16)
    _check_add_norm(x, None, weight, bias, residual_in_fp32, True)


@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("path", ["rows_per_program", "multi_pass"])
def test_add_rmsnorm_launch_paths(monkeypatch, is_rms, path):
    """Several rows per program (with a partial last program) and rows wider than a block,
    with the residual updated in place."""
    if path == "rows_per_program":
        monkeypatch.setattr(norm, "_MIN_PROGRAMS", 1)
        lead, width = (7,), 24  # 4 rows of 32 lanes per program, the last one has 3 rows
    else:
        monkeypatch.setattr(norm, "_MAX_BLOCK_N", 16)
        lead, width = (3,), 37  # three blocks of 16 columns per row
    rows, _, single_pass, _ = norm._launch_config(lead[0], width)
    assert (rows > 1) if path == "rows_per_program" else not single_pass
    torch.manual_seed(2)
    x = torch.randn(*lead, width, device=DEVICE) + 2  # a non-zero mean exercises LayerNorm's centring
    residual = torch.randn(*lead, width, device=DEVICE)
    weight = torch.randn(width, device=DEVICE)
    bias = torch.randn(width, device=DEVICE)
    _check_add_norm(x, residual.clone(), weight, bias, True, is_rms, in_place=True)


def test_add_rmsnorm_strided_inputs_and_allocated_outputs():
    """Inputs that are slices along D (unit stride, row stride > D); the kernel allocates outputs."""
    torch.manual_seed(3)
    big = torch.randn(2, 5, 80, device=DEVICE)
    x, residual = big[..., :37], big[..., 40:77]
    weight = torch.randn(37, device=DEVICE)
    normed, new_residual = add_rmsnorm(x, residual, weight, None, 1e-6, True, True)
    normed_ref, residual_ref = add_rmsnorm_ref(x, residual, weight, None, 1e-6, True, True)
    assert normed.shape == x.shape and normed.is_contiguous()
    assert_close(normed, normed_ref, RTOL[torch.float32], "normed")
    assert_close(new_residual, residual_ref, RTOL[torch.float32], "residual")
    # A layout without unit stride along D is copied first.
    xt = torch.randn(37, 6, device=DEVICE).t()
    normed, _ = add_rmsnorm(xt, None, weight, None, 1e-6, True, True)
    assert_close(normed, add_rmsnorm_ref(xt, None, weight, None, 1e-6, True, True)[0], RTOL[torch.float32])


def test_add_rmsnorm_without_residual_output():
    """The final norm only needs the normalised output: return_residual=False skips that store."""
    torch.manual_seed(4)
    x = torch.randn(4, 37, device=DEVICE).to(torch.bfloat16)
    residual = torch.randn(4, 37, device=DEVICE)
    weight = torch.randn(37, device=DEVICE)
    normed, new_residual = add_rmsnorm(x, residual, weight, None, 1e-5, True, True, return_residual=False)
    assert new_residual is None
    normed_ref, none = add_rmsnorm_ref(x, residual, weight, None, 1e-5, True, True, return_residual=False)
    assert none is None
    assert_close(normed, normed_ref, RTOL[torch.bfloat16], "normed")


def test_add_rmsnorm_empty_rows():
    x = torch.randn(0, 5, 16, device=DEVICE)
    normed, new_residual = add_rmsnorm(x, None, torch.ones(16, device=DEVICE), None, 1e-5, True, True)
    assert normed.shape == (0, 5, 16) and new_residual.shape == (0, 5, 16)


def test_add_rmsnorm_rejects_bad_shapes():
    x = torch.randn(2, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match=r"residual must have the shape of x \(2, 8\)"):
        add_rmsnorm(x, torch.randn(2, 9, device=DEVICE), w)
    with pytest.raises(ValueError, match=r"weight must be \[D=8\]"):
        add_rmsnorm(x, None, torch.ones(9, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias must be \[D=8\]"):
        add_rmsnorm(x, None, w, torch.ones(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="residual_out must be a torch.float32 tensor of shape"):
        add_rmsnorm(x, None, w, residual_out=torch.empty(2, 8, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="out must be viewable"):
        add_rmsnorm(x, None, w, out=torch.empty(8, 2, device=DEVICE).t())


@pytest.mark.parametrize("lead, width, group_size", GATED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rmsnorm_matches_ref(lead, width, group_size, dtype):
    torch.manual_seed(5)
    y = torch.randn(*lead, width, device=DEVICE).to(dtype)
    # z is a slice of a wider projection, as in the Mamba-2 block (in_proj output = [z, xBC, dt]).
    z = (2 * torch.randn(*lead, width + 9, device=DEVICE)).to(dtype)[..., 3:width + 3]
    weight = (1 + 0.1 * torch.randn(width, device=DEVICE)).to(dtype)
    expected = gated_rmsnorm_ref(y.float(), z.float(), weight.float(), 1e-5, group_size)
    out = _nan_like(y.shape, dtype)
    result = gated_rmsnorm(y, z, weight, 1e-5, group_size, out=out)
    assert result is out and result.dtype == gated_rmsnorm_ref(y, z, weight, 1e-5, group_size).dtype
    assert_close(result, expected, RTOL[dtype], "out")


def test_gated_rmsnorm_one_group_by_default_and_multi_pass(monkeypatch):
    torch.manual_seed(6)
    y = torch.randn(3, 2, 60, device=DEVICE)
    z = torch.randn(3, 2, 60, device=DEVICE)
    weight = torch.randn(60, device=DEVICE)
    assert_close(gated_rmsnorm(y, z, weight), gated_rmsnorm_ref(y, z, weight), RTOL[torch.float32], "one group")
    monkeypatch.setattr(norm, "_MAX_BLOCK_N", 8)  # each group of 20 takes three blocks
    assert not norm._launch_config(6, 20)[2]
    out = _nan_like(y.shape, y.dtype)
    gated_rmsnorm(y, z, weight, 1e-5, 20, out=out)
    assert_close(out, gated_rmsnorm_ref(y, z, weight, 1e-5, 20), RTOL[torch.float32], "multi-pass")


def test_gated_rmsnorm_rows_per_program(monkeypatch):
    monkeypatch.setattr(norm, "_MIN_PROGRAMS", 1)
    assert norm._launch_config(5, 12)[0] > 1
    torch.manual_seed(7)
    y, z = torch.randn(5, 36, device=DEVICE), torch.randn(5, 36, device=DEVICE)
    weight = torch.randn(36, device=DEVICE)
    out = _nan_like(y.shape, y.dtype)
    gated_rmsnorm(y, z, weight, 1e-5, 12, out=out)
    assert_close(out, gated_rmsnorm_ref(y, z, weight, 1e-5, 12), RTOL[torch.float32])


def test_gated_rmsnorm_rejects_bad_shapes():
    y = torch.randn(2, 12, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple of group_size 5"):
        gated_rmsnorm(y, y, torch.ones(12, device=DEVICE), 1e-5, 5)
    with pytest.raises(ValueError, match=r"z must have the shape of y \(2, 12\)"):
        gated_rmsnorm(y, torch.randn(2, 13, device=DEVICE), torch.ones(12, device=DEVICE))
    with pytest.raises(ValueError, match=r"weight must be \[D=12\]"):
        gated_rmsnorm(y, y, torch.ones(6, device=DEVICE), 1e-5, 6)
