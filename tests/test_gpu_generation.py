"""On a GPU: the CUDA-graph decoding path of ``mamba_eval.harness.generation`` against eager decoding and
the full forward, on the triton backend.

Skipped without CUDA (CI has no GPU); run on the GPU machine with
``python -m pytest -q tests/test_gpu_generation.py``.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from mamba_eval.harness.generation import DecodeRunner, SamplingParams, generate
from mamba_eval.models.config import ModelConfig, mamba_stack
from mamba_eval.models.model import LanguageModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def _config(arch: str) -> ModelConfig:
    common = dict(d_model=256, n_layer=4, vocab_size=512, d_conv=4, expand=2, conv_bias=True, proj_bias=False,
                  rms_norm=True, norm_eps=1e-5, residual_in_fp32=True, tie_embeddings=True)
    if arch == "mamba1":
        return mamba_stack(arch="mamba1", d_state=16, dt_rank=16, **common)
    return mamba_stack(arch="mamba2", d_state=64, headdim=32, ngroups=2, chunk_size=64, **common)


@pytest.fixture(params=["mamba1", "mamba2"])
def model(request):
    torch.manual_seed(0)
    m = LanguageModel(_config(request.param), backend="triton", device=CUDA, dtype=torch.float32)
    with torch.no_grad():  # a spread-out output distribution: no near-ties between greedy candidates
        m.backbone.embedding.weight.normal_(0.0, 0.5)
    return m


@torch.inference_mode()
def test_graph_replay_equals_full_forward_step_by_step(model):
    """Teacher forcing through captured graphs gives the full forward's logits at every position."""
    gen = torch.Generator().manual_seed(1)
    batch, length = 5, 24
    ids = torch.randint(1, model.config.vocab_size, (batch, length), generator=gen).to(CUDA)
    full, _ = model(ids)
    prompt = 8
    hidden, state = model.backbone_forward(ids[:, :prompt], return_state=True)
    runner = DecodeRunner(model, batch, cuda_graphs=True)
    runner.capture()
    assert sorted(runner.graphs) == [1, 2, 4, 5]
    runner.load(state)
    assert_close(model.lm_logits(hidden[:, -1]), full[:, prompt - 1], rtol_max=1e-4)
    for t in range(prompt, length):
        logits = runner.run(ids[:, t])
        assert_close(logits, full[:, t], rtol_max=1e-4)


@torch.inference_mode()
def test_graphs_equal_eager_and_batch_one():
    """Greedy tokens: CUDA graphs == eager, batched == one prompt at a time, mixed lengths, with
    sequences leaving the batch early (compaction, smaller graphs of the ladder)."""
    torch.manual_seed(0)
    for arch in ("mamba1", "mamba2"):
        m = LanguageModel(_config(arch), backend="triton", device=CUDA, dtype=torch.float32)
        with torch.no_grad():
            m.backbone.embedding.weight.normal_(0.0, 0.5)
        gen = torch.Generator().manual_seed(2)
        prompts = [torch.randint(1, 512, (n,), generator=gen).tolist() for n in (9, 9, 9, 4, 9, 17, 9)]
        limits = {0: 3, 2: 11, 4: 1}  # rows that stop early, after this many generated tokens
        eager = generate(m, prompts, max_new_tokens=20, batch_size=8, device=CUDA, cuda_graphs=False)
        graphs = generate(m, prompts, max_new_tokens=20, batch_size=8, device=CUDA, cuda_graphs=True)
        alone = [generate(m, [p], max_new_tokens=20, device=CUDA, cuda_graphs=True)[0] for p in prompts]
        assert graphs == eager
        assert graphs == alone
        # Early stops: a stop condition on the generated tokens ends some rows after a few steps.
        targets = {i: graphs[i][n - 1] for i, n in limits.items()}
        is_stopped = _first_hit_checker(graphs, targets)
        cut = generate(m, prompts, max_new_tokens=20, batch_size=8, device=CUDA, cuda_graphs=True,
                       is_stopped=is_stopped)
        for i, out in enumerate(cut):
            expected = graphs[i]
            for j in range(len(expected)):
                if is_stopped(expected[:j + 1]):
                    expected = expected[:j + 1]
                    break
            assert out == expected
        assert any(len(out) < 20 for out in cut)


def _first_hit_checker(outputs, targets):
    """Stop a sequence when its generated tokens equal a listed output's first tokens up to the
    target (so the listed rows stop early and the others run to the end)."""
    prefixes = [tuple(outputs[i][:outputs[i].index(tok) + 1]) for i, tok in targets.items()]
    return lambda toks: tuple(toks) in prefixes


@torch.inference_mode()
def test_seeded_sampling_with_graphs_is_reproducible(model):
    prompts = [[3, 4, 5], [9, 8, 7]]
    params = SamplingParams(do_sample=True, temperature=1.0, top_k=50, top_p=0.95, seed=11)
    a = generate(model, prompts, max_new_tokens=12, params=params, device=CUDA, cuda_graphs=True)
    b = generate(model, prompts, max_new_tokens=12, params=params, device=CUDA, cuda_graphs=True)
    assert a == b


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@torch.inference_mode()
def test_bf16_default_decoding_is_batch_invariant(arch):
    """The default path (bf16, batch-invariant): a prompt's greedy tokens are the same bits at
    batch 1, 8 and 64, and each is the full forward's greedy choice at that position, except where
    the forward's own top two logits lie within bf16 rounding of each other (a near-tie, which a
    step and a chunked scan may break differently; the test counts those and bounds them)."""
    torch.manual_seed(0)
    m = LanguageModel(_config(arch), backend="triton", device=CUDA, dtype=torch.bfloat16, batch_invariant=True)
    with torch.no_grad():
        m.backbone.embedding.weight.normal_(0.0, 0.5)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 512, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 40, (64,), generator=gen)]
    new = 24
    by_batch = {b: generate(m, prompts, max_new_tokens=new, batch_size=b, device=CUDA, cuda_graphs=True)
                for b in (64, 8, 1)}
    assert by_batch[8] == by_batch[64]
    assert by_batch[1] == by_batch[64]

    near_ties = 0
    for prompt, out in zip(prompts, by_batch[64]):
        ids = torch.tensor([prompt + out], device=CUDA)
        logits = m(ids)[0][0, len(prompt) - 1:-1].float()  # the logits that chose each generated token
        best = logits.max(dim=-1).values
        chosen = logits.gather(-1, torch.tensor(out, device=CUDA)[:, None])[:, 0]
        differ = chosen != best
        # bf16 keeps 8 bits: two logits within a few units of the last place of the largest are a tie.
        tie = (best - chosen) <= 4 * 2.0**-8 * best.abs().clamp_min(1.0)
        assert bool((~differ | tie).all()), f"a generated token is not the forward's greedy choice: {prompt}"
        near_ties += int(differ.sum())
    assert near_ties <= 0.02 * 64 * new, f"{near_ties} near-ties among {64 * new} tokens"
