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


def _tiny(family: str, config: dict):
    """transformers' ``{family}ForCausalLM`` of ``config``, seeded, its parameters moved off their
    constant initial values and its embeddings spread (so that the logits depend on the model)."""
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(**config)).eval()
    perturb(model, torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    return model


@pytest.fixture(scope="module")
def bamba(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bamba")
    model = _tiny("Bamba", BAMBA)
    model.save_pretrained(folder)
    return folder, model


def _ids(vocab, batch=2, seed=0):
    return torch.randint(0, vocab, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))


def _assert_matches_transformers(folder, theirs, vocab: int, name: str, batch: int = 2):
    """Our fp32 logits of the checkpoint equal transformers' model's, and step-by-step decoding
    equals our forward."""
    ours = load_model(folder, dtype="float32")
    ids = _ids(vocab, batch=batch)
    with torch.no_grad():
        expected = theirs(ids, use_cache=False).logits
        full, _ = ours(ids)
        state = ours.allocate_state(batch, max_length=LENGTH)
        stepped = torch.stack([ours.step(ids[:, t], state) for t in range(LENGTH)], dim=1)
    assert expected.std() > 0.1
    assert_close(full, expected, rtol_max=1e-4, name=f"{name} vs transformers")
    assert_close(stepped, full, rtol_max=1e-5, name="step by step vs one forward")
    return ours


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
    _assert_matches_transformers(folder, theirs, BAMBA["vocab_size"], "Bamba")


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


# ----------------------------------------------------------------------------- Granite 4.0-H

GRANITE = dict(vocab_size=96, hidden_size=64, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=8,
               mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8, num_local_experts=5,
               num_experts_per_tok=2, shared_intermediate_size=40, embedding_multiplier=3.0,
               residual_multiplier=0.4, attention_multiplier=0.3, logits_scaling=2.5, rms_norm_eps=1e-6,
               tie_word_embeddings=True)
GRANITES = {
    "moe-rope": dict(GRANITE, position_embedding_type="rope", rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 300.0}),
    "dense-nope": dict(GRANITE, num_local_experts=0, position_embedding_type="nope",
                       layer_types=["attention", "mamba", "mamba", "attention"]),
}


@pytest.fixture(scope="module", params=sorted(GRANITES))
def granite(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"granite-{request.param}")
    model = _tiny("GraniteMoeHybrid", GRANITES[request.param])
    with torch.no_grad():  # spread the routers' logits so that the choice varies by token
        for name, p in model.named_parameters():
            if "router" in name or "experts" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    model.save_pretrained(folder)
    return request.param, folder, model


def test_granite_config(granite):
    name, folder, _ = granite
    cfg = read_config(folder)
    attn = cfg.mixers("attention")[0]
    assert (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_multiplier) == (3.0, 0.4, 1 / 2.5)
    assert attn.scale == 0.3 and cfg.tie_embeddings and not cfg.residual_in_fp32
    if name == "moe-rope":
        moe = cfg.layers[0].mlp
        assert (moe.num_experts, moe.top_k, moe.d_expert, moe.d_shared) == (5, 2, 24, 40)
        assert (attn.rotary_emb_dim, attn.rotary_emb_base) == (16, 300.0) and cfg.layer_indices("attention") == (1,)
    else:
        assert cfg.layers[0].mlp.d_intermediate == 40 and attn.rotary_emb_dim == 0
        assert cfg.layer_indices("attention") == (0, 3)


def test_granite_logits_and_decoding(granite):
    name, folder, theirs = granite
    _assert_matches_transformers(folder, theirs, GRANITE["vocab_size"], f"Granite {name}", batch=3)


def test_granite_scores_are_batch_invariant(granite):
    """The experts' products included."""
    _check_invariant_scores(granite[1])


def _check_invariant_scores(folder):
    """The scoring engine under the invariance policy: batch sizes 1, 3 and auto give the same
    bits, and the scores equal the plain model's to rounding."""
    from mamba_eval.harness.engine import score_continuations

    gen = torch.Generator().manual_seed(4)
    pairs = [(torch.randint(0, 96, (int(n),), generator=gen).tolist(),
              torch.randint(0, 96, (int(m),), generator=gen).tolist())
             for n, m in zip(torch.randint(3, 15, (7,), generator=gen), torch.randint(1, 4, (7,), generator=gen))]
    model = load_model(folder, dtype="float32", batch_invariant=True)
    runs = {bs: score_continuations(model, pairs, max_length=64, batch_size=bs, device=torch.device("cpu"))
            for bs in (1, 3, "auto")}
    assert runs[3] == runs[1] and runs["auto"] == runs[1]
    plain = score_continuations(load_model(folder, dtype="float32"), pairs, max_length=64, batch_size=1,
                                device=torch.device("cpu"))
    for (a, _), (b, _) in zip(runs[1], plain):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))


