"""``mamba-eval batch``: evaluate many checkpoints on many tasks, resumably.

The unit of work is one (checkpoint, task). Its result is lm-eval's result JSON for that task,
at ``OUTPUT/<slug>/<task>.json``; a unit is done when that file exists, parses, and records the
settings it was made with (``"mamba_eval_batch"`` key: task, settings, fingerprint). Every file
is written to a temporary name in the same folder, fsynced and renamed into place
(``os.replace``), so a crash or ``kill -9`` at any point leaves finished results complete and
everything else absent (stale temporary files are removed on the next run). A rerun of the same
command skips finished units and runs the rest; a finished unit made with other lm-eval
settings (``--limit``, ``--num_fewshot``, ...) is *stale*: the run stops and names it unless
``--redo-stale`` is given.

Layout of ``OUTPUT``::

    batch.json                 status: every unit's state and error, counts, elapsed time
    <slug>/checkpoint.json     name, source, model, model_args, n_parameters (for tables)
    <slug>/<task>.json         lm-eval results of one task (complete files only)
    <slug>/<task>.error        one-line error of the last failed attempt
    <slug>/worker.log          the evaluation process's output, appended per attempt
    <slug>/.lock               held while a process evaluates this checkpoint

``<slug>`` is the checkpoint folder's (or hub repository's) name plus 8 hex digits of a hash of
the model name, the resolved path or hub id and the per-checkpoint model_args (device and batch
size excluded): stable across runs and unique (two folders named ``model`` do not collide).

How the work runs: each checkpoint's pending tasks go to one child process
(``python -m mamba_eval.commands.batch --worker``) that parses the lm-eval flags with lm-eval's own
``run`` parser, loads the model once, and runs ``lm_eval.simple_evaluate`` task by task, writing
each result as soon as it is complete. A checkpoint that fails (no config, bad weights, a task
that errors) does not stop the others; failures are reported at the end with their one-line
error and the exit status is 1. The child dies with its parent (``PR_SET_PDEATHSIG`` on Linux,
plus a parent watchdog), so killing ``mamba-eval batch`` leaves no evaluation running.

Executors:

- ``local`` (default): this machine. One checkpoint per GPU (``CUDA_VISIBLE_DEVICES`` set per
  worker; GPUs found with ``torch.cuda.device_count()`` in a child process), or with
  ``--gpus-per-checkpoint K`` one checkpoint per K GPUs, data parallel through
  ``accelerate launch``. Without GPUs, ``--workers N`` CPU workers (default 1).
- ``slurm``: a SLURM job array through submitit, one array task per checkpoint
  (``--slurm-*`` options: partition, time, array parallelism, ...). Results land in the same
  folder layout, so resuming and ``mamba-eval table`` work identically.
- ``submitit-local``: the same submitit code path with submitit's ``LocalExecutor`` (one
  local process per checkpoint, all at once): for trying the cluster path on one machine.

Progress: a line per finished or failed unit on stderr (counts, elapsed time), and
``OUTPUT/batch.json`` rewritten at every change.

Library use::

    from mamba_eval.commands.batch import expand_checkpoints, run_batch
    result = run_batch(expand_checkpoints(["ckpts/*/"]), ["hellaswag", "piqa"], "runs/b1",
                       lm_eval_args=["--batch_size", "64"])
    assert result.ok

Top-level imports are the standard library only: the CLI must start fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mamba_eval.utils import atomic_write

__all__ = [
    "Checkpoint",
    "CheckpointJob",
    "BatchResult",
    "expand_checkpoints",
    "read_manifest",
    "parse_model_args",
    "detect_gpus",
    "plan_jobs",
    "unit_state",
    "run_checkpoint",
    "run_batch",
    "add_subcommand",
]

PROG = "mamba-eval batch"
STATUS_FILE = "batch.json"
CHECKPOINT_FILE = "checkpoint.json"
LOCK_FILE = ".lock"
WORKER_LOG = "worker.log"
SPEC_FILE = ".worker-spec.json"
RESULT_KEY = "mamba_eval_batch"
DATA_DIR_ENV = "MAMBA_EVAL_DATA_DIR"
_PARENT_ENV = "MAMBA_EVAL_BATCH_PARENT"
_RUNTIME_MODEL_ARGS = frozenset({"device", "batch_size", "max_batch_size"})
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


def _error(message: str):
    from mamba_eval.errors import MambaEvalError

    return MambaEvalError(message)


def _one_line(exc: BaseException) -> str:
    from mamba_eval.errors import MambaEvalError

    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return text if isinstance(exc, MambaEvalError) else f"{type(exc).__name__}: {text}"


# ------------------------------------------------------------------------------ atomic files


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`mamba_eval.utils.atomic_write`)."""
    atomic_write(path, text)


