"""The Triton ``moe_experts`` (grouped products of a mixture of experts' routed experts) against
``moe_experts_ref`` (``MoE.forward``'s loop over the experts), ``moe_align``'s grouping of the
tokens by expert, and the batch invariance of each token's result.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1) at small sizes, with the
configurations they use on a GPU (64-row blocks, so a handful of tokens fill a block with padding
and some 70 tokens make an expert span several). Every buffer the wrapper allocates (h, the
weighted products, the output) is filled with NaN before the kernels run, so an element a kernel
forgets, or a padding row that leaks into a token's sum, shows up. On a GPU,
``test_realistic_size_on_gpu`` runs a layer of realistic size against the reference and checks
that tokens are bitwise independent of the batch, and ``test_cuda_graph_on_gpu`` that the whole
call needs no host synchronisation and replays from a CUDA graph.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()  # without one, tests/conftest.py runs Triton interpreted
triton = pytest.importorskip("triton")
from helpers import GEMM_RTOL as RTOL, assert_close  # noqa: E402

import mamba_eval.kernels.matmul as mm  # noqa: E402
from mamba_eval.kernels import moe  # noqa: E402
from mamba_eval.models.config import MoEConfig  # noqa: E402
from mamba_eval.models.layers import MoE  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(moe, "new_output", nan_output)


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _experts(d, i, e, activation, dtype, seed=1):
    """fc1 [E, 2I or I, D] and fc2 [E, D, I], scaled as MoE.reset_parameters does."""
    fc1 = _randn(e, (2 if activation == "gated" else 1) * i, d, dtype=dtype, seed=seed, scale=d ** -0.5)
    fc2 = _randn(e, d, i, dtype=dtype, seed=seed + 1, scale=i ** -0.5)
    return fc1, fc2


def _routing(n, e, k, seed, weight_dtype, unused=()):
    """top_idx [N, k] (distinct experts per token, never one of ``unused``) and weights [N, k]:
    the softmax of the chosen logits, in ``weight_dtype``."""
    logits = torch.randn(n, e, generator=torch.Generator().manual_seed(seed))
    logits[:, list(unused)] = -torch.inf
    top, idx = logits.topk(k, dim=-1)
    return idx.to(DEVICE), torch.softmax(top, dim=-1).to(weight_dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# moe_align
# ---------------------------------------------------------------------------------------------

# (N, k, E, BLOCK_M, unused experts)
ALIGN_CASES = [
    (1, 1, 4, 16, ()),  # one pair: one block, 15 rows of padding
    (5, 2, 8, 4, (0, 7)),  # first and last expert unused
    (37, 3, 6, 8, (2,)),  # experts spanning several blocks, runs ending mid-block
    (16, 2, 2, 16, ()),  # runs of exactly one block (no padding)
    (3, 2, 64, 64, ()),  # more experts than pairs
]


@pytest.mark.parametrize("case", ALIGN_CASES, ids=lambda c: f"N{c[0]}-k{c[1]}-E{c[2]}-BM{c[3]}")
def test_align_groups_every_pair_once_by_expert(case):
    n, k, e, bm, unused = case
    top_idx, _ = _routing(n, e, k, seed=n, weight_dtype=torch.float32, unused=unused)
    a = moe.moe_align(top_idx, e, bm)
    s = n * k
    blocks = moe.max_blocks(s, e, bm)
    assert a.sorted_slots.shape == (blocks * bm,) and a.block_expert.shape == (blocks,)
    assert a.num_blocks.shape == (1,) and a.combine_row.shape == (s,)
    assert all(t.dtype == torch.int32 for t in a)
    slots, block_expert = a.sorted_slots.cpu().long(), a.block_expert.cpu().long()
    experts = top_idx.cpu().reshape(-1)

    valid = slots < s
    assert torch.equal(slots[~valid], torch.full_like(slots[~valid], s)), "padding is not the sentinel"
    assert torch.equal(slots[valid].sort().values, torch.arange(s)), "not every pair exactly once"

    count = torch.bincount(experts, minlength=e)
    used = int((-(-count // bm)).sum())
    assert int(a.num_blocks) == used
    assert (block_expert[:used] < e).all() and (block_expert[used:] == e).all()
    assert (block_expert[1:] >= block_expert[:-1]).all(), "blocks not in expert order"
    row_expert = block_expert.repeat_interleave(bm)
    for x in range(e):
        rows = (row_expert == x).nonzero()[:, 0]
        assert rows.numel() == -(-int(count[x]) // bm) * bm, f"expert {x}: run not padded to whole blocks"
        run = slots[rows]
        real = run[run < s]
        assert real.numel() == count[x] and (experts[real] == x).all(), f"expert {x}: wrong pairs"
        assert torch.equal(run[:real.numel()], real), f"expert {x}: padding before pairs"
        assert (real[1:] > real[:-1]).all(), f"expert {x}: pairs out of token order"

    # combine_row: per token a permutation of t*k .. t*k + k-1, in ascending expert order.
    combine = a.combine_row.cpu().long().view(n, k)
    for t in range(n):
        assert torch.equal(combine[t].sort().values, torch.arange(t * k, (t + 1) * k))
        by_row = experts.view(n, k)[t][combine[t].argsort()]
        assert (by_row[1:] > by_row[:-1]).all(), f"token {t}: experts not ascending"


def test_align_sizes_do_not_depend_on_the_routing():
    """Every buffer's size is a function of (N, k, E, BLOCK_M): the same for all tokens on one
    expert, spread evenly, or on random experts; and the whole computation runs on meta tensors
    (no values at all), which refuse .item(), nonzero, unique and bincount."""
    n, k, e, bm = 24, 2, 8, 8
    routings = [
        torch.stack([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)], 1),  # two experts
        torch.arange(n * k).view(n, k) % e,  # spread evenly
        _routing(n, e, k, seed=0, weight_dtype=torch.float32)[0].cpu(),
    ]
    shapes = {tuple(tuple(t.shape) for t in moe.moe_align(r.to(DEVICE), e, bm)) for r in routings}
    assert len(shapes) == 1
    meta = moe.moe_align(torch.empty(n, k, dtype=torch.long, device="meta"), e, bm)
    assert tuple(tuple(t.shape) for t in meta) in shapes
    # Some routings use fewer blocks than the worst case: those are marked unused.
    assert int(moe.moe_align(routings[0].to(DEVICE), e, bm).num_blocks) < moe.max_blocks(n * k, e, bm)


def test_align_empty():
    a = moe.moe_align(torch.zeros(0, 2, dtype=torch.long, device=DEVICE), 4, 16)
    assert a.sorted_slots.numel() == a.block_expert.numel() == a.combine_row.numel() == 0
    assert int(a.num_blocks) == 0


# ---------------------------------------------------------------------------------------------
# moe_experts against the reference
# ---------------------------------------------------------------------------------------------

# (N, D, I, E, k, unused experts); BLOCK_M is 64, fc1's BLOCK_K 64 (D >= 64) or 32 / 16 (smaller
# D), fc2's likewise for I; BLOCK_N up to 64 / 128.
CASES = [
    (1, 40, 24, 4, 1, ()),  # one token, k = 1; D, I below one block
    (13, 40, 24, 6, 2, (3,)),  # N < BLOCK_M, an expert without tokens
    (70, 72, 40, 3, 2, ()),  # experts spanning several blocks; D = 72: a masked second K step
    (9, 16, 80, 8, 3, (0, 5)),  # more experts than used; I = 80: fc2's K masked, fc1's width 2 tiles
]


@pytest.mark.parametrize("activation", moe.ACTIVATIONS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-D{c[1]}-I{c[2]}-E{c[3]}-k{c[4]}")
def test_matches_reference(case, dtype, activation):
    n, d, i, e, k, unused = case
    x = _randn(n, d, dtype=dtype, seed=0)
    fc1, fc2 = _experts(d, i, e, activation, dtype)
    top_idx, weights = _routing(n, e, k, seed=2, weight_dtype=dtype, unused=unused)
    out = moe.moe_experts(x, fc1, fc2, top_idx, weights, activation)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert_close(out, moe.moe_experts_ref(x, fc1, fc2, top_idx, weights, activation), RTOL[dtype], "out")


@pytest.mark.parametrize("activation", moe.ACTIVATIONS)
def test_strided_inputs_and_fp32_weights(activation):
    """x a column slice of a wider tensor, fc1 / fc2 transposed in memory, int32 indices, and the
    sigmoid router's fp32 weights with bf16 activations (products kept in fp32)."""
    n, d, i, e, k = 11, 40, 24, 5, 2
    dtype = torch.bfloat16
    wide = _randn(n, d + 9, dtype=dtype, seed=0)
    x = wide[:, 4:4 + d]
    fc1, fc2 = _experts(d, i, e, activation, dtype)
    fc1_t = fc1.transpose(1, 2).contiguous().transpose(1, 2)
    fc2_t = fc2.transpose(1, 2).contiguous().transpose(1, 2)
    top_idx, weights = _routing(n, e, k, seed=3, weight_dtype=torch.float32)
    out = moe.moe_experts(x, fc1_t, fc2_t, top_idx.int(), weights * 2.5, activation)
    expected = moe.moe_experts_ref(x, fc1, fc2, top_idx, weights * 2.5, activation)
    assert_close(out, expected, RTOL[dtype], "out")
    assert torch.equal(out, moe.moe_experts(x.contiguous(), fc1, fc2, top_idx, weights * 2.5, activation))


