"""The Triton ``linear`` and ``linear_step`` (few-row tiles, for decoding steps) against
``linear_ref`` (F.linear), and their row invariance.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1) at small sizes, with the
configurations it uses on a GPU: there the row-invariance tests check the tiling and masking (rows
past M, columns past N, the last K step), since the interpreter's products are numpy's. On a GPU,
``test_real_shapes_on_gpu`` runs the model's projection shapes against torch's matmul and checks
that rows are bitwise independent of M on the real hardware. The output is filled with NaN before
the kernel runs, so an element the kernel forgets shows up.
"""

from __future__ import annotations

import functools

import pytest
import torch

ON_GPU = torch.cuda.is_available()  # without one, tests/conftest.py runs Triton interpreted
triton = pytest.importorskip("triton")
from helpers import GEMM_RTOL as RTOL, assert_close, gemm_layout as _layout, seeded_randn  # noqa: E402

import mamba_eval.kernels.matmul as mm  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
_randn = functools.partial(seeded_randn, device=DEVICE)
FUNCTIONS = {"linear": (mm.linear, mm._linear_config), "linear_step": (mm.linear_step, mm._step_config)}


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mm, "new_output", nan_output)


# (leading dims, K, N, bias, layout); the interpreter runs the GPU configurations: N > 256 gets
# 128 x 256 x 64 tiles, N <= 256 128 x {32, 64} x 64, K < 64 one K step of the next power of two.
CASES = [
    ((1,), 48, 80, True, "contiguous"),  # M = 1; K < BLOCK_K; N = 80: 3 blocks of 32, the last partial
    ((300,), 100, 300, True, "contiguous"),  # M, N, K past the blocks: 3 x 2 tiles, a masked K step
    ((3, 70), 128, 192, False, "column slice"),  # 3-D, rows 141 apart; K a multiple of BLOCK_K
    ((5, 41), 37, 257, True, "transposed"),  # two-level rows; N one past a block of 256
    ((2, 3, 4), 20, 33, False, "permuted"),  # copied first
    ((9,), 70, 64, True, "k strided"),
    ((), 30, 10, True, "contiguous"),  # x [K]: y [N]
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0])) or 'vec'}-K{c[1]}-N{c[2]}-{c[4]}")
def test_linear_matches_reference(case, dtype):
    _matches_reference(mm.linear, case, dtype)


# linear_step's tiles (16 x {16, 32, 64} x up to 128, rows past M masked) on a few of the cases, 16-bit (fp32 takes
# linear's configuration), and two with K cut into splits: 3 of 128, and 6 with the last K step masked.
STEP_CASES = [CASES[0], ((37,), 100, 300, True, "contiguous"), CASES[3], CASES[6],
              ((7,), 300, 40, True, "contiguous"), ((2, 5), 700, 24, False, "transposed")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", STEP_CASES,
                         ids=lambda c: f"{'x'.join(map(str, c[0])) or 'vec'}-K{c[1]}-N{c[2]}-{c[4]}")
def test_linear_step_matches_reference(case, dtype):
    _matches_reference(mm.linear_step, case, dtype)


def _matches_reference(fn, case, dtype):
    lead, k, n, with_bias, layout = case
    x = _randn(*lead, k, dtype=dtype, seed=0)
    if layout != "contiguous":
        x = _layout(x, layout)
    w = _randn(n, k, dtype=dtype, seed=1, scale=k ** -0.5)
    b = _randn(n, dtype=dtype, seed=2) if with_bias else None
    y = fn(x, w, b)
    expected = mm.linear_ref(x.float(), w.float(), None if b is None else b.float())
    assert y.dtype == dtype and y.is_contiguous()
    assert_close(y, expected, RTOL[dtype], "y")