def _atomic_write_json(path: Path, data) -> None:
    _atomic_write(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _clean_temp(folder: Path) -> None:
    for tmp in folder.glob(".*.tmp-*"):
        try:
            tmp.unlink()
        except OSError:
            pass


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


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


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text


def _resolve(text: str) -> str:
    path = Path(text).expanduser()
    if path.exists() or _looks_like_path(text):
        return str(path.resolve())
    return text  # a hub id


def parse_model_args(text) -> dict:
    """``key=value,key2=value2`` (lm-eval's syntax and value types), a JSON object, or a mapping."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    if not isinstance(text, str):
        raise _error(f"model_args must be a 'key=value,...' string or a mapping, got {text!r}")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise _error(f"model_args {text!r}: invalid JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise _error(f"model_args {text!r}: expected a JSON object")
        return value
    from lm_eval._cli.utils import key_val_to_dict

    try:
        return key_val_to_dict(stripped)
    except ValueError as e:
        raise _error(f"model_args {text!r}: {e}") from None


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
                raise _error(f"no checkpoint folder matches {spec!r}")
            out += [Checkpoint(m, "", dict(model_args or {}), n_parameters) for m in dict.fromkeys(matches)]
        else:
            out.append(Checkpoint(_resolve(spec), name, dict(model_args or {}), n_parameters))
    return out


_ENTRY_KEYS = {"pretrained", "name", "model_args", "n_parameters"}


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
        raise _error(f"{path}: manifest file does not exist")
    base = path.resolve().parent
    common_cli = dict(model_args or {})

    def where(p: str) -> str:  # relative paths and patterns are relative to the manifest's folder
        p = os.path.expanduser(p)
        if os.path.isabs(p):
            return p
        if _has_glob(p) or _looks_like_path(p) or (base / p).exists():
            return str(base / p)
        return p  # a hub id

    if path.suffix.lower() == ".txt":
        lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return expand_checkpoints([where(ln) for ln in lines if ln], model_args=common_cli)

    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise _error(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    common: dict = {}
    if isinstance(data, dict):
        unknown = set(data) - {"checkpoints", "model_args"}
        if unknown:
            raise _error(f"{path}: unknown top-level key(s) {sorted(unknown)} (expected 'checkpoints', 'model_args')")
        common = parse_model_args(data.get("model_args"))
        entries = data.get("checkpoints")
    else:
        entries = data
    if not isinstance(entries, list) or not entries:
        raise _error(f"{path}: expected a non-empty list of checkpoints")
    base_args = {**common, **common_cli}
    out: list[Checkpoint] = []
    for i, entry in enumerate(entries):
        here = f"{path}: checkpoint {i + 1}"
        if isinstance(entry, str):
            out += expand_checkpoints([where(entry)], model_args=base_args)
            continue
        if not isinstance(entry, dict):
            raise _error(f"{here}: expected a string or a mapping, got {type(entry).__name__}")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise _error(f"{here}: unknown key(s) {sorted(unknown)} (expected {sorted(_ENTRY_KEYS)})")
        if not isinstance(entry.get("pretrained"), str) or not entry["pretrained"].strip():
            raise _error(f"{here}: 'pretrained' (a path, glob or hub id) is required")
        own = parse_model_args(entry.get("model_args"))
        if "pretrained" in own:
            raise _error(f"{here}: give the checkpoint as 'pretrained:', not inside model_args")
        n_params = entry.get("n_parameters")
        if n_params is not None and (isinstance(n_params, bool) or not isinstance(n_params, int) or n_params <= 0):
            raise _error(f"{here}: n_parameters must be a positive integer, got {n_params!r}")
        name = entry.get("name") or ""
        if not isinstance(name, str):
            raise _error(f"{here}: name must be a string")
        found = expand_checkpoints([where(entry["pretrained"])], model_args={**base_args, **own},
                                   n_parameters=n_params)
        if name and len(found) > 1:
            raise _error(f"{here}: 'name' given for a pattern that matches {len(found)} checkpoints")
        out += [dataclasses.replace(c, name=name) for c in found]
    return out


def _identity(checkpoint: Checkpoint, model: str, model_args: dict) -> dict:
    args = {k: v for k, v in model_args.items() if k not in _RUNTIME_MODEL_ARGS and k != "pretrained"}
    return {"model": model, "pretrained": checkpoint.pretrained, "model_args": args}


def _slug(checkpoint: Checkpoint, identity: dict) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", _base_name(checkpoint.pretrained)).strip("-.")[:48] or "checkpoint"
    return f"{base}-{digest}"


# ----------------------------------------------------------------------- lm-eval's run flags


def _lm_eval_run_parser() -> argparse.ArgumentParser:
    """lm-eval's own ``run`` argument parser, raising MambaEvalError instead of exiting."""
    from lm_eval._cli.run import Run

    root = argparse.ArgumentParser(prog="lm-eval")
    subparsers = root.add_subparsers(dest="command")
    Run.create(subparsers)
    parser = subparsers.choices["run"]

    def error(message):
        raise _error(f"lm-eval argument: {message}")

    parser.error = error  # type: ignore[method-assign]
    return parser


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _lm_eval_settings(lm_eval_args) -> tuple[dict, str | None]:
    """Check the lm-eval flags and return (result-affecting settings, include_path)."""
    parser = _lm_eval_run_parser()
    defaults = vars(parser.parse_args([]))
    namespace, unknown = parser.parse_known_args(list(lm_eval_args))
    if unknown:
        raise _error(f"unrecognized arguments (neither batch's nor lm-eval run's): {' '.join(unknown)}")
    values = vars(namespace)
    for dest, why in _FORBIDDEN.items():
        if values.get(dest) not in (None, {}, [], "", False):
            raise _error(f"lm-eval's --{dest} cannot be used with batch ({why})")
    settings = {k: _jsonable(v) for k, v in sorted(values.items())
                if k not in _NO_EFFECT and v != defaults.get(k, None)}
    return settings, values.get("include_path")


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

    def describe(self) -> dict:
        return {"slug": self.slug, "name": self.name, "pretrained": self.pretrained, "model": self.model,
                "model_args": self.model_args, "n_parameters": self.n_parameters}


def _fingerprint(model: str, model_args: dict, task: str, settings: dict) -> str:
    args = {k: v for k, v in model_args.items() if k not in _RUNTIME_MODEL_ARGS}
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
                raise _error(f"task {task!r}: batch takes task names; put your task configs in a folder "
                             "and pass --include_path FOLDER")
            if not _TASK_NAME.match(task):
                raise _error(f"task {task!r}: not a task name (letters, digits, '_', '-', '.')")
            if task not in out:
                out.append(task)
    if not out:
        raise _error("no tasks given (--tasks a,b,...)")
    return tuple(out)


def plan_jobs(checkpoints, tasks, output, *, model: str = "mamba", model_args=None, lm_eval_args=(),
              include_path: str | None = None) -> list[CheckpointJob]:
    """One ``CheckpointJob`` per distinct checkpoint (duplicates dropped), in the given order."""
    tasks = _check_tasks(tasks)
    settings, flag_include = _lm_eval_settings(lm_eval_args)
    if include_path and flag_include:
        raise _error("--data-dir and lm-eval's --include_path cannot be combined")
    include = include_path or flag_include
    lm_eval_args = tuple(lm_eval_args)
    if flag_include:  # passed in the job instead, as an absolute path
        lm_eval_args = _drop_option(lm_eval_args, "--include_path")
        include = str(Path(flag_include).resolve())
    common = parse_model_args(model_args)
    if "pretrained" in common:
        raise _error("--model_args must not set 'pretrained': give checkpoints as arguments or in a manifest")
    output = Path(output).resolve()
    unique: dict[str, tuple[Checkpoint, dict]] = {}
    for checkpoint in checkpoints:
        merged = {**common, **checkpoint.model_args, "pretrained": checkpoint.pretrained}
        unique.setdefault(_slug(checkpoint, _identity(checkpoint, model, merged)), (checkpoint, merged))
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
        raise _error("no checkpoints given")
    return list(jobs.values())


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


def unit_state(folder, task: str, fingerprint: str) -> str:
    """``"done"``, ``"stale"`` (finished with other settings) or ``"missing"`` (absent or unreadable)."""
    data = _read_json(Path(folder) / f"{task}.json")
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or not data["results"]:
        return "missing"
    record = data.get(RESULT_KEY)
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return "stale"
    return "done"


def _stale_detail(folder: Path, task: str, settings: dict) -> str:
    data = _read_json(folder / f"{task}.json") or {}
    record = data.get(RESULT_KEY)
    if not isinstance(record, dict):
        return "made outside mamba-eval batch"
    old = record.get("settings") or {}
    keys = sorted(set(old) | set(settings))
    changed = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in keys if old.get(k) != settings.get(k)]
    return ", ".join(changed) if changed else "other model or model_args"


