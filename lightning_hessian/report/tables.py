"""The paper's table: final metrics per (training variant, batch size), mean and std over seeds.

Columns, each the final (last logged) value of a tag, omitted when no run in the table logged it:

========================  =====================================  ==============================
column                    tag                                    shown as
========================  =====================================  ==============================
test acc                  ``test/acc`` (else ``val/acc``)        percent
lambda_1^theta            ``hessian/eig_1``                      value
trace                     ``hessian/trace``                      value
lambda_1^x                ``hessian/input_eig_1``                value
norm of grad_x J          ``hessian/input_grad_norm``            value
ε-sharpness (%)           ``landscape/sharpness``                value (logged in percent)
ATTACK eps=E              ``robust/ATTACK/eps_E``                percent
ATTACK median norm        ``robust/ATTACK/median_norm``          value (DeepFool, CW)
========================  =====================================  ==============================

Accuracies are logged as fractions in [0, 1] and shown in percent. The std is the sample
standard deviation (``ddof=1``) over the runs of a row, shown when a row has two or more runs.
A final value of NaN (``HessianSpectrumCallback`` logs NaN for what its time budget cut) is left
out of a cell, so a cell may average fewer runs than its row has.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lightning_hessian.report.runs import STANDARD_VARIANT, Run

__all__ = [
    "Cell",
    "Column",
    "TableRow",
    "VariantTable",
    "epsilon_value",
    "format_cell",
    "robust_tags",
    "run_accuracy",
    "summarize_runs",
    "variant_order",
]

ACCURACY_KEY = "acc"
TEST_ACC_TAG = "test/acc"
VAL_ACC_TAG = "val/acc"
_ROBUST_TAG = re.compile(r"^robust/(?P<attack>.+)/eps_(?P<eps>[^/]+)$")
_MEDIAN_NORM_TAG = re.compile(r"^robust/[^/]+/median_norm$")


@dataclass(frozen=True)
class Column:
    """A table column: ``key`` is the tag read (``"acc"`` for the accuracy column)."""

    key: str
    title: str
    percent: bool = False


@dataclass(frozen=True)
class Cell:
    """The values of one metric over the runs of a row (runs that did not log it are left out)."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (``ddof=1``); ``None`` for fewer than two values."""
        return float(np.std(self.values, ddof=1)) if len(self.values) >= 2 else None


@dataclass
class TableRow:
    """One batch size of one variant."""

    batch_size: int | None
    runs: list[Run]
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int | None]:
        return [run.seed for run in self.runs]


@dataclass
class VariantTable:
    """The rows of one training variant, sorted by batch size."""

    variant: str
    columns: list[Column]
    rows: list[TableRow]
    notes: list[str] = field(default_factory=list)


_FIXED_COLUMNS = (
    Column("hessian/eig_1", "λ₁(θ)"),
    Column("hessian/trace", "trace"),
    Column("hessian/input_eig_1", "λ₁(x)"),
    Column("hessian/input_grad_norm", "‖∇ₓJ‖"),
    Column("landscape/sharpness", "ε-sharpness (%)"),
)


