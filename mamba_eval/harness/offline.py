"""Offline mirrors of the standard lm-eval tasks, read from a local data folder.

lm-eval 0.4.13 loads every stock task from the Hugging Face Hub and does not honour
``HF_DATASETS_OFFLINE``: on a machine without hub access (and without a warm hub cache) the
tasks fail. :func:`prepare_offline_tasks` turns a data folder laid out as documented in
``mamba_eval/tasks/README.md`` into an lm-eval *include path* holding one derived YAML per task::

    include: /…/site-packages/lm_eval/tasks/hellaswag/hellaswag.yaml   # the stock config
    task: hellaswag
    tag: []
    dataset_path: json
    dataset_name: null
    dataset_kwargs: {data_files: {validation: /data/hellaswag/hellaswag_val.jsonl}}
    training_split: null
    validation_split: validation
    test_split: null

Everything else (task name, prompts, ``process_docs``, target and choice templates, metrics,
version) comes from the stock file through ``include:``. lm-eval indexes its built-in tasks
first and include paths after them, so a derived YAML with the stock task name replaces the
stock entry. ``tag: []`` matters: a tag listed here would register a tag entry from the include
path that *replaces* the stock one (``multiple_choice``, ``ai2_arc``, ``lambada``) by one that
lists only the offline tasks; without it the stock tag entries stay whole, and the task names
they list resolve to the offline tasks.

Which file feeds which split is declared once, in ``tasks/offline/layout.yaml``. Two data sets
need converting, and the results go to a cache folder next to the YAMLs:

- PIQA's original files keep the labels in ``valid-labels.lst``; the stock task expects the
  Hub schema ``goal, sol1, sol2, label`` (int), so the two files are zipped row by row.
- ``wikitext`` reads ``EleutherAI/wikitext_document_level``: whole articles (field ``page``).
  That set is built from ``wiki.test.raw`` of the WikiText-2 raw release by splitting the text
  at ``"\\n"`` and starting a new page at every top-level heading line (`` = Title = ``, after
  folding ``"= = ="``/``"= ="`` so sub-headings do not match), joining each page's lines with
  ``"\\n"`` and dropping pages that are only whitespace. The data folder holds the Hub rows of
  ``wikitext-2-raw-v1`` (one row per line of ``wiki.test.raw``, blank lines stored as ``""``);
  writing blank rows back as ``" \\n"`` restores ``wiki.test.raw`` byte for byte, which is
  checked against the file's published MD5 before the pages are cut (62 pages for the test
  split).

The cache folder is ``<cache root>/<key>``; the key hashes the data folder's path, the size and
mtime of every file used, the layout, and the installed lm-eval (whose absolute path the YAMLs
contain), so a changed input gives a new folder. The folder is built under a temporary name
and renamed into place, so an interrupted run never leaves a half-written cache behind.

Without a data folder the stock tasks read the Hub. When ``datasets`` cannot reach it,
:func:`hub_data_error` says so in one line with the way out (a data folder), and
:func:`check_hub_data` finds that out before a run loads its model when the environment is
offline. lm-eval warns that each derived YAML overrides its stock task; :func:`is_own_override`
tells exactly those warnings (the replacement is the point) from any other, for the filter that the
start-up hook puts on lm-eval's task-index logger.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from mamba_eval.errors import MambaEvalError
from mamba_eval.utils import DATA_DIR_ENV, data_dir_from_env
from mamba_eval.utils import cache_dir as package_cache_dir  # (prepare_offline_tasks has a cache_dir argument)

__all__ = [
    "WIKITEXT2_TEST_RAW_MD5",
    "check_hub_data",
    "default_cache_root",
    "from_datasets",
    "hub_data_error",
    "hub_offline",
    "offline_task_names",
    "prepare_offline_tasks",
    "is_own_override",
    "rebuild_wikitext_raw",
    "wikitext_pages",
]

#: Bumped whenever the generated files change meaning, so old cache folders are not reused.
_CACHE_FORMAT = 1

#: MD5 of the original ``wikitext-2-raw/wiki.test.raw`` (1,290,590 bytes), as published with
#: llama.cpp's ``scripts/get-wikitext-2.sh`` and quoted by perplexity benchmarks.
WIKITEXT2_TEST_RAW_MD5 = "7c0137fc034ddbc56a296bce31b4f7fb"

_SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}
_MANIFEST = "manifest.json"
_README_HINT = "see mamba_eval/tasks/README.md for the expected layout"


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _SplitSource:
    split: str  # "train" | "validation" | "test"
    files: tuple[str, ...]  # relative to the data folder
    convert: str | None  # a key of _CONVERTERS, or None to read files[0] as is
    optional: bool


@dataclass(frozen=True)
class _OfflineTask:
    name: str
    stock: str  # stock config, relative to lm_eval/tasks/
    splits: tuple[_SplitSource, ...]


def _layout_text() -> str:
    return (importlib.resources.files("mamba_eval.tasks") / "offline" / "layout.yaml").read_text(
        encoding="utf-8"
    )


def _load_layout() -> dict[str, _OfflineTask]:
    raw = yaml.safe_load(_layout_text())
    if raw.get("format") != 1:
        raise ValueError(f"tasks/offline/layout.yaml: unsupported format {raw.get('format')!r}")
    tasks: dict[str, _OfflineTask] = {}
    for name, spec in raw["tasks"].items():
        splits = []
        for split, src in spec["splits"].items():
            if split not in _SPLIT_KEYS:
                raise ValueError(f"tasks/offline/layout.yaml: task {name}: unknown split {split!r}")
            convert = src.get("convert")
            if convert is not None and convert not in _CONVERTERS:
                raise ValueError(f"tasks/offline/layout.yaml: task {name}: unknown conversion {convert!r}")
            splits.append(
                _SplitSource(split, tuple(src["files"]), convert, bool(src.get("optional", False)))
            )
        tasks[name] = _OfflineTask(name, spec["stock"], tuple(splits))
    return tasks


def offline_task_names() -> list[str]:
    """Names of the stock lm-eval tasks that :func:`prepare_offline_tasks` mirrors, in layout order."""
    return list(_load_layout())


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/mamba_eval/offline``, with ``~/.cache`` when XDG_CACHE_HOME is unset."""
    return package_cache_dir("offline")


