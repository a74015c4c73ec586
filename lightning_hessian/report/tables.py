"""The paper's table: final metrics per (training variant, batch size), mean and std over seeds.

Every column is the final (last logged) value of a tag, or a number derived from a run's files,
and names the split of the samples it was computed on. Columns are grouped in three
:data:`SECTIONS`:

* ``training`` (the under-training check): epochs and optimizer steps of the saved model
  (``checkpoint.json``), ``train/loss`` and ``train/acc`` (epoch means over the batches trained
  on, in train mode), ``model/weight_norm``;
* ``curvature``: ``hessian/eig_1`` ... ``hessian/eig_k`` (the table shows the first and the
  last; all are in ``summary.json``), ``hessian/eig_min`` and the ratio ``eig_min / eig_1`` (a
  saddle point has a negative ratio of order one), ``hessian/stability`` (λ₁ over the optimizer's
  stability limit at the last step, 2(1 + momentum)/lr for SGD: at 1 the edge of stability),
  ``hessian/trace``, the input-space ``hessian/input_eig_1`` and ``hessian/input_grad_norm``, ``landscape/sharpness``;
* ``robustness``: the accuracy (``test/acc``, else ``val/acc``), ``robust/ATTACK/eps_E`` and
  ``robust/ATTACK/median_norm`` (DeepFool, CW).

The split of a column: a split-qualified tag names it (``hessian/test/eig_1``, logged by
``hessian-train test``); an unqualified tag was logged during ``fit`` on the samples of its
callback's ``split`` (:attr:`~lightning_hessian.report.runs.Run.fit_splits`: the training split for
the spectrum and landscape, the validation split for robustness unless the config says
otherwise). Each quantity gets one column per split it was logged on, the fit-time one first.

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

from lightning_hessian.metrics import (
    CLEAN_ACC,
    EIG_MIN,
    EIGENVALUE_PATTERN,
    INPUT_EIG_1,
    INPUT_GRAD_NORM,
    LANDSCAPE_LOSS,
    MEDIAN_NORM_PATTERN,
    ROBUST_ACCURACY_PATTERN,
    SHARPNESS,
    SPLITS,
    STABILITY,
    TEST_ACC,
    TOP_EIGENVALUE,
    TRACE,
    TRAIN_ACC,
    TRAIN_LOSS,
    VAL_ACC,
    WEIGHT_NORM,
    curvature_tag,
    eigenvalue_tag,
    parse_split_tag,
    split_tag,
)
from lightning_hessian.report.runs import STANDARD_VARIANT, Run

__all__ = [
    "EPOCHS_KEY",
    "SECTIONS",
    "STEPS_KEY",
    "Cell",
    "Column",
    "TableRow",
    "VariantTable",
    "column_value",
    "epsilon_value",
    "format_cell",
    "ratio_key",
    "report_columns",
    "robust_tags",
    "run_accuracy",
    "summarize_runs",
    "tag_split",
    "unqualified_key",
    "variant_order",
]

ACCURACY_KEY = "acc"
TEST_ACC_TAG = TEST_ACC
VAL_ACC_TAG = VAL_ACC
#: derived keys (not tags): the epochs and optimizer steps of the saved model
EPOCHS_KEY = "run/epochs"
STEPS_KEY = "run/steps"
_RATIO_PREFIX = "ratio:"

#: section key -> heading (the report renders one table per section)
SECTIONS: dict[str, str] = {
    "training": "Training: the under-training check",
    "curvature": "Curvature",
    "robustness": "Accuracy and robustness",
}


@dataclass(frozen=True)
class Column:
    """A table column.

    Attributes:
        key: the tag read (``"acc"`` for the accuracy column, :data:`EPOCHS_KEY`/:data:`STEPS_KEY`,
            or a :func:`ratio_key`).
        title: the header, naming the split.
        percent: a fraction shown in percent.
        section: one of :data:`SECTIONS`.
        shown: in the rendered tables (all columns are in ``summary.json``).
        split: the split of the samples, when there is one.
    """

    key: str
    title: str
    percent: bool = False
    section: str = "curvature"
    shown: bool = True
    split: str | None = None


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


def ratio_key(numerator: str, denominator: str) -> str:
    """The key of a derived column: the per-run ratio of two tags' final values."""
    return f"{_RATIO_PREFIX}{numerator}:{denominator}"


