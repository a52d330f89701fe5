"""The data of ``mamba-eval table``: rows read from saved lm-eval result files (and the papers'
published rows), and the table built from them: order, averages, best values, version checks,
notes. The rules are in :mod:`mamba_eval.commands.table`; the output formats in
:mod:`mamba_eval.commands.table_render`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mamba_eval.errors import MambaEvalError
from mamba_eval.utils import looks_like_path, read_json

__all__ = [
    "AVERAGE_KEY",
    "BY_KEY",
    "CHECKPOINT_FILE",
    "COLUMNS",
    "Cell",
    "Column",
    "Row",
    "Table",
    "build_table",
    "fixed",
    "load_rows",
    "make_table",
    "notes",
    "published_rows",
    "row_notes",
    "select_columns",
]

CHECKPOINT_FILE = "checkpoint.json"  # written by mamba-eval batch in each checkpoint folder
_RUNTIME_MODEL_ARGS = frozenset({"device", "batch_size", "max_batch_size"})  # not part of a row's identity


@dataclass(frozen=True)
class Column:
    key: str  # stable name used by --columns, the CSV header and mamba_eval.commands.published
    task: str  # lm-eval task
    metric: str  # lm-eval metric (filter "none")
    header: str
    higher_is_better: bool
    accuracy: bool  # shown in percent and counted in the average

    @property
    def digits(self) -> int:
        return 1 if self.accuracy else 2


COLUMNS: tuple[Column, ...] = (
    Column("lambada_ppl", "lambada_openai", "perplexity", "LAMBADA ppl", False, False),
    Column("lambada_acc", "lambada_openai", "acc", "LAMBADA acc", True, True),
    Column("hellaswag", "hellaswag", "acc_norm", "HellaSwag acc_norm", True, True),
    Column("piqa", "piqa", "acc", "PIQA acc", True, True),
    Column("arc_easy", "arc_easy", "acc", "ARC-E acc", True, True),
    Column("arc_challenge", "arc_challenge", "acc_norm", "ARC-C acc_norm", True, True),
    Column("winogrande", "winogrande", "acc", "WinoGrande acc", True, True),
    Column("openbookqa", "openbookqa", "acc_norm", "OpenBookQA acc_norm", True, True),
)
BY_KEY = {c.key: c for c in COLUMNS}  # column key -> column
AVERAGE_KEY = "average"


# ------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Cell:
    value: float  # display units: percent for accuracies
    stderr: float | None = None


@dataclass
class Row:
    label: str
    key: str  # identity: a checkpoint folder, a (model, model_args) pair, or "published:<name>"
    source: str  # "measured" or "published"
    n_parameters: int | None
    cells: dict[str, Cell] = field(default_factory=dict)  # column key -> cell
    versions: dict[str, str] = field(default_factory=dict)  # task -> version, measured rows only
    cell_sources: dict = field(default_factory=dict)  # published rows: column key -> published.Source
    references: tuple = ()  # the sources of the cells shown (set by build_table)
    family: str | None = None  # published rows: "mamba" / "mamba2"
    notes: list[str] = field(default_factory=list)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _read_object(path: Path) -> dict | None:
    """The JSON object in ``path``; None when unreadable or not an object."""
    data = read_json(path)
    return data if isinstance(data, dict) else None


def _is_results(data: dict | None) -> bool:
    return isinstance(data, dict) and isinstance(data.get("results"), dict)


def _collect_files(inputs) -> tuple[list[tuple[Path, str]], list[str]]:
    """(result file, name to show) under ``inputs`` in sorted order, and warnings for unreadable
    files. The name shown is relative to the input folder, so outputs do not depend on where the
    inputs live."""
    files: dict[Path, tuple[Path, str]] = {}
    warnings: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            if not _is_results(_read_object(path)):
                raise MambaEvalError(f"{path}: not an lm-eval results file (no 'results' object)")
            files.setdefault(path.resolve(), (path, path.name))
        elif path.is_dir():
            for candidate in sorted(path.rglob("*.json")):
                rel = candidate.relative_to(path).parts
                if any(part.startswith(".") for part in rel) or candidate.name == CHECKPOINT_FILE:
                    continue  # temporary files, submitit folders, checkpoint descriptions
                data = _read_object(candidate)
                if data is None:
                    warnings.append(f"{candidate}: unreadable JSON, skipped")
                elif _is_results(data):
                    files.setdefault(candidate.resolve(), (candidate, "/".join(rel)))
        else:
            raise MambaEvalError(f"{path}: no such file or folder")
    return [files[k] for k in sorted(files)], warnings


def _model_args(config: dict) -> dict:
    args = config.get("model_args")
    if isinstance(args, str):
        out = {}
        for item in filter(None, args.split(",")):
            k, _, v = item.partition("=")
            out[k.strip()] = v.strip()
        return out
    return dict(args) if isinstance(args, dict) else {}


def _label_for(pretrained) -> str:
    if not pretrained:
        return "model"
    text = str(pretrained).rstrip("/")
    if looks_like_path(text) or Path(text).exists():
        return Path(text).name or text
    return text  # a hub id


def _count_from_config(folder: Path) -> int | None:
    """Parameter count of a reachable checkpoint folder, from its config alone (no weights read)."""
    try:
        from mamba_eval.models.checkpoint import expected_shapes, read_config

        shapes = expected_shapes(read_config(folder))
    except Exception:  # noqa: BLE001 - any unreadable config just leaves the count unknown
        return None
    return sum(math.prod(shape) for shape in shapes.values())


@dataclass
class _Group:
    key: str
    label: str
    folder: Path | None  # batch checkpoint folder
    meta: dict  # checkpoint.json
    tasks: dict = field(default_factory=dict)  # task -> (date, path, results dict)
    duplicates: dict = field(default_factory=dict)  # task -> number of files
    reported_params: set = field(default_factory=set)
    pretrained: str | None = None


def load_rows(inputs) -> tuple[list[Row], list[str]]:
    """Measured rows from result files and folders (see the module docstring), with warnings."""
    files, warnings = _collect_files(inputs)
    groups: dict[str, _Group] = {}
    for path, shown in files:
        data = _read_object(path)
        config = data.get("config") if isinstance(data.get("config"), dict) else {}
        checkpoint_file = path.parent / CHECKPOINT_FILE
        if checkpoint_file.is_file():
            meta = _read_object(checkpoint_file) or {}
            key = "folder:" + str(path.parent.resolve())
            label = str(meta.get("name") or path.parent.name)
            folder, pretrained = path.parent, meta.get("pretrained")
        else:
            args = {k: v for k, v in _model_args(config).items() if k not in _RUNTIME_MODEL_ARGS}
            key = "model:" + json.dumps([config.get("model"), args], sort_keys=True, default=str)
            pretrained = args.get("pretrained") or config.get("model_name")
            label, folder, meta = _label_for(pretrained), None, {}
        group = groups.setdefault(key, _Group(key, label, folder, meta, pretrained=pretrained))
        n_reported = config.get("model_num_parameters")
        if isinstance(n_reported, int) and not isinstance(n_reported, bool) and n_reported > 0:
            group.reported_params.add(n_reported)
        date = _number(data.get("date")) or 0.0
        for task in data["results"]:
            if not isinstance(data["results"][task], dict):
                continue
            group.duplicates[task] = group.duplicates.get(task, 0) + 1
            current = group.tasks.get(task)
            if current is None or (date, shown) > (current[0], current[1]):
                group.tasks[task] = (date, shown, data)

    rows = []
    for key in sorted(groups):
        group = groups[key]
        row = Row(group.label, key, "measured", None)
        for column in COLUMNS:
            entry = group.tasks.get(column.task)
            if entry is None:
                continue
            metrics = entry[2]["results"][column.task]
            value = _number(metrics.get(f"{column.metric},none"))
            if value is None:
                continue
            stderr = _number(metrics.get(f"{column.metric}_stderr,none"))
            scale = 100.0 if column.accuracy else 1.0
            row.cells[column.key] = Cell(value * scale, None if stderr is None else stderr * scale)
        used_tasks = sorted({c.task for c in COLUMNS if c.key in row.cells})
        subset, fewshot = [], []
        for task in used_tasks:
            _, path, data = group.tasks[task]
            version = (data.get("versions") or {}).get(task)
            if version is not None:
                row.versions[task] = str(version)
            samples = (data.get("n-samples") or {}).get(task) or {}
            original, effective = samples.get("original"), samples.get("effective")
            if isinstance(original, int) and isinstance(effective, int) and effective < original:
                subset.append(f"{task} {effective} of {original}")
            shots = (data.get("n-shot") or {}).get(task)
            if isinstance(shots, int) and shots > 0:
                fewshot.append(f"{task} {shots}-shot")
            if group.duplicates.get(task, 0) > 1:
                row.notes.append(f"{task} found in {group.duplicates[task]} result files; the newest is used ({path})")
        if subset:
            row.notes.append("evaluated on a subset (--limit): " + ", ".join(subset) + " documents")
        if fewshot:
            row.notes.append("not zero-shot: " + ", ".join(fewshot))
        row.n_parameters = _parameters(group, row)
        rows.append(row)
    return rows, warnings


def _parameters(group: _Group, row: Row) -> int | None:
    given = group.meta.get("n_parameters")
    if isinstance(given, int) and not isinstance(given, bool) and given > 0:
        return given
    if len(group.reported_params) == 1:
        return next(iter(group.reported_params))
    if len(group.reported_params) > 1:
        row.notes.append(f"result files report different parameter counts {sorted(group.reported_params)}; "
                         "the largest is used")
        return max(group.reported_params)
    if group.pretrained and Path(str(group.pretrained)).expanduser().is_dir():
        count = _count_from_config(Path(str(group.pretrained)).expanduser())
        if count is not None:
            return count
    row.notes.append("parameter count unknown (placed last, not in the chart)")
    return None


def published_rows(families) -> list[Row]:
    """Reference rows for the published releases of ``families`` ("mamba", "mamba2")."""
    from mamba_eval.commands.published import rows as published

    out = []
    for pub in published(tuple(families)):
        cells = {key: Cell(v.value) for key, v in pub.values.items() if key in BY_KEY}
        sources = {key: v.source for key, v in pub.values.items() if key in BY_KEY}
        out.append(Row(pub.name, "published:" + pub.name, "published", pub.n_parameters, cells,
                       cell_sources=sources, family=pub.family))
    return out


# ------------------------------------------------------------------------------------ table


@dataclass
class Table:
    columns: tuple[Column, ...]
    rows: list[Row]  # in display order
    averages: list[tuple[float, int] | None]  # per row: (mean, number of accuracy cells averaged)
    best: dict[str, set[int]]  # column key (or "average") -> indices of rows holding the best value
    version_mismatch: dict[str, dict[str, list[str]]]  # task -> version -> labels
    references: list  # mamba_eval.commands.published.Source in numbering order
    stderr: bool
    partial_average: bool
    warnings: list[str] = field(default_factory=list)  # unreadable input files

    @property
    def n_accuracy(self) -> int:
        return sum(c.accuracy for c in self.columns)

    def lacking(self, row: Row) -> list[str]:
        """The tasks of the accuracy columns shown that ``row`` has no value for: why its average
        is empty (or, with ``partial_average``, over fewer columns)."""
        return list(dict.fromkeys(c.task for c in self.columns if c.accuracy and c.key not in row.cells))

    def reference_numbers(self, row: Row) -> list[int]:
        keys = [s.key for s in self.references]
        return sorted(keys.index(s.key) + 1 for s in row.references)


def fixed(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, as every output shows it (best values compare these)."""
    return f"{value:.{digits}f}"


