"""Checkpoint loading: both config dialects, all weight layouts, and clear errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mamba_eval.models.checkpoint import (
    CheckpointError,
    has_tokenizer_files,
    load_model,
    load_state_dict,
    parse_dtype,
    read_config,
    resolve_checkpoint,
)
from mamba_eval.models.releases import RELEASES


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    file = folder / "config.json"
    config = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    file.write_text(json.dumps(config))


def _raises(match: str, fn, *args, exc=CheckpointError, **kwargs) -> str:
    """Call fn, expect ``exc`` whose one-line message contains every fragment of ``match`` ('|'-separated)."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"message is not one line: {message!r}"
    for fragment in match.split("|"):
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def _logits(model, vocab, length=13):
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    return model(ids)[0]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_published_mamba_ssm_configs(tmp_path):
    """The config.json files of state-spaces/mamba-130m and state-spaces/mamba2-130m, as published."""
    mamba = read_config(_write_config(tmp_path / "m1", {
        "d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
    }))
    m = mamba.layers[0].mixer
    assert mamba.kinds == ("mamba1",) and mamba.n_layer == 24
    assert (mamba.vocab_size, m.d_state, m.d_conv, m.dt_rank, m.d_inner) == (50280, 16, 4, 48, 1536)
    assert mamba.tie_embeddings and mamba.rms_norm and mamba.residual_in_fp32 and not m.proj_bias
    mamba2 = read_config(_write_config(tmp_path / "m2", {
        "d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 16, "tie_embeddings": True,
    }))
    m2 = mamba2.layers[0].mixer
    assert (mamba2.kinds, mamba2.vocab_size, m2.d_state, m2.headdim, m2.nheads, m2.ngroups, m2.chunk_size) == (
        ("mamba2",), 50288, 128, 64, 24, 1, 256)
    assert m2.conv_dim == 1536 + 2 * 128 and m2.d_in_proj == 2 * 1536 + 2 * 128 + 24


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_transformers_defaults_match_transformers(tmp_path, arch):
    """A transformers config with most fields left out reads as transformers itself reads it."""
    import transformers

    minimal = {"model_type": arch, "hidden_size": 256, "num_hidden_layers": 2, "vocab_size": 96}
    if arch == "mamba2":
        minimal.update(num_heads=8)  # 8 * head_dim 64 = expand 2 * 256
    config = read_config(_write_config(tmp_path, minimal))
    ours = config.layers[0].mixer
    theirs = (transformers.MambaConfig if arch == "mamba" else transformers.Mamba2Config)(**minimal)
    assert (ours.d_state, ours.d_conv, ours.d_inner // config.d_model, config.norm_eps, ours.conv_bias,
            ours.proj_bias, config.residual_in_fp32, config.tie_embeddings) == (
        theirs.state_size, theirs.conv_kernel, theirs.expand, theirs.layer_norm_epsilon, theirs.use_conv_bias,
        theirs.use_bias, theirs.residual_in_fp32, theirs.tie_word_embeddings)
    if arch == "mamba":
        assert ours.dt_rank == theirs.time_step_rank
    else:
        assert (ours.headdim, ours.nheads, ours.ngroups, ours.chunk_size) == (
            theirs.head_dim, theirs.num_heads, theirs.n_groups, theirs.chunk_size)


def test_architecture_from_architectures_field(checkpoint, tmp_path):
    folder = _copy(checkpoint("mamba2-tiny").hf_dir, tmp_path / "ckpt")
    _edit_config(folder, model_type=None)
    assert read_config(folder).kinds == ("mamba2",)


# --------------------------------------------------------------------------------------------
# Weight layouts
# --------------------------------------------------------------------------------------------


def test_sharded_safetensors(checkpoint, tmp_path):
    ckpt = checkpoint("mamba2-small")
    sharded = tmp_path / "sharded"
    ckpt.hf_model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    vocab = ckpt.spec.vocab_size
    assert torch.equal(_logits(load_model(str(sharded)), vocab), _logits(load_model(str(ckpt.hf_dir)), vocab))


def test_sharded_bin(checkpoint, tmp_path):
    ckpt = checkpoint("mamba1-small")
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(ckpt.ssm_dir / "config.json", folder)
    state = torch.load(ckpt.ssm_dir / "pytorch_model.bin", weights_only=True)
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    vocab = ckpt.spec.vocab_size
    assert torch.equal(_logits(load_model(str(folder)), vocab), _logits(load_model(str(ckpt.ssm_dir)), vocab))

    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    _raises("pytorch_model-00002-of-00002.bin|missing", load_model, str(folder))


