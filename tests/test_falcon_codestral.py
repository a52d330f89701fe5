"""Falcon-Mamba and Codestral-style Mamba-2 against transformers' own classes.

Tiny random-init checkpoints are written by transformers' ``FalconMambaForCausalLM`` and
``Mamba2ForCausalLM`` (``n_groups`` 8, untied embeddings, as Codestral-Mamba) with
``save_pretrained``; our loader reads them and our fp32 logits must equal transformers' (full
forward, and prefill plus step-by-step decoding). The 7B shapes are checked on the meta device:
our parameter counts equal transformers' at the published configs.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_close, rel_max_error
from mamba_eval.models.config import ModelConfig
from mamba_eval.models.checkpoint import CheckpointError, load_model, read_config
from mamba_eval.models.model import LanguageModel

transformers = pytest.importorskip("transformers")

LENGTH = 29  # two Mamba-2 chunks of 16 and a partial one
PREFILL = 17

# Falcon-Mamba-7B's config.json as published (tiiuae/falcon-mamba-7b): note expand 16 beside
# intermediate_size 8192 = 2 x hidden_size; transformers sizes the model by intermediate_size.
FALCON_MAMBA_7B = {
    "architectures": ["FalconMambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4, "eos_token_id": 11,
    "expand": 16, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.1, "intermediate_size": 8192,
    "layer_norm_epsilon": 1e-05, "model_type": "falcon_mamba", "num_hidden_layers": 64, "pad_token_id": 11,
    "rescale_prenorm_residual": False, "residual_in_fp32": True, "state_size": 16, "tie_word_embeddings": False,
    "time_step_floor": 0.0001, "time_step_init_scheme": "random", "time_step_max": 0.1, "time_step_min": 0.001,
    "time_step_rank": 256, "time_step_scale": 1.0, "torch_dtype": "bfloat16", "use_bias": False,
    "use_cache": True, "use_conv_bias": True, "vocab_size": 65024,
}


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move parameters transformers initialises to constants (norm weights, D, biases) off them,
    so that a mix-up of any of them shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            p.copy_(1 + 0.3 * noise)
        elif name.endswith(".D"):
            p.copy_(1 + 0.5 * noise)
        elif name.endswith(("A_log", "dt_bias", "dt_proj.bias")):
            p.add_(0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.2 * noise)
        elif name.endswith("embeddings.weight"):
            p.copy_(0.5 * noise)  # a spread-out output distribution


def _build(kind: str, folder):
    """A tiny transformers model of ``kind`` ("falcon", "falcon-2layer" / "codestral"), saved to ``folder``."""
    torch.manual_seed(0)
    if kind.startswith("falcon"):
        small = kind == "falcon-2layer"  # for the Triton interpreter
        config = transformers.FalconMambaConfig(
            vocab_size=96, hidden_size=32 if small else 48, num_hidden_layers=2 if small else 3, state_size=8,
            conv_kernel=4, expand=2, time_step_rank=6, use_bias=True, tie_word_embeddings=False,
            layer_norm_epsilon=1e-5, mixer_rms_eps=1e-6)
        model = transformers.FalconMambaForCausalLM(config)
    else:
        # Mamba2Config's defaults are Codestral-Mamba's (n_groups 8, untied); shrunk, 2 heads per group.
        config = transformers.Mamba2Config(
            vocab_size=80, hidden_size=64, num_hidden_layers=2, state_size=8, head_dim=8, num_heads=16,
            n_groups=8, chunk_size=16, layer_norm_epsilon=1e-5)
        assert not config.tie_word_embeddings
        model = transformers.Mamba2ForCausalLM(config)
    model.eval()
    _perturb(model, seed=1)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """kind -> (kind, checkpoint folder, transformers model, our model), built once per module."""
    cache = {}

    def get(kind):
        if kind not in cache:
            folder = tmp_path_factory.mktemp(kind)
            theirs = _build(kind, folder)
            cache[kind] = kind, folder, theirs, load_model(str(folder))
        return cache[kind]

    return get


@pytest.fixture(params=["falcon", "codestral"])
def pair(request, built):
    return built(request.param)


def _ids(vocab: int, batch=2, length=LENGTH, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_reads_the_right_architecture(pair):
    kind, _, theirs, ours = pair
    c = ours.config
    m = c.layers[0].mixer
    assert len({layer.mixer for layer in c.layers}) == 1  # every layer the same mixer
    if kind == "falcon":
        assert (c.kinds, m.bcdt_rmsnorm, m.bcdt_rmsnorm_eps, m.dt_rank) == (("mamba1",), True, 1e-6, 6)
        assert not c.tie_embeddings and m.proj_bias
    else:
        assert (c.kinds, m.ngroups, m.nheads, m.headdim, c.tie_embeddings) == (("mamba2",), 8, 16, 8, False)
    assert ours.lm_head.weight is not ours.backbone.embedding.weight
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_forward_and_decode_match_transformers(pair):
    kind, _, theirs, ours = pair
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        expected = theirs(ids, use_cache=False).logits
    assert expected.std() > 0.1  # the reference is not degenerate
    logits, state = ours(ids[:, :PREFILL], return_state=True)
    full, _ = ours(ids)
    assert_close(full, expected, rtol_max=1e-4, name=f"{kind} forward")
    assert_close(logits, expected[:, :PREFILL], rtol_max=1e-4, name=f"{kind} prefill")
    stepped = torch.stack([ours.step(ids[:, t], state) for t in range(PREFILL, LENGTH)], dim=1)
    assert_close(stepped, expected[:, PREFILL:], rtol_max=1e-4, name=f"{kind} step decode")


def test_falcon_norms_matter(built):
    """The same weights without Falcon's norms of B, C and Δ give clearly other logits."""
    import dataclasses

    _, _, _, ours = built("falcon")
    layers = tuple(dataclasses.replace(layer, mixer=dataclasses.replace(layer.mixer, bcdt_rmsnorm=False))
                   for layer in ours.config.layers)
    plain = LanguageModel(dataclasses.replace(ours.config, layers=layers))
    plain.load_state_dict(ours.state_dict())
    ids = _ids(ours.config.vocab_size, seed=3)
    assert rel_max_error(plain(ids)[0], ours(ids)[0]) > 1e-2


