"""Published zero-shot results of the Mamba and Mamba-2 releases, as data.

Every number carries its source (paper and table). ``mamba-eval table --published`` shows them as
reference rows, marked as published in every output format; nothing here is ever measured.

Sources:

- ``MAMBA_T3``: Gu & Dao (2023), *Mamba: Linear-Time Sequence Modeling with Selective State
  Spaces*, arXiv:2312.00752, Table 3 (zero-shot evaluations, lm-eval). LAMBADA perplexity and
  the accuracies of LAMBADA, HellaSwag (acc_norm), PIQA, ARC-E, ARC-C (acc_norm), WinoGrande.
- ``MAMBA2_T10``: Dao & Gu (2024), *Transformers are SSMs: Generalized Models and Efficient
  Algorithms Through Structured State Space Duality*, ICML 2024, arXiv:2405.21060, Table 10
  (full zero-shot results). Adds OpenBookQA (acc_norm); lists the Mamba-2 models and again the
  Mamba models, whose OpenBookQA accuracies are taken from it.

Values are as printed: accuracies in percent (one decimal), LAMBADA perplexity. The papers'
printed averages are kept in ``printed_average`` for reference only (Table 3 averages six
accuracies, Table 10 seven; Table 3's printed averages for mamba-370m (50.0) and mamba-790m
(57.1) are not the mean of the six printed accuracies, 51.7 and 56.1). ``mamba-eval table``
always computes its own average from the cells it shows.

``n_parameters`` is not printed in the papers (they name sizes: 130M, 370M, ...). It is the
exact parameter count of the released architecture (``mamba_eval.models.releases``; tied
embeddings counted once), which tests/test_loader.py checks against transformers' classes. It
orders rows and places the points of the chart.

Column keys are those of ``mamba_eval.commands.table.COLUMNS``: ``lambada_ppl``, ``lambada_acc``,
``hellaswag``, ``piqa``, ``arc_easy``, ``arc_challenge``, ``winogrande``, ``openbookqa``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

__all__ = ["Source", "PublishedValue", "PublishedRow", "MAMBA_T3", "MAMBA2_T10", "SOURCES", "ROWS", "FAMILIES", "rows"]


@dataclass(frozen=True)
class Source:
    """Where a published number is printed."""

    key: str
    citation: str  # authors, year, title, arXiv id
    table: str  # e.g. "Table 3"

    def __str__(self) -> str:
        return f"{self.citation}, {self.table}"


@dataclass(frozen=True)
class PublishedValue:
    value: float  # as printed: accuracy in percent, or perplexity
    source: Source


@dataclass(frozen=True)
class PublishedRow:
    name: str  # the release's name, e.g. "mamba-130m"
    family: str  # "mamba" or "mamba2"
    hub_id: str
    n_parameters: int
    values: Mapping[str, PublishedValue]  # column key -> value
    printed_average: PublishedValue | None

    @property
    def sources(self) -> tuple[Source, ...]:
        """The distinct sources of this row's values, in column order."""
        seen: dict[str, Source] = {}
        for value in self.values.values():
            seen.setdefault(value.source.key, value.source)
        return tuple(seen.values())


MAMBA_T3 = Source(
    "mamba-t3",
    "Gu & Dao (2023), Mamba: Linear-Time Sequence Modeling with Selective State Spaces, arXiv:2312.00752",
    "Table 3",
)
MAMBA2_T10 = Source(
    "mamba2-t10",
    "Dao & Gu (2024), Transformers are SSMs: Generalized Models and Efficient Algorithms Through "
    "Structured State Space Duality, arXiv:2405.21060",
    "Table 10",
)

SOURCES = (MAMBA_T3, MAMBA2_T10)  # reference numbering order in tables
FAMILIES = {"mamba": "Mamba", "mamba2": "Mamba-2"}

_T3_KEYS = ("lambada_ppl", "lambada_acc", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")
_T10_KEYS = _T3_KEYS + ("openbookqa",)

# name: (n_parameters, Table 3 values in _T3_KEYS order, printed Table 3 average, Table 10 OpenBookQA)
_MAMBA = {
    "mamba-130m": (129_135_360, (16.07, 44.3, 35.3, 64.5, 48.0, 24.3, 51.9), 44.7, 28.8),
    "mamba-370m": (371_516_416, (8.14, 55.6, 46.5, 69.5, 55.1, 28.0, 55.3), 50.0, 30.8),
    "mamba-790m": (793_204_224, (6.02, 62.7, 55.1, 72.1, 61.2, 29.5, 56.1), 57.1, 34.2),
    "mamba-1.4b": (1_372_178_432, (5.04, 64.9, 59.1, 74.2, 65.5, 32.8, 61.5), 59.7, 36.4),
    "mamba-2.8b": (2_768_345_600, (4.23, 69.2, 66.1, 75.2, 69.7, 36.3, 63.5), 63.3, 39.6),
}

# name: (n_parameters, Table 10 values in _T10_KEYS order, printed Table 10 average)
_MAMBA2 = {
    "mamba2-130m": (128_989_632, (16.86, 43.9, 35.3, 64.9, 47.4, 24.2, 52.1, 30.6), 42.6),
    "mamba2-370m": (368_346_624, (8.02, 55.8, 46.9, 70.5, 54.9, 26.9, 55.7, 32.4), 49.0),
    "mamba2-780m": (780_161_280, (5.86, 61.7, 54.9, 72.0, 61.0, 28.5, 60.2, 36.2), 53.5),
    "mamba2-1.3b": (1_343_757_312, (5.02, 65.7, 59.9, 73.2, 64.3, 33.3, 60.9, 37.8), 56.4),
    "mamba2-2.7b": (2_702_599_680, (4.10, 69.7, 66.6, 76.4, 69.6, 36.4, 64.0, 38.8), 60.2),
}


def _build() -> tuple[PublishedRow, ...]:
    out = []
    for name, (n_params, t3, t3_avg, obqa) in _MAMBA.items():
        values = {k: PublishedValue(v, MAMBA_T3) for k, v in zip(_T3_KEYS, t3)}
        values["openbookqa"] = PublishedValue(obqa, MAMBA2_T10)
        out.append(PublishedRow(name, "mamba", f"state-spaces/{name}", n_params, MappingProxyType(values),
                                PublishedValue(t3_avg, MAMBA_T3)))
    for name, (n_params, t10, t10_avg) in _MAMBA2.items():
        values = {k: PublishedValue(v, MAMBA2_T10) for k, v in zip(_T10_KEYS, t10)}
        out.append(PublishedRow(name, "mamba2", f"state-spaces/{name}", n_params, MappingProxyType(values),
                                PublishedValue(t10_avg, MAMBA2_T10)))
    return tuple(out)


ROWS: tuple[PublishedRow, ...] = _build()


def rows(families=("mamba", "mamba2")) -> list[PublishedRow]:
    """The published rows of the given families (``"mamba"``, ``"mamba2"``), in release order."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        from mamba_eval.errors import MambaEvalError

        raise MambaEvalError(
            f"unknown published family {', '.join(map(repr, unknown))} (known: {', '.join(FAMILIES)})"
        )
    return [row for row in ROWS if row.family in families]
