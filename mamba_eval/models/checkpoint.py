"""Checkpoint loading: all knowledge of checkpoint formats lives in this module.

Two formats are read, each as a folder with a ``config.json`` and weights:

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

Weight keys are mamba_ssm's (``backbone.embedding.weight``, ``backbone.layers.N.mixer.in_proj``,
...), which are the names of ``mamba_eval.models.model``; transformers differs only by
``backbone.embeddings``. Weights may be ``model.safetensors``, ``pytorch_model.bin`` or either
sharded with an ``*.index.json``. Every problem with a checkpoint raises ``CheckpointError`` with a
one-line message naming the path and the field, key or shapes at fault; a bad ``dtype``, ``device``
or ``backend`` argument raises ``MambaEvalError``. Both are ``ValueError``s.

``dtype="auto"`` means: the checkpoint config's ``torch_dtype`` (or ``dtype``) if it names one,
else the dtype the embedding is stored in (as transformers does). The SSM parameters A_log, D and
the Δ bias are kept in fp32 in any case.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from mamba_eval.models.config import AttnConfig, ModelConfig, mamba_stack
from mamba_eval.errors import MambaEvalError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX)  # in order of preference
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "generation_config.json")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class CheckpointError(MambaEvalError):
    """A checkpoint cannot be used; the message (one line) names the path and the problem."""


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------------------------
# Locating a checkpoint
# --------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else with a slash or a leading . / ~ is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve_checkpoint(pretrained: str, revision: str | None = None) -> Path:
    """A local checkpoint folder, or a Hub id downloaded (config, weights, tokenizer files only).

    ``revision`` (branch, tag or commit) applies to Hub ids; it is ignored for local folders.
    """
    path = Path(pretrained).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: is a file; pass the checkpoint folder that holds {CONFIG_FILE}")
        return path
    if _looks_like_path(str(pretrained)):
        raise CheckpointError(f"{path}: checkpoint folder does not exist")

    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(pretrained)
    except HFValidationError:
        raise CheckpointError(f"{pretrained!r} is neither an existing folder nor a valid Hugging Face Hub id") from None
    common = [CONFIG_FILE, *_TOKENIZER_FILES]
    try:
        # safetensors if the repo has them, else the .bin files: never both.
        local = Path(snapshot_download(pretrained, revision=revision,
                                       allow_patterns=[*common, "model*.safetensors", SAFETENSORS_INDEX]))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(pretrained, revision=revision,
                                           allow_patterns=[*common, "pytorch_model*.bin", BIN_INDEX]))
    except Exception as e:  # network, authentication, missing repo or revision
        raise CheckpointError(
            f"could not download {pretrained!r} (revision {revision}) from the Hub: {_one_line(e)}"
        ) from e
    return local


def has_tokenizer_files(path) -> bool:
    """Whether the checkpoint folder carries its own tokenizer (mamba_ssm checkpoints do not)."""
    path = Path(path)
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")) or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    )


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({_one_line(e)})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _config_file(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder does not exist")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} in the checkpoint folder")
    return file


class _Fields:
    """Reads fields of one config dict, naming the file and the field in every error."""

    def __init__(self, raw: dict, where: Path, prefix: str = ""):
        self.raw, self.where, self.prefix = raw, where, prefix

    def _fail(self, key, msg):
        raise CheckpointError(f"{self.where}: field {self.prefix + key!r} {msg}")

    def get(self, key, default=None, *, required=False):
        if key not in self.raw or self.raw[key] is None:
            if required:
                self._fail(key, "is required but missing")
            return default
        return self.raw[key]

    def int(self, key, default=None, *, required=False) -> int:
        value = self.get(key, default, required=required)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            self._fail(key, f"must be an integer, got {value!r}")
        return value

    def bool(self, key, default) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            self._fail(key, f"must be true or false, got {value!r}")
        return value

    def float(self, key, default) -> float:
        value = self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self._fail(key, f"must be a number, got {value!r}")
        return float(value)

    def unsupported_unless(self, key, ok, what: str):
        if key in self.raw and not ok(self.raw[key]):
            self._fail(key, f"= {self.raw[key]!r} ({what}) is not supported yet")


def _as_float(value) -> float | None:
    """A JSON number, or transformers' encoding of non-finite floats ({"__float__": "Infinity"})."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_default_dt_limit(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and [_as_float(v) for v in value] == [0.0, math.inf]


# ssm_cfg keys of mamba_ssm's Mamba / Mamba2 modules that only affect training or initialisation.
_SSM_CFG_IGNORED = {
    "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range", "conv_init", "use_fast_path",
    "use_mem_eff_path", "layer_idx", "device", "dtype", "process_group", "sequence_parallel",
}
_SSM_CFG_READ = {
    "Mamba1": {"layer", "d_state", "d_conv", "expand", "dt_rank", "bias", "conv_bias"},
    "Mamba2": {"layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "bias", "conv_bias",
               "d_ssm", "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_limit"},
}


