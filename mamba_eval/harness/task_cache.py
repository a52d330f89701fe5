"""Exact caches for lm-eval's own start-up and task building, installed by the start-up hook
only on request (``MAMBA_EVAL_HARNESS_CACHE=1``, which ``mamba-eval`` sets for its commands:
see :mod:`mamba_eval.harness.registration`).

A sampling profile of ``lm_eval --model mamba --tasks hellaswag`` (mamba-130m shape, H200
host) found most of the process outside the model, in two places that redo the same work at
every start:

- **The task index.** ``TaskManager()`` parses every YAML file under lm-eval's task folder
  (26,653 loads for 14,717 tasks in lm-eval 0.4.13) and resolves each path with
  ``Path.resolve`` (one ``lstat`` per path component): 6 of the 7.6 s between start-up and
  model creation.
- **Prompt templates.** ``lm_eval.utils.apply_template`` compiles the Jinja template anew for
  every document it renders: 5.7 of the 7.9 s spent building HellaSwag's 40,168 requests.

Both caches hand lm-eval exactly what it would have computed:

- :func:`install_template_cache` memoises ``from_string`` of lm-eval's Jinja environment per
  template source. A compiled template is immutable and each ``render`` makes a fresh context;
  the environment's globals and filters are looked up at render time, as before.
- :func:`install_index_cache` wraps ``TaskIndex.build``. The built index is stored as JSON
  under ``$XDG_CACHE_HOME/mamba_eval/task_index`` (``~/.cache`` by default), one file per
  lm-eval version and task folder, and used only while every file the build read is
  unchanged: every YAML that lm-eval's own walk finds (the same list, in the same order) and
  every file they include, each with the size and modification time it had. Any edit, new or
  removed file rebuilds the index. Files modified in the last two seconds before a build are
  not trusted to coarse timestamps (the index is then not stored). Warnings that the build
  logs (a task overriding another) are recorded and logged again when the index is read from
  the cache. Values that JSON cannot carry exactly (anything but ``None``, booleans, numbers,
  strings, lists and dicts, or one list or dict reached twice) leave that index uncached.

Both replace parts of lm-eval's own code (``TaskIndex.build``, the Jinja environment's
``from_string``) for the whole process, hence opt-in. Every failure of a cache falls back to
lm-eval's own code.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from mamba_eval.utils import atomic_write, cache_dir

FORMAT = 1
MAX_INDEX_FILES = 32  # cached folder indexes kept (one per lm-eval version and task folder)
RACY_SECONDS = 2.0
_MARK = "_mamba_eval_cached"
_ENTRY_FIELDS = ("name", "kind", "yaml_path", "cfg", "tags")

log = logging.getLogger(__name__)


# -- templates -------------------------------------------------------------------------------
def install_template_cache(env, maxsize: int = 1024) -> bool:
    """Memoise ``env.from_string(source)`` per source string (calls with ``globals`` or
    ``template_class`` go straight through). Returns whether the cache was installed."""
    if getattr(env.from_string, _MARK, False):
        return False
    original = env.from_string

    @functools.lru_cache(maxsize=maxsize)
    def compiled(source: str):
        return original(source)

    @functools.wraps(original)
    def from_string(source, globals=None, template_class=None):
        if globals is None and template_class is None and type(source) is str:
            return compiled(source)
        return original(source, globals, template_class)

    setattr(from_string, _MARK, True)
    from_string.cache_info = compiled.cache_info
    env.from_string = from_string
    return True


# -- task index ------------------------------------------------------------------------------
class _Unencodable(Exception):
    pass


_TAGGED = "\x00d"  # {_TAGGED: [[key, value], ...]}: a dict whose keys JSON objects cannot carry


def _encode(value, seen: set[int]):
    """YAML data as JSON that decodes (:func:`_decode_object`) to an equal value of the same
    types: dicts whose keys are not all strings are stored as key-value pairs."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list or kind is dict:
        if id(value) in seen:
            raise _Unencodable("a list or dict reached twice (a YAML alias)")
        seen.add(id(value))
        if kind is list:
            return [_encode(v, seen) for v in value]
        if all(type(k) is str and not k.startswith("\x00") for k in value):
            return {k: _encode(v, seen) for k, v in value.items()}
        for k in value:
            if k is not None and type(k) not in (bool, int, float, str):
                raise _Unencodable(f"dict key of type {type(k).__name__}")
        return {_TAGGED: [[k, _encode(v, seen)] for k, v in value.items()]}
    raise _Unencodable(f"value of type {kind.__name__}")


def _decode_object(obj: dict):
    """``json.loads`` object hook undoing :func:`_encode`'s key-value pairs."""
    if len(obj) == 1 and _TAGGED in obj:
        return {k: v for k, v in obj[_TAGGED]}
    return obj


def _encode_index(index: dict, entry_cls) -> list:
    if tuple(f.name for f in dataclasses.fields(entry_cls)) != _ENTRY_FIELDS:
        raise _Unencodable(f"lm-eval's index entries have fields {[f.name for f in dataclasses.fields(entry_cls)]}")
    seen: set[int] = set()
    out = []
    for key, e in index.items():
        if type(e) is not entry_cls or not isinstance(e.name, str) or not isinstance(e.tags, set):
            raise _Unencodable("unexpected index entry")
        if e.yaml_path is not None and not isinstance(e.yaml_path, Path):
            raise _Unencodable("unexpected yaml_path")
        if any(type(t) is not str for t in e.tags):
            raise _Unencodable("unexpected tag")
        out.append([key, e.name, e.kind.name, None if e.yaml_path is None else str(e.yaml_path),
                    _encode(e.cfg, seen), sorted(e.tags)])
    return out