@pytest.mark.parametrize("changes, match", [
    (dict(layer_types=["mamba", "mlp", "mamba", "mamba"]), r"field 'layer_types' holds 'mlp'"),
    (dict(layer_types=["mamba"]), r"field 'layer_types' must list one type per layer \(4\)"),
    (dict(normalization_function="layernorm"), r"field 'normalization_function' = 'layernorm'"),
    (dict(router_jitter=0.1), r"field 'router_jitter' is not a known setting"),
])
def test_granite_refuses_what_it_does_not_implement(granite, tmp_path, changes, match):
    with pytest.raises(CheckpointError, match=match):
        load_model(_bad(granite[1], tmp_path, **changes))


# ----------------------------------------------------------------------------- Nemotron-H

NEMOTRON = dict(vocab_size=96, hidden_size=48, hybrid_override_pattern="M*-M-*M", num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, mamba_num_heads=5, mamba_head_dim=16, ssm_state_size=8,
                n_groups=5, conv_kernel=3, chunk_size=8, intermediate_size=72, mlp_bias=True,
                layer_norm_epsilon=1e-6)


# Nemotron 3's mixture of experts: squared-ReLU experts, a shared expert, the sigmoid router with a
# correction bias choosing among the best 2 of 3 groups of experts, normalised and scaled weights.
NEMOTRON_MOE = dict(NEMOTRON, hybrid_override_pattern="ME*EM", n_routed_experts=6, num_experts_per_tok=2,
                    moe_intermediate_size=20, moe_shared_expert_intermediate_size=28, n_group=3, topk_group=2,
                    routed_scaling_factor=1.7)
# Latent experts (moe_latent_size): the routed experts in a narrower space, with biased projections.
NEMOTRON_LATENT = dict(NEMOTRON_MOE, moe_latent_size=24)


def _nemotron(folder, config):
    model = _tiny("NemotronH", config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if ".gate." in name or ".experts." in name:
                p.normal_(0.0, 0.5, generator=gen)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3, generator=gen)
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory):
    return _nemotron(tmp_path_factory.mktemp("nemotron"), NEMOTRON)


@pytest.fixture(scope="module")
def nemotron_moe(tmp_path_factory):
    return _nemotron(tmp_path_factory.mktemp("nemotron-moe"), NEMOTRON_MOE)


@pytest.fixture(scope="module")
def nemotron_latent(tmp_path_factory):
    return _nemotron(tmp_path_factory.mktemp("nemotron-latent"), NEMOTRON_LATENT)


def test_nemotron_h_config(nemotron):
    cfg = read_config(nemotron[0])
    assert cfg.kinds == ("mamba2", "attention", "mlp")
    assert cfg.layer_indices("mlp") == (2, 4) and cfg.layer_indices("attention") == (1, 5)
    m = cfg.mixers("mamba2")[0]
    # d_inner = 5 heads x 16 = 80, not a multiple of hidden_size 48 (as in Nemotron-H-4B)
    assert (m.d_inner, m.ngroups, m.d_conv, m.chunk_size, m.norm_eps) == (80, 5, 3, 8, 1e-6)
    a = cfg.mixers("attention")[0]
    assert (a.head_dim, a.rotary_emb_dim, a.qkv_proj_bias) == (16, 0, False)
    assert cfg.mixers("mlp")[0].bias and not cfg.tie_embeddings and not cfg.residual_in_fp32


@pytest.mark.parametrize("which", ["nemotron", "nemotron_moe", "nemotron_latent"])
def test_nemotron_h_logits_and_decoding(which, request):
    folder, theirs = request.getfixturevalue(which)
    _assert_matches_transformers(folder, theirs, NEMOTRON["vocab_size"], "Nemotron-H")


@pytest.mark.parametrize("changes, match", [
    (dict(hybrid_override_pattern="M*EM-*M", moe_latent_size=1.5), r"field 'moe_latent_size' must be an integer"),
    (dict(hybrid_override_pattern="M*X"), r"field 'hybrid_override_pattern' holds 'X'"),
    (dict(mlp_hidden_act="gelu"), r"field 'mlp_hidden_act' = 'gelu'"),
])
def test_nemotron_h_refuses_what_it_does_not_implement(nemotron, tmp_path, changes, match):
    raw = json.loads((nemotron[0] / "config.json").read_text())
    raw.pop("layers_block_type", None)  # the older spelling, so that the pattern decides
    folder = _bad(nemotron[0], tmp_path)
    (folder / "config.json").write_text(json.dumps({**raw, **changes}))
    with pytest.raises(CheckpointError, match=match):
        load_model(folder)