# (unqualified tag, title, percent, shown) of the curvature section, in column order
_CURVATURE = (
    (TOP_EIGENVALUE, "λ₁(θ)", False, True),
    (EIG_MIN, "λ_min(θ)", False, True),
    (ratio_key(EIG_MIN, TOP_EIGENVALUE), "λ_min/λ₁", False, True),
    (STABILITY, "λ₁/stability limit", False, True),
    (TRACE, "trace", False, True),
    (INPUT_EIG_1, "λ₁(x)", False, True),
    (INPUT_GRAD_NORM, "‖∇ₓJ‖", False, True),
    (SHARPNESS, "ε-sharpness (%)", False, True),
    (curvature_tag("eig1"), "L'' along v₁", False, False),
)
#: (key, title, percent, shown) of the training section. ``train loss`` is the epoch mean over the
#: last epoch's training batches in train mode (BatchNorm batch statistics, perturbed batches under
#: robust training); the landscape callback's loss at θ is the end-of-training loss in eval mode on
#: its fixed samples, the same measurement at every batch size.
_TRAINING = (
    (EPOCHS_KEY, "epochs", False, True),
    (STEPS_KEY, "steps", False, True),
    (TRAIN_LOSS, "train loss", False, True),
    (LANDSCAPE_LOSS, "loss in eval mode", False, True),
    (TRAIN_ACC, "train acc (%)", True, True),
    (WEIGHT_NORM, "‖θ‖₂", False, True),
)
# kept for callers of the earlier module: the unqualified curvature tags the table reads
_FIXED_COLUMNS = tuple(
    Column(tag, title, percent)
    for tag, title, percent, _ in _CURVATURE
    if tag in (TOP_EIGENVALUE, TRACE, INPUT_EIG_1, INPUT_GRAD_NORM, SHARPNESS)
)


