"""The outputs of ``mamba-eval table``: Markdown, LaTeX and CSV text (written through pytablewriter,
:mod:`mamba_eval.commands.table_writers`) and the PNG chart, from a built
:class:`~mamba_eval.commands.table_data.Table`. What each shows: :mod:`mamba_eval.commands.table`.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

from mamba_eval.commands.table_data import AVERAGE_KEY, BY_KEY, Row, Table, fixed, notes, row_notes
from mamba_eval.errors import MambaEvalError
from mamba_eval.utils import atomic_write

__all__ = ["FORMATS", "SUFFIXES", "chart_points", "render_chart", "to_csv", "to_latex", "to_markdown", "write_output"]


# ---------------------------------------------------------------------------------- cells


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


def _average_text(table: Table, i: int) -> str | None:
    average = table.averages[i]
    if average is None:
        return None
    text = fixed(average[0], 1)
    if average[1] != table.n_accuracy:
        text += f" ({average[1]}/{table.n_accuracy})"
    return text


def _legend(table: Table, down: str = "↓", up: str = "↑", dash: str = "–") -> str:
    n = table.n_accuracy
    if not n:
        avg = "Avg: no accuracy column shown"
    elif table.partial_average:
        avg = (f"Avg: mean of the {n} accuracy columns; a row lacking some shows the mean of those it has, "
               f"marked (k/{n}) and never bold")
    else:
        avg = f"Avg: mean of the {n} accuracy columns, {dash} when a row lacks one of them (see the notes)"
    return (f"Accuracies in %; {down} lower is better, {up} higher is better; {dash} no result. {avg}. "
            "Bold: best value in its column.")


def _body(table: Table, escape, bold, pm, dash) -> list[list[str]]:
    """Per row: label, parameters, source (when a published row is shown), the metric cells and
    the average; text through ``escape``, best values through ``bold``, ``pm`` before a stderr,
    ``dash`` for a missing value (a paper's "no result": an empty cell reads as a rendering slip)."""
    published = _has_published(table)
    out = []
    for i, row in enumerate(table.rows):
        cells = [escape(row.label), _params(row.n_parameters)] + ([_source_text(table, row)] if published else [])
        for column in table.columns:
            cell = row.cells.get(column.key)
            if cell is None:
                cells.append(dash)
                continue
            text = fixed(cell.value, column.digits)
            if i in table.best.get(column.key, ()):
                text = bold(text)
            if table.stderr and cell.stderr is not None:
                text += pm + fixed(cell.stderr, column.digits)
            cells.append(text)
        average = _average_text(table, i)
        if average is None:
            average = dash
        elif i in table.best.get(AVERAGE_KEY, ()):
            average = bold(average)
        cells.append(average)
        out.append(cells)
    return out


def _headers(table: Table, arrow_up: str, arrow_down: str, dagger: str, escape) -> list[str]:
    headers = ["Model", "Params"] + (["Source"] if _has_published(table) else [])
    for column in table.columns:
        text = f"{escape(column.header)} {arrow_up if column.higher_is_better else arrow_down}"
        if column.task in table.version_mismatch:
            text += dagger
        headers.append(text)
    headers.append(f"Avg {arrow_up}")
    return headers


def _align(table: Table) -> list[str]:
    return ["left", "right"] + (["left"] if _has_published(table) else []) + ["right"] * (len(table.columns) + 1)


# ---------------------------------------------------------------------------------- formats


def to_markdown(table: Table) -> str:
    """A Markdown table, then the legend, references and notes."""
    from mamba_eval.commands.table_writers import markdown_table

    plain = str  # the writer escapes "|", the only character that would break a Markdown table
    head = _headers(table, "↑", "↓", " ‡", plain)
    rows = _body(table, plain, lambda t: f"**{t}**", " ± ", "–")
    lines = [markdown_table(head, rows, _align(table)).rstrip("\n"), "", _legend(table)]
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
    from mamba_eval.commands.table_writers import latex_tabular

    head = _headers(table, r"$\uparrow$", r"$\downarrow$", r" $^\ddagger$", _tex)
    rows = _body(table, _tex, lambda t: f"\\textbf{{{t}}}", "$\\pm$", "--")
    lines = [
        "% Zero-shot results from saved lm-eval result files (mamba-eval table). Needs \\usepackage{booktabs}.",
        "% " + _legend(table, "$\\downarrow$", "$\\uparrow$", "--"),
        latex_tabular(head, rows, _align(table)).rstrip("\n"),
    ]
    lines += [f"% [{i}] {source}" for i, source in enumerate(table.references, 1)]
    lines += [f"% {note}" for note in notes(table)]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """One header line, one line per row; values formatted as in the other outputs (no bold), a
    missing value an empty cell (what CSV readers take as missing)."""
    from mamba_eval.commands.table_writers import csv_table

    header = ["model", "source", "reference", "n_parameters"]
    for column in table.columns:
        header.append(column.key)
        if table.stderr:
            header.append(f"{column.key}_stderr")
    header += ["average", "average_cells", "best", "notes"]
    cell_notes: dict[int, list[str]] = {i: row_notes(table, i) for i in range(len(table.rows))}
    for task, versions in table.version_mismatch.items():
        for i, row in enumerate(table.rows):
            if task in row.versions and row.source == "measured":
                others = sorted(v for v in versions if v != row.versions[task])
                cell_notes[i].append(
                    f"{task} version {row.versions[task]} differs from other rows ({', '.join(others)})")
    lines = []
    for i, row in enumerate(table.rows):
        line = [row.label, row.source, "; ".join(str(s) for s in row.references),
                "" if row.n_parameters is None else str(row.n_parameters)]
        for column in table.columns:
            cell = row.cells.get(column.key)
            line.append("" if cell is None else fixed(cell.value, column.digits))
            if table.stderr:
                line.append("" if cell is None or cell.stderr is None else fixed(cell.stderr, column.digits))
        average = table.averages[i]
        line.append("" if average is None else fixed(average[0], 1))
        present = sum(1 for c in table.columns if c.accuracy and c.key in row.cells)
        line.append(f"{present}/{table.n_accuracy}")
        keys = [c.key for c in table.columns if i in table.best.get(c.key, ())]
        if i in table.best.get(AVERAGE_KEY, ()):
            keys.append(AVERAGE_KEY)
        line += [";".join(keys), " | ".join(cell_notes[i])]
        lines.append(line)
    return csv_table(header, lines)


# ------------------------------------------------------------------------------------ chart


def _chart_value(table: Table, i: int, metric: str) -> float | None:
    if metric == AVERAGE_KEY:
        average = table.averages[i]
        return None if average is None else average[0]
    cell = table.rows[i].cells.get(metric)
    return None if cell is None else cell.value


def chart_points(table: Table, metric: str = AVERAGE_KEY) -> tuple[list[tuple[int, float]], list[str]]:
    """What the chart of ``metric`` shows: ``(row index, value)`` for every row with a parameter
    count and a value, and ``"<label> (<why>)"`` for each row left out.

    A row without the table's average (it lacks an accuracy column) is left out rather than
    plotted over fewer tasks than its neighbours; with ``partial_average`` its partial mean is
    plotted, labelled ``(k/n)``. Raises ``MambaEvalError`` when ``metric`` is not a column (or is
    the average of a table without accuracy columns).
    """
    keys = [c.key for c in table.columns]
    if metric != AVERAGE_KEY and metric not in keys:
        raise MambaEvalError(f"chart metric {metric!r} is not a column of the table "
                             f"(choose from: {', '.join(keys + [AVERAGE_KEY])})")
    if metric == AVERAGE_KEY and not table.n_accuracy:
        raise MambaEvalError(f"chart metric {metric!r}: the table has no accuracy column to average "
                             f"(choose from: {', '.join(keys)})")
    points, left_out = [], []
    for i, row in enumerate(table.rows):
        value = _chart_value(table, i, metric)
        if not row.n_parameters:
            left_out.append(f"{row.label} (parameter count unknown)")
        elif value is None:
            lacking = table.lacking(row) if metric == AVERAGE_KEY else [BY_KEY[metric].task]
            left_out.append(f"{row.label} (no result for {', '.join(lacking)})")
        else:
            points.append((i, value))
    return points, left_out


def _chart_label(table: Table, i: int, metric: str) -> str:
    """A measured point's label; a partial average says over how many columns (as the table does)."""
    label = table.rows[i].label
    average = table.averages[i]
    if metric == AVERAGE_KEY and average is not None and average[1] != table.n_accuracy:
        label += f" ({average[1]}/{table.n_accuracy})"
    return label


def _params_tick(x: float, _=None) -> str:
    return f"{x / 1e9:g}B" if x >= 1e9 else f"{x / 1e6:g}M"


def _mantissa(x: float) -> float:
    return round(x / 10 ** math.floor(math.log10(x)), 6)


def render_chart(table: Table, path, metric: str = AVERAGE_KEY) -> Path:
    """Write a PNG of ``metric`` (a column key or "average") against the parameter count.

    Published families are lines with hollow markers; measured rows are labelled points. Rows
    :func:`chart_points` leaves out are named in a footnote of the figure. The file carries no
    timestamp or software tag, so the same table gives the same bytes. Raises
    ``MambaEvalError`` (and writes nothing) when no row can be plotted.
    """
    points, left_out = chart_points(table, metric)
    if not points:
        raise MambaEvalError(f"chart: no row has both a parameter count and a value for {metric!r}: "
                             + "; ".join(left_out))
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from mamba_eval.commands.published import FAMILIES

    points = [(table.rows[i], y, _chart_label(table, i, metric)) for i, y in points]
    column = BY_KEY.get(metric)
    ylabel = "Average accuracy (%)" if column is None else (
        f"{column.header} (%)" if column.accuracy else column.header)

    with plt.rc_context({"font.family": "DejaVu Sans", "font.size": 9, "svg.hashsalt": "mamba-eval"}):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        for family, name in FAMILIES.items():
            fam = [(row.n_parameters, y) for row, y, _ in points if row.source == "published" and row.family == family]
            if fam:
                xs, ys = zip(*fam)
                ax.plot(xs, ys, marker="o", markerfacecolor="white", linestyle="--", linewidth=1,
                        label=f"{name} (published)")
        measured = [(row, y, label) for row, y, label in points if row.source == "measured"]
        if measured:
            ax.plot([r.n_parameters for r, _, _ in measured], [y for _, y, _ in measured], marker="o",
                    linestyle="none", color="black", label="measured")
            for row, y, label in measured:
                ax.annotate(label, (row.n_parameters, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(_params_tick))
        # Within two decades (the published sizes span 130M-2.8B) one or two labelled decades say
        # little, so 2x and 5x are labelled too, in the same style instead of matplotlib's 2x10^8.
        sizes = [row.n_parameters for row, _, _ in points]
        narrow = math.log10(max(sizes) / min(sizes)) < 2
        ax.xaxis.set_minor_formatter(
            FuncFormatter(lambda x, _: _params_tick(x) if narrow and _mantissa(x) in (2, 5) else ""))
        ax.set_xlabel("Parameters")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", linewidth=0.5, alpha=0.5)
        ax.legend(loc="best", fontsize=8)
        if left_out:  # the file itself says what is missing from it
            footnote = textwrap.fill("Not shown: " + "; ".join(left_out), 110)
            fig.text(0.01, 0.01, footnote, fontsize=7, color="dimgray", va="bottom")
            fig.tight_layout(rect=(0, 0.03 * (footnote.count("\n") + 2), 1, 1))
        else:
            fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", metadata={"Software": None})
        plt.close(fig)
    return _write(Path(path), buffer.getvalue())


# ---------------------------------------------------------------------------------- outputs


#: Format name -> writer; file suffix -> format name.
FORMATS = {"markdown": to_markdown, "csv": to_csv, "latex": to_latex}
SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".tex": "latex"}


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return path


def write_output(table: Table, path, fmt: str | None = None) -> Path:
    """Write ``table`` to ``path`` in ``fmt`` (default: from the suffix: .md, .csv, .tex)."""
    path = Path(path)
    fmt = fmt or SUFFIXES.get(path.suffix.lower())
    if fmt not in FORMATS:
        raise MambaEvalError(f"{path}: cannot tell the format from the suffix (use .md, .csv or .tex)")
    return _write(path, FORMATS[fmt](table).encode("utf-8"))
