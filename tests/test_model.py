"""The model against transformers' Mamba classes, and its state handling against its own full forward."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, rel_max_error

from mamba_eval.models.checkpoint import load_model
from mamba_eval.models.model import LanguageModel

LENGTH = 37  # not a multiple of the Mamba-2 test chunk size (16); three chunks
PIECES = (11, 5, 21)  # an uneven split of LENGTH


def _ids(spec, batch=2, length=LENGTH, seed=0):
    return torch.randint(0, spec.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ours(checkpoint):
    """``ours(name, fmt)``: our model loaded from that checkpoint folder (fp32), cached per module."""
    cache = {}

    def get(name, fmt="transformers"):
        if (name, fmt) not in cache:
            cache[name, fmt] = load_model(str(checkpoint(name).dir(fmt)))
        return cache[name, fmt]

    return get


@pytest.mark.parametrize("fmt", ["transformers", "mamba_ssm"])
def test_logits_match_transformers(checkpoint, ours, ckpt_name, fmt):
    name = ckpt_name
    ckpt = checkpoint(name)
    model = ours(name, fmt)
    ids = _ids(ckpt.spec)
    with torch.no_grad():
        expected = ckpt.hf_model(ids, use_cache=False).logits
    logits, state = model(ids)
    assert state is None
    assert logits.dtype == torch.float32
    assert logits.shape == (2, LENGTH, ckpt.spec.stored_vocab)
    assert expected.std() > 0.1  # the reference is not degenerate
    assert_close(logits, expected, rtol_max=1e-4, name=f"{name} from {fmt}")


def test_tied_embeddings_share_storage(ours, ckpt_name):
    name = ckpt_name
    model = ours(name)
    tied = model.lm_head.weight is model.backbone.embedding.weight
    assert tied == model.config.tie_embeddings


def test_state_passing_equals_one_pass(ours, checkpoint, ckpt_name):
    name = ckpt_name
    model = ours(name)
    ids = _ids(checkpoint(name).spec, seed=1)
    full, full_state = model(ids, return_state=True)
    pieces, stateless, state = [], [], None
    for chunk in ids.split(PIECES, dim=1):
        logits, state = model(chunk, state=state, return_state=True)
        pieces.append(logits)
        stateless.append(model(chunk)[0])
    assert_close(torch.cat(pieces, dim=1), full, rtol_max=1e-5, name="chained logits")
    for i, (a, b) in enumerate(zip(state, full_state)):
        assert_close(a.conv, b.conv, rtol_max=1e-6, name=f"layer {i} conv state")
        assert_close(a.ssm, b.ssm, rtol_max=1e-5, name=f"layer {i} ssm state")
    # The test is sensitive: dropping the state between pieces changes the logits clearly.
    assert rel_max_error(torch.cat(stateless, dim=1), full) > 1e-3


@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "four-op-step"])
def test_step_equals_forward(ours, checkpoint, ckpt_name, fused, monkeypatch):
    """Both Mamba-1 decoding paths (the fused op for few rows, the four ops for many)."""
    import mamba_eval.models.mixers.mamba1 as model_mod

    monkeypatch.setattr(model_mod, "FUSED_DECODE_MAX_ELEMENTS", 1 << 30 if fused else 0)
    name = ckpt_name
    model = ours(name)
    ids = _ids(checkpoint(name).spec, seed=2)
    full, _ = model(ids)
    # Token by token from the zero state.
    state = model.allocate_state(ids.shape[0])
    stepped = torch.stack([model.step(ids[:, t], state) for t in range(ids.shape[1])], dim=1)
    assert_close(stepped, full, rtol_max=1e-5, name="step from zeros")
    # Prefill with forward, then decode with step (how generation uses them).
    prefix = 20
    _, state = model(ids[:, :prefix], return_state=True)
    decoded = torch.stack([model.step(ids[:, t], state) for t in range(prefix, ids.shape[1])], dim=1)
    assert_close(decoded, full[:, prefix:], rtol_max=1e-5, name="step after prefill")


@pytest.mark.parametrize("name", ["mamba1-small", "mamba2-small"])
def test_forked_states_continue_each_sequence(ours, checkpoint, name):
    """index_select forks a prefix's state; each fork continues as if it had seen the prefix."""
    model = ours(name)
    spec = checkpoint(name).spec
    prefix, suffix = _ids(spec, batch=2, length=9, seed=3), _ids(spec, batch=3, length=6, seed=4)
    _, state = model(prefix, return_state=True)
    rows = [1, 0, 1]
    forked = [s.index_select(rows) for s in state]
    snapshot = [s.clone() for s in forked]
    logits, _ = model(suffix, state=forked)
    for a, b in zip(forked, snapshot):  # forward reads the state, never writes it
        assert torch.equal(a.conv, b.conv) and torch.equal(a.ssm, b.ssm)
    expected, _ = model(torch.cat([prefix[rows], suffix], dim=1))
    assert_close(logits, expected[:, prefix.shape[1]:], rtol_max=1e-5)