# ----------------------------------------------------------------------------------- locking


def _try_lock(path: Path):
    """An exclusive, non-blocking lock on ``path`` (an open fd), or None if another process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no protection against concurrent runs
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _note_lock(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


# ---------------------------------------------------------------------------- one checkpoint


def _worker_command(job: CheckpointJob, spec: Path) -> list[str]:
    worker = ["-m", "mamba_eval.commands.batch", "--worker", str(spec)]
    if job.processes <= 1:
        return [sys.executable, *worker]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(job.processes),
              "--num_machines", "1", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(job.port), *worker]
    return [sys.executable, "-m", "mamba_eval.commands.batch", "--exec", *launch]


def run_checkpoint(job: CheckpointJob) -> dict:
    """Evaluate the unfinished tasks of one checkpoint in a child process; return a summary.

    Holds ``<folder>/.lock`` meanwhile: a second process on the same checkpoint returns at once
    with ``busy`` set. Safe to call again after any interruption. This is also the job function
    submitit runs on a cluster node.
    """
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"slug": job.slug, "done": [], "failed": {}, "busy": None, "returncode": None, "ran": []}
    lock = _try_lock(folder / LOCK_FILE)
    if lock is None:
        holder = (folder / LOCK_FILE).read_text(errors="replace").strip() or "another process"
        summary["busy"] = f"locked by {holder}"
        return summary
    try:
        _note_lock(lock, f"pid {os.getpid()} on {socket.gethostname()}")
        _clean_temp(folder)
        _atomic_write_json(folder / CHECKPOINT_FILE, job.describe())
        pending = [t for t in job.tasks if unit_state(folder, t, job.fingerprints[t]) != "done"]
        summary["ran"] = pending
        for task in pending:
            (folder / f"{task}.error").unlink(missing_ok=True)
        if pending:
            spec = folder / SPEC_FILE
            _atomic_write_json(spec, {**dataclasses.asdict(job), "tasks": pending})
            env = dict(os.environ)
            env[_PARENT_ENV] = str(os.getpid())
            env.setdefault("TOKENIZERS_PARALLELISM", "false")
            if job.gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(job.gpus)
            if job.threads:
                for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                    env.setdefault(var, str(job.threads))
            command = _worker_command(job, spec)
            with open(folder / WORKER_LOG, "a", encoding="utf-8") as log:
                log.write(f"\n===== {_now()} on {socket.gethostname()}: {' '.join(map(shlex.quote, command))}\n"
                          f"===== tasks: {', '.join(pending)}; CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}\n")
                log.flush()
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env)
                _RUNNING[proc.pid] = proc
                _note_lock(lock, f"pid {os.getpid()} on {socket.gethostname()} (worker pid {proc.pid})")
                try:
                    summary["returncode"] = proc.wait()
                finally:
                    _RUNNING.pop(proc.pid, None)
            for task in pending:
                if unit_state(folder, task, job.fingerprints[task]) != "done" and not (folder / f"{task}.error").exists():
                    _atomic_write(folder / f"{task}.error",
                                  f"evaluation process exited with status {summary['returncode']} before finishing "
                                  f"this task ({_last_line(folder / WORKER_LOG)})\n")
        for task in job.tasks:
            if unit_state(folder, task, job.fingerprints[task]) == "done":
                summary["done"].append(task)
            else:
                summary["failed"][task] = _error_text(folder, task)
    finally:
        os.close(lock)
    return summary


_RUNNING: dict[int, subprocess.Popen] = {}  # worker processes started by this process


def _error_text(folder: Path, task: str) -> str:
    try:
        return (folder / f"{task}.error").read_text(encoding="utf-8").strip() or "failed"
    except OSError:
        return "not finished"


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"see {path}"
    return f"last output: {lines[-1][:300]}" if lines else f"no output; see {path}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------- the worker process


def _die_with_parent() -> None:
    """End this process when its parent dies (Linux: PR_SET_PDEATHSIG; elsewhere: a watchdog)."""
    expected = int(os.environ.get(_PARENT_ENV, "0") or 0)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if expected and os.getppid() != expected:
        os._exit(70)  # the parent died before the death signal was armed

    def watch():
        while True:
            time.sleep(2.0)
            if expected and os.getppid() != expected:
                os._exit(70)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _exec_with_parent(argv: list[str]) -> int:
    """Arm the parent-death signal, then become ``argv`` (e.g. ``accelerate launch``)."""
    _die_with_parent()
    os.environ[_PARENT_ENV] = str(os.getpid())  # the launched ranks watch the launcher
    os.execv(argv[0], argv)
    return 127  # not reached


def _write_failure(folder: Path, tasks, message: str) -> None:
    for task in tasks:
        _atomic_write(folder / f"{task}.error", message.strip() + "\n")


def _worker(spec_path: str) -> int:
    """Evaluate the tasks of one checkpoint as described by the spec file (see ``run_checkpoint``)."""
    import traceback

    _die_with_parent()
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    folder = Path(spec["folder"])
    rank = int(os.environ.get("RANK", "0") or 0)
    tasks = list(spec["tasks"])

    def fail(tasks_, exc):
        traceback.print_exc()
        if rank == 0:
            _write_failure(folder, tasks_, _one_line(exc))

    try:
        from lm_eval.config.evaluate_config import EvaluatorConfig

        argv = [*spec["lm_eval_args"], "--model", spec["model"], "--model_args", json.dumps(spec["model_args"]),
                "--tasks", ",".join(tasks), "--output_path", str(folder)]
        if spec.get("include_path"):
            argv += ["--include_path", spec["include_path"]]
        cfg = EvaluatorConfig.from_cli(_lm_eval_run_parser().parse_args(argv))
        import lm_eval.api.registry

        lm = lm_eval.api.registry.get_model(cfg.model).create_from_arg_obj(
            cfg.model_args, {"batch_size": cfg.batch_size, "max_batch_size": cfg.max_batch_size, "device": cfg.device})
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_path=cfg.include_path, metadata=cfg.metadata or {})
    except BaseException as exc:  # noqa: BLE001 - the model or the settings: every task fails alike
        fail(tasks, exc)
        return 3

    failures = 0
    for task in tasks:
        print(f"===== {task}", flush=True)
        try:
            if not task_manager.match_tasks([task]):
                raise _error(f"unknown task {task!r} (see 'lm-eval ls tasks'; local configs: --include_path)")
            results, samples = _evaluate_one(lm, cfg, task, task_manager)
        except Exception as exc:  # noqa: BLE001 - one task failing must not stop the next
            failures += 1
            fail([task], exc)
            continue
        if results is None:  # not the main process of a data-parallel run
            continue
        results[RESULT_KEY] = {"format": 1, "task": task, "fingerprint": spec["fingerprints"][task],
                               "settings": spec["settings"], "slug": spec["slug"], "name": spec["name"]}
        from lm_eval.utils import handle_non_serializable

        if samples:
            for name, rows in sorted(samples.items()):
                path = folder / (f"{task}.samples.jsonl" if name == task else f"{task}.{name}.samples.jsonl")
                _atomic_write(path, "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n"
                                            for r in rows))
        _atomic_write(folder / f"{task}.json",
                      json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return 4 if failures else 0


def _evaluate_one(lm, cfg, task: str, task_manager):
    """lm-eval's ``run`` for one task on an already loaded model: (results, samples or None)."""
    from dataclasses import asdict

    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import hash_string

    tracker = EvaluationTracker()
    seed = cfg.seed
    results = simple_evaluate(
        model=lm, model_args=cfg.model_args, tasks=[task], num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size, max_batch_size=cfg.max_batch_size, device=cfg.device,
        use_cache=cfg.use_cache, cache_requests=cfg.cache_requests.get("cache_requests", False),
        rewrite_requests_cache=cfg.cache_requests.get("rewrite_requests_cache", False),
        delete_requests_cache=cfg.cache_requests.get("delete_requests_cache", False),
        limit=cfg.limit, samples=cfg.samples, check_integrity=cfg.check_integrity, write_out=cfg.write_out,
        log_samples=cfg.log_samples, evaluation_tracker=tracker, system_instruction=cfg.system_instruction,
        apply_chat_template=cfg.apply_chat_template, fewshot_as_multiturn=cfg.fewshot_as_multiturn,
        gen_kwargs=cfg.gen_kwargs, task_manager=task_manager, verbosity=cfg.verbosity,
        predict_only=cfg.predict_only,
        random_seed=seed[0] if seed else None, numpy_random_seed=seed[1] if seed else None,
        torch_random_seed=seed[2] if seed else None, fewshot_random_seed=seed[3] if seed else None,
        confirm_run_unsafe_code=cfg.confirm_run_unsafe_code, metadata=cfg.metadata,
    )
    if results is None:
        return None, None
    samples = results.pop("samples", None)
    if not cfg.log_samples:
        samples = None
    # What lm-eval's EvaluationTracker adds when it saves a results file.
    tracker.general_config_tracker.log_end_time()
    task_hashes = {}
    for name, rows in (samples or {}).items():
        task_hashes[name] = hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in rows))
    results["task_hashes"] = task_hashes
    results.update(asdict(tracker.general_config_tracker))
    results["config"]["model"] = cfg.model  # simple_evaluate names a pre-built model by its class
    results["model_source"] = cfg.model
    return results, samples


