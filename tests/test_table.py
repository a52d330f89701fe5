"""``mamba-eval table``: tables from fixture result files against expected outputs, determinism,
escaping, the chart, the published reference rows, and the command line.

The fixtures (tests/fixtures/results/input) hold three models: ``alpha`` and ``beta`` as batch
checkpoint folders, ``org/gamma`` as plain lm-eval output. Their metric values are chosen so that
every displayed number is exact. The expected files (tests/fixtures/results/expected) are
pytablewriter's layout of cells written by hand from them (the files were first written by hand
whole; the cells of pytablewriter's output were checked equal to those): ordering by parameter count (beta 1.0M from its results, alpha 2.0M
from its checkpoint.json although its results report 1999999, gamma 3.0M), averages (alpha
315/7 = 45.0, gamma 365/7 = 52.1, beta lacks OpenBookQA: none, with a note, or 295/6 = 49.2 (6/7)
with partial averages), best values (a tie on WinoGrande), beta's HellaSwag task version 2.0 against
1.0, beta's PIQA subset, gamma's HellaSwag found in two files (the newer wins), a half-written
hidden temporary file and a truncated JSON that must both be ignored.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mamba_eval.commands import published
from mamba_eval.errors import MambaEvalError
from mamba_eval.commands.table import (
    COLUMNS,
    Cell,
    Row,
    build_table,
    chart_points,
    load_rows,
    make_table,
    published_rows,
    render_chart,
    to_csv,
    to_latex,
    to_markdown,
)
from mamba_eval.commands.table_data import row_notes

FIXTURES = Path(__file__).parent / "fixtures" / "results"
INPUT = FIXTURES / "input"
BETA = INPUT / "batch" / "beta-22222222"  # lacks OpenBookQA: no average
EXPECTED = FIXTURES / "expected"
SCRIPT = Path(sys.executable).parent / "mamba-eval"


@pytest.mark.parametrize("name,render", [("table.md", to_markdown), ("table.csv", to_csv), ("table.tex", to_latex)])
def test_outputs_equal_hand_written_expected(name, render):
    table = make_table([INPUT])
    assert render(table) == (EXPECTED / name).read_text(encoding="utf-8")


def test_published_rows_stderr_and_partial_average_markdown():
    table = make_table([INPUT], published=("mamba",), stderr=True, partial_average=True)
    assert to_markdown(table) == (EXPECTED / "table_published_stderr_partial.md").read_text(encoding="utf-8")


def test_half_written_and_unreadable_files_are_not_read():
    table = make_table([INPUT])
    beta = next(r for r in table.rows if r.label == "beta")
    assert beta.cells["hellaswag"].value == 50.0  # not the 90.0 of the hidden temporary file
    assert len(table.warnings) == 1 and "truncated.json: unreadable JSON" in table.warnings[0]


def test_same_inputs_give_identical_bytes_wherever_they_live(tmp_path):
    """Twice, from a copy in another folder, and with the folders given in either order."""
    copy = tmp_path / "elsewhere"
    shutil.copytree(INPUT, copy)

    def render(inputs):
        table = make_table(inputs, published=("mamba", "mamba2"), stderr=True)
        return to_markdown(table), to_csv(table), to_latex(table)

    assert render([INPUT]) == render([INPUT]) == render([copy])
    assert render([copy / "batch", copy / "plain"]) == render([copy / "plain", copy / "batch"])


def _read_csv(text: str) -> list[list[str]]:
    """Standard CSV (RFC 4180), as any reader reads it."""
    return list(csv.reader(io.StringIO(text)))


def _markdown_cells(text: str) -> list[list[str]]:
    """The body rows of a Markdown table, cells stripped (header and rule left out)."""
    lines = [line for line in text.splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def _latex_cells(text: str) -> list[list[str]]:
    """The body rows of a booktabs tabular, cells stripped."""
    body = text.split("\\midrule\n", 1)[1].split("\\bottomrule", 1)[0]
    return [[c.strip() for c in line.removesuffix(r"\\").split(" & ")] for line in body.splitlines()]


@pytest.mark.parametrize("partial", [False, True])
def test_formats_agree_cell_by_cell(partial):
    """Markdown, LaTeX and CSV show the same values, the same missing cells (``–``, ``--``,
    empty), the same best values and the same row notes, among them why a row has no average
    (beta lacks OpenBookQA)."""
    table = make_table([INPUT], partial_average=partial)
    header, *lines = _read_csv(to_csv(table))
    records = [dict(zip(header, line, strict=True)) for line in lines]
    md, tex = to_markdown(table), to_latex(table)
    keys = [c.key for c in table.columns] + ["average"]
    complete = f"{table.n_accuracy}/{table.n_accuracy}"
    first = 2  # model, params
    for record, md_row, tex_row in zip(records, _markdown_cells(md), _latex_cells(tex), strict=True):
        assert md_row[0] == tex_row[0] == record["model"]
        bold_md = {k for k, cell in zip(keys, md_row[first:]) if cell.startswith("**")}
        bold_tex = {k for k, cell in zip(keys, tex_row[first:]) if cell.startswith(r"\textbf{")}
        assert bold_md == bold_tex == set(filter(None, record["best"].split(";")))
        for key, md_cell, tex_cell in zip(keys, md_row[first:], tex_row[first:], strict=True):
            md_cell = md_cell.strip("*")
            tex_cell = tex_cell.removeprefix(r"\textbf{").removesuffix("}")
            if record[key] == "":
                assert (md_cell, tex_cell) == ("–", "--"), key
            else:  # a partial average carries its "(k/n)" in the tables, in average_cells in the CSV
                assert md_cell == tex_cell == record[key] + (
                    f" ({record['average_cells']})" if key == "average" and record["average_cells"] != complete else "")
        row = next(r for r in table.rows if r.label == record["model"])
        for note in row_notes(table, table.rows.index(row)):
            assert f"- {row.label}: {note}\n" in md and f"% {row.label}: {note}\n" in tex
            assert note in record["notes"].split(" | ")
    beta = next(r for r in records if r["model"] == "beta")
    assert beta["openbookqa"] == "" and beta["average_cells"] == "6/7"
    assert (beta["average"] == "") != partial
    assert any(n.startswith("no result for openbookqa, so ") for n in beta["notes"].split(" | "))


def test_special_characters_are_escaped_in_every_format():
    """A label with the characters each format treats specially: the Markdown table keeps its
    columns, LaTeX gets escapes (no \verb, no unescaped specials), the CSV gives the label back."""
    label = 'a|b_c&d%e$f#g{h}i~j^k\\l "m", n'
    rows = [Row(label, "x", "measured", 10 ** 6, {"piqa": Cell(50.0)}),
            Row("plain", "y", "measured", 2 * 10 ** 6, {"piqa": Cell(60.0)})]
    table = build_table(rows, [c for c in COLUMNS if c.key == "piqa"])

    md_rows = [line for line in to_markdown(table).splitlines() if line.startswith("|")]
    assert len({len(re.findall(r"(?<!\\)\|", line)) for line in md_rows}) == 1  # same column count
    assert r"a\|b_c" in md_rows[2] and "**60.0**" in md_rows[3]

    tex = to_latex(table)
    assert r"\verb" not in tex and "\\begin{tabular}{lrrr}\n\\toprule\n" in tex and tex.count(r"\midrule") == 1
    assert (r"a|b\_c\&d\%e\$f\#g\{h\}i\textasciitilde{}j\textasciicircum{}k\textbackslash{}l "
            '"m", n') in tex
    body = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert [line.count(" & ") for line in body] == [3, 3, 3]  # header and both rows: 4 cells each
    assert r"\textbf{60.0}" in body[2]

    parsed = _read_csv(to_csv(table))
    assert [r[0] for r in parsed[1:]] == [label, "plain"] and parsed[2][parsed[0].index("best")] == "piqa;average"


def test_chart_is_a_deterministic_png(tmp_path):
    table = make_table([INPUT], published=("mamba", "mamba2"))
    first, second = render_chart(table, tmp_path / "a.png"), render_chart(table, tmp_path / "b.png")
    data = first.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert data == second.read_bytes()
    assert b"Software" not in data and b"tIME" not in data  # no tool tag, no timestamp chunk
    with pytest.raises(MambaEvalError, match="not a column"):
        render_chart(table, tmp_path / "c.png", metric="mmlu")


def test_chart_plots_the_rows_with_a_value_and_names_the_others():
    """Measured rows appear beside the published ones; a row without the plotted value (beta
    lacks OpenBookQA, so it has no average) or without a parameter count is named, with why."""
    rows, _ = load_rows([INPUT])
    rows.append(Row("uncounted", "uncounted", "measured", None, {c.key: Cell(50.0) for c in COLUMNS}))
    table = build_table(rows + published_rows(("mamba", "mamba2")))
    points, left_out = chart_points(table)
    plotted = {table.rows[i].label for i, _ in points}
    assert plotted == {r.label for r in table.rows} - {"beta", "uncounted"}
    assert left_out == ["beta (no result for openbookqa)", "uncounted (parameter count unknown)"]
    assert [y for _, y in points] == [table.averages[i][0] for i, _ in points]

    points, left_out = chart_points(table, "piqa")  # a column beta has
    assert "beta" in {table.rows[i].label for i, _ in points} and left_out == ["uncounted (parameter count unknown)"]

    partial = build_table(rows, partial_average=True)  # beta's partial average is plotted
    points, _ = chart_points(partial)
    assert {partial.rows[i].label for i, _ in points} == {"alpha", "beta", "org/gamma"}

    with pytest.raises(MambaEvalError, match="no accuracy column"):
        chart_points(make_table([INPUT], columns="lambada_ppl"))


def test_missing_columns_and_table3_averages():
    """The Mamba paper's own format (no OpenBookQA): the averages equal those printed in its
    Table 3, except the two rows whose printed average is not the mean of their six accuracies
    (see mamba_eval.commands.published)."""
    t3 = ["lambada_ppl", "lambada_acc", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande"]
    table = make_table(published=("mamba",), columns=t3)
    printed = {r.name: f"{r.printed_average.value:.1f}" for r in published.ROWS if r.family == "mamba"}
    averages = {row.label: f"{avg[0]:.1f}" for row, avg in zip(table.rows, table.averages)}
    assert averages.keys() == printed.keys()
    differ = {name for name in printed if averages[name] != printed[name]}
    assert differ == {"mamba-370m", "mamba-790m"}
    assert all(table.averages[i][1] == 6 for i in range(len(table.rows)))
    assert [s.table for s in table.references] == ["Table 3"]  # OpenBookQA (Table 10) not shown
    assert "OpenBookQA" not in to_markdown(table)


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(MambaEvalError, match="no such file or folder"):
        make_table([tmp_path / "nope"])
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(MambaEvalError, match="not an lm-eval results file"):
        make_table([tmp_path / "x.json"])
    with pytest.raises(MambaEvalError, match="unknown column 'mmlu'"):
        make_table([INPUT], columns="piqa,mmlu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MambaEvalError, match="no results found"):
        make_table([tmp_path / "empty"])
    with pytest.raises(MambaEvalError, match="unknown published family"):
        make_table([INPUT], published=("mamba3",))


def test_parameter_count_from_a_reachable_checkpoint_config(tmp_path):
    """No n_parameters anywhere in the results: counted from the checkpoint's config.json. The
    expected 5056 is counted by hand: embedding 104 x 16 (vocab 100 padded to 8); one Mamba-1
    layer with d_inner 32, dt_rank 1, d_state 16, d_conv 4: in_proj 16*64, conv 32*4 + 32,
    x_proj 32*33, dt_proj 32 + 32, A_log 32*16, D 32, out_proj 32*16, norm 16 (3376); norm_f 16."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "d_model": 16, "n_layer": 1, "vocab_size": 100, "ssm_cfg": {}, "rms_norm": True,
        "residual_in_fp32": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}))
    (tmp_path / "res.json").write_text(json.dumps({
        "results": {"piqa": {"acc,none": 0.5}}, "versions": {"piqa": 1.0},
        "config": {"model": "mamba", "model_args": f"pretrained={ckpt}"}}))
    table = make_table([tmp_path / "res.json"])
    assert table.rows[0].n_parameters == 5056 and table.rows[0].label == "ckpt"