def test_linear_empty_shapes():
    w, b = _randn(6, 5, dtype=torch.float32, seed=0), _randn(6, dtype=torch.float32, seed=1)
    assert mm.linear(torch.zeros(0, 5, device=DEVICE), w, b).shape == (0, 6)
    assert mm.linear(torch.zeros(3, 5, device=DEVICE), w[:0], b[:0]).shape == (3, 0)
    y = mm.linear(torch.zeros(3, 0, device=DEVICE), torch.zeros(6, 0, device=DEVICE), b)  # K = 0: the bias
    assert torch.equal(y, b.expand(3, 6))


def test_linear_rejects_bad_inputs():
    x, w = _randn(4, 8, dtype=torch.float32, seed=0), _randn(3, 8, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="disagree on K"):
        mm.linear(x, w[:, :7])
    with pytest.raises(ValueError, match="bias must be"):
        mm.linear(x, w, torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="one dtype"):
        mm.linear(x, w.bfloat16())
    with pytest.raises(ValueError, match="supports float16"):
        mm.linear(x.double(), w.double())


def _rows_are_independent(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, subsets,
                          fn=mm.linear) -> None:
    """Rows computed among all of x, within subsets of rows, and in shuffled order: the same bits."""
    full = fn(x, w, b)
    gen = torch.Generator().manual_seed(0)
    for size in subsets:
        rows = torch.randperm(x.shape[0], generator=gen)[:size].to(x.device)
        part = fn(x[rows], w, b)
        assert torch.equal(part, full[rows]), f"{size} rows differ from the same rows among {x.shape[0]}"
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    assert torch.equal(fn(x[perm], w, b), full[perm]), "shuffled rows differ"


@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kn", [(100, 300), (48, 80), (300, 40)], ids=["wide", "narrow", "long"])
def test_rows_do_not_depend_on_the_other_rows(kn, dtype, function):
    """M = 1, 5, 64 out of 200 rows for linear, 70 for linear_step (a decoding batch; several row
    blocks, the last partial), and all rows shuffled."""
    fn = FUNCTIONS[function][0]
    k, n = kn
    x = _randn(200 if function == "linear" else 70, k, dtype=dtype, seed=3)
    w = _randn(n, k, dtype=dtype, seed=4, scale=k ** -0.5)
    _rows_are_independent(x, w, _randn(n, dtype=dtype, seed=5), subsets=(1, 5, 64), fn=fn)
    # The same rows read through a strided view (a column slice of a wider tensor) give the same bits.
    assert torch.equal(fn(_layout(x, "column slice"), w), fn(x, w))


