"""The checkpoint dialects: every config format and weight naming read, translated into a
``ModelConfig`` and our parameter names. Nothing else in the package reads a checkpoint's config.

The formats read, each as a folder with a ``config.json`` and weights:

- **mamba_ssm** (``state-spaces/mamba-130m``, ``state-spaces/mamba2-130m``,
  ``state-spaces/mamba2attn-2.7b``, ...): config fields ``d_model, d_intermediate, n_layer,
  vocab_size, ssm_cfg, attn_layer_idx, attn_cfg, rms_norm, residual_in_fp32,
  pad_vocab_size_multiple, tie_embeddings, ...``; ``vocab_size`` is the tokenizer's (e.g. 50277)
  and the stored embedding has it rounded up to a multiple of ``pad_vocab_size_multiple`` (e.g.
  50280). ``ssm_cfg["layer"]`` = ``"Mamba2"`` selects Mamba-2. Defaults are mamba_ssm's (Mamba-1:
  d_state 16, d_conv 4, expand 2, dt_rank ceil(d_model/16); Mamba-2: d_state 128, d_conv 4,
  expand 2, headdim 64, ngroups 1, chunk_size 256; norm eps 1e-5). ``fused_add_norm`` only
  selects a kernel and is ignored. Hybrids: the layers of ``attn_layer_idx`` are attention as
  described by ``attn_cfg`` (mamba_ssm's ``MHA`` arguments and defaults: num_heads,
  num_heads_kv = num_heads, head_dim = d_model / num_heads, qkv_proj_bias and out_proj_bias true,
  rotary_emb_dim 0, rotary_emb_base 10000, rotary_emb_interleaved false, softmax_scale
  1/sqrt(head_dim), d_conv 0, mlp_dim 0 rounded up to a multiple of 256; ``causal`` must be true);
  ``d_intermediate > 0`` adds a gated MLP whose width mamba_ssm rounds up to a multiple of 128.
- **transformers** (``model_type`` "mamba" / "mamba2" / "falcon_mamba", ``MambaForCausalLM`` /
  ``Mamba2ForCausalLM`` / ``FalconMambaForCausalLM``): ``hidden_size, num_hidden_layers,
  state_size, conv_kernel, expand, intermediate_size, time_step_rank, head_dim, n_groups,
  num_heads, chunk_size, layer_norm_epsilon, mixer_rms_eps, use_bias, use_conv_bias,
  residual_in_fp32, tie_word_embeddings, vocab_size``; here ``vocab_size`` already equals the
  stored embedding rows. Missing optional fields take transformers' class defaults (note
  ``Mamba2Config``'s: n_groups 8, num_heads 128, untied embeddings — Codestral-Mamba's shape).
  For Mamba-1 and Falcon-Mamba a stored ``intermediate_size`` wins over ``expand``, as in
  transformers (Falcon-Mamba-7B's config says expand 16 and intermediate_size 8192 = 2 x 4096).
  Falcon-Mamba is Mamba-1 with weightless RMSNorms of Δ, B and C (eps ``mixer_rms_eps``, 1e-6).

- **Mamba-3** in mamba_ssm's format (``state-spaces/mamba3-{siso,mimo}-*``): ``ssm_cfg["layer"]`` =
  ``"Mamba3"`` with ``d_state, expand, headdim, ngroups, rope_fraction, A_floor, is_outproj_norm,
  is_mimo, mimo_rank, chunk_size`` (defaults 128, 2, 64, 1, 0.5, 1e-4, false, false, 4, 64, as in
  ``mamba_ssm/modules/mamba3.py`` at e9594ce); ``dt_min, dt_max, dt_init_floor`` and
  ``fuse_pregate_headwise_norm`` (a kernel choice) are ignored, any other key refused (mamba_ssm's
  ``Mamba3(**kwargs)`` would swallow it silently). Mixer weights ``in_proj, dt_bias, B_bias,
  C_bias, B_norm, C_norm, D, out_proj`` and, for MIMO, ``mimo_x, mimo_z, mimo_o``, and ``norm``
  with ``is_outproj_norm``; no conv, no ``A_log``.
- **fla's Mamba-3** (``model_type`` "mamba3", ``Mamba3ForCausalLM``, fla-org/flash-linear-attention
  ``fla/models/mamba3`` at bc3b101): ``hidden_size, num_hidden_layers, vocab_size, state_size,
  head_dim, expand, n_groups, rope_fraction, A_floor, is_outproj_norm, is_mimo, mimo_rank,
  chunk_size, use_bias, norm_eps, residual_in_fp32, tie_word_embeddings`` (default false); no MLP;
  ``norm_eps`` is also the eps of the B, C and output norms. The same mixer weight names, under
  ``backbone.embeddings``.

Both Mamba-3 dialects take ``A_activation`` ("softplus", the default, or "heavy_tail"), a key of
ours: the activation of Mamba-3's data-dependent A changed in mamba_ssm's source (commit c69aaab,
after the release) from softplus, which fla keeps, to a heavy-tailed map, and no config field
records which one a checkpoint was trained with (see ``Mamba3Config``).

Weight keys are mamba_ssm's (``backbone.embedding.weight``, ``backbone.layers.N.mixer.in_proj``,
...), which are the names of ``mamba_eval.models.model``; transformers differs only by
``backbone.embeddings``. Weights may be ``model.safetensors``, ``pytorch_model.bin`` or either
sharded with an ``*.index.json`` (``mamba_eval.models.checkpoint`` reads the files).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from mamba_eval.models.config import AttnConfig, Mamba3Config, ModelConfig, mamba_stack
from mamba_eval.models.config_fields import CheckpointError, Fields, generic_config_keys, is_default_dt_limit
from mamba_eval.models.hf_hybrids import FAMILIES


# ssm_cfg keys of mamba_ssm's Mamba / Mamba2 modules that only affect training or initialisation.
_SSM_CFG_IGNORED = {
    "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range", "conv_init", "use_fast_path",
    "use_mem_eff_path", "layer_idx", "device", "dtype", "process_group", "sequence_parallel",
}
_SSM_CFG_READ = {
    "Mamba1": {"layer", "d_state", "d_conv", "expand", "dt_rank", "bias", "conv_bias"},
    "Mamba2": {"layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "bias", "conv_bias",
               "d_ssm", "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_limit"},
    "Mamba3": {"layer", "d_state", "expand", "headdim", "ngroups", "rope_fraction", "A_floor", "is_outproj_norm",
               "is_mimo", "mimo_rank", "chunk_size", "A_activation"},
}
# ssm_cfg keys of mamba_ssm's Mamba3 that only affect training, initialisation or which kernel runs
# (fuse_pregate_headwise_norm fuses the MIMO output norm into the scan kernel; the references of
# both paths in mamba_ssm's tests compute the same function).
_MAMBA3_IGNORED = {"dt_min", "dt_max", "dt_init_floor", "fuse_pregate_headwise_norm", "dropout", "layer_idx",
                   "n_layer", "device", "dtype"}


# attn_cfg keys of mamba_ssm's MHA that only place the module.
_ATTN_CFG_IGNORED = {"layer_idx", "device", "dtype"}
_ATTN_CFG_READ = {
    "num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias", "out_proj_bias", "softmax_scale",
    "causal", "d_conv", "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved",
}


def _attn_layers(f: Fields, d_model: int, n_layer: int) -> tuple[tuple[int, ...], AttnConfig | None]:
    """``attn_layer_idx`` and ``attn_cfg`` of a mamba_ssm config (mamba_ssm's MHA defaults)."""
    idx = f.get("attn_layer_idx", [])
    if not isinstance(idx, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in idx):
        f.fail("attn_layer_idx", f"must be a list of layer indices, got {idx!r}")
    bad = [i for i in idx if not 0 <= i < n_layer]
    if bad:
        f.fail("attn_layer_idx", f"holds {bad}, outside the {n_layer} layers")
    if not idx:
        return (), None  # mamba_ssm ignores attn_cfg then
    attn_cfg = f.get("attn_cfg", {})
    if not isinstance(attn_cfg, dict):
        f.fail("attn_cfg", f"must be an object, got {attn_cfg!r}")
    a = Fields(attn_cfg, f.where, prefix="attn_cfg.")
    unknown = sorted(set(attn_cfg) - _ATTN_CFG_READ - _ATTN_CFG_IGNORED)
    if unknown:
        a.fail(unknown[0], "is not a known setting of mamba_ssm's MHA")
    num_heads = a.int("num_heads", required=True)
    if num_heads < 1:
        a.fail("num_heads", f"must be positive, got {num_heads}")
    if a.bool("causal", False) is not True:  # MHA's default is non-causal
        a.fail("causal", "must be true: a language model's attention is causal")
    if a.get("head_dim") is None and d_model % num_heads != 0:
        a.fail("head_dim", f"is missing and d_model = {d_model} is not a multiple of num_heads = {num_heads}")
    mlp_dim = a.int("mlp_dim", 0)
    softmax_scale = a.get("softmax_scale")
    if softmax_scale is not None:
        softmax_scale = a.float("softmax_scale", None)
    try:
        attn = AttnConfig(
            num_heads=num_heads,
            num_heads_kv=a.int("num_heads_kv", num_heads),
            head_dim=a.int("head_dim", d_model // num_heads),
            rotary_emb_dim=a.int("rotary_emb_dim", 0),
            rotary_emb_base=a.float("rotary_emb_base", 10000.0),
            rotary_emb_interleaved=a.bool("rotary_emb_interleaved", False),
            qkv_proj_bias=a.bool("qkv_proj_bias", True),
            out_proj_bias=a.bool("out_proj_bias", True),
            softmax_scale=softmax_scale,
            d_conv=a.int("d_conv", 0),
            mlp_dim=-(-mlp_dim // 256) * 256,  # MHA rounds it up to a multiple of 256
        )
    except ValueError as e:
        raise CheckpointError(f"{f.where}: attn_cfg: {e}") from None
    return tuple(sorted(set(idx))), attn


def _mamba3_mixer(s: Fields, d_inner: int, names: dict | None = None, **fields) -> Mamba3Config:
    """The Mamba3Config of a mamba_ssm ``ssm_cfg`` (``s``) with mamba_ssm's defaults, or of another
    dialect's config whose field names differ (``names``: mamba_ssm's name -> the dialect's);
    ``fields``: values the dialect sets elsewhere (fla's biases and norm eps)."""
    n = (names or {}).get
    rope_fraction = s.float(n("rope_fraction", "rope_fraction"), 0.5)
    if rope_fraction not in (0.5, 1.0):
        s.fail(n("rope_fraction", "rope_fraction"), f"= {rope_fraction!r} is not supported (mamba_ssm allows 0.5 and 1.0)")
    A_activation = s.get("A_activation", "softplus")
    if A_activation not in ("softplus", "heavy_tail"):
        s.fail("A_activation", f"= {A_activation!r} is not supported (softplus or heavy_tail)")
    is_mimo = s.bool(n("is_mimo", "is_mimo"), False)
    mimo_rank = s.int(n("mimo_rank", "mimo_rank"), 4)
    if is_mimo and mimo_rank < 1:
        s.fail(n("mimo_rank", "mimo_rank"), f"must be positive, got {mimo_rank}")
    d_state = s.int(n("d_state", "d_state"), 128)
    if d_state < 2:
        s.fail(n("d_state", "d_state"), f"must be at least 2, got {d_state}")
    if is_mimo and d_state % 4:
        s.fail(n("d_state", "d_state"), f"= {d_state} is not supported with MIMO (its rotation needs a multiple of 4)")
    headdim, ngroups = s.int(n("headdim", "headdim"), 64), s.int(n("ngroups", "ngroups"), 1)
    if headdim < 1 or d_inner % headdim:
        s.fail(n("headdim", "headdim"), f"= {headdim} does not divide d_inner = {d_inner}")
    if ngroups < 1 or (d_inner // headdim) % ngroups:
        s.fail(n("ngroups", "ngroups"), f"= {ngroups} does not divide the {d_inner // headdim} heads")
    try:
        return Mamba3Config(
            d_inner=d_inner, d_state=d_state, headdim=headdim, ngroups=ngroups, rope_fraction=rope_fraction,
            A_floor=s.float(n("A_floor", "A_floor"), 1e-4), A_activation=A_activation,
            is_outproj_norm=s.bool(n("is_outproj_norm", "is_outproj_norm"), False), is_mimo=is_mimo,
            mimo_rank=mimo_rank if is_mimo else 4, chunk_size=s.int(n("chunk_size", "chunk_size"), 64), **fields)
    except ValueError as e:
        raise CheckpointError(f"{s.where}: {e}") from None


# fla's Mamba3Config (fla/models/mamba3/configuration_mamba3.py): fields we read, and fields that only
# affect training, initialisation, kernels or generation defaults.
_FLA_MAMBA3_READ = {
    "hidden_size", "num_hidden_layers", "vocab_size", "state_size", "head_dim", "expand", "n_groups", "num_heads",
    "rope_fraction", "A_floor", "is_outproj_norm", "is_mimo", "mimo_rank", "chunk_size", "use_bias", "norm_eps",
    "hidden_act", "residual_in_fp32", "tie_word_embeddings", "A_activation",
}
_FLA_MAMBA3_IGNORED = {
    "dt_min", "dt_max", "dt_init_floor", "initializer_range", "rescale_prenorm_residual", "use_cache", "fuse_norm",
    "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp", "pad_token_id", "bos_token_id", "eos_token_id",
}
_FLA_NAMES = {"d_state": "state_size", "headdim": "head_dim", "ngroups": "n_groups"}


def _from_fla_mamba3(raw: dict, where: Path) -> ModelConfig:
    """flash-linear-attention's ``mamba3`` (``Mamba3ForCausalLM``): a Mamba-3 mixer per block, no
    MLP, pre-norm blocks with RMSNorm of eps ``norm_eps`` (also the B, C and output norms'), keys
    ``backbone.embeddings``, ``backbone.layers.N.{norm, mixer.*}``, ``backbone.norm_f``, ``lm_head``."""
    f = Fields(raw, where)
    unknown = sorted(set(raw) - _FLA_MAMBA3_READ - _FLA_MAMBA3_IGNORED - generic_config_keys())
    if unknown:
        f.fail(unknown[0], "is not a known setting of fla's Mamba3Config")
    f.unsupported_unless("hidden_act", lambda v: v in ("silu", "swish"), "activation other than SiLU")
    hidden, expand = f.int("hidden_size", required=True), f.int("expand", 2)
    norm_eps = f.float("norm_eps", 1e-5)
    mixer = _mamba3_mixer(f, expand * hidden, names=_FLA_NAMES, proj_bias=f.bool("use_bias", False),
                          norm_eps=norm_eps)
    if f.get("num_heads") is not None and f.int("num_heads") != mixer.nheads:
        f.fail("num_heads", f"= {raw['num_heads']} is not expand * hidden_size / head_dim = {mixer.nheads}")
    return mamba_stack(
        arch="mamba3", mamba3=mixer, d_model=hidden, n_layer=f.int("num_hidden_layers", required=True),
        vocab_size=f.int("vocab_size", required=True), expand=expand, rms_norm=True, norm_eps=norm_eps,
        residual_in_fp32=f.bool("residual_in_fp32", True), tie_embeddings=f.bool("tie_word_embeddings", False),
    )


def _from_mamba_ssm(raw: dict, where: Path) -> ModelConfig:
    f = Fields(raw, where)
    d_model = f.int("d_model", required=True)
    n_layer = f.int("n_layer", required=True)
    vocab_size = f.int("vocab_size", required=True)
    d_intermediate = f.int("d_intermediate", 0)
    if d_intermediate < 0:
        f.fail("d_intermediate", f"must be non-negative, got {d_intermediate}")
    attn_layer_idx, attn = _attn_layers(f, d_model, n_layer)
    ssm_cfg = f.get("ssm_cfg", {})
    if not isinstance(ssm_cfg, dict):
        f.fail("ssm_cfg", f"must be an object, got {ssm_cfg!r}")
    s = Fields(ssm_cfg, where, prefix="ssm_cfg.")
    layer = s.get("layer", "Mamba1")
    if layer not in _SSM_CFG_READ:
        s.fail("layer", f"= {layer!r} is not supported (supported: Mamba1, Mamba2, Mamba3)")
    ignored = _MAMBA3_IGNORED if layer == "Mamba3" else _SSM_CFG_IGNORED
    unknown = sorted(set(ssm_cfg) - _SSM_CFG_READ[layer] - ignored)
    if unknown:
        s.fail(unknown[0], f"is not a known {layer} setting")
    pad = f.int("pad_vocab_size_multiple", 8)
    if pad < 1:
        f.fail("pad_vocab_size_multiple", f"must be positive, got {pad}")
    common = dict(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=-(-vocab_size // pad) * pad,  # mamba_ssm pads the embedding rows
        d_conv=s.int("d_conv", 4),
        expand=s.int("expand", 2),
        conv_bias=s.bool("conv_bias", True),
        proj_bias=s.bool("bias", False),
        rms_norm=f.bool("rms_norm", True),
        norm_eps=1e-5,  # mamba_ssm's MixerModel default (and RMSNormGated's); not stored in the config
        residual_in_fp32=f.bool("residual_in_fp32", True),
        tie_embeddings=f.bool("tie_embeddings", True),
        d_intermediate=-(-d_intermediate // 128) * 128,  # GatedMLP rounds its width up to a multiple of 128
        attn_layer_idx=attn_layer_idx,
        attn=attn,
    )
    if layer == "Mamba3":
        for key in ("d_conv", "conv_bias", "proj_bias"):  # Mamba-3 has no conv and no projection biases
            del common[key]
        return mamba_stack(arch="mamba3", mamba3=_mamba3_mixer(s, common["expand"] * d_model), **common)
    if layer == "Mamba1":
        dt_rank = s.get("dt_rank", "auto")
        return mamba_stack(
            arch="mamba1", d_state=s.int("d_state", 16),
            dt_rank=math.ceil(d_model / 16) if dt_rank == "auto" else s.int("dt_rank"), **common,
        )
    d_inner = common["expand"] * d_model
    s.unsupported_unless("d_ssm", lambda v: v is None or v == d_inner, "an SSM narrower than d_inner")
    s.unsupported_unless("D_has_hdim", lambda v: v is False, "D per channel")
    s.unsupported_unless("rmsnorm", lambda v: v is True, "no gated norm")
    s.unsupported_unless("norm_before_gate", lambda v: v is False, "norm before gate")
    s.unsupported_unless("dt_limit", is_default_dt_limit, "clamped Δ")
    return mamba_stack(
        arch="mamba2", d_state=s.int("d_state", 128), headdim=s.int("headdim", 64), ngroups=s.int("ngroups", 1),
        chunk_size=s.int("chunk_size", 256), **common,
    )


def _from_transformers(raw: dict, arch: str, where: Path, falcon: bool = False) -> ModelConfig:
    f = Fields(raw, where)
    hidden = f.int("hidden_size", required=True)
    expand = f.int("expand", 2)
    f.unsupported_unless("hidden_act", lambda v: v in ("silu", "swish"), "activation other than SiLU")
    if arch == "mamba1" and f.get("intermediate_size") is not None:
        # transformers' MambaConfig / FalconMambaConfig set intermediate_size = expand * hidden_size,
        # but a stored intermediate_size overrides it (and sizes the weights).
        intermediate = f.int("intermediate_size")
        if intermediate < 1 or intermediate % hidden != 0:
            f.fail("intermediate_size", f"= {intermediate} is not a positive multiple of hidden_size = {hidden} "
                    "(not supported)")
        expand = intermediate // hidden
    common = dict(
        d_model=hidden,
        n_layer=f.int("num_hidden_layers", required=True),
        vocab_size=f.int("vocab_size", required=True),  # already the stored (padded) rows
        d_conv=f.int("conv_kernel", 4),
        expand=expand,
        conv_bias=f.bool("use_conv_bias", True),
        proj_bias=f.bool("use_bias", False),
        rms_norm=True,  # transformers' Mamba classes always use RMSNorm
        norm_eps=f.float("layer_norm_epsilon", 1e-5),
        residual_in_fp32=f.bool("residual_in_fp32", True),
    )
    if arch == "mamba1":
        dt_rank = f.get("time_step_rank", "auto")
        return mamba_stack(
            arch="mamba1", d_state=f.int("state_size", 16),
            dt_rank=math.ceil(hidden / 16) if dt_rank == "auto" else f.int("time_step_rank"),
            tie_embeddings=f.bool("tie_word_embeddings", True), bcdt_rmsnorm=falcon,
            bcdt_rmsnorm_eps=f.float("mixer_rms_eps", 1e-6) if falcon else 1e-6, **common,
        )
    f.unsupported_unless("time_step_limit", is_default_dt_limit, "clamped Δ")
    head_dim, num_heads = f.int("head_dim", 64), f.int("num_heads", 128)
    if num_heads * head_dim != expand * hidden:
        raise CheckpointError(
            f"{where}: num_heads * head_dim = {num_heads} * {head_dim} does not equal "
            f"expand * hidden_size = {expand} * {hidden}"
        )
    return mamba_stack(
        arch="mamba2", d_state=f.int("state_size", 128), headdim=head_dim, ngroups=f.int("n_groups", 8),
        chunk_size=f.int("chunk_size", 256), tie_embeddings=f.bool("tie_word_embeddings", False),
        **common,
    )


_TRANSFORMERS_ARCHS = {"mamba": "mamba1", "mamba2": "mamba2", "falcon_mamba": "mamba1"}
_OTHER_TYPES = ("mamba3", *FAMILIES)
_TRANSFORMERS_CLASSES = {"MambaForCausalLM": "mamba", "Mamba2ForCausalLM": "mamba2",
                         "FalconMambaForCausalLM": "falcon_mamba"}  # -> model_type


def config_from_dict(raw: dict, file: Path) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint's parsed ``config.json`` (``file``, for messages), from
    either dialect."""
    quant = raw.get("quantization_config")
    if quant is not None:  # FP8, bitsandbytes, GPTQ, ...: the weights are not plain floats
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise CheckpointError(f"{file}: quantised weights (quantization_config: {method}) are not supported; "
                              "use the unquantised release")
    model_type = raw.get("model_type")
    if model_type is None and "Mamba3ForCausalLM" in (raw.get("architectures") or []):
        model_type = "mamba3"
    if model_type is not None and model_type not in _TRANSFORMERS_ARCHS and model_type not in _OTHER_TYPES:
        supported = [*_TRANSFORMERS_ARCHS, *_OTHER_TYPES]
        raise CheckpointError(f"{file}: unsupported model_type {model_type!r} (supported: {', '.join(map(repr, supported))})")
    try:
        if model_type in FAMILIES:
            return FAMILIES[model_type][0](raw, file)
        if model_type == "mamba3":
            return _from_fla_mamba3(raw, file)
        if "hidden_size" not in raw and "d_model" in raw:
            return _from_mamba_ssm(raw, file)
        if model_type is None:
            model_type = next((_TRANSFORMERS_CLASSES[n] for n in raw.get("architectures") or []
                               if n in _TRANSFORMERS_CLASSES), None)
        if model_type is not None:
            return _from_transformers(raw, _TRANSFORMERS_ARCHS[model_type], file, falcon=model_type == "falcon_mamba")
        architectures = raw.get("architectures") or []
        if architectures:
            raise CheckpointError(f"{file}: unsupported architectures {architectures}")
        raise CheckpointError(f"{file}: unknown config format (no model_type, architectures or d_model field)")
    except CheckpointError:
        raise
    except ValueError as e:  # the config classes' own consistency checks
        raise CheckpointError(f"{file}: {e}") from e


# transformers' names -> ours (mamba_ssm's); everything else is already identical.
_RENAMES = ((re.compile(r"^backbone\.embeddings\."), "backbone.embedding."),)
# Falcon-Mamba's norms of Δ, B and C have no weight; some transformers versions keep placeholder
# weights of ones. Stored ones are dropped; any other value would change the model and is refused.
_FALCON_PLACEHOLDERS = re.compile(r"^backbone\.layers\.\d+\.mixer\.(b|c|dt)_layernorm\.weight$")


def _rename_key(key: str) -> str:
    """Our (mamba_ssm's) name of a stored weight of the Mamba / Mamba-2 / Mamba-3 dialects."""
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    return key


def weights_to_ours(state: dict, raw: dict, config: ModelConfig, path) -> dict:
    """The stored tensors of a checkpoint (its ``config.json``: ``raw``) under our names: renamed,
    fused where a family stores one of our weights in parts, placeholders dropped."""
    family = FAMILIES.get(raw.get("model_type"))
    if family is not None:
        return family[1](config, raw).apply(state, path)
    out = {}
    for key, tensor in state.items():
        ours = _rename_key(key)
        if ours in out:
            raise CheckpointError(f"{path}: weight {key!r} appears twice (as {ours!r})")
        out[ours] = tensor
    _drop_placeholders(out, config, path)
    return out


def _drop_placeholders(state: dict, config: ModelConfig, path) -> None:
    """Remove stored weights that the model does not have but a format writes as placeholders
    (Falcon-Mamba's all-ones norm weights), IN PLACE; any other value of them is refused."""
    if not any(getattr(layer.mixer, "bcdt_rmsnorm", False) for layer in config.layers):
        return
    for key in [k for k in state if _FALCON_PLACEHOLDERS.match(k)]:
        if not bool((state[key] == 1).all()):
            raise CheckpointError(
                f"{path}: weight {key!r} is not all ones; Falcon-Mamba's norms of B, C and dt have no weight"
            )
        del state[key]