# -------------------------------------------------------------------------------- scheduling


def detect_gpus(spec: str = "auto") -> list[str]:
    """GPU ids to use: a comma-separated list, ``none``, or ``auto`` (``CUDA_VISIBLE_DEVICES`` if
    set, else ``torch.cuda.device_count()`` asked in a child process, so this process never
    initialises CUDA)."""
    spec = (spec or "auto").strip()
    if spec in ("none", "cpu", ""):
        return []
    if spec != "auto":
        ids = [s.strip() for s in spec.split(",") if s.strip()]
        if not ids:
            raise _error(f"--gpus {spec!r}: expected 'auto', 'none' or a list such as 0,1,3")
        return ids
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [] if visible.strip() in ("", "-1") else [v.strip() for v in visible.split(",") if v.strip()]
    env = dict(os.environ, MAMBA_EVAL_DISABLE_HOOK="1")
    try:
        proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                              capture_output=True, text=True, timeout=120, env=env)
        count = int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else 0
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        count = 0
    return [str(i) for i in range(count)]


@dataclass
class BatchResult:
    """What a batch ended with: per unit ``(slug, task) -> state`` and the failures' errors."""

    output: Path
    states: dict  # (slug, task) -> "done" | "failed" | "busy" | "pending" | "submitted"
    errors: dict  # (slug, task) -> one-line error
    names: dict  # slug -> label
    previously_done: int = 0
    jobs: list = field(default_factory=list)  # submitit job ids, when submitted

    @property
    def ok(self) -> bool:
        return all(s == "done" for s in self.states.values())

    @property
    def counts(self) -> dict:
        out: dict[str, int] = {}
        for state in self.states.values():
            out[state] = out.get(state, 0) + 1
        return out