# attn_cfg keys of mamba_ssm's MHA that only place the module.
_ATTN_CFG_IGNORED = {"layer_idx", "device", "dtype"}
_ATTN_CFG_READ = {
    "num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias", "out_proj_bias", "softmax_scale",
    "causal", "d_conv", "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved",
}


def _attn_layers(f: _Fields, d_model: int, n_layer: int) -> tuple[tuple[int, ...], AttnConfig | None]:
    """``attn_layer_idx`` and ``attn_cfg`` of a mamba_ssm config (mamba_ssm's MHA defaults)."""
    idx = f.get("attn_layer_idx", [])
    if not isinstance(idx, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in idx):
        f._fail("attn_layer_idx", f"must be a list of layer indices, got {idx!r}")
    bad = [i for i in idx if not 0 <= i < n_layer]
    if bad:
        f._fail("attn_layer_idx", f"holds {bad}, outside the {n_layer} layers")
    if not idx:
        return (), None  # mamba_ssm ignores attn_cfg then
    attn_cfg = f.get("attn_cfg", {})
    if not isinstance(attn_cfg, dict):
        f._fail("attn_cfg", f"must be an object, got {attn_cfg!r}")
    a = _Fields(attn_cfg, f.where, prefix="attn_cfg.")
    unknown = sorted(set(attn_cfg) - _ATTN_CFG_READ - _ATTN_CFG_IGNORED)
    if unknown:
        a._fail(unknown[0], "is not a known setting of mamba_ssm's MHA")
    num_heads = a.int("num_heads", required=True)
    if num_heads < 1:
        a._fail("num_heads", f"must be positive, got {num_heads}")
    if a.bool("causal", False) is not True:  # MHA's default is non-causal
        a._fail("causal", "must be true: a language model's attention is causal")
    if a.get("head_dim") is None and d_model % num_heads != 0:
        a._fail("head_dim", f"is missing and d_model = {d_model} is not a multiple of num_heads = {num_heads}")
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


def _from_mamba_ssm(raw: dict, where: Path) -> ModelConfig:
    f = _Fields(raw, where)
    d_model = f.int("d_model", required=True)
    n_layer = f.int("n_layer", required=True)
    vocab_size = f.int("vocab_size", required=True)
    d_intermediate = f.int("d_intermediate", 0)
    if d_intermediate < 0:
        f._fail("d_intermediate", f"must be non-negative, got {d_intermediate}")
    attn_layer_idx, attn = _attn_layers(f, d_model, n_layer)
    ssm_cfg = f.get("ssm_cfg", {})
    if not isinstance(ssm_cfg, dict):
        f._fail("ssm_cfg", f"must be an object, got {ssm_cfg!r}")
    s = _Fields(ssm_cfg, where, prefix="ssm_cfg.")
    layer = s.get("layer", "Mamba1")
    if layer not in _SSM_CFG_READ:
        s._fail("layer", f"= {layer!r} is not supported (supported: Mamba1, Mamba2)")
    unknown = sorted(set(ssm_cfg) - _SSM_CFG_READ[layer] - _SSM_CFG_IGNORED)
    if unknown:
        s._fail(unknown[0], f"is not a known {layer} setting")
    pad = f.int("pad_vocab_size_multiple", 8)
    if pad < 1:
        f._fail("pad_vocab_size_multiple", f"must be positive, got {pad}")
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
    s.unsupported_unless("dt_limit", _is_default_dt_limit, "clamped Δ")
    return mamba_stack(
        arch="mamba2", d_state=s.int("d_state", 128), headdim=s.int("headdim", 64), ngroups=s.int("ngroups", 1),
        chunk_size=s.int("chunk_size", 256), **common,
    )


