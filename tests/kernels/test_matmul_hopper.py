"""The Triton ``linear_hopper`` (TMA loads, persistent grid) against ``linear_hopper_ref`` (F.linear),
its row invariance, and which layers it leaves to ``linear``.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1), which checks TMA's
alignment rules and applies its bounds (zeros past the edges on loads, clipped stores), at small
sizes: with the configurations it uses on a GPU, and with small tiles (``_small_tiles``: the same
code, many tiles per program and several GROUP_M groups). There the row-invariance tests check the
tiling, the persistent loop and the bounds (rows past M, columns past N, the last K step), since
the interpreter's products are numpy's. On a GPU, ``test_real_shapes_on_gpu`` runs the model's
projection shapes against torch's matmul and checks that rows are bitwise independent of M on the
real hardware. Outputs are filled with NaN before a kernel runs, so a forgotten element shows up,
and lie between NaN bands, so a store past their bounds shows up too.
"""

from __future__ import annotations

import functools
import inspect
import math

import pytest
import torch

ON_GPU = torch.cuda.is_available()  # without one, tests/conftest.py runs Triton interpreted
triton = pytest.importorskip("triton")
from helpers import GEMM_RTOL as RTOL, assert_close, gemm_layout as _layout, seeded_randn  # noqa: E402

import mamba_eval.kernels.matmul as mm  # noqa: E402
import mamba_eval.kernels.matmul_hopper as mh  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
_randn = functools.partial(seeded_randn, device=DEVICE)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
HOPPER = ON_GPU and torch.version.hip is None and torch.cuda.get_device_capability()[0] >= 9


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    """Outputs filled with NaN and lying between two NaN bands 256 rows deep (two tiles of rows; 16-byte
    aligned): an element the kernel forgets stays NaN, and a store past the output's bounds (a
    missing mask) shows in the bands when the test ends, not as memory corrupted elsewhere."""
    buffers = []

    def nan_output(shape, dtype, device):
        numel, band = math.prod(shape), 256 * shape[-1] + 64
        buf = torch.full((numel + 2 * band,), float("nan"), dtype=dtype, device=device)
        buffers.append((buf, band, numel))
        return buf[band:band + numel].view(shape)

    monkeypatch.setattr(mh, "new_output", nan_output)
    monkeypatch.setattr(mm, "new_output", nan_output)  # the layers left to linear
    yield
    for buf, band, numel in buffers:
        assert buf[:band].isnan().all() and buf[band + numel:].isnan().all(), "a store past the output"


def _small_tiles(split: bool):
    """A ``_hopper_config`` with 16 x 32 x 16 tiles and GROUP_M 2 (the real one's other choices), so
    that small products have many tiles per program, several groups and a partial last group."""
    real = mh._hopper_config

    def config(n, k, dtype):
        cfg = real(n, k, dtype)
        if cfg is not None:
            cfg.update(block_m=16, block_n=32, block_k=16, group_m=2, epilogue_split=split)
        return cfg

    return config


SMALL_TILES = {"small": _small_tiles(False), "small split": _small_tiles(True)}