# ------------------------------------------------------------------------- published data


def _count(d_model: int, n_layer: int, mamba2: bool) -> int:
    """Parameter count of a released shape, by the architecture's formula (tied embeddings)."""
    d_inner = 2 * d_model
    if mamba2:
        n, heads, vocab = 128, d_inner // 64, 50288
        conv_dim = d_inner + 2 * n
        layer = (d_model * (2 * d_inner + 2 * n + heads) + conv_dim * 4 + conv_dim + 3 * heads + d_inner
                 + d_inner * d_model + d_model)
    else:
        n, rank, vocab = 16, math.ceil(d_model / 16), 50280
        layer = (d_model * 2 * d_inner + d_inner * 4 + d_inner + d_inner * (rank + 2 * n) + rank * d_inner + d_inner
                 + d_inner * n + d_inner + d_inner * d_model + d_model)
    return vocab * d_model + n_layer * layer + d_model


SHAPES = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "780m": (1536, 48), "1.4b": (2048, 48),
          "1.3b": (2048, 48), "2.8b": (2560, 64), "2.7b": (2560, 64)}


def test_published_rows_are_sourced_and_consistent():
    keys = {c.key for c in COLUMNS}
    assert [r.name for r in published.ROWS] == [
        "mamba-130m", "mamba-370m", "mamba-790m", "mamba-1.4b", "mamba-2.8b",
        "mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b", "mamba2-2.7b"]
    for row in published.ROWS:
        assert set(row.values) == keys, row.name
        assert all(v.source in published.SOURCES for v in row.values.values())
        d_model, n_layer = SHAPES[row.name.split("-")[1]]
        assert row.n_parameters == _count(d_model, n_layer, row.family == "mamba2"), row.name
        accuracies = [v.value for k, v in row.values.items() if k != "lambada_ppl"]
        if row.family == "mamba2":  # Table 10 averages its seven accuracies
            assert f"{sum(accuracies) / 7:.1f}" == f"{row.printed_average.value:.1f}", row.name
        else:  # Table 3 averages six; two of its printed averages are not that mean (see published.py)
            mean6 = sum(v.value for k, v in row.values.items() if k not in ("lambada_ppl", "openbookqa")) / 6
            agrees = abs(mean6 - row.printed_average.value) < 0.051
            assert agrees == (row.name not in ("mamba-370m", "mamba-790m")), (row.name, mean6)
            assert row.values["openbookqa"].source is published.MAMBA2_T10
            assert row.values["piqa"].source is published.MAMBA_T3