def _stock_tasks_dir() -> Path:
    # find_spec on a top-level package locates it without importing it (lm_eval is heavy).
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lm-eval is not installed; the offline tasks extend its stock task configs")
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "tasks"


# --------------------------------------------------------------------------- conversions


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return rows


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _convert_piqa_labels(sources: Sequence[Path], out: Path) -> int:
    """Zip PIQA's ``valid.jsonl`` (goal, sol1, sol2) with ``valid-labels.lst`` (one 0/1 per line)."""
    questions_path, labels_path = sources
    questions = _read_jsonl(questions_path)
    labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(questions):
        raise ValueError(
            f"{labels_path} has {len(labels)} labels but {questions_path} has {len(questions)} rows"
        )
    rows = []
    for i, (q, label) in enumerate(zip(questions, labels)):
        if label not in ("0", "1"):
            raise ValueError(f"{labels_path}:{i + 1}: label {label!r} is not 0 or 1")
        missing = {"goal", "sol1", "sol2"} - q.keys()
        if missing:
            raise ValueError(f"{questions_path}:{i + 1}: missing field(s) {sorted(missing)}")
        rows.append({"goal": q["goal"], "sol1": q["sol1"], "sol2": q["sol2"], "label": int(label)})
    _write_jsonl(out, rows)
    return len(rows)