def robust_tags(tags: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(tag, attack, epsilon)`` of the unqualified ``robust/ATTACK/eps_E`` tags, by attack then epsilon."""
    found = []
    for tag in set(tags):
        match = ROBUST_ACCURACY_PATTERN.match(tag)
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


def variant_order(variant: str) -> tuple:
    """Sort key of the training variants: standard training first, then its own variations
    (``"standard, ..."``: controls, activations), then the others; numbers inside a label in
    numeric order (softplus β=5 before β=20).

    Returns:
        ``(rank, parts)``: the rank of the kind of variant, then the label's numbers and the text
        between them.
    """
    rank = 0 if variant == STANDARD_VARIANT else 1 if variant.startswith(STANDARD_VARIANT) else 2
    parts = tuple(
        (0, float(part), "") if _is_number(part) else (1, 0.0, part) for part in _NUMBER.split(variant) if part
    )
    return (rank, parts)


_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")


def _is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text) is not None


def tag_split(run: Run, tag: str) -> str | None:
    """The split of the samples behind ``tag`` in ``run``.

    Returns:
        The split named in a split-qualified tag, else the split the tag's group sampled during
        ``fit`` (``run.fit_splits``); ``None`` for tags of no analysis group.
    """
    split, base = parse_split_tag(tag)
    if split is not None:
        return split
    return run.fit_splits.get(base.split("/", 1)[0])


def column_value(run: Run, key: str) -> float | None:
    """A run's value of a column key: the final value of a tag, a derived count, or a ratio.

    Args:
        run: the run.
        key: a tag, ``"acc"``, :data:`EPOCHS_KEY`, :data:`STEPS_KEY` or a :func:`ratio_key`.

    Returns:
        The value, ``None`` when the run has none.
    """
    if key == ACCURACY_KEY:
        return run_accuracy(run)[0]
    if key == EPOCHS_KEY:
        if run.epochs is not None:
            return float(run.epochs)
        # one epoch-mean train/loss per epoch (resumed runs keep one value per step)
        points = run.events.scalars.get(TRAIN_LOSS)
        return float(len(points)) if points else None
    if key == STEPS_KEY:
        return None if run.global_step is None else float(run.global_step)
    if key.startswith(_RATIO_PREFIX):
        numerator, denominator = key[len(_RATIO_PREFIX) :].split(":", 1)
        top, bottom = run.events.final(numerator), run.events.final(denominator)
        if top is None or bottom is None or bottom == 0:
            return None
        return top / bottom
    return run.events.final(key)


def unqualified_key(key: str) -> str:
    """A column key without its split qualifier: the quantity the column shows at one split.

    Returns:
        ``key`` with its split removed (``hessian/test/eig_1`` -> ``hessian/eig_1``; for a
        :func:`ratio_key`, from both tags).
    """
    if key.startswith(_RATIO_PREFIX):
        numerator, denominator = key[len(_RATIO_PREFIX) :].split(":", 1)
        return ratio_key(parse_split_tag(numerator)[1], parse_split_tag(denominator)[1])
    return parse_split_tag(key)[1]


def _qualified(tag: str, split: str) -> str:
    if tag.startswith(_RATIO_PREFIX):
        numerator, denominator = tag[len(_RATIO_PREFIX) :].split(":", 1)
        return ratio_key(split_tag(numerator, split), split_tag(denominator, split))  # type: ignore[arg-type]
    return split_tag(tag, split)  # type: ignore[arg-type]


def _fit_split(runs: Sequence[Run], group: str) -> str:
    splits = sorted({run.fit_splits.get(group, "?") for run in runs})
    return "/".join(splits) if splits else "?"


def _present(runs: Sequence[Run], key: str) -> bool:
    return any(column_value(run, key) is not None for run in runs)


def report_columns(runs: Sequence[Run]) -> list[Column]:
    """The columns of the report over ``runs``: those some run has a value for, in section order.

    Args:
        runs: the reported runs.

    Returns:
        The columns: training, then curvature (each quantity at its fit-time split, then at the
        splits named in qualified tags), then robustness.
    """
    tags = sorted({tag for run in runs for tag in run.events.scalars})
    qualified_splits = sorted(
        {named for tag in tags if (named := parse_split_tag(tag)[0]) is not None}, key=SPLITS.index
    )
    columns: list[Column] = []
    split: str | None  # of the column being made, in each section below
    for key, title, percent, shown in _TRAINING:
        if key == LANDSCAPE_LOSS:
            # at the landscape callback's split, shown; at the splits of `hessian-train test`, in summary.json
            fit_split = _fit_split(runs, "landscape")
            if _present(runs, key):
                columns.append(Column(key, f"{title}, {fit_split}", percent, "training", shown, fit_split))
            for other in qualified_splits:
                if _present(runs, qualified := _qualified(key, other)):
                    columns.append(Column(qualified, f"{title}, {other}", percent, "training", False, other))
        elif _present(runs, key):
            columns.append(
                Column(key, title, percent, "training", shown, "train" if key in (TRAIN_LOSS, TRAIN_ACC) else None)
            )

    eigen_indices = sorted(
        {int(m.group(1)) for tag in tags if (m := EIGENVALUE_PATTERN.match(parse_split_tag(tag)[1]))}
    )
    curvature: list[tuple[str, str, bool, bool]] = []
    for tag, title, percent, shown in _CURVATURE:
        curvature.append((tag, title, percent, shown))
        if tag == TOP_EIGENVALUE:
            # λ₂ ... λ_k: the last one shown (the spectrum's reach), the others in summary.json
            last = max(eigen_indices, default=1)
            curvature += [(eigenvalue_tag(i), f"λ{_subscript(i)}(θ)", False, i == last) for i in eigen_indices if i > 1]
    for tag, title, percent, shown in curvature:
        group = (tag[len(_RATIO_PREFIX) :] if tag.startswith(_RATIO_PREFIX) else tag).split("/", 1)[0]
        if _present(runs, tag):
            split = _fit_split(runs, group)
            columns.append(Column(tag, f"{title}, {split}", percent, "curvature", shown, split))
        for split in qualified_splits:
            key = _qualified(tag, split)
            if _present(runs, key):
                columns.append(Column(key, f"{title}, {split}", percent, "curvature", shown, split))

    accuracy_tags = {accuracy_tag for run in runs if (accuracy_tag := run_accuracy(run)[1]) is not None}
    if accuracy_tags:
        title = {frozenset({TEST_ACC}): "test acc (%)", frozenset({VAL_ACC}): "val acc (%)"}.get(
            frozenset(accuracy_tags), "test acc* (%)"
        )
        columns.append(
            Column(ACCURACY_KEY, title, True, "robustness", True, "test" if title.startswith("test") else "val")
        )
    by_split: dict[str | None, list[str]] = defaultdict(list)
    for tag in tags:
        by_split[parse_split_tag(tag)[0]].append(tag)
    for split in (None, *SPLITS):
        unqualified = {parse_split_tag(tag)[1]: tag for tag in by_split.get(split, [])}
        label = _fit_split(runs, "robust") if split is None else split
        if CLEAN_ACC in unqualified:
            columns.append(Column(unqualified[CLEAN_ACC], f"clean acc (%), {label}", True, "robustness", False, label))
        minimal = {m.group("attack") for base in unqualified if (m := MEDIAN_NORM_PATTERN.match(base)) is not None}
        for base, attack, eps in robust_tags(list(unqualified)):
            # shown: the fixed-epsilon attacks at epsilon > 0; the minimal attacks (DeepFool, CW) are
            # summarised by their median norm (their accuracies at each epsilon are in summary.json)
            shown = attack not in minimal and epsilon_value(eps) > 0
            columns.append(
                Column(unqualified[base], f"{attack} ε={eps} (%), {label}", True, "robustness", shown, label)
            )
        for base in sorted(unqualified):
            if (match := MEDIAN_NORM_PATTERN.match(base)) is not None:
                columns.append(
                    Column(
                        unqualified[base],
                        f"{match.group('attack')} median ‖δ‖, {label}",
                        False,
                        "robustness",
                        True,
                        label,
                    )
                )
    return columns


_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def _subscript(index: int) -> str:
    return str(index).translate(_SUBSCRIPTS)


def summarize_runs(runs: Sequence[Run]) -> list[VariantTable]:
    """The tables of the report, one per training variant.

    Returns:
        One :class:`VariantTable` per training variant, standard training first (:func:`variant_order`);
        each holds the :func:`report_columns` of all runs that its own runs have a value for.
    """
    columns = report_columns(runs)
    by_variant: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_variant[run.variant].append(run)
    return [
        _summarize_variant(variant, by_variant[variant], columns) for variant in sorted(by_variant, key=variant_order)
    ]


def _summarize_variant(variant: str, runs: list[Run], all_columns: Sequence[Column]) -> VariantTable:
    by_batch_size: dict[int | None, list[Run]] = defaultdict(list)
    for run in runs:
        by_batch_size[run.batch_size].append(run)
    notes = []

    # Accuracy column: test/acc, falling back to val/acc per run, and the header says which.
    accuracy_source = {run.path: run_accuracy(run) for run in runs}
    used = {tag for _, tag in accuracy_source.values() if tag is not None}
    columns = [column for column in all_columns if column.key != ACCURACY_KEY and _present(runs, column.key)]
    if used:
        if used == {TEST_ACC_TAG}:
            title = "test acc (%)"
        elif used == {VAL_ACC_TAG}:
            title = "val acc (%)"
            notes.append("No run logged `test/acc`: the accuracy column is the last `val/acc`.")
        else:
            title = "test acc* (%)"
            fallback = sorted(run.name for run in runs if accuracy_source[run.path][1] == VAL_ACC_TAG)
            notes.append(
                "*Last `val/acc` for runs without `test/acc`: " + ", ".join(f"`{name}`" for name in fallback) + "."
            )
        accuracy = Column(ACCURACY_KEY, title, True, "robustness", True, "test" if title.startswith("test") else "val")
        position = next((i for i, c in enumerate(columns) if c.section == "robustness"), len(columns))
        columns.insert(position, accuracy)

    rows = []
    for batch_size in sorted(by_batch_size, key=lambda b: (b is None, b or 0)):
        row_runs = sorted(by_batch_size[batch_size], key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
        row = TableRow(batch_size, row_runs)
        for column in columns:
            values = [column_value(run, column.key) for run in row_runs]
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
    if column.key in (EPOCHS_KEY, STEPS_KEY) and not std and float(mean).is_integer():
        return str(int(mean))  # the same count for every seed
    text = _format_number(mean, 4)
    return text if std is None else f"{text} ± {_format_number(std, 2)}"