def test_dtype_auto(checkpoint, tmp_path):
    ckpt = checkpoint("mamba1-tiny")
    assert load_model(str(ckpt.hf_dir)).dtype == torch.float32  # config "dtype": "float32"
    assert load_model(str(ckpt.ssm_dir)).dtype == torch.float32  # no dtype field: fp32 weights
    folder = _copy(ckpt.hf_dir, tmp_path / "bf16")
    _edit_config(folder, dtype=None, torch_dtype="bfloat16")
    assert load_model(str(folder)).dtype == torch.bfloat16
    assert load_model(str(folder), dtype="float32").dtype == torch.float32
    # No dtype field: the stored dtype of the weights decides.
    _edit_config(folder, torch_dtype=None)
    save_file({k: v.half() for k, v in load_file(folder / "model.safetensors").items()}, folder / "model.safetensors")
    model = load_model(str(folder))
    assert model.dtype == torch.float16 and model.backbone.layers[0].mixer.A_log.dtype == torch.float32


def test_a_model_larger_than_the_gpu_is_refused_before_allocating(checkpoint, monkeypatch):
    """On a GPU without room for the weights: one line with what they need, what is free and what
    would fit, raised before any CUDA memory is touched (this machine may have no GPU at all)."""
    from mamba_eval.errors import MambaEvalError
    from mamba_eval.models.checkpoint import _weight_bytes

    ckpt = checkpoint("mamba1-small")
    need = _weight_bytes(load_model(str(ckpt.hf_dir), dtype="float32"))
    need_bf16 = _weight_bytes(load_model(str(ckpt.hf_dir), dtype="bfloat16"))
    assert need_bf16 < need < 2 * need_bf16 + 1
    gib = 2**30

    def free_memory(free):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * gib))
        monkeypatch.setattr(torch.nn.Module, "to_empty", lambda *a, **k: pytest.fail("allocated"))

    free_memory(need_bf16)
    _raises(f"GiB in float32, more than the|free on cuda:0 (of 80.0 GiB)|with dtype=bfloat16 they need "
            f"{need_bf16 / gib:.1f} GiB, which fits", load_model, str(ckpt.hf_dir), dtype="float32", device="cuda:0",
            exc=MambaEvalError)
    free_memory(need_bf16 - 1)
    _raises("GiB in bfloat16|it needs one GPU with|(a model is not split across GPUs)", load_model, str(ckpt.hf_dir),
            dtype="bfloat16", device="cuda", exc=MambaEvalError)


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32 and parse_dtype("auto") == "auto"
    _raises("dtype='bfloat61' is not one of auto, float32, bfloat16, float16", parse_dtype, "bfloat61",
            exc=ValueError)
    _raises("dtype=torch.int8 is not one of", parse_dtype, torch.int8, exc=ValueError)


def test_tokenizer_files(checkpoint, tmp_path):
    assert not has_tokenizer_files(checkpoint("mamba1-tiny").ssm_dir)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert has_tokenizer_files(tmp_path)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def test_nonexistent_path(tmp_path):
    _raises(f"{tmp_path / 'nope'}|does not exist", load_model, str(tmp_path / "nope"))
    _raises("does not exist", resolve_checkpoint, "./no/such/folder")
    _raises("neither an existing folder nor a valid Hugging Face Hub id", resolve_checkpoint, "not a hub id")


def test_file_instead_of_folder(checkpoint):
    _raises("is a file", load_model, str(checkpoint("mamba1-tiny").hf_dir / "config.json"))


def test_folder_without_config(checkpoint, tmp_path):
    folder = _copy(checkpoint("mamba1-tiny").hf_dir, tmp_path / "ckpt")
    (folder / "config.json").unlink()
    _raises(f"{folder}|no config.json", load_model, str(folder))