# fp32 and fp16 with the ReLU^2 experts (no silu, whose last bits differ between numpy's exp and
# torch's): every rounding is the reference's, every fp32 sum that of matmul.linear, so the output
# must be the reference's bits, including the order in which a token's k > 2 experts are added
# (fp32 additions do not commute beyond two terms) and the rounding of the weighted products
# (to fp16 with fp16 weights, none with fp32 weights; fp32 activations with fp16 weights promote
# to fp32).
@pytest.mark.skipif(ON_GPU, reason="the interpreter's products are linear's; on a GPU the tiles differ")
@pytest.mark.parametrize("case", [(3, "fp32", "fp32"), (4, "fp32", "fp16"), (3, "fp16", "fp16"), (4, "fp16", "fp32")],
                         ids=lambda c: f"k{c[0]}-{c[1]}-weights_{c[2]}")
def test_same_bits_as_the_layer_loop_with_linear(case):
    k, dtype, weight_dtype = case[0], DTYPES[case[1]], DTYPES[case[2]]
    n, d, i, e = 30, 40, 24, 6
    x = _randn(n, d, dtype=dtype, seed=0)
    fc1, fc2 = _experts(d, i, e, "relu2", dtype)
    top_idx, weights = _routing(n, e, k, seed=4, weight_dtype=weight_dtype)
    out = moe.moe_experts(x, fc1, fc2, top_idx, weights, "relu2")
    expected = moe.moe_experts_ref(x, fc1, fc2, top_idx, weights, "relu2", linear=mm.linear)
    assert torch.equal(out, expected), f"{int((out != expected).sum())} of {out.numel()} elements differ"