def _from_transformers(raw: dict, arch: str, where: Path, falcon: bool = False) -> ModelConfig:
    f = _Fields(raw, where)
    hidden = f.int("hidden_size", required=True)
    expand = f.int("expand", 2)
    f.unsupported_unless("hidden_act", lambda v: v in ("silu", "swish"), "activation other than SiLU")
    if arch == "mamba1" and f.get("intermediate_size") is not None:
        # transformers' MambaConfig / FalconMambaConfig set intermediate_size = expand * hidden_size,
        # but a stored intermediate_size overrides it (and sizes the weights).
        intermediate = f.int("intermediate_size")
        if intermediate < 1 or intermediate % hidden != 0:
            f._fail("intermediate_size", f"= {intermediate} is not a positive multiple of hidden_size = {hidden} "
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
    f.unsupported_unless("time_step_limit", _is_default_dt_limit, "clamped Δ")
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
_TRANSFORMERS_CLASSES = {"MambaForCausalLM": "mamba", "Mamba2ForCausalLM": "mamba2",
                         "FalconMambaForCausalLM": "falcon_mamba"}  # -> model_type


def read_config(path) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint folder, from either config dialect."""
    file = _config_file(path)
    raw = _read_json(file)
    model_type = raw.get("model_type")
    if model_type is not None and model_type not in _TRANSFORMERS_ARCHS:
        raise CheckpointError(
            f"{file}: unsupported model_type {model_type!r} (supported: {', '.join(map(repr, _TRANSFORMERS_ARCHS))})"
        )
    try:
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


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _weight_files(path: Path) -> list[Path]:
    for name in _WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        weight_map = _read_json(file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{file}: no 'weight_map' in the index")
        shards = [path / shard for shard in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{file}: shard {shard.name} is listed in the index but missing")
        return shards
    raise CheckpointError(f"{path}: no weights found (looked for {', '.join(_WEIGHT_FILES)})")


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(file), device="cpu")
        else:
            try:
                tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                tensors = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read weights ({_one_line(e)})") from e
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{file}: expected a flat dict of tensors (a state dict)")
    return tensors


# transformers' names -> ours (mamba_ssm's); everything else is already identical.
_RENAMES = ((re.compile(r"^backbone\.embeddings\."), "backbone.embedding."),)
# Falcon-Mamba's norms of Δ, B and C have no weight; some transformers versions keep placeholder
# weights of ones. Stored ones are dropped; any other value would change the model and is refused.
_FALCON_PLACEHOLDERS = re.compile(r"^backbone\.layers\.\d+\.mixer\.(b|c|dt)_layernorm\.weight$")


def _rename(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    return key


def _list(keys, limit=4) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``config`` (``lm_head.weight`` only when untied)."""
    from mamba_eval.models.model import LanguageModel

    model = LanguageModel(config, device="meta")
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def load_state_dict(path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names, checked against ``config`` (names and shapes).

    When the embeddings are tied, a stored ``lm_head.weight`` is dropped (the embedding is used).
    Tensors keep their stored dtype and live on the CPU (memory-mapped where the format allows).
    """
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        for key, tensor in _read_weights(file).items():
            ours = _rename(key)
            if ours in state:
                raise CheckpointError(f"{file}: weight {key!r} appears twice (as {ours!r})")
            state[ours] = tensor
    expected = expected_shapes(config)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    if any(getattr(layer.mixer, "bcdt_rmsnorm", False) for layer in config.layers):
        for key in [k for k in state if _FALCON_PLACEHOLDERS.match(k)]:
            if not bool((state[key] == 1).all()):
                raise CheckpointError(
                    f"{path}: weight {key!r} is not all ones; Falcon-Mamba's norms of B, C and dt have no weight"
                )
            del state[key]
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} weight(s) missing from the checkpoint: {_list(missing)}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected weight(s) in the checkpoint: {_list(unexpected)}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{path}: weight {key!r} has shape {tuple(state[key].shape)} in the checkpoint "
                f"but the config implies {shape}"
            )
        if not state[key].is_floating_point():
            raise CheckpointError(f"{path}: weight {key!r} has non-floating dtype {state[key].dtype}")
    return state


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def parse_dtype(dtype) -> torch.dtype | str:
    """``"auto"`` or a torch floating dtype, from a torch.dtype or a name ("bfloat16", "bf16", "torch.float16")."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise MambaEvalError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name in _DTYPES:
            return _DTYPES[name]
    raise MambaEvalError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")


def _auto_dtype(path: Path, state: dict[str, torch.Tensor]) -> torch.dtype:
    raw = _read_json(path / CONFIG_FILE)
    for field in ("torch_dtype", "dtype"):
        if raw.get(field) is not None:
            try:
                return parse_dtype(raw[field])
            except ValueError:
                msg = f"{path / CONFIG_FILE}: field {field!r} = {raw[field]!r} is not a dtype"
                raise CheckpointError(msg) from None
    return state["backbone.embedding.weight"].dtype


def load_model(pretrained, *, revision: str | None = None, dtype="auto", device="cpu", backend: str = "ref",
               batch_invariant: bool = False):
    """Build a ``LanguageModel`` from a checkpoint folder (str or Path) or Hub id, in eval mode,
    with no parameter requiring grad.

    ``dtype``: "auto" (see the module docstring), a name ("float32", "bfloat16", "float16", ...) or
    a torch.dtype. ``device``: where the weights go. ``backend``: "ref" or another name known to
    ``mamba_eval.models.ops``; ``batch_invariant``: the model's batch-invariance policy on
    ``device`` (``mamba_eval.models.invariance``).
    """
    from mamba_eval.models.invariance import Invariance
    from mamba_eval.models.model import LanguageModel
    from mamba_eval.models.ops import get_ops

    torch_dtype = parse_dtype(dtype)  # fail on a typo before any I/O
    get_ops(backend)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise MambaEvalError(f"invalid device {device!r}") from e
    path = resolve_checkpoint(pretrained, revision)
    config = read_config(path)
    state = load_state_dict(path, config)
    if torch_dtype == "auto":
        torch_dtype = _auto_dtype(path, state)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    model = LanguageModel(config, backend=backend, device="meta", dtype=torch_dtype,
                          invariance=Invariance.for_device(device, batch_invariant))
    model.to_empty(device=device)  # allocates (per-parameter dtypes kept) but un-ties
    model.tie_weights()
    model.load_state_dict(state, strict=True)  # copies, casting to each parameter's dtype
    return model