def _unique_labels(rows: list[Row]) -> None:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.label] = counts.get(row.label, 0) + 1
    for row in rows:
        if counts[row.label] > 1 and row.source == "measured":
            row.label = f"{row.label} ({hashlib.sha256(row.key.encode()).hexdigest()[:6]})"


def build_table(rows: list[Row], columns=COLUMNS, *, stderr: bool = False, partial_average: bool = False) -> Table:
    """Order ``rows``, compute averages, best values and version checks for ``columns``."""
    columns = tuple(columns)
    if not columns:
        raise MambaEvalError("no columns selected")
    rows = list(rows)
    _unique_labels(rows)
    rows.sort(key=lambda r: (r.n_parameters is None, r.n_parameters or 0, r.label, r.source, r.key))
    accuracy = [c for c in columns if c.accuracy]

    averages: list[tuple[float, int] | None] = []
    for row in rows:
        present = [row.cells[c.key].value for c in accuracy if c.key in row.cells]
        if accuracy and present and (len(present) == len(accuracy) or partial_average):
            averages.append((math.fsum(present) / len(present), len(present)))
        else:
            averages.append(None)

    best: dict[str, set[int]] = {}
    for column in columns:
        shown = {i: float(fixed(r.cells[column.key].value, column.digits))
                 for i, r in enumerate(rows) if column.key in r.cells}
        if len(shown) >= 2:
            target = (max if column.higher_is_better else min)(shown.values())
            best[column.key] = {i for i, v in shown.items() if v == target}
    full = {i: float(fixed(a[0], 1)) for i, a in enumerate(averages) if a is not None and a[1] == len(accuracy)}
    if len(full) >= 2:
        target = max(full.values())
        best[AVERAGE_KEY] = {i for i, v in full.items() if v == target}

    mismatch: dict[str, dict[str, list[str]]] = {}
    for task in sorted({c.task for c in columns}):
        versions: dict[str, list[str]] = {}
        for row in rows:
            if row.source == "measured" and task in row.versions:
                versions.setdefault(row.versions[task], []).append(row.label)
        if len(versions) > 1:
            mismatch[task] = dict(sorted(versions.items()))

    from mamba_eval.commands.published import SOURCES

    order = {s.key: i for i, s in enumerate(SOURCES)}
    references: dict = {}
    for row in rows:
        used = {row.cell_sources[c.key].key: row.cell_sources[c.key] for c in columns if c.key in row.cell_sources}
        row.references = tuple(sorted(used.values(), key=lambda s: (order.get(s.key, len(order)), s.key)))
        references.update((s.key, s) for s in row.references)
    references = sorted(references.values(), key=lambda s: (order.get(s.key, len(order)), s.key))
    return Table(columns, rows, averages, best, mismatch, references, stderr, partial_average)