@pytest.mark.skipif(ON_GPU, reason="the interpreter's products are linear's; on a GPU the tiles differ")
def test_gated_rounds_where_the_layer_loop_rounds():
    """fp16 gated experts: silu's last fp32 bits (numpy's exp against torch's) may move a rounding
    of the gate by one ulp, so a few elements differ from the loop with ``linear`` (1% here); a
    rounding of the reference left out (silu(gate) or y * silu(gate) kept in fp32) moves most."""
    n, d, i, e, k = 30, 40, 24, 6, 3
    dtype = torch.float16
    x = _randn(n, d, dtype=dtype, seed=0)
    fc1, fc2 = _experts(d, i, e, "gated", dtype)
    top_idx, weights = _routing(n, e, k, seed=4, weight_dtype=dtype)
    out = moe.moe_experts(x, fc1, fc2, top_idx, weights, "gated")
    expected = moe.moe_experts_ref(x, fc1, fc2, top_idx, weights, "gated", linear=mm.linear)
    assert_close(out, expected, RTOL[dtype], "out")
    assert (out != expected).float().mean() < 0.05, f"{int((out != expected).sum())} of {out.numel()} differ"


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("activation", moe.ACTIVATIONS)
def test_reference_equals_every_expert_on_every_row(activation, router):
    """moe_experts_ref (MoE.forward's routed products) against MoE's dense form, which runs every
    expert on every row weighted 0 where not chosen: the same sum, by another route (fp32; the
    rows' products differ in their last bits, as F.linear's do by row count on the CPU)."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=6, top_k=2, d_expert=24, experts=activation, router=router)
    layer = MoE(40, cfg)
    layer.reset_parameters()
    x = torch.randn(17, 40)
    with torch.no_grad():
        top_idx, weights = layer._route(x, F.linear)
        expected = layer._all_experts(x)
        out = moe.moe_experts_ref(x, layer.fc1, layer.fc2, top_idx, weights, activation)
    assert len(set(top_idx.flatten().tolist())) == 6  # every expert gets rows
    assert_close(out, expected, 1e-5, "routed vs dense")


def test_empty_and_bad_inputs():
    d, i, e = 8, 4, 3
    fc1, fc2 = _experts(d, i, e, "gated", torch.float32)
    top_idx, weights = _routing(5, e, 2, seed=0, weight_dtype=torch.float32)
    x = _randn(5, d, dtype=torch.float32, seed=0)
    empty = moe.moe_experts(x[:0], fc1, fc2, top_idx[:0], weights[:0], "gated")
    assert empty.shape == (0, d) and empty.dtype == torch.float32
    none = moe.moe_experts(x, fc1, fc2, top_idx[:, :0], weights[:, :0], "gated")  # k = 0: nothing added
    assert torch.equal(none, torch.zeros(5, d, device=DEVICE))
    with pytest.raises(ValueError, match="activation"):
        moe.moe_experts(x, fc1, fc2, top_idx, weights, "swiglu")
    with pytest.raises(ValueError, match="fc1 must be"):
        moe.moe_experts(x, fc1, fc2, top_idx, weights, "relu2")  # fc1 has 2I rows
    with pytest.raises(ValueError, match="one dtype"):
        moe.moe_experts(x, fc1.bfloat16(), fc2, top_idx, weights, "gated")
    with pytest.raises(ValueError, match="top_idx and weights"):
        moe.moe_experts(x, fc1, fc2, top_idx[:4], weights, "gated")
    with pytest.raises(ValueError, match="integers"):
        moe.moe_experts(x, fc1, fc2, top_idx.float(), weights, "gated")
    with pytest.raises(ValueError, match="supports float16"):
        moe.moe_experts(x.double(), fc1.double(), fc2.double(), top_idx, weights, "gated")


# ---------------------------------------------------------------------------------------------
# Batch invariance
# ---------------------------------------------------------------------------------------------


def _tokens_are_independent(x, fc1, fc2, top_idx, weights, activation, subsets) -> None:
    """Tokens computed among all of x, within subsets of the tokens, and in shuffled order: the
    same bits."""
    full = moe.moe_experts(x, fc1, fc2, top_idx, weights, activation)
    gen = torch.Generator().manual_seed(0)
    for size in subsets:
        rows = torch.randperm(x.shape[0], generator=gen)[:size].to(x.device)
        part = moe.moe_experts(x[rows], fc1, fc2, top_idx[rows], weights[rows], activation)
        assert torch.equal(part, full[rows]), f"{size} tokens differ from the same tokens among {x.shape[0]}"
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    shuffled = moe.moe_experts(x[perm], fc1, fc2, top_idx[perm], weights[perm], activation)
    assert torch.equal(shuffled, full[perm]), "shuffled tokens differ"


@pytest.mark.parametrize("activation", moe.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tokens_do_not_depend_on_the_other_tokens(dtype, activation):
    """1, 5 and 40 of 90 tokens (k = 2 of 4 experts: each expert's run spans several 64-row blocks
    in the full batch, part of one alone), and all 90 shuffled."""
    n, d, i, e, k = 90, 40, 24, 4, 2
    x = _randn(n, d, dtype=dtype, seed=5)
    fc1, fc2 = _experts(d, i, e, activation, dtype, seed=6)
    top_idx, weights = _routing(n, e, k, seed=7, weight_dtype=dtype)
    _tokens_are_independent(x, fc1, fc2, top_idx, weights, activation, subsets=(1, 5, 40))


class _LaunchSpy:
    """Stands in for a Triton kernel: records every launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_launch_configuration_does_not_depend_on_n(monkeypatch):
    """What the wrapper launches (tiles, warps, stages, masks) is the same for N = 1, 7, 64, 150."""
    spies = {}
    for name in ("_moe_fc1_kernel", "_moe_fc2_kernel", "_moe_sum_kernel"):
        spies[name] = _LaunchSpy(getattr(moe, name))
        monkeypatch.setattr(moe, name, spies[name])
    d, i, e, k = 40, 24, 4, 2
    fc1, fc2 = _experts(d, i, e, "gated", torch.bfloat16)
    for n in (1, 7, 64, 150):
        top_idx, weights = _routing(n, e, k, seed=n, weight_dtype=torch.bfloat16)
        moe.moe_experts(_randn(n, d, dtype=torch.bfloat16, seed=n), fc1, fc2, top_idx, weights, "gated")
    for name, spy in spies.items():
        assert len(spy.launches) == 4 and all(kw == spy.launches[0] for kw in spy.launches), name