# ----------------------------------------------------------------------------- command line


def _script(*args, cwd=None):
    return subprocess.run([str(SCRIPT), "table", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "MAMBA_EVAL_TRACEBACK"})


def test_command_line(tmp_path):
    proc = _script(INPUT, "-o", tmp_path / "t.md", "-o", tmp_path / "t.csv", "-o", tmp_path / "t.tex",
                   "--chart", tmp_path / "t.png")
    assert proc.returncode == 0, proc.stderr
    for name in ("md", "csv", "tex"):
        assert (tmp_path / f"t.{name}").read_text(encoding="utf-8") == (EXPECTED / f"table.{name}").read_text(
            encoding="utf-8")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert proc.stdout == ""
    assert "note: ‡ hellaswag: task versions differ" in proc.stderr and "truncated.json" in proc.stderr

    proc = _script(INPUT, "--format", "csv")
    assert proc.returncode == 0 and proc.stdout == (EXPECTED / "table.csv").read_text(encoding="utf-8")

    # One bad -o: an error before anything is written, not a part of the outputs.
    proc = _script(INPUT, "-o", tmp_path / "new.md", "-o", tmp_path / "new.txt")
    assert proc.returncode == 1 and "cannot tell the format" in proc.stderr
    assert not (tmp_path / "new.md").exists() and not (tmp_path / "new.txt").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary file left behind

    proc = _script(INPUT, "--columns", "piqa,mmlu")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("mamba-eval: error: unknown column 'mmlu'")