def _decode_index(rows: list, entry_cls, kind_cls) -> dict:
    return {key: entry_cls(name=name, kind=kind_cls[kind], yaml_path=None if path is None else Path(path),
                           cfg=cfg, tags=set(tags))
            for key, name, kind, path, cfg, tags in rows}


def _stat(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


class _Recorder(logging.Handler):
    """Keeps the records (warnings and above) that the index build logs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[tuple[int, str]] = []

    def emit(self, record):
        self.records.append((record.levelno, record.getMessage()))


def install_index_cache(index_module, loader_module) -> bool:
    """Wrap ``index_module.TaskIndex.build`` (lm-eval's ``lm_eval.tasks._index``) with the
    on-disk cache; ``loader_module`` is ``lm_eval.tasks._yaml_loader`` (its ``load_yaml`` calls
    are recorded while an index is built). Returns whether the wrapper was installed."""
    task_index = index_module.TaskIndex
    build = task_index.__dict__.get("build")
    if not isinstance(build, staticmethod) or getattr(build.__func__, _MARK, False):
        return False
    if not callable(getattr(task_index, "_iter_yaml_files", None)) or not callable(
            getattr(loader_module, "load_yaml", None)):
        return False
    original = build.__func__

    @functools.wraps(original)
    def cached_build(paths, *, resolve_includes=True):
        paths = list(paths)
        try:
            parts = [_cached_build(index_module, loader_module, original, [root], resolve_includes)
                     for root in paths]
        except Exception as exc:  # the cache must never stand between lm-eval and its tasks
            log.debug("task index cache not used: %s", exc)
            return original(paths, resolve_includes=resolve_includes)
        return _merge(parts, index_module.log)

    setattr(cached_build, _MARK, True)
    task_index.build = staticmethod(cached_build)
    return True


def _merge(parts: list[dict], index_log) -> dict:
    """The index of several folders from each folder's own, as ``TaskIndex.build`` merges them:
    a later folder's entry replaces an earlier one of the same name, with lm-eval's warning.
    (Each folder is cached on its own, so lm-eval's 14,000-odd built-in tasks are stored once
    however many ``include_path`` folders are indexed with them.)"""
    if len(parts) == 1:
        return parts[0]
    index: dict = {}
    for part in parts:
        for name, entry in part.items():
            if name in index:
                index_log.warning("Task '%s' from %s overrides existing task from %s",
                                  name, entry.yaml_path, index[name].yaml_path)
            index[name] = entry
    return index


@functools.lru_cache(maxsize=1)
def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _cached_build(index_module, loader_module, original, paths: list, resolve_includes: bool) -> dict:
    task_index = index_module.TaskIndex
    roots = [os.path.abspath(os.path.expanduser(str(p))) for p in paths]
    key = hashlib.sha256(json.dumps([FORMAT, _lm_eval_version(), sys.version_info[:2], roots,
                                     bool(resolve_includes)]).encode()).hexdigest()[:24]
    file = cache_dir("task_index") / f"{key}.json"
    yamls = [str(p) for root in paths for p in task_index._iter_yaml_files(Path(root))]

    hit = _read_stored(file, yamls, index_module)
    if hit is not None:
        index, records = hit
        for level, message in records:
            index_module.log.log(level, "%s", message)
        return index

    # Build with lm-eval's own code, recording the files it reads and the warnings it logs.
    read: list[str] = []
    loader_load = loader_module.load_yaml
    index_load = getattr(index_module, "load_yaml", None)

    @functools.wraps(loader_load)
    def recording_load(path, *args, **kwargs):
        read.append(os.path.abspath(os.path.expanduser(str(path))))
        return loader_load(path, *args, **kwargs)

    recorder = _Recorder()
    started = time.time()
    loader_module.load_yaml = recording_load
    if index_load is loader_load:
        index_module.load_yaml = recording_load
    index_module.log.addHandler(recorder)
    try:
        index = original(paths, resolve_includes=resolve_includes)
    finally:
        index_module.log.removeHandler(recorder)
        loader_module.load_yaml = loader_load
        if index_load is loader_load:
            index_module.load_yaml = index_load
    try:
        files = {p: _stat(p) for p in dict.fromkeys(yamls + read)}
        if any(s is not None and s[0] >= (started - RACY_SECONDS) * 1e9 for s in files.values()):
            return index  # a file changed just now: its timestamp may not tell the next change
        payload = {"format": FORMAT, "yamls": yamls, "files": files, "log": recorder.records,
                   "index": _encode_index(index, index_module.Entry)}
        _store(file, json.dumps(payload, separators=(",", ":"), allow_nan=True))
    except (_Unencodable, OSError) as exc:
        log.debug("task index not cached: %s", exc)
    return index


def _read_stored(file: Path, yamls: list[str], index_module):
    """(index, logged records) from ``file`` when it is valid for ``yamls`` and every file it
    was built from is unchanged; None otherwise (missing, stale, unreadable or malformed: the
    index is then built again and the file replaced)."""
    try:
        stored = json.loads(file.read_text(encoding="utf-8"), object_hook=_decode_object)
        if not (isinstance(stored, dict) and stored.get("format") == FORMAT and stored.get("yamls") == yamls
                and all(_stat(p) == s for p, s in stored["files"].items())):
            return None
        records = [(int(level), str(message)) for level, message in stored["log"]]
        return _decode_index(stored["index"], index_module.Entry, index_module.Kind), records
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _store(file: Path, text: str) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(file, text)
    kept = sorted(file.parent.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[MAX_INDEX_FILES:]:
        try:
            old.unlink()
        except OSError:
            pass