# (name, D, I, E): routed experts of the sizes of current hybrid MoE models.
REAL_SHAPES = [("D1536-I512-E64", 1536, 512, 64), ("D4096-I768-E72", 4096, 768, 72),
               ("D2688-I1856-E128", 2688, 1856, 128)]


@pytest.mark.parametrize("activation", moe.ACTIVATIONS)
@pytest.mark.parametrize("hip", [False, True], ids=["cuda", "rocm"])
def test_configurations_of_the_real_shapes(hip, activation):
    """Powers of two, linear's BLOCK_K for the same weights, and shared memory within the GPU's
    (227 KiB a program on an H100/H200, 64 KiB on AMD)."""
    gated = activation == "gated"
    for dtype in DTYPES.values():
        for name, d, i, e in REAL_SHAPES:
            cfg = moe._moe_config(d, i, e, dtype, gated, hip=hip)
            elem = torch.finfo(dtype).bits // 8
            for key, (n, kk), b_tiles in (("fc1", ((2 if gated else 1) * i, d), 2 if gated else 1),
                                         ("fc2", (d, i), 1)):
                c = cfg[key]
                for size in (cfg["block_m"], c["block_n"], c["block_k"]):
                    assert size >= 16 and size & (size - 1) == 0, (name, key, cfg)
                assert c["block_k"] == mm._linear_config(n, kk, dtype, hip=hip)["block_k"], (name, key)
                smem = c["num_stages"] * (cfg["block_m"] + b_tiles * c["block_n"]) * c["block_k"] * elem
                assert smem <= (64 if hip else 227) * 1024, (name, key, dtype, cfg)