def rebuild_wikitext_raw(rows: Sequence[str]) -> str:
    """Rebuild ``wiki.test.raw`` from the Hub's ``wikitext-*-raw-v1`` rows.

    The Hub builder yields one row per line of the raw file, keeping the newline, except that
    whitespace-only lines (``" \\n"`` in the raw file) become ``""``.
    """
    return "".join(row if row.strip() else " \n" for row in rows)


def wikitext_pages(raw: str) -> list[str]:
    """Cut raw WikiText into article pages as ``EleutherAI/wikitext_document_level`` does.

    A line opens a new page when, after folding ``"= = ="`` to ``"==="`` and ``"= ="`` to
    ``"=="`` and stripping, it starts with ``"= "`` and ends with ``" ="`` (a top-level heading;
    sub-headings then start with ``"=="``). Pages are their lines joined by ``"\\n"``; a page
    that is only whitespace is dropped, except the last one, which is always kept.
    """
    pages: list[str] = []
    lines: list[str] = []
    for line in raw.split("\n"):
        folded = line.replace("= = =", "===").replace("= =", "==").strip()
        if folded.startswith("= ") and folded.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def _convert_wikitext_documents(sources: Sequence[Path], out: Path) -> int:
    (rows_path,) = sources
    rows = []
    for i, row in enumerate(_read_jsonl(rows_path)):
        if not isinstance(row.get("text"), str):
            raise ValueError(f"{rows_path}:{i + 1}: expected a string field 'text'")
        rows.append(row["text"])
    raw = rebuild_wikitext_raw(rows)
    digest = hashlib.md5(raw.encode("utf-8")).hexdigest()
    if digest != WIKITEXT2_TEST_RAW_MD5:
        raise ValueError(
            f"{rows_path}: the rows do not rebuild the original WikiText-2 wiki.test.raw "
            f"(md5 {digest}, expected {WIKITEXT2_TEST_RAW_MD5}); expected the Hub's wikitext-2-raw-v1 test rows"
        )
    pages = wikitext_pages(raw)
    _write_jsonl(out, [{"page": page} for page in pages])
    return len(pages)


_CONVERTERS: dict[str, Callable[[Sequence[Path], Path], int]] = {
    "piqa_labels": _convert_piqa_labels,
    "wikitext_documents": _convert_wikitext_documents,
}


# --------------------------------------------------------------------------- building


def _resolve_sources(data_dir: Path, layout: dict[str, _OfflineTask]) -> dict[str, list[_SplitSource]]:
    """The splits wired up per task; raises FileNotFoundError naming the first missing required file."""
    wired: dict[str, list[_SplitSource]] = {}
    for task in layout.values():
        wired[task.name] = []
        for src in task.splits:
            missing = [f for f in src.files if not (data_dir / f).is_file()]
            if missing and src.optional:
                continue
            if missing:
                raise FileNotFoundError(
                    f"offline data folder {data_dir} is missing {missing[0]} "
                    f"(feeds task {task.name}); {_README_HINT}"
                )
            wired[task.name].append(src)
    return wired