def test_folder_without_weights(checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(checkpoint("mamba1-tiny").hf_dir / "config.json", folder)
    _raises("no weights found|model.safetensors|pytorch_model.bin", load_model, str(folder))


def test_broken_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    _raises("config.json|cannot read JSON", read_config, tmp_path)


@pytest.mark.parametrize("config, match", [
    ({"model_type": "llama", "hidden_size": 64}, "unsupported model_type 'llama'"),
    ({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}, "unsupported architectures ['LlamaForCausalLM']"),
    ({"n_layer": 2}, "unknown config format"),
])
def test_unknown_architecture(tmp_path, config, match):
    _raises(match, read_config, _write_config(tmp_path, config))


@pytest.mark.parametrize("config, match", [
    ({"model_type": "mamba", "num_hidden_layers": 2, "vocab_size": 8}, "field 'hidden_size' is required but missing"),
    ({"model_type": "mamba2", "hidden_size": 64, "vocab_size": 8}, "'num_hidden_layers' is required"),
    ({"d_model": 64, "vocab_size": 8}, "field 'n_layer' is required but missing"),
    ({"d_model": 64, "n_layer": 2}, "field 'vocab_size' is required but missing"),
])
def test_missing_required_field(tmp_path, config, match):
    _raises(match, read_config, _write_config(tmp_path, config))


@pytest.mark.parametrize("extra, match", [
    ({"d_intermediate": -1}, "'d_intermediate'|must be non-negative"),
    ({"attn_layer_idx": [1]}, "'attn_cfg.num_heads'|is required but missing"),
    ({"ssm_cfg": {"layer": "Mamba4"}}, "'ssm_cfg.layer'|'Mamba4'|not supported"),
    ({"ssm_cfg": {"layer": "Mamba2", "norm_before_gate": True}}, "'ssm_cfg.norm_before_gate'|not supported yet"),
    ({"ssm_cfg": {"d_state": 8, "d_sate": 4}}, "'ssm_cfg.d_sate'|not a known Mamba1 setting"),
    ({"ssm_cfg": {"d_state": "16"}}, "'ssm_cfg.d_state'|must be an integer"),
    ({"ssm_cfg": {"layer": "Mamba2", "headdim": 48}}, "not a multiple of headdim = 48"),
    ({"rms_norm": "yes"}, "'rms_norm'|must be true or false"),
])
def test_unsupported_or_invalid_mamba_ssm_fields(tmp_path, extra, match):
    _raises(match, read_config, _write_config(tmp_path, {"d_model": 64, "n_layer": 2, "vocab_size": 50, **extra}))


def test_inconsistent_transformers_mamba2_heads(tmp_path):
    config = {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 50,
              "num_heads": 3, "head_dim": 16}
    _raises("num_heads * head_dim = 3 * 16|expand * hidden_size = 2 * 64", read_config, _write_config(tmp_path, config))


def test_shapes_not_matching_config(checkpoint, tmp_path):
    folder = _copy(checkpoint("mamba2-tiny").ssm_dir, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    _edit_config(folder, ssm_cfg={**config["ssm_cfg"], "d_state": 4})
    _raises("'backbone.layers.0.mixer.in_proj.weight'|(280, 64)|(272, 64)", load_model, str(folder))
    # The padded vocabulary is part of the shapes: another padding multiple gives other rows.
    _edit_config(folder, ssm_cfg=config["ssm_cfg"], pad_vocab_size_multiple=1)
    _raises("'backbone.embedding.weight'|(112, 64)|(100, 64)", load_model, str(folder))


def test_missing_key(checkpoint, tmp_path):
    folder = _copy(checkpoint("mamba2-tiny").hf_dir, tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    del state["backbone.layers.1.mixer.D"]
    save_file(state, folder / "model.safetensors")
    _raises("1 weight(s) missing|backbone.layers.1.mixer.D", load_model, str(folder))


def test_missing_untied_lm_head(checkpoint, tmp_path):
    folder = _copy(checkpoint("mamba2-small").hf_dir, tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, folder / "model.safetensors")
    _raises("missing|lm_head.weight", load_model, str(folder))


def test_unexpected_key(checkpoint, tmp_path):
    folder = _copy(checkpoint("mamba1-tiny").ssm_dir, tmp_path / "ckpt")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["backbone.layers.0.mixer.extra_proj.weight"] = torch.zeros(3)
    torch.save(state, folder / "pytorch_model.bin")
    _raises("1 unexpected weight(s)|backbone.layers.0.mixer.extra_proj.weight", load_model, str(folder))


def test_config_with_more_layers_than_weights(checkpoint, tmp_path):
    folder = _copy(checkpoint("mamba1-tiny").ssm_dir, tmp_path / "ckpt")
    _edit_config(folder, n_layer=3)
    _raises("missing|backbone.layers.2.", load_state_dict, folder, read_config(folder))


def test_unreadable_weights(checkpoint, tmp_path):
    folder = _copy(checkpoint("mamba1-tiny").ssm_dir, tmp_path / "ckpt")
    (folder / "pytorch_model.bin").write_bytes(b"definitely not a checkpoint")
    _raises("pytorch_model.bin|cannot read weights", load_model, str(folder))


def test_bad_runtime_arguments(checkpoint):
    folder = str(checkpoint("mamba1-tiny").hf_dir)
    _raises("dtype='bfloat61' is not one of", load_model, folder, dtype="bfloat61", exc=ValueError)
    _raises("unknown kernel backend 'cuda'", load_model, folder, backend="cuda", exc=ValueError)
    _raises("invalid device 'gpu0'", load_model, folder, device="gpu0", exc=ValueError)


# The state-spaces Mamba and Mamba-2 releases (mamba_ssm format, no attention layers; Mamba-3's are
# tested in test_mamba3_model.py: transformers has no Mamba-3 class).
STATE_SPACES = [name for name, raw in RELEASES.items()
                if "d_model" in raw and not raw["attn_layer_idx"] and raw["ssm_cfg"].get("layer") != "Mamba3"]


@pytest.mark.parametrize("name", STATE_SPACES)
def test_every_published_size_builds_with_transformers_parameter_count(name):
    """Each published size reads, builds (on the meta device: no memory) and has exactly the
    parameter count of transformers' own class at the same shape, the count the published-results
    table shows for it."""
    import transformers

    from mamba_eval.commands.published import rows
    from mamba_eval.models.model import LanguageModel
    from mamba_eval.models.releases import release_config

    raw = RELEASES[name]
    d_model, n_layer = raw["d_model"], raw["n_layer"]
    mamba2 = name.startswith("mamba2")
    cfg = release_config(name)
    ours = LanguageModel(cfg, device="meta")
    n_ours = sum(p.numel() for p in ours.parameters())
    with torch.device("meta"):
        if mamba2:
            theirs = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
                hidden_size=d_model, num_hidden_layers=n_layer, vocab_size=cfg.vocab_size, state_size=128,
                head_dim=64, num_heads=2 * d_model // 64, n_groups=1, tie_word_embeddings=True))
        else:
            theirs = transformers.MambaForCausalLM(transformers.MambaConfig(
                hidden_size=d_model, num_hidden_layers=n_layer, vocab_size=cfg.vocab_size, state_size=16,
                tie_word_embeddings=True))
    assert n_ours == sum(p.numel() for p in theirs.parameters())
    assert n_ours == next(r.n_parameters for r in rows() if r.name == name)
    size = float(name.split("-")[1][:-1]) * (1e9 if name.endswith("b") else 1e6)
    assert 0.8 * size < n_ours < 1.25 * size


def test_write_random_checkpoint_both_formats(tmp_path):
    """A random checkpoint of a release's config (shrunk), written as the releases store it and as
    safetensors: both load to the same weights, and the seed decides them."""
    from mamba_eval.models.releases import release, write_random_checkpoint

    raw = release("mamba2-130m", d_model=64, n_layer=2, ssm_cfg={"layer": "Mamba2", "headdim": 16, "chunk_size": 16})
    bin_dir = write_random_checkpoint(tmp_path / "bin", raw, seed=3)
    st_dir = write_random_checkpoint(tmp_path / "st", raw, seed=3, safetensors=True)
    other = write_random_checkpoint(tmp_path / "other", raw, seed=4)
    assert (bin_dir / "pytorch_model.bin").is_file() and (st_dir / "model.safetensors").is_file()
    assert json.loads((bin_dir / "config.json").read_text()) == raw
    a, b, c = (load_model(str(d)).state_dict() for d in (bin_dir, st_dir, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["backbone.embedding.weight"], c["backbone.embedding.weight"])


def test_loading_and_running_a_model_stays_clear_of_torch_dynamo(tmp_path):
    """Building and running a model (attention layers included) never imports torch._dynamo, whose
    import alone costs seconds of every start-up (a fresh process: the test session imports it)."""
    import subprocess
    import sys

    from mamba_eval.models.releases import release, write_random_checkpoint

    raw = release("mamba2attn-2.7b", d_model=64, n_layer=3, attn_layer_idx=[1],
                  attn_cfg={"causal": True, "num_heads": 4, "head_dim": 16, "rotary_emb_dim": 8})
    folder = write_random_checkpoint(tmp_path / "ckpt", raw)
    code = ("import sys, torch\n"
            "from mamba_eval.models.checkpoint import load_model\n"
            f"model = load_model({str(folder)!r}, dtype='float32')\n"
            "logits, _ = model(torch.tensor([[1, 2, 3, 4]]))\n"
            "assert logits.shape == (1, 4, model.config.vocab_size)\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