# ---------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("activation", moe.ACTIVATIONS)
def test_realistic_size_on_gpu(activation):
    """bf16, D = 1536, I = 512, E = 64, k = 8 at N = 1, 64 and 4096: close to the reference; and
    tokens bitwise equal among 4096, alone, among 64, among 1000 and shuffled."""
    n, d, i, e, k = 4096, 1536, 512, 64, 8
    dtype = torch.bfloat16
    x = _randn(n, d, dtype=dtype, seed=0)
    fc1, fc2 = _experts(d, i, e, activation, dtype)
    top_idx, weights = _routing(n, e, k, seed=2, weight_dtype=dtype)
    for m in (1, 64, n):
        out = moe.moe_experts(x[:m], fc1, fc2, top_idx[:m], weights[:m], activation)
        expected = moe.moe_experts_ref(x[:m], fc1, fc2, top_idx[:m], weights[:m], activation)
        assert_close(out, expected, RTOL[dtype], f"out, N = {m}")
    _tokens_are_independent(x, fc1, fc2, top_idx, weights, activation, subsets=(1, 64, 1000))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_cuda_graph_on_gpu():
    """No host synchronisation (torch's sync debug mode raises on one), and a CUDA graph captured
    on one routing replays another one to the bits of a direct call."""
    n, d, i, e, k = 64, 256, 128, 16, 4
    dtype = torch.bfloat16
    fc1, fc2 = _experts(d, i, e, "gated", dtype)
    x = _randn(n, d, dtype=dtype, seed=0)
    top_idx, weights = _routing(n, e, k, seed=1, weight_dtype=dtype)
    moe.moe_experts(x, fc1, fc2, top_idx, weights, "gated")  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe.moe_experts(x, fc1, fc2, top_idx, weights, "gated")
    finally:
        torch.cuda.set_sync_debug_mode("default")

    x_in, top_in, w_in = x.clone(), top_idx.clone(), weights.clone()
    stream = torch.cuda.Stream()  # warm up on a side stream, as torch.cuda.graphs recommends
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe.moe_experts(x_in, fc1, fc2, top_in, w_in, "gated")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe.moe_experts(x_in, fc1, fc2, top_in, w_in, "gated")
    x2 = _randn(n, d, dtype=dtype, seed=5)
    top2, w2 = _routing(n, e, k, seed=6, weight_dtype=dtype, unused=range(8))  # half the experts idle
    x_in.copy_(x2)
    top_in.copy_(top2)
    w_in.copy_(w2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, moe.moe_experts(x2, fc1, fc2, top2, w2, "gated"))


