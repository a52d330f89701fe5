"""Checkpoint files: locating a checkpoint (a folder or a Hub download), reading its config and
weights, checking them against the model and building the model.

What the config fields and weight names mean is ``mamba_eval.models.formats``'s knowledge (both
dialects: mamba_ssm's and transformers'); this module handles the files. Weights may be
``model.safetensors``, ``pytorch_model.bin`` or either sharded with an ``*.index.json``; they
are read as data only (safetensors, or ``torch.load(weights_only=True)``). Every problem with a
checkpoint raises ``CheckpointError`` with a one-line message naming the path and the field, key
or shapes at fault; a bad ``dtype``, ``device`` or ``backend`` argument raises
``MambaEvalError``. Both are ``ValueError``s.

``dtype="auto"`` means: the checkpoint config's ``torch_dtype`` (or ``dtype``) if it names one,
else the dtype the embedding is stored in (as transformers does). The SSM parameters A_log, D and
the Δ bias are kept in fp32 in any case.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mamba_eval.errors import MambaEvalError, one_line
from mamba_eval.models.config import ModelConfig
from mamba_eval.models.dtypes import parse_dtype
from mamba_eval.models.formats import CheckpointError, config_from_dict, weights_to_ours
from mamba_eval.utils import looks_like_path

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX)  # in order of preference
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "generation_config.json")

# --------------------------------------------------------------------------------------------
# Locating a checkpoint
# --------------------------------------------------------------------------------------------


def resolve_checkpoint(pretrained: str, revision: str | None = None) -> Path:
    """A local checkpoint folder, or a Hub id downloaded (config, weights, tokenizer files only).

    ``revision`` (branch, tag or commit) applies to Hub ids; it is ignored for local folders.
    """
    path = Path(pretrained).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: is a file; pass the checkpoint folder that holds {CONFIG_FILE}")
        return path
    if looks_like_path(str(pretrained)):
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
            f"could not download {pretrained!r} (revision {revision}) from the Hub: {one_line(e)}"
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
        raise CheckpointError(f"{path}: cannot read JSON ({one_line(e)})") from e
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


def read_config(path) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint folder, from either config dialect."""
    file = _config_file(path)
    return config_from_dict(_read_json(file), file)


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
        raise CheckpointError(f"{file}: cannot read weights ({one_line(e)})") from e
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{file}: expected a flat dict of tensors (a state dict)")
    return tensors


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
    stored: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        for key, tensor in _read_weights(file).items():
            if key in stored:
                raise CheckpointError(f"{file}: weight {key!r} appears in two files")
            stored[key] = tensor
    state = weights_to_ours(stored, _read_json(_config_file(path)), config, path)
    expected = expected_shapes(config)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
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


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each shared tensor once); works on the meta device."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_fits(model: torch.nn.Module, config: ModelConfig, device: torch.device, path) -> None:
    """Raise ``MambaEvalError`` before anything is allocated when the weights of ``model`` (built on
    the meta device) exceed the free memory of the GPU ``device``, saying what would fit. A model
    runs on one GPU: it is not split across several."""
    from mamba_eval.models.model import LanguageModel

    free, total = torch.cuda.mem_get_info(device)
    need = _weight_bytes(model)
    if need <= free:
        return
    gib = 2.0**-30
    dtype = str(model.dtype).removeprefix("torch.")
    hint = f"it needs one GPU with {need * gib:.1f} GiB free (a model is not split across GPUs)"
    if model.dtype.itemsize > 2:
        half = _weight_bytes(LanguageModel(config, device="meta", dtype=torch.bfloat16))
        if half <= free:
            hint = f"with dtype=bfloat16 they need {half * gib:.1f} GiB, which fits"
    raise MambaEvalError(f"{path}: the weights need {need * gib:.1f} GiB in {dtype}, more than the "
                         f"{free * gib:.1f} GiB free on {device} (of {total * gib:.1f} GiB); {hint}")


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
    from mamba_eval.models.ops import check_backend, get_ops

    torch_dtype = parse_dtype(dtype)  # fail on a typo before any I/O
    get_ops(backend)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise MambaEvalError(f"invalid device {device!r}") from e
    check_backend(backend, device)
    path = resolve_checkpoint(pretrained, revision)
    config = read_config(path)
    state = load_state_dict(path, config)
    if torch_dtype == "auto":
        torch_dtype = _auto_dtype(path, state)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    model = LanguageModel(config, backend=backend, device="meta", dtype=torch_dtype,
                          invariance=Invariance.for_device(device, batch_invariant))
    if device.type == "cuda":
        check_fits(model, config, device, path)
    model.to_empty(device=device)  # allocates (per-parameter dtypes kept) but un-ties
    model.tie_weights()
    model.load_state_dict(state, strict=True)  # copies, casting to each parameter's dtype
    return model
