"""What a batch will do: checkpoints (paths, globs, hub ids, manifests), their slugs and labels,
the lm-eval flags and which of them change results, and one ``CheckpointJob`` per checkpoint
with a fingerprint per task.

Nothing here touches the output folder or runs a model. A unit's fingerprint hashes the model
name, the model_args (runtime ones excluded: device, batch sizes) and the result-affecting lm-eval
settings, so a finished result made with other settings is recognised as stale.

Top-level imports are the standard library only (the CLI imports this module at start-up).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mamba_eval.errors import MambaEvalError
from mamba_eval.utils import looks_like_path

#: model_args that choose where and how fast a model runs, not what it computes.
RUNTIME_MODEL_ARGS = frozenset({"device", "batch_size", "max_batch_size"})
# lm-eval `run` settings that do not change results (everything else is part of a unit's fingerprint)
_NO_EFFECT = frozenset({
    "batch_size", "max_batch_size", "device", "verbosity", "log_samples", "show_config", "write_out",
    "use_cache", "cache_requests", "check_integrity", "include_path", "trust_remote_code",
    "output_path", "tasks", "model", "model_args", "command", "func", "config",
})
# lm-eval `run` options batch does not take (it sets them itself, or they publish elsewhere)
_FORBIDDEN = {
    "output_path": "use --output", "tasks": "use batch's --tasks", "model": "use batch's --model",
    "model_args": "use batch's --model_args or a manifest", "config": "give the flags directly",
    "wandb_args": "not supported by batch", "wandb_config_args": "not supported by batch",
    "hf_hub_log_args": "not supported by batch", "trackio_args": "not supported by batch",
}
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_ENTRY_KEYS = {"pretrained", "name", "model_args", "n_parameters"}


# ------------------------------------------------------------------------------ checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint to evaluate: a folder or hub id, its label and its own model_args."""

    pretrained: str  # absolute folder path, or a hub id
    name: str = ""  # label in tables (default: the folder's or repository's name)
    model_args: dict = field(default_factory=dict)  # overrides the common --model_args
    n_parameters: int | None = None  # for tables, when the results cannot tell

    @property
    def label(self) -> str:
        """The given name, else the folder's name, or the hub id itself."""
        if self.name:
            return self.name
        return _base_name(self.pretrained) if Path(self.pretrained).is_absolute() else self.pretrained


def _base_name(pretrained: str) -> str:
    return Path(pretrained.rstrip("/")).name or pretrained


def _resolve(text: str) -> str:
    path = Path(text).expanduser()
    if path.exists() or looks_like_path(text):
        return str(path.resolve())
    return text  # a hub id