class _Progress:
    """Unit states, one stderr line per finished or failed unit, and the status file."""

    def __init__(self, output: Path, jobs: list[CheckpointJob], states: dict, stream, executor: str):
        self.output, self.jobs, self.stream, self.executor = output, {j.slug: j for j in jobs}, stream, executor
        self.states = states  # (slug, task) -> state
        self.errors: dict = {}
        self.start = time.monotonic()
        self.started_at = _now()
        self.previously_done = sum(1 for s in states.values() if s == "done")
        self.lock = threading.Lock()
        self.job_ids: dict[str, str] = {}

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

    def _line(self, text: str) -> None:
        counts = self.counts()
        total = len(self.states)
        print(f"{PROG}: [{counts.get('done', 0)}/{total} done, {counts.get('failed', 0)} failed, {self.elapsed()}] "
              f"{text}", file=self.stream, flush=True)

    def counts(self) -> dict:
        out: dict[str, int] = {}
        for state in self.states.values():
            out[state] = out.get(state, 0) + 1
        return out

    def set(self, slug: str, task: str, state: str, error: str | None = None) -> None:
        with self.lock:
            if self.states.get((slug, task)) == state:
                return
            self.states[(slug, task)] = state
            if error:
                self.errors[(slug, task)] = error
            name = self.jobs[slug].name
            if state == "done":
                seconds = _eval_seconds(Path(self.jobs[slug].folder) / f"{task}.json")
                self._line(f"{name} {task}: done" + (f" in {seconds:.1f} s" if seconds is not None else ""))
            elif state == "failed":
                self._line(f"{name} {task}: FAILED: {error}")
            elif state == "busy":
                self._line(f"{name} {task}: skipped, {error}")
            self.write_status()

    def poll(self, slugs) -> None:
        """Pick up results and errors that workers of ``slugs`` have written since the last poll."""
        for slug in slugs:
            job = self.jobs[slug]
            folder = Path(job.folder)
            for task in job.tasks:
                if self.states[(slug, task)] in ("done", "failed"):
                    continue
                if (folder / f"{task}.json").exists() and unit_state(folder, task, job.fingerprints[task]) == "done":
                    self.set(slug, task, "done")
                elif (folder / f"{task}.error").exists():
                    self.set(slug, task, "failed", _error_text(folder, task))

    def finish(self, summary: dict) -> None:
        slug = summary["slug"]
        for task in self.jobs[slug].tasks:
            if task in summary["done"]:
                self.set(slug, task, "done")
            elif summary.get("busy"):
                if self.states[(slug, task)] != "done":
                    self.set(slug, task, "busy", summary["busy"])
            elif task in summary["failed"]:
                self.set(slug, task, "failed", summary["failed"][task])

    def crash(self, slug: str, message: str) -> None:
        for task in self.jobs[slug].tasks:
            if self.states[(slug, task)] not in ("done", "failed"):
                self.set(slug, task, "failed", message)

    def write_status(self) -> None:
        checkpoints = []
        for slug, job in self.jobs.items():
            units = {}
            for task in job.tasks:
                unit = {"state": self.states[(slug, task)]}
                if (slug, task) in self.errors and unit["state"] != "done":
                    unit["error"] = self.errors[(slug, task)]
                units[task] = unit
            entry = {"slug": slug, "name": job.name, "pretrained": job.pretrained, "units": units}
            if slug in self.job_ids:
                entry["job_id"] = self.job_ids[slug]
            checkpoints.append(entry)
        status = {
            "format": 1, "executor": self.executor, "started": self.started_at, "updated": _now(),
            "elapsed_s": round(time.monotonic() - self.start, 1),
            "counts": {"total": len(self.states), **self.counts()},
            "previously_done": self.previously_done, "checkpoints": checkpoints,
        }
        _atomic_write_json(self.output / STATUS_FILE, status)


def _eval_seconds(path: Path) -> float | None:
    data = _read_json(path) or {}
    try:
        return float(data.get("total_evaluation_time_seconds"))
    except (TypeError, ValueError):
        return None


def _parse_minutes(text) -> int:
    """Minutes from ``90``, ``HH:MM``, ``HH:MM:SS`` or ``D-HH:MM:SS``."""
    text = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?", text)
    if match:
        days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
        return max(1, days * 1440 + hours * 60 + minutes + (1 if seconds else 0))
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise _error(f"--slurm-time {text!r}: expected minutes or [D-]HH:MM[:SS]")


@dataclass
class SlurmOptions:
    """Cluster settings for ``executor="slurm"`` (submitit parameter names in comments)."""

    partition: str | None = None  # slurm_partition
    time_min: int = 24 * 60  # timeout_min
    cpus_per_task: int | None = None  # cpus_per_task
    mem_gb: float | None = None  # mem_gb
    array_parallelism: int | None = None  # slurm_array_parallelism (default: all tasks at once)
    account: str | None = None  # slurm_account
    qos: str | None = None  # slurm_qos
    constraint: str | None = None  # slurm_constraint
    setup: tuple[str, ...] = ()  # slurm_setup: shell lines run before the job
    additional: dict = field(default_factory=dict)  # slurm_additional_parameters

    def parameters(self, n_jobs: int, gpus_per_job: int) -> dict:
        params = {"timeout_min": self.time_min, "gpus_per_node": gpus_per_job, "tasks_per_node": 1, "nodes": 1,
                  "name": "mamba-eval-batch", "slurm_array_parallelism": self.array_parallelism or n_jobs}
        optional = {"slurm_partition": self.partition, "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb,
                    "slurm_account": self.account, "slurm_qos": self.qos, "slurm_constraint": self.constraint}
        params.update({k: v for k, v in optional.items() if v is not None})
        if self.setup:
            params["slurm_setup"] = list(self.setup)
        if self.additional:
            params["slurm_additional_parameters"] = dict(self.additional)
        return params