def robust_tags(tags: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(tag, attack, epsilon)`` of the ``robust/ATTACK/eps_E`` tags, by attack then epsilon."""
    found = []
    for tag in set(tags):
        match = _ROBUST_TAG.match(tag)
        if match is not None:
            found.append((tag, match.group("attack"), match.group("eps")))
    return sorted(found, key=lambda item: (item[1], epsilon_value(item[2]), item[2]))


def epsilon_value(epsilon: str) -> float:
    """The number an ``eps_`` tag suffix stands for (``0.1``, ``8_255`` = 8/255, ``0p1``)."""
    text = epsilon.replace("p", ".")
    try:
        if "_" in text:
            numerator, denominator = text.split("_", 1)
            return float(numerator) / float(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return math.inf


def run_accuracy(run: Run) -> tuple[float | None, str | None]:
    """The run's final accuracy and the tag it came from: ``test/acc``, else ``val/acc``."""
    for tag in (TEST_ACC_TAG, VAL_ACC_TAG):
        value = run.events.final(tag)
        if value is not None:
            return value, tag
    return None, None


def variant_order(variant: str) -> tuple[int, str]:
    return (0 if variant == STANDARD_VARIANT else 1, variant)


def summarize_runs(runs: Sequence[Run]) -> list[VariantTable]:
    """One :class:`VariantTable` per training variant: standard training first."""
    by_variant: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_variant[run.variant].append(run)
    tables = []
    for variant in sorted(by_variant, key=variant_order):
        tables.append(_summarize_variant(variant, by_variant[variant]))
    return tables


def _summarize_variant(variant: str, runs: list[Run]) -> VariantTable:
    by_batch_size: dict[int | None, list[Run]] = defaultdict(list)
    for run in runs:
        by_batch_size[run.batch_size].append(run)
    notes = []

    # Accuracy column: test/acc, falling back to val/acc per run, and the header says which.
    accuracy_source = {}
    for run in runs:
        accuracy_source[run.path] = run_accuracy(run)
    used = {tag for _, tag in accuracy_source.values() if tag is not None}
    if used == {TEST_ACC_TAG}:
        accuracy_title = "test acc (%)"
    elif used == {VAL_ACC_TAG}:
        accuracy_title = "val acc (%)"
        notes.append("No run logged `test/acc`: the accuracy column is the last `val/acc`.")
    elif used:
        accuracy_title = "test acc* (%)"
        fallback = sorted(run.name for run in runs if accuracy_source[run.path][1] == VAL_ACC_TAG)
        notes.append(
            "*Last `val/acc` for runs without `test/acc`: " + ", ".join(f"`{name}`" for name in fallback) + "."
        )
    else:  # no run logged an accuracy (a regressor, say): no accuracy column
        accuracy_title = ""

    all_tags = sorted({tag for run in runs for tag in run.events.scalars})
    columns = [Column(ACCURACY_KEY, accuracy_title, percent=True)] if used else []
    columns += [column for column in _FIXED_COLUMNS if column.key in all_tags]
    columns += [Column(tag, f"{attack} ε={eps} (%)", percent=True) for tag, attack, eps in robust_tags(all_tags)]
    columns += [
        Column(tag, f"{tag.split('/')[1]} median ‖δ‖") for tag in all_tags if _MEDIAN_NORM_TAG.match(tag) is not None
    ]

    rows = []
    for batch_size in sorted(by_batch_size, key=lambda b: (b is None, b or 0)):
        row_runs = sorted(by_batch_size[batch_size], key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
        row = TableRow(batch_size, row_runs)
        for column in columns:
            if column.key == ACCURACY_KEY:
                values = [accuracy_source[run.path][0] for run in row_runs]
            else:
                values = [run.events.final(column.key) for run in row_runs]
            # NaN marks a quantity an analysis did not reach (time budget): not a value to average.
            row.cells[column.key] = Cell(tuple(v for v in values if v is not None and not math.isnan(v)))
        rows.append(row)
    if None in by_batch_size:
        notes.append("Batch size unknown for some runs (no sweep.json, config.yaml, hparams.yaml or `bs<N>` name).")
    return VariantTable(variant, columns, rows, notes)


def _format_number(value: float, digits: int) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.{digits}g}"


def format_cell(cell: Cell | None, column: Column) -> str:
    """``mean ± std`` (or the single value); accuracies in percent with two decimals."""
    if cell is None or cell.mean is None:
        return "–"
    scale = 100.0 if column.percent else 1.0
    mean, std = cell.mean * scale, cell.std
    if column.percent:
        text = f"{mean:.2f}"
        return text if std is None else f"{text} ± {std * scale:.2f}"
    text = _format_number(mean, 4)
    return text if std is None else f"{text} ± {_format_number(std, 2)}"
