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
  unrounded values. A row that lacks one of them gets no average (a mean over fewer tasks does
  not compare with the others'); with ``partial_average=True`` it gets the mean of the cells it
  has, written ``41.2 (6/7)``, which is never marked best. Either way a note names the tasks
  the row lacks.
- **Best.** In each column with values in at least two rows, the best displayed value (lowest
  perplexity, highest accuracy; ties all) is bold in Markdown and LaTeX and listed in the CSV
  column ``best`` (column keys separated by ``;``). Published rows take part.
- **Missing** values are ``–`` in Markdown, ``--`` in LaTeX (as papers print them) and empty
  cells in the CSV. **Task versions** that differ across rows put ``‡`` on the
  task's column headers and a note naming the versions and rows. Subsets (``--limit``) and
  few-shot results are noted too; notes follow the Markdown table, are ``%`` comments after the
  LaTeX tabular, fill the CSV column ``notes``, and are printed on stderr by the command.
- **Published rows** (``published=("mamba", "mamba2")``, from ``mamba_eval.commands.published``) carry
  ``published [n]`` in the Source column (Markdown, LaTeX; ``source``/``reference`` in the CSV)
  with the paper and table of every number; their average is computed like any other row's.
- **Deterministic.** The same inputs give byte-identical output: inputs are read in sorted
  order, floats are formatted with fixed digits, nothing depends on time or the environment.
  The PNG chart (score vs parameters, log scale) is written without a timestamp or software tag.
- **Chart.** Rows with a parameter count and a value of the metric are plotted; the others are
  named in a footnote of the figure (and on stderr by the command). With no row to plot no
  chart is written: the command still writes every table, then fails.

The data (rows, the built table) is :mod:`mamba_eval.commands.table_data`; the outputs are
:mod:`mamba_eval.commands.table_render`, written through
:mod:`mamba_eval.commands.table_writers` (Markdown with padded columns and LaTeX as a booktabs
``tabular`` through pytablewriter, RFC 4180 CSV through the ``csv`` module). Library use::

    from mamba_eval.commands.table import make_table, to_markdown, to_csv, to_latex, render_chart
    table = make_table(["runs/batch1"], published=("mamba", "mamba2"), stderr=True)
    print(to_markdown(table))
    render_chart(table, "chart.png")
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mamba_eval.commands.published import FAMILIES
from mamba_eval.commands.table_data import (
    AVERAGE_KEY,
    BY_KEY,
    COLUMNS,
    Cell,
    Column,
    Row,
    Table,
    build_table,
    load_rows,
    make_table,
    notes,
    published_rows,
)
from mamba_eval.commands.table_render import (
    FORMATS,
    SUFFIXES,
    chart_points,
    render_chart,
    to_csv,
    to_latex,
    to_markdown,
    write_output,
)
from mamba_eval.errors import MambaEvalError

__all__ = [
    "COLUMNS",
    "Cell",
    "Column",
    "Row",
    "Table",
    "add_subcommand",
    "build_table",
    "chart_points",
    "load_rows",
    "make_table",
    "published_rows",
    "render_chart",
    "to_csv",
    "to_latex",
    "to_markdown",
    "write_output",
]

PROG = "mamba-eval table"

# -------------------------------------------------------------------------------------- CLI


_DESCRIPTION = """\
Build zero-shot leaderboard tables from saved lm-eval result JSON (never runs a model).

INPUT is a 'mamba-eval batch' results folder, an lm-eval --output_path folder, or a results
JSON file; several may be given. Columns: LAMBADA ppl, LAMBADA acc, HellaSwag acc_norm,
PIQA acc, ARC-E acc, ARC-C acc_norm, WinoGrande acc, OpenBookQA acc_norm, and Avg, the mean
of the accuracy columns. Rows are ordered by parameter count; the best value of each column
is bold (Markdown, LaTeX) or listed in the 'best' column (CSV). The same inputs give
byte-identical output.

missing results: a task a row was not evaluated on shows '–' ('--' in LaTeX, an empty cell
in the CSV). Such a row gets no Avg, since a mean over fewer tasks does not compare with the
others (--partial-average: the mean of the accuracies it has, marked '(k/n)', never bold),
and a note under the table (CSV: 'notes' column; also on stderr) names the missing tasks.

chart: --chart plots --chart-metric against parameter count for every row that has both;
rows left out are named in one warning line and in a footnote of the figure. Every table
file is written in any case; when no row can be plotted the chart is not written and the
exit status is 1. A bad -o suffix or --chart-metric stops before anything is written.

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
    parser.add_argument("--format", choices=sorted(FORMATS), default="markdown",
                        help="format written to stdout when no -o is given (default: markdown)")
    parser.add_argument("--published", default="none", metavar="FAMILIES",
                        help="add the papers' published rows: 'mamba', 'mamba2', 'all' or 'none' "
                        "(comma-separated; default: none)")
    parser.add_argument("--columns", default=None, metavar="KEYS",
                        help=f"comma-separated column keys (default: all: {','.join(BY_KEY)})")
    parser.add_argument("--stderr", action="store_true", help="show lm-eval's standard errors")
    parser.add_argument("--partial-average", action="store_true",
                        help="average the accuracy cells a row has when it lacks some, marked '(k/n)'")
    parser.add_argument("--chart", metavar="FILE.png", default=None,
                        help="also write a PNG chart of a metric against parameter count (see 'chart' above)")
    parser.add_argument("--chart-metric", default=AVERAGE_KEY, metavar="KEY",
                        help="column key plotted by --chart (default: average)")
    parser.set_defaults(handler=_main)


def _families(text: str) -> tuple[str, ...]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items in (["none"], []):
        return ()
    if items == ["all"]:
        return ("mamba", "mamba2")
    unknown = [t for t in items if t not in FAMILIES]
    if unknown:
        raise MambaEvalError(f"--published: unknown family {', '.join(map(repr, unknown))} (use mamba, mamba2, all or none)")
    return tuple(items)


def _main(args: argparse.Namespace, extra: list[str]) -> int:
    families = _families(args.published)
    if not args.inputs and not families:
        raise MambaEvalError("give at least one results folder or file (or --published to show only published rows)")
    for out in args.output:
        if Path(out).suffix.lower() not in SUFFIXES:
            raise MambaEvalError(f"-o {out}: cannot tell the format from the suffix (use .md, .csv or .tex)")
    table = make_table(args.inputs, published=families, columns=args.columns, stderr=args.stderr,
                       partial_average=args.partial_average)
    for warning in table.warnings + notes(table):
        print(f"{PROG}: note: {warning}", file=sys.stderr)
    if args.chart:
        points, left_out = chart_points(table, args.chart_metric)  # a bad metric stops before any write
    for out in args.output:
        write_output(table, out)
    if not args.output:
        sys.stdout.write(FORMATS[args.format](table))
    if not args.chart:
        return 0
    hint = _shared_columns_hint(table) if args.chart_metric == AVERAGE_KEY else ""
    if not points:
        written = "the tables were written" if args.output else "the table was printed"
        raise MambaEvalError(f"--chart {args.chart} not written ({written}): no row has both a parameter count "
                             f"and a value for {args.chart_metric!r}: {'; '.join(left_out)}{hint}")
    render_chart(table, args.chart, args.chart_metric)
    if left_out:
        print(f"{PROG}: warning: {args.chart} leaves out {'; '.join(left_out)}{hint}", file=sys.stderr)
    return 0


def _shared_columns_hint(table: Table) -> str:
    """A ``--columns`` value that keeps only the tasks every charted row has, so that their
    averages compare; empty when no accuracy column would be left or nothing would change."""
    rows = [r for r in table.rows if r.n_parameters]
    keys = [c.key for c in table.columns if not c.accuracy or all(c.key in r.cells for r in rows)]
    if len(keys) == len(table.columns) or not any(BY_KEY[k].accuracy for k in keys):
        return ""
    return f"; to average only the tasks every row has: --columns {','.join(keys)}"