def test_nemotron_h_moe_config_and_invariance(nemotron_moe):
    """The "E" layers read as experts; engine scores bit-identical across batch sizes."""
    from mamba_eval.harness.engine import score_continuations

    folder = nemotron_moe[0]
    cfg = read_config(folder)
    moe = cfg.mixers("moe")[0].moe
    assert cfg.layer_indices("moe") == (1, 3)
    assert (moe.num_experts, moe.top_k, moe.d_expert, moe.d_shared, moe.experts, moe.router) == (
        6, 2, 20, 28, "relu2", "sigmoid")
    assert (moe.n_group, moe.topk_group, moe.norm_topk, moe.scaling) == (3, 2, True, 1.7)
    gen = torch.Generator().manual_seed(4)
    pairs = [(torch.randint(0, 96, (n,), generator=gen).tolist(), torch.randint(0, 96, (2,), generator=gen).tolist())
             for n in (5, 9, 9, 14, 3)]
    model = load_model(folder, dtype="float32", batch_invariant=True)
    runs = [score_continuations(model, pairs, max_length=64, batch_size=bs, device=torch.device("cpu"))
            for bs in (1, 4)]
    assert runs[0] == runs[1]



@pytest.mark.parametrize("family, overrides", [
    ("Bamba", dict(attn_layer_indices=[3, 11, 19, 27])),  # transformers' defaults: Bamba-9B's shape
    ("GraniteMoeHybrid", dict(layer_types=["mamba"] * 3 + ["attention"] + ["mamba"] * 4, num_hidden_layers=8,
                              position_embedding_type="nope")),
    ("NemotronH", dict(hybrid_override_pattern="M-M-M*-M-M-ME*E")),
    ("NemotronH", dict(hybrid_override_pattern="M-M-M*-M-M-ME*E", moe_latent_size=1024, mlp_bias=True)),
    ("FalconH1", dict(mamba_rms_norm=True, num_hidden_layers=8)),
    ("Jamba", dict(num_hidden_layers=8)),
    ("Zamba2", dict(use_shared_attention_adapter=True, num_mem_blocks=2)),  # Zamba2-2.7B's shape, 54 layers
])
def test_full_size_configs_have_transformers_parameter_count(family, overrides):
    """Full-size configs (transformers' defaults, hybrid layouts) build with exactly the parameters
    of transformers' own model (on the meta device: nothing is allocated)."""
    from mamba_eval.models.formats import config_from_dict
    from mamba_eval.models.model import LanguageModel

    config = getattr(transformers, f"{family}Config")(**overrides)
    with torch.device("meta"):
        theirs = getattr(transformers, f"{family}ForCausalLM")(config)
    expected = sum(p.numel() for p in theirs.parameters())
    expected += sum(b.numel() for n, b in theirs.named_buffers() if n.endswith("e_score_correction_bias"))
    raw = json.loads(config.to_json_string())
    ours = LanguageModel(config_from_dict(raw, family), device="meta")
    assert sum(p.numel() for p in ours.parameters()) == expected


# ----------------------------------------------------------------------------- Falcon-H1

FALCON = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2,
              mamba_d_state=8, mamba_d_conv=3, mamba_chunk_size=8, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 1e5}, embedding_multiplier=2.5,
              lm_head_multiplier=0.6, mlp_multipliers=[1.3, 0.7], key_multiplier=0.8, attention_in_multiplier=1.2,
              attention_out_multiplier=0.9, ssm_multipliers=[0.5, 1.5, 0.8, 1.1, 2.0], ssm_in_multiplier=1.4,
              ssm_out_multiplier=0.75)
FALCONS = {
    "no-norm": dict(FALCON, mamba_rms_norm=False, tie_word_embeddings=True),
    "norm-after-gate-biases": dict(FALCON, mamba_rms_norm=True, mamba_norm_before_gate=False, attention_bias=True,
                                   mamba_proj_bias=True, projectors_bias=True, tie_word_embeddings=False),
    "norm-before-gate": dict(FALCON, mamba_rms_norm=True, mamba_norm_before_gate=True),
}


@pytest.fixture(scope="module", params=sorted(FALCONS))
def falcon(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"falcon-{request.param}")
    model = _tiny("FalconH1", FALCONS[request.param])
    with torch.no_grad():
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            model.lm_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    model.save_pretrained(folder)
    return request.param, folder, model