def make_executor(kind: str, folder, *, n_jobs: int, gpus_per_job: int, slurm: SlurmOptions | None = None):
    """A submitit executor for ``kind`` ("slurm" or "submitit-local") with the batch's parameters."""
    import submitit

    slurm = slurm or SlurmOptions()
    cluster = {"slurm": "slurm", "submitit-local": "local"}[kind]
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    except RuntimeError as e:  # e.g. no srun on this machine
        raise _error(f"--executor {kind}: {e}") from None
    executor.update_parameters(**slurm.parameters(n_jobs, gpus_per_job))
    return executor


def run_batch(checkpoints, tasks, output, *, model: str = "mamba", model_args=None, lm_eval_args=(),
              data_dir: str | None = None, executor: str = "local", workers: int | None = None,
              gpus: str = "auto", gpus_per_checkpoint: int = 1, slurm: SlurmOptions | None = None,
              wait: bool = True, redo_stale: bool = False, dry_run: bool = False, stream=None) -> BatchResult:
    """Evaluate ``checkpoints`` (``Checkpoint``s) on ``tasks``, writing into ``output``.

    ``lm_eval_args``: flags of ``lm-eval run`` applied to every unit (``--batch_size 64``,
    ``--limit 4``, ``--num_fewshot 0``, ...). ``data_dir``: a local data folder for the offline
    tasks (``mamba_eval.harness.offline``). See the module docstring for executors and resuming.
    Returns a ``BatchResult``; bad input raises ``MambaEvalError`` before anything runs.
    """
    stream = stream or sys.stderr
    if executor not in ("local", "slurm", "submitit-local"):
        raise _error(f"unknown executor {executor!r} (local, slurm, submitit-local)")
    if gpus_per_checkpoint < 1:
        raise _error("--gpus-per-checkpoint must be at least 1")
    include_path = None
    if data_dir:
        from mamba_eval.harness.offline import prepare_offline_tasks

        try:
            include_path = str(prepare_offline_tasks(data_dir))
        except (FileNotFoundError, ValueError) as e:
            raise _error(f"--data-dir {data_dir}: {e}") from None
    output = Path(output).resolve()
    jobs = plan_jobs(checkpoints, tasks, output, model=model, model_args=model_args, lm_eval_args=lm_eval_args,
                     include_path=include_path)

    states: dict = {}
    stale = []
    for job in jobs:
        for task in job.tasks:
            state = unit_state(job.folder, task, job.fingerprints[task])
            if state == "stale":
                stale.append((job, task))
            states[(job.slug, task)] = "done" if state == "done" else "pending"
    if stale and not redo_stale:
        shown = "; ".join(f"{Path(j.folder).name}/{t}.json ({_stale_detail(Path(j.folder), t, j.settings)})"
                          for j, t in stale[:5])
        more = f" and {len(stale) - 5} more" if len(stale) > 5 else ""
        raise _error(f"{len(stale)} finished result(s) in {output} were made with other settings: {shown}{more}; "
                     "rerun with --redo-stale to replace them, or use another --output folder")

    todo = [job for job in jobs if any(states[(job.slug, t)] != "done" for t in job.tasks)]
    names = {job.slug: job.name for job in jobs}
    n_done = sum(1 for s in states.values() if s == "done")
    if dry_run:
        for job in jobs:
            for task in job.tasks:
                print(f"{job.slug}\t{task}\t{states[(job.slug, task)]}\t{job.pretrained}", file=stream)
        return BatchResult(output, states, {}, names, n_done)

    slots = _local_slots(gpus, gpus_per_checkpoint, workers) if executor == "local" and todo else []
    output.mkdir(parents=True, exist_ok=True)
    for job in todo:  # errors of earlier attempts are not this run's
        for task in job.tasks:
            if states[(job.slug, task)] != "done":
                (Path(job.folder) / f"{task}.error").unlink(missing_ok=True)
    progress = _Progress(output, jobs, states, stream, executor)
    progress.write_status()
    total = len(states)
    where = ""
    if slots:
        where = (f" on {len(slots)} worker(s) with GPUs {', '.join(','.join(s) for s in slots)}"
                 if slots[0] is not None else f" on {len(slots)} CPU worker(s)")
    elif todo:
        where = f" as {len(todo)} {executor} job(s)"
    n_ckpt, n_task = len(jobs), len(jobs[0].tasks)
    print(f"{PROG}: {total} units ({n_ckpt} checkpoint{'s' * (n_ckpt != 1)} x {n_task} task{'s' * (n_task != 1)}): "
          f"{n_done} already done, "
          f"{total - n_done} to run{where}; results in {output}", file=stream, flush=True)

    if todo:
        if executor == "local":
            _run_local(todo, slots, gpus_per_checkpoint, progress)
        else:
            submitted = _run_submitit(todo, executor, output, gpus_per_checkpoint, slurm, progress, wait)
            if not wait:
                for job in todo:
                    for task in job.tasks:
                        if states[(job.slug, task)] != "done":
                            states[(job.slug, task)] = "submitted"
                progress.write_status()
                print(f"{PROG}: submitted {len(submitted)} job(s) ({', '.join(submitted)}); rerun the same command "
                      "to see progress and resume", file=stream, flush=True)
                return BatchResult(output, states, progress.errors, names, n_done, submitted)
    progress.write_status()
    result = BatchResult(output, states, progress.errors, names, n_done)
    _report(result, progress, stream)
    return result


