"""Text tables through ``pytablewriter`` (the library behind lm-eval's own ``make_table``): Markdown,
CSV, and a LaTeX booktabs ``tabular``, for ``mamba-eval table`` and the ``mamba-eval probe`` report.

Cells are given as text, already formatted by the caller (fixed digits, bold marks, LaTeX
escapes), and are written as given: the writers never re-format a number. What pytablewriter
adds: Markdown pads the columns and escapes ``|`` in cells; CSV quotes every cell that is not
empty and escapes a quote or a backslash inside one with a backslash (read it back with
``csv.reader(f, escapechar="\\\\", doublequote=False)``; cells never span lines, a line break in
a cell becomes a space); LaTeX is :class:`BooktabsWriter`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pytablewriter import CsvTableWriter, LatexTableWriter, MarkdownTableWriter, String
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
    """CSV, one line per row; cells quoted unless empty (escaping: module docstring)."""
    return _render(CsvTableWriter, headers, rows, None)
