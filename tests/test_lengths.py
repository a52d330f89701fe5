"""``backbone_forward(..., lengths=...)``: rows of different lengths in one right-padded pass,
each row's returned state the state after its own last real token, bit for bit.

The reference for row b is the same batch cut at row b's length (``input_ids[:, :len_b]``) run
without ``lengths``: the operators are the same, only the padding after row b differs. On the
reference backend the batch is repeated to 64 rows, so that with one intra-op thread every
forward holds a multiple of 64 positions and every matrix product 64 rows or more: the CPU
libraries' own dependence on the batch's size (``mamba_eval.models.invariance``) stays out of the
comparison. The Triton kernels compute each row on its own and need no such care.
"""

from __future__ import annotations

import os

import pytest
import torch

from mamba_eval.models.config import AttnConfig, ModelConfig, mamba_stack
from mamba_eval.models.model import LanguageModel

COMMON = dict(n_layer=2, vocab_size=64, d_conv=4, expand=2, conv_bias=True, proj_bias=False, rms_norm=True,
              norm_eps=1e-5, residual_in_fp32=True, tie_embeddings=True)


def _config(arch: str, **extra) -> ModelConfig:
    if arch == "mamba1":
        return mamba_stack(arch="mamba1", d_model=16, d_state=4, dt_rank=2, **{**COMMON, **extra})
    # chunk 4: rows of 1, 2, 3, 5, 7 and 9 positions end inside a chunk, padded rows cross several
    return mamba_stack(arch="mamba2", d_model=16, d_state=4, headdim=8, ngroups=1, chunk_size=4,
                       **{**COMMON, **extra})


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(arch: str, backend: str = "ref", batch_invariant: bool = False, **extra) -> LanguageModel:
    torch.manual_seed(0)
    # The Triton backend runs on the GPU where there is one (else in the interpreter on the CPU).
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    model = LanguageModel(_config(arch, **extra), backend=backend, dtype=torch.float32,
                          batch_invariant=batch_invariant, device=device)
    # Larger Δ and conv weights than the initialisation gives, so that states differ visibly
    # between positions (a wrong position would not pass for a right one by decaying to zero).
    for layer in model.backbone.layers:
        layer.mixer.conv1d.weight.mul_(3.0)
    return model