def parse_model_args(text) -> dict:
    """``key=value,key2=value2`` (lm-eval's syntax and value types), a JSON object, or a mapping."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    if not isinstance(text, str):
        raise MambaEvalError(f"model_args must be a 'key=value,...' string or a mapping, got {text!r}")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise MambaEvalError(f"model_args {text!r}: invalid JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise MambaEvalError(f"model_args {text!r}: expected a JSON object")
        return value
    # lm-eval's own --model_args parser (nested values such as [4096,8192]); lm-eval has no
    # public equivalent (lm_eval.utils.simple_parse_args_string splits inside brackets).
    from lm_eval._cli.utils import key_val_to_dict

    try:
        return key_val_to_dict(stripped)
    except ValueError as e:
        raise MambaEvalError(f"model_args {text!r}: {e}") from None


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def expand_checkpoints(specs, *, model_args=None, name: str = "", n_parameters=None) -> list[Checkpoint]:
    """Checkpoints from folder paths, glob patterns (matching folders, or their ``config.json``)
    and hub ids, each with ``model_args``. A pattern that matches nothing is an error."""
    out = []
    for spec in specs:
        spec = str(spec).strip()
        if not spec:
            continue
        if _has_glob(spec):
            matches = []
            for match in sorted(glob.glob(os.path.expanduser(spec))):
                path = Path(match)
                if path.is_file() and path.name == "config.json":
                    path = path.parent
                if path.is_dir():
                    matches.append(str(path.resolve()))
            if not matches:
                raise MambaEvalError(f"no checkpoint folder matches {spec!r}")
            out += [Checkpoint(m, "", dict(model_args or {}), n_parameters) for m in dict.fromkeys(matches)]
        else:
            out.append(Checkpoint(_resolve(spec), name, dict(model_args or {}), n_parameters))
    return out


def read_manifest(path, *, model_args=None) -> list[Checkpoint]:
    """Checkpoints from a manifest file.

    YAML or JSON: a list of entries, or a mapping with ``checkpoints:`` (the list) and optional
    ``model_args:`` for every entry. An entry is a string (path, glob or hub id) or a mapping with
    ``pretrained`` (required), ``name``, ``model_args`` (string or mapping) and ``n_parameters``.
    A ``.txt`` manifest lists one path, glob or hub id per line (``#`` starts a comment).
    model_args merge as: manifest ``model_args`` < ``model_args`` (the command line) < entry's own.
    Relative paths are relative to the manifest's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise MambaEvalError(f"{path}: manifest file does not exist")
    base = path.resolve().parent
    common_cli = dict(model_args or {})

    def where(p: str) -> str:  # relative paths and patterns are relative to the manifest's folder
        p = os.path.expanduser(p)
        if os.path.isabs(p):
            return p
        if _has_glob(p) or looks_like_path(p) or (base / p).exists():
            return str(base / p)
        return p  # a hub id

    if path.suffix.lower() == ".txt":
        lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return expand_checkpoints([where(ln) for ln in lines if ln], model_args=common_cli)

    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MambaEvalError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    common: dict = {}
    if isinstance(data, dict):
        unknown = set(data) - {"checkpoints", "model_args"}
        if unknown:
            raise MambaEvalError(f"{path}: unknown top-level key(s) {sorted(unknown)} "
                                 "(expected 'checkpoints', 'model_args')")
        common = parse_model_args(data.get("model_args"))
        entries = data.get("checkpoints")
    else:
        entries = data
    if not isinstance(entries, list) or not entries:
        raise MambaEvalError(f"{path}: expected a non-empty list of checkpoints")
    base_args = {**common, **common_cli}
    out: list[Checkpoint] = []
    for i, entry in enumerate(entries):
        here = f"{path}: checkpoint {i + 1}"
        if isinstance(entry, str):
            out += expand_checkpoints([where(entry)], model_args=base_args)
            continue
        if not isinstance(entry, dict):
            raise MambaEvalError(f"{here}: expected a string or a mapping, got {type(entry).__name__}")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise MambaEvalError(f"{here}: unknown key(s) {sorted(unknown)} (expected {sorted(_ENTRY_KEYS)})")
        if not isinstance(entry.get("pretrained"), str) or not entry["pretrained"].strip():
            raise MambaEvalError(f"{here}: 'pretrained' (a path, glob or hub id) is required")
        own = parse_model_args(entry.get("model_args"))
        if "pretrained" in own:
            raise MambaEvalError(f"{here}: give the checkpoint as 'pretrained:', not inside model_args")
        n_params = entry.get("n_parameters")
        if n_params is not None and (isinstance(n_params, bool) or not isinstance(n_params, int) or n_params <= 0):
            raise MambaEvalError(f"{here}: n_parameters must be a positive integer, got {n_params!r}")
        name = entry.get("name") or ""
        if not isinstance(name, str):
            raise MambaEvalError(f"{here}: name must be a string")
        found = expand_checkpoints([where(entry["pretrained"])], model_args={**base_args, **own},
                                   n_parameters=n_params)
        if name and len(found) > 1:
            raise MambaEvalError(f"{here}: 'name' given for a pattern that matches {len(found)} checkpoints")
        out += [dataclasses.replace(c, name=name) for c in found]
    return out


def _slug(checkpoint: Checkpoint, model: str, model_args: dict) -> str:
    """The checkpoint's folder name plus 8 hex digits of a hash of what identifies it."""
    args = {k: v for k, v in model_args.items() if k not in RUNTIME_MODEL_ARGS and k != "pretrained"}
    identity = {"model": model, "pretrained": checkpoint.pretrained, "model_args": args}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", _base_name(checkpoint.pretrained)).strip("-.")[:48] or "checkpoint"
    return f"{base}-{digest}"


def _distinct_names(checkpoints: list[Checkpoint]) -> list[str]:
    """Labels: given names, else the folder name, lengthened with parent folders where two
    checkpoints of this batch would otherwise share one (``run1/model``, ``run2/model``)."""
    names = [c.label for c in checkpoints]
    for depth in range(2, 6):
        counts: dict[str, int] = {}
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        clashing = [i for i, c in enumerate(checkpoints) if not c.name and counts[names[i]] > 1
                    and Path(c.pretrained).is_absolute()]
        if not clashing:
            break
        for i in clashing:
            parts = Path(checkpoints[i].pretrained).parts[1:]
            names[i] = "/".join(parts[-depth:])
    return names


# ----------------------------------------------------------------------- lm-eval's run flags


def lm_eval_run_parser() -> argparse.ArgumentParser:
    """lm-eval's own ``run`` argument parser, raising MambaEvalError instead of exiting.

    lm-eval defines its ``run`` flags only in its CLI class (``lm_eval._cli.run.Run``) and has
    no public accessor for the parser; taking it from there keeps batch's flags exactly
    lm-eval's, whatever version is installed."""
    from lm_eval._cli.run import Run

    root = argparse.ArgumentParser(prog="lm-eval")
    subparsers = root.add_subparsers(dest="command")
    Run.create(subparsers)
    parser = subparsers.choices["run"]

    def error(message):
        raise MambaEvalError(f"lm-eval argument: {message}")

    parser.error = error  # type: ignore[method-assign]
    return parser


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _lm_eval_settings(lm_eval_args) -> tuple[dict, str | None]:
    """Check the lm-eval flags and return (result-affecting settings, include_path)."""
    parser = lm_eval_run_parser()
    defaults = vars(parser.parse_args([]))
    namespace, unknown = parser.parse_known_args(list(lm_eval_args))
    if unknown:
        raise MambaEvalError(f"unrecognized arguments (neither batch's nor lm-eval run's): {' '.join(unknown)}")
    values = vars(namespace)
    for dest, why in _FORBIDDEN.items():
        if values.get(dest) not in (None, {}, [], "", False):
            raise MambaEvalError(f"lm-eval's --{dest} cannot be used with batch ({why})")
    settings = {k: _jsonable(v) for k, v in sorted(values.items())
                if k not in _NO_EFFECT and v != defaults.get(k, None)}
    # lm-eval's rule (EvaluatorConfig): few-shot examples are turns of the chat exactly when a
    # chat template is applied, unless --fewshot_as_multiturn says otherwise; true needs one.
    chat = bool(settings.get("apply_chat_template"))
    if settings.get("fewshot_as_multiturn") is True and not chat:
        raise MambaEvalError("lm-eval's --fewshot_as_multiturn needs --apply_chat_template")
    if settings.get("fewshot_as_multiturn") == chat:  # the default spelt out: the same results
        del settings["fewshot_as_multiturn"]
    return settings, values.get("include_path")


def _drop_option(args: tuple[str, ...], option: str) -> tuple[str, ...]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return tuple(out)


# ------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class CheckpointJob:
    """Everything one process needs to evaluate one checkpoint's tasks (picklable)."""

    slug: str
    folder: str
    name: str
    pretrained: str
    model: str
    model_args: dict  # merged, including "pretrained"
    tasks: tuple[str, ...]
    fingerprints: dict  # task -> fingerprint
    settings: dict  # result-affecting lm-eval settings
    lm_eval_args: tuple[str, ...]
    include_path: str | None = None
    n_parameters: int | None = None
    gpus: tuple[str, ...] | None = None  # CUDA_VISIBLE_DEVICES for the worker (None: inherit)
    processes: int = 1  # > 1: data parallel through accelerate launch
    threads: int | None = None  # CPU threads per worker (OMP_NUM_THREADS), when set
    port: int = 29500  # accelerate's main process port (distinct per concurrent worker)
    # A worker killed by a signal leaves its unfinished units pending (for another slot) instead of failed.
    retry_if_killed: bool = False

    def describe(self) -> dict:
        """The checkpoint's description, as ``checkpoint.json`` holds it (read by ``mamba-eval table``)."""
        return {"slug": self.slug, "name": self.name, "pretrained": self.pretrained, "model": self.model,
                "model_args": self.model_args, "n_parameters": self.n_parameters}


def _fingerprint(model: str, model_args: dict, task: str, settings: dict) -> str:
    args = {k: v for k, v in model_args.items() if k not in RUNTIME_MODEL_ARGS}
    record = {"model": model, "model_args": args, "task": task, "settings": settings}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_tasks(tasks) -> tuple[str, ...]:
    out: list[str] = []
    for item in tasks:
        for task in str(item).split(","):
            task = task.strip()
            if not task:
                continue
            if task.endswith((".yaml", ".yml")) or "/" in task:
                raise MambaEvalError(f"task {task!r}: batch takes task names; put your task configs in a folder "
                                     "and pass --include_path FOLDER")
            if not _TASK_NAME.match(task):
                raise MambaEvalError(f"task {task!r}: not a task name (letters, digits, '_', '-', '.')")
            if task not in out:
                out.append(task)
    if not out:
        raise MambaEvalError("no tasks given (--tasks a,b,...)")
    return tuple(out)


def plan_jobs(checkpoints, tasks, output, *, model: str = "mamba", model_args=None, lm_eval_args=(),
              include_path: str | None = None) -> list[CheckpointJob]:
    """One ``CheckpointJob`` per distinct checkpoint (duplicates dropped), in the given order."""
    tasks = _check_tasks(tasks)
    settings, flag_include = _lm_eval_settings(lm_eval_args)
    if include_path and flag_include:
        raise MambaEvalError("--data-dir and lm-eval's --include_path cannot be combined")
    include = include_path or flag_include
    lm_eval_args = tuple(lm_eval_args)
    if flag_include:  # passed in the job instead, as an absolute path
        lm_eval_args = _drop_option(lm_eval_args, "--include_path")
        include = str(Path(flag_include).resolve())
    common = parse_model_args(model_args)
    if "pretrained" in common:
        raise MambaEvalError("--model_args must not set 'pretrained': give checkpoints as arguments or in a manifest")
    output = Path(output).resolve()
    unique: dict[str, tuple[Checkpoint, dict]] = {}
    for checkpoint in checkpoints:
        merged = {**common, **checkpoint.model_args, "pretrained": checkpoint.pretrained}
        unique.setdefault(_slug(checkpoint, model, merged), (checkpoint, merged))
    names = _distinct_names([c for c, _ in unique.values()])
    jobs: dict[str, CheckpointJob] = {}
    for (slug, (checkpoint, merged)), name in zip(unique.items(), names):
        jobs[slug] = CheckpointJob(
            slug=slug, folder=str(output / slug), name=name, pretrained=checkpoint.pretrained,
            model=model, model_args=merged, tasks=tasks,
            fingerprints={t: _fingerprint(model, merged, t, settings) for t in tasks}, settings=settings,
            lm_eval_args=lm_eval_args, include_path=include, n_parameters=checkpoint.n_parameters,
        )
    if not jobs:
        raise MambaEvalError("no checkpoints given")
    return list(jobs.values())