def _local_slots(gpus: str, per_checkpoint: int, workers: int | None) -> list:
    ids = detect_gpus(gpus)
    if ids:
        if len(ids) < per_checkpoint:
            raise _error(f"--gpus-per-checkpoint {per_checkpoint} but only {len(ids)} GPU(s): {','.join(ids)}")
        slots = [tuple(ids[i:i + per_checkpoint]) for i in range(0, len(ids) - per_checkpoint + 1, per_checkpoint)]
        return slots[:workers] if workers else slots
    if per_checkpoint > 1:
        raise _error("--gpus-per-checkpoint > 1 needs GPUs (none found; see --gpus)")
    return [None] * (workers or 1)


def _run_local(jobs: list[CheckpointJob], slots: list, per_checkpoint: int, progress: _Progress) -> None:
    pending: queue.Queue = queue.Queue()
    for job in jobs:
        pending.put(job)
    finished: queue.Queue = queue.Queue()
    running: set[str] = set()
    running_lock = threading.Lock()
    cpu_threads = None if slots[0] is not None else max(1, (os.cpu_count() or 1) // len(slots))

    def slot_loop(index: int, gpus):
        while True:
            try:
                job = pending.get_nowait()
            except queue.Empty:
                return
            job = dataclasses.replace(job, gpus=gpus, processes=per_checkpoint if gpus is not None else 1,
                                      threads=cpu_threads, port=29500 + index)
            with running_lock:
                running.add(job.slug)
            try:
                finished.put(("ok", run_checkpoint(job)))
            except Exception as exc:  # noqa: BLE001 - reported as this checkpoint's failure
                finished.put(("crash", (job.slug, _one_line(exc))))

    threads = [threading.Thread(target=slot_loop, args=(i, gpus), daemon=True, name=f"batch-slot-{i}")
               for i, gpus in enumerate(slots[:len(jobs)])]
    for thread in threads:
        thread.start()
    try:
        while any(t.is_alive() for t in threads) or not finished.empty():
            with running_lock:
                slugs = list(running)
            progress.poll(slugs)
            try:
                kind, payload = finished.get(timeout=0.5)
            except queue.Empty:
                continue
            slug = payload["slug"] if kind == "ok" else payload[0]
            progress.poll([slug])
            if kind == "ok":
                progress.finish(payload)
            else:
                progress.crash(*payload)
            with running_lock:
                running.discard(slug)
    except KeyboardInterrupt:
        for proc in list(_RUNNING.values()):
            proc.kill()
        progress.write_status()
        raise


def _run_submitit(jobs, kind, output: Path, per_checkpoint: int, slurm, progress: _Progress, wait: bool) -> list[str]:
    # submitit's LocalExecutor would give every job the same GPUs: there, jobs inherit this process's.
    gpus_per_job = per_checkpoint if kind == "slurm" else 0
    executor = make_executor(kind, output / ".submitit", n_jobs=len(jobs), gpus_per_job=gpus_per_job, slurm=slurm)
    jobs = [dataclasses.replace(job, processes=per_checkpoint) for job in jobs]
    submitted = executor.map_array(run_checkpoint, jobs)
    for job, sub in zip(jobs, submitted):
        progress.job_ids[job.slug] = str(sub.job_id)
    progress.write_status()
    if not wait:
        return [str(s.job_id) for s in submitted]
    remaining = dict(zip([j.slug for j in jobs], submitted))
    while remaining:
        progress.poll(list(remaining))
        for slug, sub in list(remaining.items()):
            if not sub.done():
                continue
            try:
                summary = sub.result()
            except Exception as exc:  # noqa: BLE001 - the job itself failed (killed, timed out, ...)
                progress.poll([slug])
                progress.crash(slug, f"job {sub.job_id} failed: {_one_line(exc)}")
            else:
                progress.poll([slug])
                progress.finish(summary)
            del remaining[slug]
        if remaining:
            time.sleep(0.5)
    return [str(s.job_id) for s in submitted]


def _report(result: BatchResult, progress: _Progress, stream) -> None:
    counts = result.counts
    total = len(result.states)
    print(f"{PROG}: finished in {progress.elapsed()}: {counts.get('done', 0)} of {total} units done "
          f"({result.previously_done} before this run), {counts.get('failed', 0)} failed"
          + (f", {counts['busy']} skipped (locked by another run)" if counts.get("busy") else ""),
          file=stream, flush=True)
    by_error: dict = {}
    for (slug, task), state in result.states.items():
        if state != "done":
            by_error.setdefault((slug, result.errors.get((slug, task), state)), []).append(task)
    for (slug, error), tasks in by_error.items():
        print(f"{PROG}: FAILED {result.names[slug]} [{slug}] ({', '.join(tasks)}): {error}", file=stream, flush=True)
    if by_error:
        print(f"{PROG}: logs in {result.output}/<slug>/{WORKER_LOG}; rerun the same command to retry what is not done",
              file=stream, flush=True)


# -------------------------------------------------------------------------------------- CLI


_DESCRIPTION = """\
Evaluate many checkpoints on many tasks with lm-eval, resumably. Each (checkpoint, task)
result is lm-eval's result JSON at OUTPUT/<slug>/<task>.json, written atomically; a rerun of
the same command skips finished work. Unknown flags are lm-eval 'run' flags applied to every
evaluation (e.g. --batch_size 64 --limit 100 --num_fewshot 0).

examples:
  mamba-eval batch --checkpoints '/ckpts/run1/step-*' state-spaces/mamba-130m --tasks hellaswag,piqa -o runs/b1
  mamba-eval batch --manifest ckpts.yaml --tasks lambada_openai,hellaswag -o runs/b1 --batch_size 64
  mamba-eval batch --manifest ckpts.yaml --tasks hellaswag -o /shared/runs/b1 \\
      --executor slurm --slurm-partition gpu --slurm-time 4:00:00 --slurm-array-parallelism 16

manifest (YAML or JSON; .txt: one checkpoint per line):
  model_args: dtype=bfloat16            # optional, for every entry
  checkpoints:
    - /ckpts/run2/final                 # a path, glob or hub id
    - pretrained: /ckpts/run3/step-1000
      name: run3-1k                     # label in tables
      model_args: {dtype: float32}      # overrides the common ones
      n_parameters: 129135360           # for tables, when results cannot tell
"""


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="evaluate many checkpoints on many tasks, resumably, on all GPUs or a SLURM cluster",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    # An option, not a positional: argparse would take the value of an lm-eval flag given after
    # the checkpoints ("--limit 4") for one more checkpoint.
    parser.add_argument("--checkpoints", nargs="+", action="extend", default=[], metavar="CKPT",
                        help="checkpoint folders, glob patterns (quote them) or hub ids; repeatable")
    parser.add_argument("--manifest", metavar="FILE", action="append", default=[],
                        help="YAML/JSON/.txt file listing checkpoints (with per-checkpoint model_args); repeatable")
    parser.add_argument("--tasks", "-t", action="append", default=[], metavar="T1,T2",
                        help="lm-eval task names (comma-separated; repeatable)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="results folder")
    parser.add_argument("--model", default="mamba", help="lm-eval model name (default: mamba)")
    parser.add_argument("--model_args", default=None, metavar="ARGS",
                        help="model_args for every checkpoint ('key=value,...' or JSON), e.g. dtype=bfloat16")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help=f"local data folder for the offline tasks (default: ${DATA_DIR_ENV}; empty: off)")
    parser.add_argument("--executor", choices=("local", "slurm", "submitit-local"), default="local",
                        help="where units run (default: local)")
    parser.add_argument("--gpus", default="auto", metavar="LIST",
                        help="local GPUs to use: auto (default), none, or ids such as 0,1,3")
    parser.add_argument("--gpus-per-checkpoint", type=int, default=1, metavar="K",
                        help="GPUs per checkpoint; K > 1 runs it data parallel with accelerate launch")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="concurrent local workers (default: one per GPU group, or 1 on the CPU)")
    parser.add_argument("--redo-stale", action="store_true",
                        help="replace finished results that were made with other lm-eval settings")
    parser.add_argument("--dry-run", action="store_true", help="list the units and their states; run nothing")
    parser.add_argument("--no-wait", action="store_true",
                        help="slurm/submitit-local: return after submitting (rerun to follow up)")
    group = parser.add_argument_group("slurm (with --executor slurm; through submitit)")
    group.add_argument("--slurm-partition", default=None, metavar="NAME")
    group.add_argument("--slurm-time", default="24:00:00", metavar="TIME",
                       help="time limit per array task: minutes or [D-]HH:MM[:SS] (default: 24:00:00)")
    group.add_argument("--slurm-cpus-per-task", type=int, default=None, metavar="N")
    group.add_argument("--slurm-mem-gb", type=float, default=None, metavar="GB")
    group.add_argument("--slurm-array-parallelism", type=int, default=None, metavar="N",
                       help="array tasks running at once (default: all)")
    group.add_argument("--slurm-account", default=None, metavar="NAME")
    group.add_argument("--slurm-qos", default=None, metavar="NAME")
    group.add_argument("--slurm-constraint", default=None, metavar="NAME")
    group.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                       help="shell line run before each job, e.g. 'source ~/venv/bin/activate'; repeatable")
    group.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch parameter (e.g. reservation=abc); repeatable")
    parser.set_defaults(handler=_main, passthrough=True)