def _cache_key(data_dir: Path, stock_dir: Path, wired: dict[str, list[_SplitSource]]) -> str:
    try:
        lm_eval_version = importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        lm_eval_version = "unknown"
    files = sorted({f for srcs in wired.values() for s in srcs for f in s.files})
    stats = []
    for f in files:
        st = (data_dir / f).stat()
        stats.append([f, st.st_size, st.st_mtime_ns])
    blob = json.dumps(
        {
            "format": _CACHE_FORMAT,
            "data_dir": str(data_dir),
            "files": stats,
            "layout": hashlib.sha256(_layout_text().encode("utf-8")).hexdigest(),
            "lm_eval": [lm_eval_version, str(stock_dir)],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _task_yaml(task: _OfflineTask, stock_yaml: Path, data_files: dict[str, str]) -> str:
    cfg: dict = {
        "include": str(stock_yaml),
        "task": task.name,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files},
    }
    for split, key in _SPLIT_KEYS.items():
        cfg[key] = split if split in data_files else None
    header = (
        f"# Generated by mamba_eval.harness.offline: stock lm-eval task {task.name!r} reading local files.\n"
        "# Do not edit; rerun prepare_offline_tasks() instead.\n"
    )
    return header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


def _build(
    folder: Path,
    final: Path,
    data_dir: Path,
    stock_dir: Path,
    layout: dict[str, _OfflineTask],
    wired: dict[str, list[_SplitSource]],
) -> None:
    """Write YAMLs, converted data and the manifest into ``folder``; paths inside point at ``final``."""
    manifest: dict = {
        "format": _CACHE_FORMAT,
        "data_dir": str(data_dir),
        "lm_eval_tasks": str(stock_dir),
        "tasks": {},
    }
    for name, srcs in wired.items():
        task = layout[name]
        stock_yaml = stock_dir / task.stock
        if not stock_yaml.is_file():
            raise FileNotFoundError(
                f"stock config {task.stock} of task {name} not found under {stock_dir}; "
                f"the offline tasks were written for lm-eval 0.4.13"
            )
        data_files: dict[str, str] = {}
        entry: dict = {"stock_config": str(stock_yaml), "splits": {}}
        for src in srcs:
            sources = [data_dir / f for f in src.files]
            if src.convert is None:
                data_files[src.split] = str(sources[0])
                entry["splits"][src.split] = {"sources": list(src.files)}
            else:
                rel = Path("data") / name / f"{src.split}.jsonl"
                n_rows = _CONVERTERS[src.convert](sources, folder / rel)
                data_files[src.split] = str(final / rel)
                entry["splits"][src.split] = {
                    "sources": list(src.files),
                    "converted": str(rel),
                    "conversion": src.convert,
                    "rows": n_rows,
                }
        (folder / f"{name}.yaml").write_text(_task_yaml(task, stock_yaml, data_files), encoding="utf-8")
        entry["data_files"] = data_files
        manifest["tasks"][name] = entry
    # Written last: a folder with a manifest is complete.
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def prepare_offline_tasks(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Make the stock lm-eval tasks read the local data folder ``data_dir``; return the include path.

    Args:
        data_dir: folder laid out as in ``mamba_eval/tasks/README.md`` (``tasks/offline/layout.yaml``).
        cache_dir: root under which the generated folder ``<cache_dir>/<key>`` is created;
            default :func:`default_cache_root`.

    Returns:
        The folder of derived task YAMLs, to pass as ``TaskManager(include_path=...)`` or
        ``lm_eval --include_path``. The tasks keep their stock names (:func:`offline_task_names`).

    Raises:
        FileNotFoundError: the data folder, or a file the layout requires, is missing.
        ValueError: a data file does not have the expected content.
    """
    data = Path(data_dir).expanduser()
    if not data.is_dir():
        raise FileNotFoundError(f"offline data folder not found: {data}")
    data = data.resolve()
    layout = _load_layout()
    wired = _resolve_sources(data, layout)
    stock_dir = _stock_tasks_dir()

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    root = root.resolve()
    final = root / _cache_key(data, stock_dir, wired)
    if (final / _MANIFEST).is_file():
        return final

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is plain readable data
        _build(tmp, final, data, stock_dir, layout, wired)
        if final.exists() and not (final / _MANIFEST).is_file():
            shutil.rmtree(final)  # not written by this function (it renames only complete folders)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _MANIFEST).is_file():  # not a concurrent build of the same inputs
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --------------------------------------------------------------------------- without a data folder


def hub_offline() -> bool:
    """Whether ``datasets`` runs offline, by its own rule (``datasets.config``, which takes seconds
    to import): ``HF_DATASETS_OFFLINE`` when set, else huggingface_hub's ``HF_HUB_OFFLINE`` (which
    ``TRANSFORMERS_OFFLINE`` also sets)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_DATASETS_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.upper() in ("1", "ON", "YES", "TRUE")


def from_datasets(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``ConnectionError`` raised inside ``datasets``: a task's Hub data set
    could not be fetched (no network, or offline mode without it in the local cache)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return isinstance(exc, ConnectionError) and module.partition(".")[0] == "datasets"


def hub_data_error(exc: BaseException, data_dir) -> MambaEvalError:
    """The one-line error for task data that ``datasets`` could not fetch (``exc``): with no data
    folder (``data_dir`` None), how to give one; with one, which tasks it serves."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if data_dir is None:
        hint = f"without network access pass --data-dir DIR or set {DATA_DIR_ENV} ({_README_HINT})"
    else:
        hint = f"the data folder {data_dir} serves only {', '.join(offline_task_names())}"
    return MambaEvalError(f"{reason}; {hint}")


def check_hub_data(task_names: Sequence[str]) -> None:
    """For a run without a data folder in offline mode (:func:`hub_offline`): raise
    :func:`hub_data_error` for the first of ``task_names`` that is a stock task mirrored here and
    whose Hub data set ``datasets`` cannot load from its local cache, before lm-eval loads a
    model to find out. ``datasets.load_dataset_builder`` is the lookup lm-eval's own
    ``load_dataset`` starts with, so a run that would work is left alone."""
    layout = _load_layout()
    mirrored = [name for name in task_names if name in layout]
    if not mirrored or not hub_offline():
        return
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml

    for name in mirrored:
        stock = load_yaml(_stock_tasks_dir() / layout[name].stock, resolve_func=False)
        try:
            datasets.load_dataset_builder(stock["dataset_path"], stock.get("dataset_name"))
        except ConnectionError as exc:
            raise hub_data_error(exc, None) from None


# --------------------------------------------------------------------------- lm-eval's warnings


#: lm-eval's warning when a task config replaces another of the same name (lm_eval.tasks._index).
_OVERRIDE = re.compile(r"Task '(?P<name>[^']+)' from (?P<new>.+) overrides existing task from (?P<old>.+)")


def is_own_override(record: logging.LogRecord) -> bool:
    """Whether ``record`` is lm-eval's warning that an offline mirror written here overrides its own
    stock task (replacing it is the mirror's purpose). Every other override is not."""
    match = _OVERRIDE.fullmatch(record.getMessage())
    if match is None:
        return False
    entry = _manifest_tasks(os.path.dirname(os.path.abspath(match["new"]))).get(match["name"])
    stock = entry.get("stock_config") if isinstance(entry, dict) else None
    return isinstance(stock, str) and os.path.realpath(stock) == os.path.realpath(match["old"])


@functools.lru_cache(maxsize=None)
def _manifest_tasks(folder: str) -> dict:
    """The tasks of the offline folder ``folder`` (its manifest's ``tasks``); {} for any other folder."""
    try:
        manifest = json.loads((Path(folder) / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(manifest, dict) or manifest.get("format") != _CACHE_FORMAT:
        return {}
    tasks = manifest.get("tasks")
    return tasks if isinstance(tasks, dict) else {}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mamba_eval.harness.offline [DATA_DIR]``: prepare the offline tasks, print the include path."""
    parser = argparse.ArgumentParser(
        prog="python -m mamba_eval.harness.offline",
        description="Write lm-eval task configs that read the standard tasks from a local data "
        "folder, and print the folder to pass as lm_eval --include_path.",
    )
    parser.add_argument("data_dir", nargs="?", help=f"data folder (default: ${DATA_DIR_ENV})")
    parser.add_argument("--cache-dir", help=f"cache root (default: {default_cache_root()})")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or data_dir_from_env()
    if data_dir is None:
        parser.error(f"give DATA_DIR or set {DATA_DIR_ENV}")
    try:
        print(prepare_offline_tasks(data_dir, args.cache_dir))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