def test_command_line_writes_every_table_when_no_row_can_be_charted(tmp_path):
    """One error line and exit status 1 for the chart alone; every table file is complete."""
    outs = [tmp_path / f"t.{suffix}" for suffix in ("md", "csv", "tex")]
    chart = tmp_path / "t.png"
    proc = _script(BETA, *[arg for out in outs for arg in ("-o", out)], "--chart", chart)
    assert proc.returncode == 1 and proc.stdout == ""
    table = make_table([BETA])
    for out, render in zip(outs, (to_markdown, to_csv, to_latex)):
        assert out.read_text(encoding="utf-8") == render(table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.md", "t.tex"]  # no chart, no temporary file
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mamba-eval: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"mamba-eval: error: --chart {chart} not written")
    assert "beta (no result for openbookqa)" in errors[0]


def test_command_line_published_all_says_which_measured_rows_the_chart_leaves_out(tmp_path):
    """``--published all`` with a measured row lacking a task: one warning names it and gives the
    ``--columns`` that average the tasks every row has; following it puts every row in the chart."""
    proc = _script(INPUT, "--published", "all", "--chart", tmp_path / "a.png", "-o", tmp_path / "a.md")
    assert proc.returncode == 0 and (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("mamba-eval table: warning:")]
    assert len(warnings) == 1 and "beta (no result for openbookqa)" in warnings[0]
    columns = warnings[0].split("--columns ", 1)[1]
    assert columns.split(",") == [c.key for c in COLUMNS if c.key != "openbookqa"]

    proc = _script(INPUT, "--published", "all", "--chart", tmp_path / "b.png", "--columns", columns,
                   "-o", tmp_path / "b.md")
    assert proc.returncode == 0 and "warning" not in proc.stderr
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