def _main(args: argparse.Namespace, extra: list[str]) -> int:
    if args.workers is not None and args.workers < 1:
        raise _error("--workers must be at least 1")
    model_args = parse_model_args(args.model_args)
    checkpoints = expand_checkpoints(args.checkpoints, model_args={})
    for manifest in args.manifest:
        checkpoints += read_manifest(manifest, model_args=model_args)
    if not checkpoints:
        raise _error("no checkpoints: give --checkpoints (folders, globs, hub ids) or --manifest FILE")
    additional = {}
    for item in args.slurm_param:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _error(f"--slurm-param {item!r}: expected KEY=VALUE")
        additional[key.strip()] = value.strip()
    slurm = SlurmOptions(
        partition=args.slurm_partition, time_min=_parse_minutes(args.slurm_time),
        cpus_per_task=args.slurm_cpus_per_task, mem_gb=args.slurm_mem_gb,
        array_parallelism=args.slurm_array_parallelism, account=args.slurm_account, qos=args.slurm_qos,
        constraint=args.slurm_constraint, setup=tuple(args.slurm_setup), additional=additional,
    )
    data_dir = args.data_dir if args.data_dir is not None else os.environ.get(DATA_DIR_ENV, "")
    if data_dir and any(a == "--include_path" or a.startswith("--include_path=") for a in extra):
        if args.data_dir is not None:
            raise _error("--data-dir and --include_path cannot be combined")
        print(f"{PROG}: ignoring ${DATA_DIR_ENV}={data_dir} because --include_path is given", file=sys.stderr)
        data_dir = ""
    try:
        result = run_batch(
            checkpoints, args.tasks, args.output, model=args.model, model_args=model_args, lm_eval_args=extra,
            data_dir=data_dir or None, executor=args.executor, workers=args.workers, gpus=args.gpus,
            gpus_per_checkpoint=args.gpus_per_checkpoint, slurm=slurm, wait=not args.no_wait,
            redo_stale=args.redo_stale, dry_run=args.dry_run,
        )
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished results are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    if args.dry_run or args.no_wait:
        return 0
    return 0 if result.ok else 1


def _module_main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"] and len(argv) == 2:
        return _worker(argv[1])
    if argv[:1] == ["--exec"] and len(argv) > 1:
        return _exec_with_parent(argv[1:])
    from mamba_eval.commands.cli import main

    return main(["batch", *argv])


if __name__ == "__main__":
    sys.exit(_module_main(sys.argv[1:]))