class _LaunchSpy:
    """Stands in for a Triton kernel: records every launch's grid and keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.grids = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(grid)
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def spy(monkeypatch):
    """(kernel spy, list of the calls left to ``linear``)."""
    kernel = _LaunchSpy(mh._linear_hopper_kernel)
    monkeypatch.setattr(mh, "_linear_hopper_kernel", kernel)
    fallbacks = []

    def linear(x, w, b=None):
        fallbacks.append((tuple(x.shape), tuple(w.shape)))
        return mm.linear(x, w, b)

    monkeypatch.setattr(mh, "linear", linear)
    return kernel, fallbacks


# (leading dims, K, N, bias, layout). 16-bit with K % 8 == 0 runs the TMA kernel: N > 256 gets
# 128 x 256 x 64 tiles (store in halves), N <= 256 128 x {32, 64} x 64, K < 64 one K step of the next
# power of two; fp32 and K % 8 != 0 run linear. The interpreter has 4 "SMs": 4 programs.
CASES = [
    ((1,), 48, 80, True, "contiguous"),  # M = 1; K < BLOCK_K; N = 80: 3 blocks of 32, the last partial
    ((300,), 136, 300, True, "contiguous"),  # 3 x 2 tiles on 4 programs; a partial K step; N * 2 bytes
    # not a multiple of 16: masked stores
    ((3, 70), 128, 192, False, "column slice"),  # 3-D, misaligned rows: copied; 3 column blocks of 64
    ((5, 41), 40, 264, True, "transposed"),  # rows no single stride describes: copied; N 8 past 256
    ((2, 3, 4), 24, 40, False, "permuted"),  # copied
    ((9,), 72, 64, True, "k strided"),  # copied
    ((4, 33), 64, 128, True, "aligned slice"),  # rows 80 apart, read in place
    ((), 32, 16, True, "contiguous"),  # x [K]: y [N]
    ((7,), 100, 48, True, "contiguous"),  # K * 2 bytes not a multiple of 16: linear
]


def _case_id(c):
    return f"{'x'.join(map(str, c[0])) or 'vec'}-K{c[1]}-N{c[2]}-{c[4]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_linear_hopper_matches_reference(case, dtype, spy):
    lead, k, n, with_bias, layout = case
    x = _layout(_randn(*lead, k, dtype=dtype, seed=0), layout)
    w = _randn(n, k, dtype=dtype, seed=1, scale=k ** -0.5)
    b = _randn(n, dtype=dtype, seed=2) if with_bias else None
    y = mh.linear_hopper(x, w, b)
    expected = mh.linear_hopper_ref(x.float(), w.float(), None if b is None else b.float())
    assert y.dtype == dtype and y.is_contiguous()
    assert_close(y, expected, RTOL[dtype], "y")
    kernel, fallbacks = spy
    tma = dtype != torch.float32 and k % 8 == 0
    assert (len(kernel.launches), len(fallbacks)) == ((1, 0) if tma else (0, 1))


@pytest.mark.parametrize("tiles", list(SMALL_TILES))
@pytest.mark.parametrize("mkn", [(70, 40, 40), (45, 24, 100)], ids=lambda s: "x".join(map(str, s)))
def test_small_tiles_match_reference(mkn, tiles, monkeypatch, spy):
    """16 x 32 x 16 tiles: 10 or 12 tiles on 4 programs, GROUP_M groups of 2 row blocks (the last
    partial), rows, columns and K past the blocks, bias; TMA stores (N = 40) and masked ones (N = 100)."""
    monkeypatch.setattr(mh, "_hopper_config", SMALL_TILES[tiles])
    monkeypatch.setattr(mh, "sm_count", lambda device: 4)  # as many programs on a GPU as interpreted
    m, k, n = mkn
    x = _randn(m, k, dtype=torch.bfloat16, seed=0)
    w = _randn(n, k, dtype=torch.bfloat16, seed=1, scale=k ** -0.5)
    b = _randn(n, dtype=torch.bfloat16, seed=2)
    assert_close(mh.linear_hopper(x, w, b), mm.linear_ref(x.float(), w.float(), b.float()), RTOL[torch.bfloat16])
    assert len(spy[0].launches) == 1 and spy[0].grids[0] == (4,)


def test_which_layers_run_linear(spy):
    """The kernel for 16-bit layers whose weight TMA can read, whatever x's layout; linear for fp32,
    K % 8 != 0, K = 0, and weights with strided or misaligned rows, with the same results."""
    kernel, fallbacks = spy
    x = _randn(6, 40, dtype=torch.bfloat16, seed=0)
    w = _randn(24, 40, dtype=torch.bfloat16, seed=1, scale=40 ** -0.5)
    y = mh.linear_hopper(x, w)
    for layout in ("misaligned", "k strided", "column slice", "aligned slice"):
        assert torch.equal(mh.linear_hopper(_layout(x, layout), w), y), layout  # copied or read in place
    assert (len(kernel.launches), len(fallbacks)) == (5, 0)

    expected = mm.linear_ref(x.float(), w.float())
    for w_other in (_layout(w, "k strided"), _layout(w, "misaligned"), _layout(w, "column slice")):
        assert_close(mh.linear_hopper(x, w_other), expected, RTOL[torch.bfloat16])
    assert_close(mh.linear_hopper(x.float(), w.float()), expected, RTOL[torch.float32])
    x36, w36 = x[:, :36], w[:, :36].contiguous()
    assert_close(mh.linear_hopper(x36, w36), mm.linear_ref(x36.float(), w36.float()), RTOL[torch.bfloat16])
    b = _randn(24, dtype=torch.bfloat16, seed=2)
    assert torch.equal(mh.linear_hopper(x[:, :0], w[:, :0], b), b.expand(6, 24))  # K = 0: the bias
    assert (len(kernel.launches), len(fallbacks)) == (5, 6)


def test_linear_hopper_empty_shapes():
    w, b = _randn(8, 16, dtype=torch.bfloat16, seed=0), _randn(8, dtype=torch.bfloat16, seed=1)
    assert mh.linear_hopper(torch.zeros(0, 16, dtype=torch.bfloat16, device=DEVICE), w, b).shape == (0, 8)
    assert mh.linear_hopper(torch.zeros(3, 16, dtype=torch.bfloat16, device=DEVICE), w[:0], b[:0]).shape == (3, 0)


def test_linear_hopper_rejects_bad_inputs():
    x, w = _randn(4, 8, dtype=torch.bfloat16, seed=0), _randn(3, 8, dtype=torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="disagree on K"):
        mh.linear_hopper(x, w[:, :7])
    with pytest.raises(ValueError, match="bias must be"):
        mh.linear_hopper(x, w, torch.zeros(4, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="one dtype"):
        mh.linear_hopper(x, w.float())
    with pytest.raises(ValueError, match="supports float16"):
        mh.linear_hopper(x.double(), w.double())


def test_signature_and_reference():
    assert list(inspect.signature(mh.linear_hopper).parameters) == list(inspect.signature(mm.linear).parameters)
    assert mh.linear_hopper_ref is mm.linear_ref


def _rows_are_independent(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, subsets) -> torch.Tensor:
    """Rows computed among all of x, within subsets of rows (at other positions), and in shuffled
    order: the same bits. Returns the result on all of x."""
    full = mh.linear_hopper(x, w, b)
    gen = torch.Generator().manual_seed(0)
    for size in subsets:
        rows = torch.randperm(x.shape[0], generator=gen)[:size].to(x.device)
        part = mh.linear_hopper(x[rows], w, b)
        assert torch.equal(part, full[rows]), f"{size} rows differ from the same rows among {x.shape[0]}"
        assert torch.equal(mh.linear_hopper(x[:size], w, b), full[:size]), f"the first {size} rows differ"
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    assert torch.equal(mh.linear_hopper(x[perm], w, b), full[perm]), "shuffled rows differ"
    return full


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kn", [(136, 320), (48, 80), (200, 36)], ids=["wide", "narrow", "long"])
def test_rows_do_not_depend_on_the_other_rows(kn, dtype, spy):
    """The GPU tiles (wide: 128 x 256, the store in halves; narrow: 128 x 32; long: 128 x 64, masked
    stores): M = 1, 5, 64 out of 200 rows (2 row blocks, the last partial), at their positions and
    elsewhere, and all rows shuffled; the rows read in place from a strided view, or after a copy,
    give the same bits."""
    k, n = kn
    x = _randn(200, k, dtype=dtype, seed=3)
    w = _randn(n, k, dtype=dtype, seed=4, scale=k ** -0.5)
    b = _randn(n, dtype=dtype, seed=5)
    full = _rows_are_independent(x, w, b, subsets=(1, 5, 64))
    for layout in ("aligned slice", "column slice"):
        assert torch.equal(mh.linear_hopper(_layout(x, layout), w, b), full), layout
    assert spy[1] == []  # all of it ran the TMA kernel


@pytest.mark.parametrize("tiles", list(SMALL_TILES))
def test_rows_do_not_depend_on_the_other_rows_small_tiles(tiles, monkeypatch, spy):
    """16 x 32 x 16 tiles: M = 1, 5, 33 out of 70 rows (5 row blocks in 3 groups of 2), N = 72
    (3 column blocks, the last partial), K = 40 (3 steps, the last partial)."""
    monkeypatch.setattr(mh, "_hopper_config", SMALL_TILES[tiles])
    x = _randn(70, 40, dtype=torch.bfloat16, seed=3)
    w = _randn(72, 40, dtype=torch.bfloat16, seed=4, scale=40 ** -0.5)
    _rows_are_independent(x, w, _randn(72, dtype=torch.bfloat16, seed=5), subsets=(1, 5, 33))
    assert spy[1] == []


@pytest.mark.parametrize("tiles", ["real", "small split"])
def test_tiles_do_not_depend_on_the_program_that_runs_them(tiles, monkeypatch):
    """1, 2, 3, 5 or 64 programs (each tile run by another program, in another order): the same bits.
    The GPU tiles: 300 x 264 (3 x 2 tiles); the small ones: 70 x 72 (5 x 3 tiles)."""
    m, n = (300, 264) if tiles == "real" else (70, 72)
    if tiles != "real":
        monkeypatch.setattr(mh, "_hopper_config", SMALL_TILES[tiles])
    x = _randn(m, 40, dtype=torch.bfloat16, seed=6)
    w = _randn(n, 40, dtype=torch.bfloat16, seed=7, scale=40 ** -0.5)
    b = _randn(n, dtype=torch.bfloat16, seed=8)
    results = []
    for sms in (1, 2, 3, 5, 64):
        monkeypatch.setattr(mh, "sm_count", lambda device, sms=sms: sms)
        results.append(mh.linear_hopper(x, w, b))
    assert all(torch.equal(r, results[0]) for r in results)


def test_launch_configuration_does_not_depend_on_m(spy, monkeypatch):
    """What the wrapper launches (tiles, warps, stages, epilogue, programs at most) is the same for
    M = 1, 7, 64, 256, 300; only the grid (min(programs, tiles)) grows with M."""
    kernel, _ = spy
    monkeypatch.setattr(mh, "sm_count", lambda device: 4)  # a GPU's SM count would hide the cap
    w = _randn(264, 72, dtype=torch.bfloat16, seed=0)
    for m in (1, 7, 64, 256, 300):
        mh.linear_hopper(_randn(m, 72, dtype=torch.bfloat16, seed=m), w)
    assert len(kernel.launches) == 5 and all(kw == kernel.launches[0] for kw in kernel.launches)
    assert [g[0] for g in kernel.grids] == [2, 2, 2, 4, 4]  # 2, 2, 2, 4, 6 tiles of 128 x 256 on 4 programs
    assert list(inspect.signature(mh._hopper_config).parameters) == ["n", "k", "dtype"]


# The model's projections: (layer, K, N). Mamba-1 130m / 2.8b, Mamba-2 130m / 2.7b in_proj, LM head
# (test_matmul's list).
REAL_SHAPES = [
    ("in_proj 130m", 768, 3072), ("x_proj 130m", 1536, 80), ("dt_proj 130m", 48, 1536), ("out_proj 130m", 1536, 768),
    ("in_proj 2.8b", 2560, 10240), ("x_proj 2.8b", 5120, 192), ("dt_proj 2.8b", 160, 5120),
    ("out_proj 2.8b", 5120, 2560), ("in_proj mamba2-130m", 768, 3352), ("in_proj mamba2-2.7b", 2560, 10576),
    ("lm_head 130m", 768, 50280), ("lm_head 2.8b", 2560, 50280),
]


def test_configurations_of_the_real_shapes():
    """Every projection of the table, 16-bit: powers of two, TMA boxes of at most 256 per dimension
    and at least 16 bytes wide, shared memory within an H100's 227 KiB a program, TMA stores; fp32
    and K % 8 != 0 run linear."""
    assert {(n, k) for _, k, n in REAL_SHAPES} == set(mh._HOPPER_TABLE)
    for dtype in (torch.bfloat16, torch.float16):
        for name, k, n in REAL_SHAPES:
            cfg = mh._hopper_config(n, k, dtype)
            assert set(cfg) == {"block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages",
                                "epilogue_split", "tma_store", "flatten", "warp_specialize"}, name
            for key in ("block_m", "block_n", "block_k", "group_m", "num_warps"):
                assert cfg[key] & (cfg[key] - 1) == 0, (name, cfg)
            assert 16 <= cfg["block_k"] <= 256 and 64 <= cfg["block_m"] <= 256 and 32 <= cfg["block_n"] <= 256, name
            assert cfg["num_warps"] in (4, 8) and 2 <= cfg["num_stages"] <= 4, name
            store_n = cfg["block_n"] // 2 if cfg["epilogue_split"] else cfg["block_n"]
            stages = cfg["num_stages"] * (cfg["block_m"] + cfg["block_n"]) * cfg["block_k"]
            smem = (stages + cfg["block_m"] * store_n) * 2  # x and W tiles, the TMA store's buffer
            assert smem <= 227 * 1024, (name, dtype, cfg, smem)
            assert cfg["tma_store"] and cfg["flatten"], name
            assert cfg["block_k"] <= max(16, triton.next_power_of_2(k)), name  # no K step of zeros only
            assert mh._hopper_config(n, k, torch.float32) is None
    assert mh._hopper_config(50280, 2560, torch.bfloat16)["block_n"] == 256
    assert mh._hopper_config(80, 1536, torch.bfloat16)["block_n"] == 32  # 3 x 32 = 96 columns for 80
    assert mh._hopper_config(300, 100, torch.bfloat16) is None  # rows of 200 bytes
    assert mh._hopper_config(300, 104, torch.bfloat16)["tma_store"] is False  # rows of 600 bytes
    with pytest.raises(ValueError, match="supports float16"):
        mh._hopper_config(64, 64, torch.float64)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: s[0])
def test_real_shapes_on_gpu(shape, spy):
    """bf16 at the model's shapes: close to torch's matmul (fp32 on the same inputs) at 16384 rows;
    the first 1, 64 and 4096 rows computed alone, 64 rows from elsewhere, and all rows shuffled, bitwise
    equal to the same rows among 16384. On Hopper the TMA kernel ran, not linear."""
    _, k, n = shape
    x = _randn(16384, k, dtype=torch.bfloat16, seed=0)
    w = _randn(n, k, dtype=torch.bfloat16, seed=1, scale=k ** -0.5)
    b = _randn(n, dtype=torch.bfloat16, seed=2)
    y = mh.linear_hopper(x, w, b)
    expected = torch.addmm(b.float(), x.float(), w.float().t())
    assert_close(y, expected, RTOL[torch.bfloat16], "y")
    del expected
    for m in (1, 64, 4096):
        assert torch.equal(mh.linear_hopper(x[:m], w, b), y[:m]), f"the first {m} rows differ"
    rows = torch.randperm(16384, generator=torch.Generator().manual_seed(0))[:64].to(DEVICE)
    assert torch.equal(mh.linear_hopper(x[rows], w, b), y[rows]), "64 rows from elsewhere differ"
    perm = torch.randperm(16384, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert torch.equal(mh.linear_hopper(x[perm], w, b), y[perm]), "shuffled rows differ"
    if HOPPER:
        assert spy[1] == [] and len(spy[0].launches) == 6


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper-class NVIDIA GPU")
def test_cuda_graph_on_gpu():
    """Captured in a CUDA graph (the descriptors' scratch memory allocated during the capture) and
    replayed: the same bits as an eager call."""
    x = _randn(4096, 2560, dtype=torch.bfloat16, seed=0)
    w = _randn(10240, 2560, dtype=torch.bfloat16, seed=1, scale=2560 ** -0.5)
    b = _randn(10240, dtype=torch.bfloat16, seed=2)
    expected = mh.linear_hopper(x, w, b)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mh.linear_hopper(x, w, b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, expected)
