"""transformers' hybrid families read from their own format (``mamba_eval.models.hf_hybrids``).

Each family: a tiny random-init checkpoint written by its transformers class (parameters moved off
their constant initial values), read by our loader; our fp32 logits must equal transformers' and
step-by-step decoding must equal one forward. The config readers refuse what they do not
implement with one line naming the field. (``test_lm_eval_e2e`` runs Bamba through lm-eval against
``--model hf`` on real task data.)
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_close, perturb
from mamba_eval.models.checkpoint import CheckpointError, load_model, read_config

transformers = pytest.importorskip("transformers")

LENGTH = 21
BAMBA = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=24, attn_layer_indices=[0, 2], mamba_n_heads=8, mamba_d_head=16,
             mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=3, mamba_chunk_size=8, attention_bias=True,
             rms_norm_eps=1e-6, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.75})


@pytest.fixture(scope="module")
def bamba(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bamba")
    torch.manual_seed(0)
    model = transformers.BambaForCausalLM(transformers.BambaConfig(**BAMBA)).eval()
    perturb(model, torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    model.save_pretrained(folder)
    return folder, model


def _ids(vocab, batch=2, seed=0):
    return torch.randint(0, vocab, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))


def test_bamba_config(bamba):
    cfg = read_config(bamba[0])
    attn = cfg.mixers("attention")[0]
    mamba = cfg.mixers("mamba2")[0]
    assert cfg.layer_indices("attention") == (0, 2) and cfg.layers[1].mlp.d_intermediate == 80
    assert (attn.num_heads, attn.num_heads_kv, attn.head_dim, attn.rotary_emb_dim, attn.rotary_emb_base) == (
        4, 2, 24, 18, 500.0)
    assert attn.qkv_proj_bias and attn.out_proj_bias and not attn.rotary_emb_interleaved
    assert (mamba.nheads, mamba.headdim, mamba.ngroups, mamba.d_state, mamba.d_conv, mamba.norm_eps) == (
        8, 16, 2, 8, 3, 1e-6)
    assert not cfg.tie_embeddings and not cfg.residual_in_fp32 and cfg.norm_eps == 1e-6


def test_bamba_logits_and_decoding(bamba):
    folder, theirs = bamba
    ours = load_model(folder, dtype="float32")
    ids = _ids(BAMBA["vocab_size"])
    with torch.no_grad():
        expected = theirs(ids, use_cache=False).logits
        full, _ = ours(ids)
        state = ours.allocate_state(2, max_length=LENGTH)
        stepped = torch.stack([ours.step(ids[:, t], state) for t in range(LENGTH)], dim=1)
    assert expected.std() > 0.1
    assert_close(full, expected, rtol_max=1e-4, name="Bamba vs BambaForCausalLM")
    assert_close(stepped, full, rtol_max=1e-5, name="step by step vs one forward")


def _bad(folder, tmp_path, **changes):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).symlink_to(f)
    raw = json.loads((folder / "config.json").read_text())
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps({**raw, **changes}))
    return bad


@pytest.mark.parametrize("changes, match", [
    (dict(mamba_new_feature=1), r"field 'mamba_new_feature' is not a known setting of transformers' BambaConfig"),
    (dict(mlp_bias=True), r"field 'mlp_bias' = True \(MLP biases\) is not supported"),
    (dict(hidden_act="gelu"), r"field 'hidden_act' = 'gelu'"),
    (dict(time_step_limit=[0.0, 0.1]), r"field 'time_step_limit'.*clamped"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), r"field 'rope_parameters.rope_type' = 'yarn'"),
    (dict(attn_layer_indices=[7]), r"field 'attn_layer_indices' must list layer indices in \[0, 4\)"),
    (dict(mamba_d_head=12), r"field 'mamba_d_head' = 12 times mamba_n_heads = 8"),
])
def test_bamba_refuses_what_it_does_not_implement(bamba, tmp_path, changes, match):
    with pytest.raises(CheckpointError, match=match):
        load_model(_bad(bamba[0], tmp_path, **changes))


def test_bamba_missing_projection_part_is_named(bamba, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "cut"
    folder.mkdir()
    (folder / "config.json").write_text((bamba[0] / "config.json").read_text())
    state = load_file(str(bamba[0] / "model.safetensors"))
    del state["model.layers.2.self_attn.k_proj.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks the 'k' part of 'backbone.layers.2.mixer.in_proj.weight'"):
        load_model(folder)