def _check(model: LanguageModel, lengths: list[int], width: int, initial: bool = False, rows: int = 1,
           exact: bool = True, same_math: bool = False):
    """Row b's state from one padded pass with ``lengths`` equals its final state from the batch
    cut at its length; hidden states at real positions are those without lengths. The batch is
    repeated to ``rows`` rows at least (CPU shape rules: see the module docstring).

    Where the cut batch ran the same arithmetic as the padded pass (its hidden states equal the
    padded pass's bit for bit) the states must be equal bit for bit; where a library's matrix
    products gave other last bits for the shorter batch, they are compared to within fp32
    rounding (a wrong position is still far off). ``same_math`` requires the former (the Triton
    kernels compute each row on its own); ``exact=False`` compares SSM states to within fp32
    rounding always."""
    gen = torch.Generator().manual_seed(1)
    reps = -(-rows // len(lengths))
    lengths = lengths * reps
    batch = len(lengths)
    device = model.lm_head.weight.device
    ids = torch.randint(0, model.config.vocab_size, (batch // reps, width), generator=gen).repeat(reps, 1).to(device)
    state = None
    if initial:  # a nonzero starting state (conv window and SSM state), as a forked context gives
        prefix = torch.randint(0, model.config.vocab_size, (batch // reps, 6), generator=gen).repeat(reps, 1)
        _, state = model.backbone_forward(prefix.to(device), return_state=True)
    lens = torch.tensor(lengths, dtype=torch.long, device=device)
    hidden, got = model.backbone_forward(ids, state=state, return_state=True, lengths=lens)
    plain, padded_state = model.backbone_forward(ids, state=state, return_state=True)
    for b, n in enumerate(lengths):
        assert torch.equal(hidden[b, :n], plain[b, :n]), f"row {b}: hidden states changed by lengths"
    for n in sorted(set(lengths)):
        cut, want = model.backbone_forward(ids[:, :n], state=state, return_state=True)
        bitwise = torch.equal(cut, plain[:, :n])
        assert bitwise or not same_math, f"length {n}: the cut batch's hidden states differ"
        for b in [b for b, m in enumerate(lengths) if m == n]:
            for i, (g, w) in enumerate(zip(got, want)):
                where = f"layer {i} row {b} (length {n})"
                if bitwise:
                    assert torch.equal(g.conv[b], w.conv[b]), f"{where}: conv state differs"
                else:
                    torch.testing.assert_close(g.conv[b], w.conv[b], rtol=1e-5, atol=1e-6, msg=where)
                if bitwise and exact:
                    assert torch.equal(g.ssm[b], w.ssm[b]), f"{where}: SSM state differs"
                else:
                    torch.testing.assert_close(g.ssm[b], w.ssm[b], rtol=1e-5, atol=1e-6, msg=where)
                assert torch.isfinite(g.ssm[b]).all()
    # The padding really matters: without lengths a short row's state is not its own.
    short = min(range(batch), key=lambda b: lengths[b])
    assert not torch.equal(padded_state[0].ssm[short], got[0].ssm[short])


# lengths: two as long as the batch, three shorter than the conv width (1, 2, 3), ragged chunks
LENGTHS = [13, 1, 9, 2, 5, 3, 13, 7]

# On the CPU, Mamba-1's out_proj over the transposed scan output gives other last bits in a
# forward of 1-3 positions than in a longer one (a library effect the scoring engine keeps
# clear of: models.rows.RAGGED_MIN_LENGTH): for rows that short the cut batch is not the same
# arithmetic, and _check compares their states to within rounding. Other CPUs and library
# versions draw that line elsewhere; the Triton kernels do not.


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_ref_states_equal_each_row_at_its_own_length(arch):
    _check(_model(arch), LENGTHS, 13, rows=64)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_ref_states_from_an_initial_state(arch):
    # Mamba-2's reference scan sums the chunks' contributions to the final state in one product
    # over the chunk count: from a nonzero initial state, the padded pass's extra (empty) chunks
    # change how that sum is cut, hence its last bits. The engine's context passes start from
    # zero, where the extra terms are exact zeros; from an initial state the SSM states agree to
    # fp32 rounding, the conv windows exactly.
    _check(_model(arch), LENGTHS, 13, initial=True, rows=64, exact=arch == "mamba1")


def test_ref_falcon_norms():
    _check(_model("mamba1", bcdt_rmsnorm=True), LENGTHS, 13, rows=64)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("batch_invariant", [False, True], ids=["plain", "batch-invariant"])
def test_triton_interpreter_states_equal_each_row_at_its_own_length(arch, batch_invariant, monkeypatch):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1")
    # Few rows and positions: the interpreter is slow, and each row's reference forward is run
    # at every distinct length.
    lengths = [7, 1, 3, 5] if arch == "mamba1" else [9, 1, 6, 2, 9]
    _check(_model(arch, backend="triton", batch_invariant=batch_invariant), lengths, max(lengths),
           initial=True, same_math=batch_invariant)


def test_lengths_refused_for_attention_and_bad_shapes():
    attn = AttnConfig(num_heads=2, num_heads_kv=1, head_dim=8)
    model = LanguageModel(_config("mamba1", attn_layer_idx=(1,), attn=attn), dtype=torch.float32)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention"):
        model.backbone_forward(ids, return_state=True, lengths=torch.tensor([5, 3]))
    model = _model("mamba2")
    with pytest.raises(ValueError, match="return_state"):
        model.backbone_forward(ids, lengths=torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="lengths must be"):
        model.backbone_forward(ids, return_state=True, lengths=torch.tensor([5, 3, 1]))
    with pytest.raises(ValueError, match="lengths must be"):
        model.backbone_forward(ids, return_state=True, lengths=torch.tensor([5.0, 3.0]))