@pytest.mark.parametrize("activation", moe.ACTIVATIONS)
def test_the_layer_runs_its_experts_through_the_kernel_when_the_backend_has_it(activation, monkeypatch):
    """MoE with the Triton backend's moe_experts (enabled here as it will be once validated on a
    GPU): its forward and its decoding steps (routed, as a CUDA graph can hold the kernel) equal
    the layer on the references."""
    from mamba_eval.models import ops as ops_mod

    monkeypatch.setattr(ops_mod, "_REF_ONLY", tuple(f for f in ops_mod._REF_ONLY if f != "moe_experts"))
    triton_ops, ref_ops = ops_mod.get_ops("triton"), ops_mod.get_ops("ref")
    assert "moe_experts" in triton_ops.kernels and "moe_experts" not in ref_ops.kernels
    cfg = MoEConfig(num_experts=5, top_k=2, d_expert=24, d_shared=16, experts=activation,
                    router="sigmoid" if activation == "relu2" else "softmax")
    torch.manual_seed(0)
    ours = MoE(40, cfg, triton_ops)
    ours.reset_parameters()
    reference = MoE(40, cfg, ref_ops)
    reference.load_state_dict(ours.state_dict())
    ours, reference = ours.to(DEVICE), reference.to(DEVICE)
    assert ours.routed_steps and not reference.routed_steps
    x = torch.randn(2, 9, 40).to(DEVICE)
    with torch.no_grad():
        expected = reference(x)
        assert_close(ours(x), expected, 1e-5, "forward")
        assert_close(ours.step(x[:, 3]), expected[:, 3], 1e-5, "step")
