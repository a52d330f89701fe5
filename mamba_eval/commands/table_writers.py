"""Text tables for ``mamba-eval table`` and the ``mamba-eval probe`` report: Markdown and a LaTeX
booktabs ``tabular`` through ``pytablewriter`` (the library behind lm-eval's own ``make_table``),
CSV through the standard library's ``csv`` module (RFC 4180: what every CSV reader expects;
pytablewriter's CSV escapes quotes with backslashes).

Cells are given as text, already formatted by the caller (fixed digits, bold marks, LaTeX
escapes), and are written as given: the writers never re-format a number. Markdown pads the
columns and escapes ``|`` in cells; LaTeX is :class:`BooktabsWriter`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from pytablewriter import LatexTableWriter, MarkdownTableWriter, String
from pytablewriter.style import Style

__all__ = ["BooktabsWriter", "csv_table", "latex_tabular", "markdown_table"]


class BooktabsWriter(LatexTableWriter):
    """pytablewriter's LaTeX writer, writing a booktabs ``tabular`` for a paper.

    Its own output is a math-mode ``array`` with every text cell in ``\\verb|...|`` (made for
    Jupyter): outside math mode that does not compile, and a ``\\verb`` cell cannot hold a
    ``\\textbf`` mark or a ``$\\uparrow$``. Here the environment and rules are booktabs' and the
    cells are written as the caller escaped them. Needs ``\\usepackage{booktabs}``.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.char_right_side_row = r" \\"  # no \hline after every row

    def _get_opening_row_items(self) -> list[str]:
        return ["\\begin{tabular}{" + "".join(self._get_col_align_char_list()) + "}\n\\toprule"]

    def _get_header_row_separator_items(self) -> list[str]:
        return [r"\midrule"]

    def _get_closing_row_items(self) -> list[str]:
        return ["\\bottomrule\n\\end{tabular}"]

    # LatexTableWriter wraps each cell in \verb; its parent writes the cell as it is.
    def _to_header_item(self, col_dp, value_dp) -> str:
        return super(LatexTableWriter, self)._to_header_item(col_dp, value_dp)

    def _to_row_item(self, row_idx, col_dp, value_dp) -> str:
        return super(LatexTableWriter, self)._to_row_item(row_idx, col_dp, value_dp)


def _render(writer_class, headers: Sequence[str], rows: Sequence[Sequence[str]],
            align: Sequence[str] | None, **kwargs) -> str:
    writer = writer_class(headers=list(headers), value_matrix=[list(row) for row in rows], **kwargs)
    writer.type_hints = [String] * len(headers)  # text as given: "20.50" stays "20.50"
    if align is not None:
        writer.column_styles = [Style(align=a) for a in align]
    return writer.dumps()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    """A Markdown (GitHub / CommonMark) table; ``align``: ``"left"`` / ``"right"`` per column."""
    return _render(MarkdownTableWriter, headers, rows, align, margin=1)


def latex_tabular(headers: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    """A booktabs ``tabular`` (:class:`BooktabsWriter`) of cells that are already LaTeX."""
    return _render(BooktabsWriter, headers, rows, align, indent_string="")


def csv_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """CSV (RFC 4180: a cell with a comma, quote or line break is quoted, quotes doubled), one
    line per row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    return out.getvalue()
