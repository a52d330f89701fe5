"""``mamba-eval table``: zero-shot leaderboard tables from saved lm-eval result JSON.

Tables are built only from result files already on disk (a ``mamba-eval batch`` folder, lm-eval
``--output_path`` folders, or single ``results_*.json`` files); no model is ever run. The columns
are the papers' (Mamba, Table 3; Mamba-2, Table 10)::

    LAMBADA ppl | LAMBADA acc | HellaSwag acc_norm | PIQA acc | ARC-E acc | ARC-C acc_norm |
    WinoGrande acc | OpenBookQA acc_norm | Avg

read from lm-eval's ``results[task]["<metric>,none"]`` (``lambada_openai``, ``hellaswag``, ``piqa``,
``arc_easy``, ``arc_challenge``, ``winogrande``, ``openbookqa``). Accuracies are shown in percent
with one decimal, the perplexity with two; ``--stderr`` adds lm-eval's standard errors.

Rules (the same in every format):

- **Rows.** One row per evaluated model: a checkpoint folder of a batch (``<slug>/`` with its
  ``checkpoint.json``), else one per distinct ``(model, model_args)`` of the results' ``config``
  (``device``, ``batch_size`` and ``max_batch_size`` ignored). If several files hold the same task
  for one row, the newest (lm-eval's ``date``) wins and a note says so.
- **Parameters.** ``n_parameters`` of the batch's ``checkpoint.json`` (a manifest can set it),
  else ``config.model_num_parameters`` of the results (what lm-eval's model reported), else
  counted from the checkpoint's ``config.json`` when that folder is reachable. Rows are ordered
  by parameter count, rows without one last, ties by label.
- **Average.** Mean of the accuracy columns shown (not the perplexity), computed from the
  unrounded values. A row that lacks one of them gets an empty average; with
  ``partial_average=True`` it gets the mean of the cells it has, written ``41.2 (6/7)``, which is
  never marked best.
- **Best.** In each column with values in at least two rows, the best displayed value (lowest
  perplexity, highest accuracy; ties all) is bold in Markdown and LaTeX and listed in the CSV
  column ``best`` (column keys separated by ``;``). Published rows take part.
- **Missing** tasks are empty cells. **Task versions** that differ across rows put ``‡`` on the
  task's column headers and a note naming the versions and rows. Subsets (``--limit``) and
  few-shot results are noted too; notes follow the Markdown table, are ``%`` comments after the
  LaTeX tabular, fill the CSV column ``notes``, and are printed on stderr by the command.
- **Published rows** (``published=("mamba", "mamba2")``, from ``mamba_eval.commands.published``) carry
  ``published [n]`` in the Source column (Markdown, LaTeX; ``source``/``reference`` in the CSV)
  with the paper and table of every number; their average is computed like any other row's.
- **Deterministic.** The same inputs give byte-identical output: inputs are read in sorted
  order, floats are formatted with fixed digits, nothing depends on time or the environment.
  The PNG chart (score vs parameters, log scale) is written without a timestamp or software tag.

Library use::

    from mamba_eval.commands.table import make_table, to_markdown, to_csv, to_latex, render_chart
    table = make_table(["runs/batch1"], published=("mamba", "mamba2"), stderr=True)
    print(to_markdown(table))
    render_chart(table, "chart.png")
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mamba_eval.utils import atomic_write

__all__ = [
    "Column",
    "COLUMNS",
    "Cell",
    "Row",
    "Table",
    "load_rows",
    "published_rows",
    "build_table",
    "make_table",
    "to_markdown",
    "to_csv",
    "to_latex",
    "render_chart",
    "write_output",
    "add_subcommand",
]

PROG = "mamba-eval table"
CHECKPOINT_FILE = "checkpoint.json"  # written by mamba-eval batch in each checkpoint folder
_RUNTIME_MODEL_ARGS = frozenset({"device", "batch_size", "max_batch_size"})


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
_BY_KEY = {c.key: c for c in COLUMNS}
AVERAGE_KEY = "average"


def _error(message: str):
    from mamba_eval.errors import MambaEvalError

    return MambaEvalError(message)


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


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
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
            if not _is_results(_read_json(path)):
                raise _error(f"{path}: not an lm-eval results file (no 'results' object)")
            files.setdefault(path.resolve(), (path, path.name))
        elif path.is_dir():
            for candidate in sorted(path.rglob("*.json")):
                rel = candidate.relative_to(path).parts
                if any(part.startswith(".") for part in rel) or candidate.name == CHECKPOINT_FILE:
                    continue  # temporary files, submitit folders, checkpoint descriptions
                data = _read_json(candidate)
                if data is None:
                    warnings.append(f"{candidate}: unreadable JSON, skipped")
                elif _is_results(data):
                    files.setdefault(candidate.resolve(), (candidate, "/".join(rel)))
        else:
            raise _error(f"{path}: no such file or folder")
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
    if Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or Path(text).exists():
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
        data = _read_json(path)
        config = data.get("config") if isinstance(data.get("config"), dict) else {}
        checkpoint_file = path.parent / CHECKPOINT_FILE
        if checkpoint_file.is_file():
            meta = _read_json(checkpoint_file) or {}
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
        cells = {key: Cell(v.value) for key, v in pub.values.items() if key in _BY_KEY}
        sources = {key: v.source for key, v in pub.values.items() if key in _BY_KEY}
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

    def reference_numbers(self, row: Row) -> list[int]:
        keys = [s.key for s in self.references]
        return sorted(keys.index(s.key) + 1 for s in row.references)


def _format(value: float, digits: int) -> str:
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
        raise _error("no columns selected")
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
        shown = {i: float(_format(r.cells[column.key].value, column.digits))
                 for i, r in enumerate(rows) if column.key in r.cells}
        if len(shown) >= 2:
            target = (max if column.higher_is_better else min)(shown.values())
            best[column.key] = {i for i, v in shown.items() if v == target}
    full = {i: float(_format(a[0], 1)) for i, a in enumerate(averages) if a is not None and a[1] == len(accuracy)}
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
    selected = COLUMNS if columns is None else _select_columns(columns)
    rows, warnings = load_rows(inputs) if inputs else ([], [])
    rows += published_rows(published)
    if not rows:
        raise _error("no results found" + (f" in {', '.join(map(str, inputs))}" if inputs else ""))
    table = build_table(rows, selected, stderr=stderr, partial_average=partial_average)
    table.warnings = warnings
    return table


def _select_columns(keys) -> tuple[Column, ...]:
    if isinstance(keys, str):
        keys = [k.strip() for k in keys.split(",") if k.strip()]
    unknown = [k for k in keys if k not in _BY_KEY]
    if unknown:
        raise _error(f"unknown column {', '.join(map(repr, unknown))} (known: {', '.join(_BY_KEY)})")
    if len(set(keys)) != len(keys):
        raise _error("a column is listed twice in --columns")
    return tuple(_BY_KEY[k] for k in keys)


def notes(table: Table) -> list[str]:
    """Warnings and row notes, in display order (one line each)."""
    out = []
    for task, versions in table.version_mismatch.items():
        listed = "; ".join(f"{v} ({', '.join(labels)})" for v, labels in versions.items())
        out.append(f"‡ {task}: task versions differ across rows: {listed}")
    for row in table.rows:
        out.extend(f"{row.label}: {note}" for note in row.notes)
    return out


def _params(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _has_published(table: Table) -> bool:
    return any(r.source == "published" for r in table.rows)


def _source_text(table: Table, row: Row) -> str:
    if row.source != "published":
        return "measured"
    return "published " + ", ".join(f"[{n}]" for n in table.reference_numbers(row))


def _average_text(table: Table, i: int) -> str:
    average = table.averages[i]
    if average is None:
        return ""
    text = _format(average[0], 1)
    if average[1] != table.n_accuracy:
        text += f" ({average[1]}/{table.n_accuracy})"
    return text


def _legend(table: Table, down: str = "↓", up: str = "↑") -> str:
    n = table.n_accuracy
    if not n:
        avg = "Avg: no accuracy column shown"
    elif table.partial_average:
        avg = (f"Avg: mean of the {n} accuracy columns; a row lacking some shows the mean of those it has, "
               f"marked (k/{n}) and never bold")
    else:
        avg = f"Avg: mean of the {n} accuracy columns, empty when a row lacks one of them"
    return (f"Accuracies in %; {down} lower is better, {up} higher is better. {avg}. "
            "Bold: best value in its column.")


# ---------------------------------------------------------------------------------- formats


def _cells(table: Table, bold, pm) -> list[list[str]]:
    """Per row: the metric cells and the average, formatted with ``bold(text)`` and ``pm``."""
    out = []
    for i, row in enumerate(table.rows):
        cells = []
        for column in table.columns:
            cell = row.cells.get(column.key)
            if cell is None:
                cells.append("")
                continue
            text = _format(cell.value, column.digits)
            if i in table.best.get(column.key, ()):
                text = bold(text)
            if table.stderr and cell.stderr is not None:
                text += pm + _format(cell.stderr, column.digits)
            cells.append(text)
        average = _average_text(table, i)
        if average and i in table.best.get(AVERAGE_KEY, ()):
            average = bold(average)
        cells.append(average)
        out.append(cells)
    return out


def _headers(table: Table, arrow_up: str, arrow_down: str, dagger: str, escape=lambda s: s) -> list[str]:
    headers = []
    for column in table.columns:
        text = f"{escape(column.header)} {arrow_up if column.higher_is_better else arrow_down}"
        if column.task in table.version_mismatch:
            text += dagger
        headers.append(text)
    headers.append(f"Avg {arrow_up}")
    return headers


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table, then the legend, references and notes."""
    published = _has_published(table)
    head = ["Model", "Params"] + (["Source"] if published else []) + _headers(table, "↑", "↓", " ‡")
    align = [":---", "---:"] + ([":---"] if published else []) + ["---:"] * (len(table.columns) + 1)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for row, cells in zip(table.rows, _cells(table, lambda t: f"**{t}**", " ± ")):
        first = [row.label.replace("|", "\\|"), _params(row.n_parameters)]
        if published:
            first.append(_source_text(table, row))
        lines.append("| " + " | ".join(first + cells) + " |")
    lines += ["", _legend(table)]
    extra = [f"- [{i}] {source}" for i, source in enumerate(table.references, 1)]
    extra += [f"- {note}" for note in notes(table)]
    if extra:
        lines += [""] + extra
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def _tex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    """A booktabs ``tabular`` (no float environment), references and notes as ``%`` comments."""
    published = _has_published(table)
    head = ["Model", "Params"] + (["Source"] if published else []) + _headers(
        table, r"$\uparrow$", r"$\downarrow$", r" $^\ddagger$", _tex)
    spec = "lr" + ("l" if published else "") + "r" * (len(table.columns) + 1)
    lines = [
        "% Zero-shot results from saved lm-eval result files (mamba-eval table). Needs \\usepackage{booktabs}.",
        "% " + _legend(table, "$\\downarrow$", "$\\uparrow$"),
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(head) + " \\\\",
        "\\midrule",
    ]
    for row, cells in zip(table.rows, _cells(table, lambda t: f"\\textbf{{{t}}}", "$\\pm$")):
        first = [_tex(row.label), _params(row.n_parameters)]
        if published:
            first.append(_source_text(table, row))
        lines.append(" & ".join(first + cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    lines += [f"% [{i}] {source}" for i, source in enumerate(table.references, 1)]
    lines += [f"% {note}" for note in notes(table)]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """One header line, one line per row; values formatted as in the other outputs (no bold)."""
    header = ["model", "source", "reference", "n_parameters"]
    for column in table.columns:
        header.append(column.key)
        if table.stderr:
            header.append(f"{column.key}_stderr")
    header += ["average", "average_cells", "best", "notes"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    row_notes: dict[int, list[str]] = {i: list(r.notes) for i, r in enumerate(table.rows)}
    for task, versions in table.version_mismatch.items():
        for i, row in enumerate(table.rows):
            if task in row.versions and row.source == "measured":
                others = sorted(v for v in versions if v != row.versions[task])
                row_notes[i].append(f"{task} version {row.versions[task]} differs from other rows ({', '.join(others)})")
    for i, row in enumerate(table.rows):
        line = [row.label, row.source, "; ".join(str(s) for s in row.references),
                "" if row.n_parameters is None else str(row.n_parameters)]
        for column in table.columns:
            cell = row.cells.get(column.key)
            line.append("" if cell is None else _format(cell.value, column.digits))
            if table.stderr:
                line.append("" if cell is None or cell.stderr is None else _format(cell.stderr, column.digits))
        average = table.averages[i]
        line.append("" if average is None else _format(average[0], 1))
        present = sum(1 for c in table.columns if c.accuracy and c.key in row.cells)
        line.append(f"{present}/{table.n_accuracy}")
        keys = [c.key for c in table.columns if i in table.best.get(c.key, ())]
        if i in table.best.get(AVERAGE_KEY, ()):
            keys.append(AVERAGE_KEY)
        line += [";".join(keys), " | ".join(row_notes[i])]
        writer.writerow(line)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ chart


def _chart_value(table: Table, i: int, metric: str) -> float | None:
    if metric == AVERAGE_KEY:
        average = table.averages[i]
        return None if average is None else average[0]
    cell = table.rows[i].cells.get(metric)
    return None if cell is None else cell.value


def render_chart(table: Table, path, metric: str = AVERAGE_KEY) -> Path:
    """Write a PNG of ``metric`` (a column key or "average") against the parameter count.

    Published families are lines with hollow markers; measured rows are labelled points. Rows
    without a parameter count or a value are left out. The file carries no timestamp or software
    tag, so the same table gives the same bytes.
    """
    if metric != AVERAGE_KEY and metric not in [c.key for c in table.columns]:
        raise _error(f"chart metric {metric!r} is not a column of the table "
                     f"(choose from: {', '.join([c.key for c in table.columns] + [AVERAGE_KEY])})")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from mamba_eval.commands.published import FAMILIES

    points = [(i, row, _chart_value(table, i, metric)) for i, row in enumerate(table.rows)]
    points = [(i, row, y) for i, row, y in points if y is not None and row.n_parameters]
    if not points:
        raise _error(f"chart: no row has both a parameter count and a value for {metric!r}")
    column = next((c for c in table.columns if c.key == metric), None)
    ylabel = "Average accuracy (%)" if column is None else (
        f"{column.header} (%)" if column.accuracy else column.header)

    with plt.rc_context({"font.family": "DejaVu Sans", "font.size": 9, "svg.hashsalt": "mamba-eval"}):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        for family, name in FAMILIES.items():
            fam = [(row.n_parameters, y) for _, row, y in points if row.source == "published" and row.family == family]
            if fam:
                xs, ys = zip(*fam)
                ax.plot(xs, ys, marker="o", markerfacecolor="white", linestyle="--", linewidth=1,
                        label=f"{name} (published)")
        measured = [(row, y) for _, row, y in points if row.source == "measured"]
        if measured:
            ax.plot([r.n_parameters for r, _ in measured], [y for _, y in measured], marker="o",
                    linestyle="none", color="black", label="measured")
            for row, y in measured:
                ax.annotate(row.label, (row.n_parameters, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e9:g}B" if x >= 1e9 else f"{x / 1e6:g}M"))
        ax.set_xlabel("Parameters")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", linewidth=0.5, alpha=0.5)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", metadata={"Software": None})
        plt.close(fig)
    path = Path(path)
    _atomic_write_bytes(path, buffer.getvalue())
    return path


# ---------------------------------------------------------------------------------- outputs


_FORMATS = {"markdown": to_markdown, "csv": to_csv, "latex": to_latex}
_SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".tex": "latex"}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def write_output(table: Table, path, fmt: str | None = None) -> Path:
    """Write ``table`` to ``path`` in ``fmt`` (default: from the suffix: .md, .csv, .tex)."""
    path = Path(path)
    fmt = fmt or _SUFFIXES.get(path.suffix.lower())
    if fmt not in _FORMATS:
        raise _error(f"{path}: cannot tell the format from the suffix (use .md, .csv or .tex)")
    _atomic_write_bytes(path, _FORMATS[fmt](table).encode("utf-8"))
    return path


# -------------------------------------------------------------------------------------- CLI


_DESCRIPTION = """\
Build zero-shot leaderboard tables from saved lm-eval result JSON (never runs a model).

INPUT is a 'mamba-eval batch' results folder, an lm-eval --output_path folder, or a results
JSON file; several may be given. Columns: LAMBADA ppl, LAMBADA acc, HellaSwag acc_norm,
PIQA acc, ARC-E acc, ARC-C acc_norm, WinoGrande acc, OpenBookQA acc_norm, and the average of
the accuracy columns (empty for a row that lacks one). Rows are ordered by parameter count;
the best value of each column is bold (Markdown, LaTeX) or listed in the 'best' column (CSV).
The same inputs give byte-identical output.

examples:
  mamba-eval table runs/batch1                          # Markdown on stdout
  mamba-eval table runs/batch1 --published all -o t.md -o t.csv -o t.tex --chart t.png
  mamba-eval table results_*.json --stderr --columns lambada_ppl,lambada_acc,hellaswag,piqa
"""


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser(
        "table",
        help="leaderboard tables (Markdown, CSV, LaTeX, PNG chart) from saved lm-eval results",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="results folder or JSON file")
    parser.add_argument("-o", "--output", action="append", default=[], metavar="FILE",
                        help="write to FILE, format from its suffix (.md, .csv, .tex); repeatable "
                        "(default: --format on stdout)")
    parser.add_argument("--format", choices=sorted(_FORMATS), default="markdown",
                        help="format written to stdout when no -o is given (default: markdown)")
    parser.add_argument("--published", default="none", metavar="FAMILIES",
                        help="add the papers' published rows: 'mamba', 'mamba2', 'all' or 'none' "
                        "(comma-separated; default: none)")
    parser.add_argument("--columns", default=None, metavar="KEYS",
                        help=f"comma-separated column keys (default: all: {','.join(_BY_KEY)})")
    parser.add_argument("--stderr", action="store_true", help="show lm-eval's standard errors")
    parser.add_argument("--partial-average", action="store_true",
                        help="average the accuracy cells a row has when it lacks some, marked '(k/n)'")
    parser.add_argument("--chart", metavar="FILE.png", default=None,
                        help="also write a PNG chart of a metric against parameter count")
    parser.add_argument("--chart-metric", default=AVERAGE_KEY, metavar="KEY",
                        help="column key plotted by --chart (default: average)")
    parser.set_defaults(handler=_main)


def _families(text: str) -> tuple[str, ...]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items in (["none"], []):
        return ()
    if items == ["all"]:
        return ("mamba", "mamba2")
    from mamba_eval.commands.published import FAMILIES

    unknown = [t for t in items if t not in FAMILIES]
    if unknown:
        raise _error(f"--published: unknown family {', '.join(map(repr, unknown))} (use mamba, mamba2, all or none)")
    return tuple(items)


def _main(args: argparse.Namespace, extra: list[str]) -> int:
    families = _families(args.published)
    if not args.inputs and not families:
        raise _error("give at least one results folder or file (or --published to show only published rows)")
    for out in args.output:
        if Path(out).suffix.lower() not in _SUFFIXES:
            raise _error(f"-o {out}: cannot tell the format from the suffix (use .md, .csv or .tex)")
    table = make_table(args.inputs, published=families, columns=args.columns, stderr=args.stderr,
                       partial_average=args.partial_average)
    for warning in table.warnings + notes(table):
        print(f"{PROG}: note: {warning}", file=sys.stderr)
    if args.chart:
        render_chart(table, args.chart, args.chart_metric)
    for out in args.output:
        write_output(table, out)
    if not args.output:
        sys.stdout.write(_FORMATS[args.format](table))
    return 0