def test_falcon_h1_logits_and_decoding(falcon):
    name, folder, theirs = falcon
    ours = _assert_matches_transformers(folder, theirs, FALCON["vocab_size"], f"Falcon-H1 {name}")
    assert ours.config.kinds == ("parallel",)


@pytest.mark.parametrize("changes, match", [
    (dict(ssm_multipliers=[1.0, 2.0]), r"field 'ssm_multipliers' must be a list of 5 numbers"),
    (dict(projectors_bias=True, mamba_proj_bias=False), r"field 'projectors_bias' differs from mamba_proj_bias"),
    (dict(mlp_bias=True), r"field 'mlp_bias' = True \(MLP biases\)"),
])
def test_falcon_h1_refuses_what_it_does_not_implement(falcon, tmp_path, changes, match):
    with pytest.raises(CheckpointError, match=match):
        load_model(_bad(falcon[1], tmp_path, **changes))


# ----------------------------------------------------------------------------- Jamba

JAMBA = dict(vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=5, num_attention_heads=4,
             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
             expert_layer_offset=1, attn_layer_period=3, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=3,
             mamba_dt_rank=6, mamba_proj_bias=True, rms_norm_eps=1e-6, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def jamba(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jamba")
    model = _tiny("Jamba", JAMBA)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        model.lm_head.weight.normal_(0.0, 0.5, generator=gen)
        for name, p in model.named_parameters():
            if "router" in name or "experts" in name:
                p.normal_(0.0, 0.5, generator=gen)
    model.save_pretrained(folder)
    return folder, model


def test_jamba_config(jamba):
    cfg = read_config(jamba[0])
    assert cfg.layer_indices("attention") == (1, 4) and cfg.layer_indices("mamba1") == (0, 2, 3)
    assert [type(layer.mlp).__name__ for layer in cfg.layers] == ["MLPConfig", "MoEConfig"] * 2 + ["MLPConfig"]
    m = cfg.mixers("mamba1")[0]
    assert (m.dt_rank, m.d_state, m.d_conv, m.bcdt_norm_weights, m.proj_bias) == (6, 8, 3, True, True)
    assert cfg.layers[1].mlp.router == "softmax_all" and cfg.mixers("attention")[0].rotary_emb_dim == 0


def test_jamba_logits_and_decoding(jamba):
    folder, theirs = jamba
    _assert_matches_transformers(folder, theirs, JAMBA["vocab_size"], "Jamba")


def test_jamba_refuses_what_it_does_not_implement(jamba, tmp_path):
    with pytest.raises(CheckpointError, match=r"field 'attn_layer_offset' = 3 must lie in \[0, attn_layer_period = 3\)"):
        load_model(_bad(jamba[0], tmp_path, attn_layer_offset=3))


# ----------------------------------------------------------------------------- Zamba2

ZAMBA2 = dict(vocab_size=96, hidden_size=32, num_hidden_layers=6, intermediate_size=40, num_attention_heads=4,
              layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"], mamba_d_state=8,
              n_mamba_heads=4, mamba_ngroups=2, mamba_d_conv=3, chunk_size=8, adapter_rank=6, rms_norm_eps=1e-6,
              time_step_min=0.2)  # a clamp of Δ that matters
ZAMBAS2 = {  # two blocks used alternately, with all adapters and rotary; one block, biases, no rotary
    "two-blocks": dict(ZAMBA2, num_mem_blocks=2, use_shared_attention_adapter=True, use_mem_rope=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 300.0}),
    "one-block": dict(ZAMBA2, num_mem_blocks=1, add_bias_linear=True,
                      layers_block_type=["hybrid", "mamba", "hybrid", "mamba", "mamba", "hybrid"]),
}


@pytest.fixture(scope="module", params=sorted(ZAMBAS2))
def zamba2(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"zamba2-{request.param}")
    model = _tiny("Zamba2", ZAMBAS2[request.param])
    model.save_pretrained(folder)
    return request.param, folder, model


def test_zamba2_config(zamba2):
    which, folder, _ = zamba2
    cfg = read_config(folder)
    uses = [(i, layer.shared.block) for i, layer in enumerate(cfg.layers) if layer.shared is not None]
    assert uses == ([(1, 0), (3, 1), (4, 0)] if which == "two-blocks" else [(0, 0), (2, 0), (5, 0)])
    assert len(cfg.shared_blocks) == (2 if which == "two-blocks" else 1) and cfg.kinds == ("mamba2",)
    attn = cfg.shared_blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.scale) == (4, 16, 8 ** -0.5)
    assert attn.rotary_emb_dim == (16 if which == "two-blocks" else 0)
    assert cfg.layers[1].shared is None or cfg.layers[1].shared.attn_adapters == (which == "two-blocks")
    m = cfg.mixers("mamba2")[0]
    assert (m.nheads, m.headdim, m.ngroups, m.d_state, m.dt_min, m.proj_bias) == (
        4, 16, 2, 8, 0.2, which == "one-block")
    assert not cfg.residual_in_fp32 and cfg.tie_embeddings