@pytest.mark.parametrize("name", ["mamba1-small", "mamba2-small"])
def test_half_precision_keeps_ssm_parameters_fp32(checkpoint, ours, name):
    ckpt = checkpoint(name)
    model = load_model(str(ckpt.hf_dir), dtype="bfloat16")
    mixer = model.backbone.layers[0].mixer
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    dt_bias = mixer.dt_proj.bias if ckpt.spec.arch == "mamba1" else mixer.dt_bias
    for p in (mixer.A_log, mixer.D, dt_bias):
        assert p.dtype == torch.float32
    ids = _ids(ckpt.spec)
    logits, state = model(ids, return_state=True)
    assert logits.dtype == torch.float32
    assert state[0].conv.dtype == torch.bfloat16 and state[0].ssm.dtype == torch.float32
    assert_close(logits, ours(name)(ids)[0], rtol_max=5e-2, name="bf16 vs fp32")


def test_random_init_model_runs_and_rejects_bad_input():
    from mamba_eval.models.config import mamba_stack

    config = mamba_stack(arch="mamba2", d_model=32, n_layer=1, vocab_size=40, d_state=4, d_conv=4, expand=2,
                         dt_rank=0, headdim=8, ngroups=2, chunk_size=4)
    torch.manual_seed(0)
    model = LanguageModel(config)
    assert not any(p.requires_grad for p in model.parameters())
    logits, _ = model(torch.randint(0, 40, (1, 7)))
    assert torch.isfinite(logits).all() and logits.shape == (1, 7, 40)
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.zeros(1, 7))
    with pytest.raises(ValueError, match="state is for batch size 2"):
        model(torch.zeros(1, 3, dtype=torch.long), state=model.allocate_state(2))
    with pytest.raises(ValueError, match="unknown kernel backend 'tritonn'"):
        LanguageModel(config, backend="tritonn")


def test_layernorm_variant_has_norm_biases():
    """mamba_ssm's rms_norm=False builds LayerNorms (weight and bias) for the blocks and norm_f."""
    from mamba_eval.models.config import mamba_stack

    config = mamba_stack(arch="mamba1", d_model=16, n_layer=2, vocab_size=24, d_state=4, d_conv=3, expand=2,
                         dt_rank=2, headdim=0, ngroups=1, chunk_size=0, rms_norm=False)
    torch.manual_seed(0)
    model = LanguageModel(config)
    names = set(model.state_dict())
    assert {"backbone.norm_f.bias", "backbone.layers.1.norm.bias"} <= names
    ids = torch.randint(0, 24, (2, 9))
    full, _ = model(ids)
    state = model.allocate_state(2)
    stepped = torch.stack([model.step(ids[:, t], state) for t in range(9)], dim=1)
    assert_close(stepped, full, rtol_max=1e-5)


@pytest.mark.parametrize("name", ["mamba1-tiny", "mamba2-tiny"])
def test_cached_A_follows_the_parameter(checkpoint, name):
    """A = -exp(A_log) is cached per mixer, recomputed when A_log is written, and differentiable
    when gradients flow to A_log (training)."""
    from mamba_eval.models.checkpoint import load_model

    model = load_model(checkpoint(name).ssm_dir, dtype="float32")
    mixer = model.backbone.layers[0].mixer
    a = mixer.neg_A()
    assert torch.equal(a, -torch.exp(mixer.A_log.float()))
    assert mixer.neg_A() is a
    ids = torch.tensor([[3, 4, 5, 6]])
    before, _ = model(ids)
    with torch.no_grad():
        mixer.A_log.add_(0.5)
    assert torch.equal(mixer.neg_A(), -torch.exp(mixer.A_log.float()))
    after, _ = model(ids)
    assert not torch.equal(before, after)
    mixer.A_log.requires_grad_(True)
    mixer.neg_A().sum().backward()
    assert mixer.A_log.grad is not None
