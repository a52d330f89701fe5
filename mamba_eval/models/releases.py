"""The configs of published checkpoints, as their ``config.json`` files hold them: the one place
the package, its benchmarks and its tests take the published shapes from.

The real weights cannot be needed to measure speed or to test shapes: :func:`write_random_checkpoint`
writes a checkpoint of any of these shapes (or any other config) with random weights, in the
format the releases use, for benchmarks, the demo and tests.
"""

from __future__ import annotations

import copy
from pathlib import Path

_MAMBA_SSM = {"rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "tie_embeddings": True,
              "d_intermediate": 0, "attn_layer_idx": [], "attn_cfg": {}, "vocab_size": 50277}


def _mamba(d_model: int, n_layer: int) -> dict:
    return {**_MAMBA_SSM, "d_model": d_model, "n_layer": n_layer, "ssm_cfg": {}, "pad_vocab_size_multiple": 8}


def _mamba2(d_model: int, n_layer: int, **extra) -> dict:
    return {**_MAMBA_SSM, "d_model": d_model, "n_layer": n_layer, "ssm_cfg": {"layer": "Mamba2"},
            "pad_vocab_size_multiple": 16, **extra}


def _mamba3(d_model: int, n_layer: int, d_intermediate: int, mimo: bool) -> dict:
    """The Mamba-3 releases (``state-spaces/mamba3-{siso,mimo}-*``): Llama-3.1 vocabulary, tied,
    d_state 128, headdim 64, rope_fraction 0.5, a gated MLP per block; MIMO rank 4 with chunk 16.

    The shapes are not published as config files we could read: those of 187m and 1.5b are the
    third-party reproductions recorded in /work/shared/reference/facts.md (d_intermediate as
    stored: 1264 and 3824 for MIMO, built as 1280 and 3840); 443m/444m and 893m/894m are derived
    here as the (d_model, n_layer, d_intermediate) whose parameter count, computed from the
    modules' definitions, rounds to the names (the Mamba-2 paper's 24-layer widths 1024 and
    1536; SISO MLP width 2 d_model, MIMO's the multiple of 128 that brings it back to the SISO
    count). ``tests/test_mamba3_model.py`` checks the counts."""
    ssm_cfg = {"layer": "Mamba3", "d_state": 128, "headdim": 64, "rope_fraction": 0.5, "is_mimo": mimo,
               "chunk_size": 16 if mimo else 64}
    if mimo:
        ssm_cfg["mimo_rank"] = 4
    return {**_MAMBA_SSM, "d_model": d_model, "n_layer": n_layer, "d_intermediate": d_intermediate,
            "vocab_size": 128256, "ssm_cfg": ssm_cfg, "pad_vocab_size_multiple": 16}


#: ``config.json`` of each published checkpoint, by its name on the Hub (``state-spaces/<name>``
#: for the mamba_ssm-format releases).
RELEASES: dict[str, dict] = {
    "mamba-130m": _mamba(768, 24),
    "mamba-370m": _mamba(1024, 48),
    "mamba-790m": _mamba(1536, 48),
    "mamba-1.4b": _mamba(2048, 48),
    "mamba-2.8b": _mamba(2560, 64),
    "mamba2-130m": _mamba2(768, 24),
    "mamba2-370m": _mamba2(1024, 48),
    "mamba2-780m": _mamba2(1536, 48),
    "mamba2-1.3b": _mamba2(2048, 48),
    "mamba2-2.7b": _mamba2(2560, 64),
    "mamba2attn-2.7b": _mamba2(
        2560, 64, attn_layer_idx=[9, 18, 27, 36, 45, 56],
        attn_cfg={"causal": True, "d_conv": 4, "head_dim": 128, "num_heads": 30, "out_proj_bias": False,
                  "qkv_proj_bias": False, "rotary_emb_dim": 64}),
    "mamba3-siso-187m": _mamba3(768, 12, 1536, mimo=False),
    "mamba3-siso-443m": _mamba3(1024, 24, 2048, mimo=False),
    "mamba3-siso-893m": _mamba3(1536, 24, 3072, mimo=False),
    "mamba3-siso-1.5b": _mamba3(2048, 24, 4096, mimo=False),
    "mamba3-mimo-187m": _mamba3(768, 12, 1264, mimo=True),
    "mamba3-mimo-444m": _mamba3(1024, 24, 1792, mimo=True),
    "mamba3-mimo-894m": _mamba3(1536, 24, 2816, mimo=True),
    "mamba3-mimo-1.5b": _mamba3(2048, 24, 3824, mimo=True),
    "falcon-mamba-7b": {
        "architectures": ["FalconMambaForCausalLM"], "model_type": "falcon_mamba", "hidden_size": 4096,
        "num_hidden_layers": 64, "vocab_size": 65024, "state_size": 16, "conv_kernel": 4, "expand": 16,
        "intermediate_size": 8192, "time_step_rank": 256, "use_bias": False, "use_conv_bias": True,
        "layer_norm_epsilon": 1e-5, "residual_in_fp32": True, "tie_word_embeddings": False},
    "mamba-codestral-7b": {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "hidden_size": 4096,
        "num_hidden_layers": 64, "vocab_size": 32768, "state_size": 128, "head_dim": 64, "num_heads": 128,
        "n_groups": 8, "expand": 2, "chunk_size": 256, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
        "layer_norm_epsilon": 1e-5, "residual_in_fp32": True, "tie_word_embeddings": False},
}


def release(name: str, **overrides) -> dict:
    """A copy of the ``config.json`` of release ``name``, with top-level fields replaced."""
    if name not in RELEASES:
        raise KeyError(f"unknown release {name!r} (known: {', '.join(RELEASES)})")
    return {**copy.deepcopy(RELEASES[name]), **overrides}


def release_config(name: str):
    """The ``ModelConfig`` of release ``name``."""
    from mamba_eval.models.formats import config_from_dict

    return config_from_dict(release(name), Path(f"<{name}>/config.json"))


def write_random_checkpoint(folder, raw_config: dict, *, seed: int = 0, dtype=None, device="cpu",
                            safetensors: bool = False) -> Path:
    """Write ``raw_config`` as ``config.json`` and random weights (our initialisation, seeded, in
    ``dtype``: default fp32) into ``folder``: ``pytorch_model.bin`` with every tensor, the tied
    ``lm_head.weight`` too, as the mamba_ssm releases store it, or ``model.safetensors`` without
    the tied copy (safetensors refuses shared storage). Files appear whole (written to a temporary
    name, then renamed); ``device`` is where the weights are drawn (a GPU draws large ones
    faster). Returns the folder."""
    import torch

    from mamba_eval.models.formats import config_from_dict
    from mamba_eval.models.model import LanguageModel
    from mamba_eval.utils import atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config_from_dict(raw_config, folder / "config.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LanguageModel(config, backend="ref", device=device, dtype=dtype or torch.float32)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    del model
    if safetensors:
        from safetensors.torch import save_file

        if config.tie_embeddings:
            del state["lm_head.weight"]
        name, save = "model.safetensors", lambda path: save_file(state, str(path), metadata={"format": "pt"})
    else:
        name, save = "pytorch_model.bin", lambda path: torch.save(state, path)
    tmp = folder / f".{name}.tmp"
    save(tmp)
    tmp.replace(folder / name)
    atomic_write_json(folder / "config.json", raw_config)
    return folder