def make_table(inputs=(), *, published=(), columns=None, stderr: bool = False,
               partial_average: bool = False) -> Table:
    """Read result files/folders ``inputs``, add published rows of ``published`` families, build.

    ``columns``: column keys (default: all of ``COLUMNS``). Raises ``MambaEvalError`` for bad input.
    """
    selected = COLUMNS if columns is None else select_columns(columns)
    rows, warnings = load_rows(inputs) if inputs else ([], [])
    rows += published_rows(published)
    if not rows:
        raise MambaEvalError("no results found" + (f" in {', '.join(map(str, inputs))}" if inputs else ""))
    table = build_table(rows, selected, stderr=stderr, partial_average=partial_average)
    table.warnings = warnings
    return table


def select_columns(keys) -> tuple[Column, ...]:
    """The columns named by ``keys`` ("piqa,hellaswag" or a sequence), in that order."""
    if isinstance(keys, str):
        keys = [k.strip() for k in keys.split(",") if k.strip()]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        raise MambaEvalError(f"unknown column {', '.join(map(repr, unknown))} (known: {', '.join(BY_KEY)})")
    if len(set(keys)) != len(keys):
        raise MambaEvalError("a column is listed twice in --columns")
    return tuple(BY_KEY[k] for k in keys)


def row_notes(table: Table, i: int) -> list[str]:
    """The notes of row ``i``: those of its result files, then why its average is empty or partial."""
    row = table.rows[i]
    out = list(row.notes)
    lacking = table.lacking(row)
    if lacking:
        average = table.averages[i]
        consequence = "no Avg" if average is None else f"Avg over {average[1]} of {table.n_accuracy} accuracies"
        out.append(f"no result for {', '.join(lacking)}, so {consequence}")
    return out


def notes(table: Table) -> list[str]:
    """Warnings and row notes, in display order (one line each)."""
    out = []
    for task, versions in table.version_mismatch.items():
        listed = "; ".join(f"{v} ({', '.join(labels)})" for v, labels in versions.items())
        out.append(f"‡ {task}: task versions differ across rows: {listed}")
    for i, row in enumerate(table.rows):
        out.extend(f"{row.label}: {note}" for note in row_notes(table, i))
    return out