def test_zamba2_logits_and_decoding(zamba2):
    which, folder, theirs = zamba2
    _assert_matches_transformers(folder, theirs, ZAMBA2["vocab_size"], f"Zamba2 {which}")


def test_zamba2_scores_are_batch_invariant(zamba2):
    """Shared contexts fork every use's key/value cache with the Mamba states."""
    _check_invariant_scores(zamba2[1])


def test_zamba2_shared_weights_read_from_any_using_layer(zamba2, tmp_path):
    """A shared block stored under another of its layers (an alias) reads the same; an alias that
    disagrees is refused."""
    from safetensors.torch import load_file, save_file

    which, folder, _ = zamba2
    state = load_file(str(folder / "model.safetensors"))
    first, other = (1, 4) if which == "two-blocks" else (0, 5)  # two layers of block 0
    moved = {k.replace(f"layers.{first}.shared_transformer", f"layers.{other}.shared_transformer"): v
             for k, v in state.items()}
    for name, tensors in (("moved", moved), ("clash", {**state, **{
            k: v + 1 for k, v in moved.items() if f"layers.{other}.shared_transformer.pre_ff" in k}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((folder / "config.json").read_text())
        save_file(tensors, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    ids = _ids(ZAMBA2["vocab_size"])
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "moved", dtype="float32")(ids)[0],
                           load_model(folder, dtype="float32")(ids)[0])
    with pytest.raises(CheckpointError, match=r"stores 'backbone.shared.0.norm_ff.weight' twice, with different"):
        load_model(tmp_path / "clash")


@pytest.mark.parametrize("changes, match", [
    (dict(layers_block_type=["mamba", "hybrid", "attention", "hybrid", "hybrid", "mamba"]),
     r"field 'layers_block_type' has the unknown layer type 'attention'"),
    (dict(hidden_act="silu"), r"field 'hidden_act' = 'silu' \(activation other than GELU\)"),
    (dict(use_long_context=True), r"field 'use_long_context' = True \(rescaled rotary embedding\)"),
    (dict(mamba_new_feature=1), r"field 'mamba_new_feature' is not a known setting of transformers' Zamba2Config"),
    (dict(num_attention_heads=5), r"field 'num_attention_heads' = 5 does not divide the attention width"),
])
def test_zamba2_refuses_what_it_does_not_implement(zamba2, tmp_path, changes, match):
    with pytest.raises(CheckpointError, match=match):
        load_model(_bad(zamba2[1], tmp_path, **changes))


def _check_greedy_generation(folder):
    """The decoder on a hybrid: greedy tokens equal the full forward's argmax, and under the
    invariance policy they are the same at batch sizes 1 and 3 (prompts of different lengths)."""
    from mamba_eval.harness.generation import generate

    model = load_model(folder, dtype="float32", batch_invariant=True)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (7, 4, 9)]
    outs = {b: generate(model, prompts, max_new_tokens=5, batch_size=b, device=torch.device("cpu")) for b in (1, 3)}
    assert outs[1] == outs[3]
    for prompt, out in zip(prompts, outs[1]):
        with torch.no_grad():
            logits, _ = model(torch.tensor([prompt + out]))
        assert out == logits[0, len(prompt) - 1:-1].argmax(-1).tolist()


def test_generation_granite(granite):  # experts in every layer
    _check_greedy_generation(granite[1])


def test_generation_nemotron_moe(nemotron_moe):  # MLP-free blocks of experts
    _check_greedy_generation(nemotron_moe[0])


def test_generation_falcon_h1(falcon):  # the parallel mixer's pair of states
    _check_greedy_generation(falcon[1])


def test_generation_jamba(jamba):
    _check_greedy_generation(jamba[0])


def test_generation_zamba2(zamba2):  # the shared blocks' key/value caches, one per use
    _check_greedy_generation(zamba2[1])


@pytest.mark.parametrize("method", ["fp8", "bitsandbytes"])
def test_quantised_checkpoints_are_refused_in_one_line(bamba, tmp_path, method):
    with pytest.raises(CheckpointError, match=rf"quantised weights \(quantization_config: {method}\) are not supported"):
        load_model(_bad(bamba[0], tmp_path, quantization_config={"quant_method": method}))