class _LaunchSpy:
    """Stands in for a Triton kernel: records every launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_launch_configuration_does_not_depend_on_m(function, monkeypatch):
    """What the wrapper launches (tiles, warps, stages, masks) is the same for M = 1, 7, 64, 256."""
    spy = _LaunchSpy(mm._linear_fwd_kernel)
    monkeypatch.setattr(mm, "_linear_fwd_kernel", spy)
    w = _randn(40, 70, dtype=torch.bfloat16, seed=0)
    for m in (1, 7, 64, 256):
        FUNCTIONS[function][0](_randn(m, 70, dtype=torch.bfloat16, seed=m), w)
    assert len(spy.launches) == 4 and all(kw == spy.launches[0] for kw in spy.launches)


# The model's projections: (layer, K, N). Mamba-1 130m / 2.8b, Mamba-2 130m / 2.7b in_proj, LM head.
REAL_SHAPES = [
    ("in_proj 130m", 768, 3072), ("x_proj 130m", 1536, 80), ("dt_proj 130m", 48, 1536), ("out_proj 130m", 1536, 768),
    ("in_proj 2.8b", 2560, 10240), ("x_proj 2.8b", 5120, 192), ("dt_proj 2.8b", 160, 5120),
    ("out_proj 2.8b", 5120, 2560), ("in_proj mamba2-130m", 768, 3352), ("in_proj mamba2-2.7b", 2560, 10576),
    ("lm_head 130m", 768, 50280), ("lm_head 2.8b", 2560, 50280),
]


@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("hip", [False, True], ids=["cuda", "rocm"])
def test_configurations_of_the_real_shapes(hip, function):
    """Powers of two, no K split, the narrow class for x_proj, and shared memory within the GPU's
    (227 KiB a program on an H200, 64 KiB on AMD)."""
    config = FUNCTIONS[function][1]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for name, k, n in REAL_SHAPES:
            cfg = config(n, k, dtype, hip=hip)
            assert set(cfg) == {"block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages",
                                "mask_m", "split_k"}, name
            for key in ("block_m", "block_n", "block_k"):
                assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0, (name, cfg)
            elem = torch.finfo(dtype).bits // 8
            smem = cfg["num_stages"] * (cfg["block_m"] + cfg["block_n"]) * cfg["block_k"] * elem
            assert smem <= (64 if hip else 227) * 1024, (name, dtype, cfg)
    if function == "linear_step":  # enough column blocks to keep the SMs reading W; 16-row tiles, masked
        assert all(config(n, k, torch.bfloat16)["block_m"] == 16 for _, k, n in REAL_SHAPES)
        assert all(config(n, k, torch.bfloat16)["mask_m"] for _, k, n in REAL_SHAPES)
        assert mm._step_config(10240, 2560, torch.bfloat16)["block_n"] == 32  # 320 blocks
        assert mm._step_config(2560, 5120, torch.bfloat16)["block_n"] == 16  # 160 blocks
        assert mm._step_config(50280, 2560, torch.bfloat16)["block_n"] == 64
        # Few column blocks: K split into whole 128-wide steps, enough programs, no empty split.
        assert mm._step_config(10240, 2560, torch.bfloat16)["split_k"] == 1
        for n, k in ((2560, 5120), (192, 5120), (80, 1536), (768, 1536)):
            cfg = mm._step_config(n, k, torch.bfloat16)
            steps, split = -(-k // 128), cfg["split_k"]
            assert 1 < split <= 16 and (split - 1) * -(-steps // split) < steps, (n, k, cfg)
        assert mm._step_config(2560, 5120, torch.bfloat16)["split_k"] == 2  # 160 column blocks x 2
        assert mm._step_config(192, 5120, torch.bfloat16)["split_k"] == 14  # 12 x 14: 3 steps each
        return
    assert mm._linear_config(80, 1536, torch.bfloat16)["block_n"] == 32  # 3 x 32 = 96 columns for 80
    assert mm._linear_config(192, 5120, torch.bfloat16)["block_n"] == 64  # 3 x 64, no waste
    assert mm._linear_config(50280, 2560, torch.bfloat16)["block_n"] == 256


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: s[0])
def test_real_shapes_on_gpu(shape):
    """bf16 at the model's shapes: close to torch's matmul (fp32 on the same inputs), and rows
    bitwise equal whether computed among 4096 rows, alone, among 5 or shuffled."""
    _, k, n = shape
    x = _randn(4096, k, dtype=torch.bfloat16, seed=0)
    w = _randn(n, k, dtype=torch.bfloat16, seed=1, scale=k ** -0.5)
    b = _randn(n, dtype=torch.bfloat16, seed=2)
    y = mm.linear(x, w, b)
    expected = torch.matmul(x.float(), w.float().t()) + b.float()
    assert_close(y, expected, RTOL[torch.bfloat16], "y")
    _rows_are_independent(x, w, b, subsets=(1, 5, 64, 1000))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: s[0])
def test_real_shapes_on_gpu_linear_step(shape):
    """linear_step at a decoding batch of 64 rows: close to torch's matmul, and each row's bits
    the same alone, among 5, among 64 and among 100."""
    _, k, n = shape
    x = _randn(100, k, dtype=torch.bfloat16, seed=0)
    w = _randn(n, k, dtype=torch.bfloat16, seed=1, scale=k ** -0.5)
    b = _randn(n, dtype=torch.bfloat16, seed=2)
    expected = torch.matmul(x[:64].float(), w.float().t()) + b.float()
    assert_close(mm.linear_step(x[:64], w, b), expected, RTOL[torch.bfloat16], "y")
    _rows_are_independent(x, w, b, subsets=(1, 5, 64), fn=mm.linear_step)