def test_falcon_config_quirks_and_placeholder_weights(tmp_path):
    """intermediate_size wins over expand (as in transformers); placeholder weights of the
    weightless norms, if stored, load when all ones and are refused otherwise."""
    theirs = _build("falcon", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(expand=16, intermediate_size=2 * config["hidden_size"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = read_config(tmp_path)
    assert cfg.layers[0].mixer.d_inner == 2 * cfg.d_model  # expand 2
    ids = _ids(96, seed=4)
    expected = theirs(ids, use_cache=False).logits
    weights = load_file(tmp_path / "model.safetensors")
    for name in ("b_layernorm", "c_layernorm", "dt_layernorm"):
        weights[f"backbone.layers.1.mixer.{name}.weight"] = torch.ones(8)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_close(load_model(str(tmp_path))(ids)[0], expected.detach(), rtol_max=1e-4)
    weights["backbone.layers.1.mixer.c_layernorm.weight"] = torch.full((8,), 2.0)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"c_layernorm\.weight' is not all ones"):
        load_model(str(tmp_path))
    config["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'intermediate_size'.*not a positive multiple of hidden_size"):
        read_config(tmp_path)


def test_triton_backend_matches_reference(tmp_path):
    """Falcon-Mamba on the Triton kernels (interpreted on the CPU) gives the reference backend's
    logits, in a forward and in step decoding (Codestral's kernels are those of any Mamba-2)."""
    _build("falcon-2layer", tmp_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    tol = 2e-2 if device == "cuda" else 1e-4
    ref = load_model(str(tmp_path), dtype=dtype, device=device)
    tri = load_model(str(tmp_path), dtype=dtype, device=device, backend="triton")
    ids = _ids(96, batch=1, length=11, seed=5).to(device)
    expected, _ = ref(ids)
    _, state = tri(ids[:, :8], return_state=True)
    assert_close(tri(ids)[0], expected, tol, name="falcon triton forward")
    stepped = torch.stack([tri.step(ids[:, t], state) for t in range(8, 11)], dim=1)
    assert_close(stepped, expected[:, 8:], tol, name="falcon triton step")


def test_codestral_uses_its_own_tokenizer(built):
    """lm-eval's model reads the tokenizer saved with the checkpoint (Codestral's is not GPT-NeoX's)."""
    _, folder, _, _ = built("codestral")
    pytest.importorskip("lm_eval")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mamba_eval.harness.lm import MambaLM

    words = ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    }))
    lm = MambaLM(pretrained=str(folder), device="cpu")
    assert len(lm.tokenizer) == len(words)
    assert lm.tok_encode("w3 w41 w7") == [6, 44, 10]
    assert lm.eot_token_id == 1


@pytest.mark.parametrize("name", ["falcon-mamba-7b", "mamba-codestral-7b"])
def test_7b_shapes_have_transformers_parameter_count(tmp_path, name):
    """The published 7B configs read, build on the meta device and have exactly the parameter
    count of transformers' classes at the same config."""
    if name == "falcon-mamba-7b":
        raw = FALCON_MAMBA_7B
        their_config = transformers.FalconMambaConfig(**{k: v for k, v in raw.items() if k != "architectures"})
        their_cls = transformers.FalconMambaForCausalLM
    else:
        # Mamba2Config's defaults are Mamba-Codestral-7B's shape (d 4096, 64 layers, 128 heads of 64,
        # 8 groups, d_state 128, vocab 32768, untied).
        their_config = transformers.Mamba2Config()
        raw = {**their_config.to_dict(), "architectures": ["Mamba2ForCausalLM"]}
        their_cls = transformers.Mamba2ForCausalLM
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg: ModelConfig = read_config(tmp_path)
    assert (cfg.d_model, cfg.n_layer, cfg.layers[0].mixer.d_inner, cfg.tie_embeddings) == (4096, 64, 8192, False)
    ours = LanguageModel(cfg, device="meta")
    with torch.device("meta"):
        theirs = their_cls(their_config)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in theirs.parameters())
    assert 7.0e9 < n_ours < 7.5e9
