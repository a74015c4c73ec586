"""Which of the paper's claims hold in a set of runs: one line per claim, decided by a stated rule.

The claims of Yao et al. (NeurIPS 2018), each tested in every training variant that has the runs
it needs:

1. *Large batches converge to points of larger curvature*: the top Hessian eigenvalue and the
   trace at the largest batch size against the smallest (:func:`batch_size_claims`).
2. *They are not saddle points*: the smallest eigenvalue is small against the top one
   (``λ_min / λ₁`` above :data:`SADDLE_RATIO`).
3. *Large-batch models generalise worse and are less robust*: test accuracy, FGSM/PGD accuracy
   at one epsilon per attack (the one where the smallest batch keeps closest to half its clean
   accuracy) and the DeepFool/CW median perturbation norms, largest against smallest batch.
4. *Input-space curvature*: ``λ₁(x)`` and ``‖∇ₓJ‖`` are larger at large batch, and across batch
   sizes a larger ``λ₁(x)`` goes with a lower robust accuracy (Spearman correlation per seed).
5. *Robust training finds flatter points* (:func:`training_claims`): ``λ₁(θ)`` and ``λ₁(x)`` of
   each robustly trained variant (FGSM, PGD, TRADES) against standard training at the same batch
   size; noise training (the reviewers' baseline) is tested the same way and named as such.
6. *Model interpolation* (:func:`interpolation_claims`): along ``θ(α)`` from a small- to a
   large-batch model the large-batch end has the larger top eigenvalue; from a standard to a
   robustly trained model the robust end the smaller.

Under each variant's claims, context lines compared by no rule (:data:`_CONTEXT`): the training
loss reached (equal losses separate batch size from under-training) and ``λ₁(θ)`` over the
optimizer's stability limit at the last step (near 1, the learning rate holds ``λ₁(θ)`` at the edge
of stability, whatever the batch size).

**The rule** (:data:`RULE`): the two numbers compared are means over seeds with their sample
standard deviations. A claim *holds* when the difference of the means has the direction the paper
predicts and is larger than the sum of the two standard deviations; it is *contradicted* when it
is that large in the opposite direction; otherwise it is *not decided* (within the seed spread, or
a side with fewer than two seeds). Correlations and ratios follow the same rule against their
threshold (0 and :data:`SADDLE_RATIO`), which has no spread: the mean must be beyond it by more
than its one standard deviation. The verdicts are computed, never typed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lightning_hessian.metrics import (
    CLEAN_ACC,
    EIG_MIN,
    INPUT_EIG_1,
    INPUT_GRAD_NORM,
    MEDIAN_NORM_PATTERN,
    ROBUST_ACCURACY_PATTERN,
    STABILITY,
    TOP_EIGENVALUE,
    TRACE,
    TRAIN_LOSS,
    parse_split_tag,
)
from lightning_hessian.report.artifacts import Interpolation, group_interpolations
from lightning_hessian.report.runs import STANDARD_VARIANT
from lightning_hessian.report.tables import (
    ACCURACY_KEY,
    Column,
    TableRow,
    VariantTable,
    column_value,
    epsilon_value,
    ratio_key,
    unqualified_key,
)

__all__ = [
    "CONTRADICTED",
    "HOLDS",
    "NOT_DECIDED",
    "RULE",
    "SADDLE_RATIO",
    "Claim",
    "batch_size_claims",
    "compare",
    "evaluate_claims",
    "interpolation_claims",
    "training_claims",
    "variant_method",
]

HOLDS = "holds"
CONTRADICTED = "contradicted"
NOT_DECIDED = "not decided"
#: the smallest eigenvalue of a point that is not a saddle: ``λ_min / λ₁`` above this. A convention:
#: the Hessian of a finite sample (and of a ReLU network, whose kinks it does not see) has small
#: negative eigenvalues even at a minimum; a saddle that matters to descent has a negative curvature
#: of the order of the positive ones, so a most negative curvature under a tenth of the largest is
#: counted as none.
SADDLE_RATIO = -0.1
#: robust training methods (the paper's), and the noise baselines (the reviewers')
ROBUST_METHODS = ("fgsm", "fgsm_rs", "pgd", "trades")
NOISE_METHODS = ("gaussian_noise", "uniform_noise")
RULE = (
    "Each line compares two means over seeds (± their sample standard deviations, n = number of seeds). "
    "**holds**: the difference has the direction the paper predicts and is larger than the sum of the two "
    "standard deviations; **contradicted**: as large in the opposite direction; **not decided**: within the seed "
    "spread, or fewer than two seeds on a side. A ratio or correlation is compared with its threshold the same way; "
    "the threshold has no spread, so the mean must be beyond it by more than its one standard deviation "
    f"(λ_min/λ₁ against {SADDLE_RATIO:g}; a correlation against 0)."
)


@dataclass(frozen=True)
class Claim:
    """One tested claim.

    Attributes:
        claim: the paper's claim, in words.
        setting: the runs it is tested on (variant, samples).
        evidence: the deciding numbers, formatted (mean ± std (n) of both sides).
        verdict: :data:`HOLDS`, :data:`CONTRADICTED` or :data:`NOT_DECIDED`.
        numbers: the same numbers, unrounded (``summary.json``).
    """

    claim: str
    setting: str
    evidence: str
    verdict: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None, 0
    std = float(np.std(finite, ddof=1)) if len(finite) >= 2 else None
    return float(np.mean(finite)), std, len(finite)


def compare(a: Sequence[float], b: Sequence[float], expect: str) -> str:
    """The verdict of "``b`` is ``expect`` (``"larger"``/``"smaller"``) than ``a``" by :data:`RULE`.

    Args:
        a: the values (one per seed) of the reference side.
        b: the values of the side the paper makes a prediction about.
        expect: ``"larger"`` or ``"smaller"``.

    Returns:
        The verdict.
    """
    mean_a, std_a, _ = _stats(a)
    mean_b, std_b, _ = _stats(b)
    if mean_a is None or mean_b is None or std_a is None or std_b is None:
        return NOT_DECIDED
    difference = (mean_b - mean_a) * (1 if expect == "larger" else -1)
    spread = std_a + std_b
    if difference > spread:
        return HOLDS
    if difference < -spread:
        return CONTRADICTED
    return NOT_DECIDED


def _threshold_verdict(values: Sequence[float], threshold: float, expect: str) -> str:
    """``values`` (one per seed) are ``expect`` (``"above"``/``"below"``) ``threshold`` by :data:`RULE`."""
    mean, std, _ = _stats(values)
    if mean is None or std is None:
        return NOT_DECIDED
    difference = (mean - threshold) * (1 if expect == "above" else -1)
    if difference > std:
        return HOLDS
    if difference < -std:
        return CONTRADICTED
    return NOT_DECIDED


def _fmt(values: Sequence[float], percent: bool = False) -> str:
    mean, std, n = _stats(values)
    if mean is None:
        return "–"
    scale = 100.0 if percent else 1.0
    if percent:
        text = f"{mean * scale:.2f}%" if std is None else f"{mean * scale:.2f} ± {std * scale:.2f}%"
    else:
        text = f"{mean:.4g}" if std is None else f"{mean:.4g} ± {std:.2g}"
    return f"{text} (n={n})"


def variant_method(variant: str) -> str:
    """The training method of a variant label: its first word (``"fgsm ε=0.1"`` -> ``"fgsm"``)."""
    return variant.split(",", 1)[0].split(" ", 1)[0].strip()


def _values(row: TableRow, key: str) -> list[float]:
    return [v for run in row.runs if (v := column_value(run, key)) is not None and math.isfinite(v)]


def _column(columns: Sequence[Column], base: str, prefer: Sequence[str]) -> Column | None:
    """The column of an unqualified tag (or ratio key) at the first available split of ``prefer``."""
    candidates = [column for column in columns if unqualified_key(column.key) == base]
    for split in prefer:
        for column in candidates:
            if column.split == split:
                return column
    return candidates[0] if candidates else None


def _ends(table: VariantTable, key: str) -> tuple[TableRow, TableRow] | None:
    """The rows of the smallest and the largest known batch size that have values of ``key``."""
    rows = [row for row in table.rows if row.batch_size is not None and _values(row, key)]
    if len(rows) < 2:
        return None
    rows.sort(key=lambda row: row.batch_size or 0)
    return rows[0], rows[-1]


def _pair_claim(
    claim: str, setting: str, key: str, low: TableRow, high: TableRow, expect: str, percent: bool = False
) -> Claim:
    a, b = _values(low, key), _values(high, key)
    verdict = compare(a, b, expect)
    evidence = f"B={low.batch_size}: {_fmt(a, percent)} vs B={high.batch_size}: {_fmt(b, percent)}"
    numbers = {
        "key": key,
        "a": {"batch_size": low.batch_size, "values": a},
        "b": {"batch_size": high.batch_size, "values": b},
    }
    return Claim(claim, setting, evidence, verdict, numbers)


def _chosen_epsilon(
    table: VariantTable, columns: Sequence[Column], attack: str, split: str, low: TableRow
) -> Column | None:
    """The ε column of ``attack`` at ``split`` where the smallest batch keeps closest to half its
    clean accuracy (the most telling ε: not all robust, not all broken).

    Returns:
        That column (of the ties, the smallest ε), or ``None`` when the smallest batch has no
        value at any ε > 0 of ``attack`` at ``split``.
    """
    options = []
    for column in columns:
        if column.split != split:
            continue
        match = ROBUST_ACCURACY_PATTERN.match(parse_split_tag(column.key)[1])
        if match is None or match.group("attack") != attack or (epsilon := epsilon_value(match.group("eps"))) <= 0:
            continue
        values = _values(low, column.key)
        if values:
            options.append((column, float(np.mean(values)), epsilon))
    if not options:
        return None
    # the clean accuracy of the same attacked samples, else the model's accuracy
    clean_key = next((c.key for c in columns if c.split == split and unqualified_key(c.key) == CLEAN_ACC), ACCURACY_KEY)
    clean_values = _values(low, clean_key)
    clean = float(np.mean(clean_values)) if clean_values else 1.0
    return min(options, key=lambda item: (abs(item[1] - clean / 2), item[2]))[0]


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (as Spearman's correlation wants)."""
    array = np.asarray(values, dtype=np.float64)
    order = np.argsort(array, kind="stable")
    ranks = np.empty(len(array))
    ranks[order] = np.arange(1, len(array) + 1)
    for value in np.unique(array):
        tied = array == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation of at least three pairs; ``None`` when either side is constant."""
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


#: (unqualified tag, words) of the context lines under each variant's claims: what a reader needs to
#: weigh the comparison, compared by no rule
_CONTEXT = (
    (TRAIN_LOSS, "the training loss reached: equal losses separate batch size from under-training"),
    (
        STABILITY,
        "λ₁(θ) over the optimizer's stability limit at the last step: near 1 or above, the learning rate holds "
        "λ₁(θ) at the edge of stability",
    ),
)


def _context_claims(table: VariantTable, columns: Sequence[Column]) -> list[Claim]:
    """The :data:`_CONTEXT` lines of one variant: smallest against largest batch, verdict ``"context"``."""
    claims = []
    for base, words in _CONTEXT:
        column = _column(columns, base, ("train", "val", "test"))
        if column is None or (ends := _ends(table, column.key)) is None:
            continue
        low, high = ends
        a, b = _values(low, column.key), _values(high, column.key)
        claims.append(
            Claim(
                f"(Context, not a claim of the paper) {words}",
                f"{table.variant}, {column.split} samples",
                f"B={low.batch_size}: {_fmt(a)} vs B={high.batch_size}: {_fmt(b)}",
                "context",
                {"key": column.key, "a": a, "b": b},
            )
        )
    return claims


def batch_size_claims(table: VariantTable, columns: Sequence[Column]) -> list[Claim]:
    """Claims 1-4 in one variant: its largest batch size against its smallest.

    Args:
        table: the variant's rows.
        columns: the report's columns (they name the splits).

    Returns:
        The claims this variant has the numbers for (none with fewer than two batch sizes).
    """
    claims: list[Claim] = []
    variant = table.variant
    curvature = ("train", "val", "test")
    held_out = ("test", "val", "train")

    for base, words in ((TOP_EIGENVALUE, "top Hessian eigenvalue λ₁(θ)"), (TRACE, "Hessian trace")):
        column = _column(columns, base, curvature)
        if column is not None and (ends := _ends(table, column.key)) is not None:
            claims.append(
                _pair_claim(
                    f"Large batches converge to points of larger curvature: {words}",
                    f"{variant}, {column.split} samples",
                    column.key,
                    *ends,
                    "larger",
                )
            )

    ratio = _column(columns, ratio_key(EIG_MIN, TOP_EIGENVALUE), curvature)
    if ratio is not None and (ends := _ends(table, ratio.key)) is not None:
        low, high = ends
        values = _values(high, ratio.key)
        verdict = _threshold_verdict(values, SADDLE_RATIO, "above")
        eig_min = _column(columns, EIG_MIN, curvature)
        extra = "" if eig_min is None else f"; λ_min {_fmt(_values(high, eig_min.key))}"
        claims.append(
            Claim(
                "Large-batch training does not end at saddle points: λ_min/λ₁ above "
                f"{SADDLE_RATIO:g} at the largest batch",
                f"{variant}, {ratio.split} samples",
                f"B={high.batch_size}: λ_min/λ₁ {_fmt(values)}{extra}"
                f" (B={low.batch_size}: {_fmt(_values(low, ratio.key))})",
                verdict,
                {"key": ratio.key, "threshold": SADDLE_RATIO, "batch_size": high.batch_size, "values": values},
            )
        )

    accuracy = next((c for c in columns if c.key == ACCURACY_KEY), None)
    if accuracy is not None and (ends := _ends(table, ACCURACY_KEY)) is not None:
        claims.append(
            _pair_claim("Large batches generalise worse: lower accuracy", f"{variant}, {accuracy.split} samples",
                        ACCURACY_KEY, *ends, "smaller", percent=True)
        )  # fmt: skip

    robust_keys: dict[str, str] = {}
    for attack in ("fgsm", "linf_pgd", "l2_pgd"):
        for split in held_out:
            first = next(
                (
                    c
                    for c in columns
                    if c.split == split
                    and (m := ROBUST_ACCURACY_PATTERN.match(parse_split_tag(c.key)[1]))
                    and m.group("attack") == attack
                ),
                None,
            )
            if first is None:
                continue
            ends = _ends(table, first.key)
            if ends is None:
                continue
            column = _chosen_epsilon(table, columns, attack, split, ends[0])
            if column is None or (ends := _ends(table, column.key)) is None:
                continue
            eps = ROBUST_ACCURACY_PATTERN.match(parse_split_tag(column.key)[1]).group("eps")  # type: ignore[union-attr]
            claims.append(
                _pair_claim(
                    f"Large-batch models are less robust: {attack} accuracy at ε={eps}",
                    f"{variant}, {split} samples",
                    column.key,
                    *ends,
                    "smaller",
                    percent=True,
                )
            )
            robust_keys[attack] = column.key
            break
    # the correlation uses the strongest attack measured: PGD, else FGSM
    robust_key = robust_keys.get("linf_pgd") or robust_keys.get("fgsm") or robust_keys.get("l2_pgd")
    for column in columns:
        match = MEDIAN_NORM_PATTERN.match(parse_split_tag(column.key)[1])
        if match is not None and (ends := _ends(table, column.key)) is not None:
            claims.append(
                _pair_claim(f"Large-batch models are less robust: {match.group('attack')} median minimal ‖δ‖₂",
                            f"{variant}, {column.split} samples", column.key, *ends, "smaller")
            )  # fmt: skip

    for base, words in ((INPUT_EIG_1, "input-space curvature λ₁(x)"), (INPUT_GRAD_NORM, "input-gradient norm ‖∇ₓJ‖")):
        column = _column(columns, base, held_out)
        if column is not None and (ends := _ends(table, column.key)) is not None:
            claims.append(
                _pair_claim(
                    f"Large batches have a larger {words}",
                    f"{variant}, {column.split} samples",
                    column.key,
                    *ends,
                    "larger",
                )
            )
    input_column = _column(columns, INPUT_EIG_1, held_out)
    if input_column is not None and robust_key is not None:
        by_seed: dict[int | None, tuple[list[float], list[float]]] = {}
        for row in table.rows:
            for run in row.runs:
                x, y = column_value(run, input_column.key), column_value(run, robust_key)
                if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                    by_seed.setdefault(run.seed, ([], []))
                    by_seed[run.seed][0].append(x)
                    by_seed[run.seed][1].append(y)
        rhos = [rho for xs, ys in by_seed.values() if (rho := _spearman(xs, ys)) is not None]
        if rhos:
            claims.append(
                Claim(
                    "Higher input-space curvature goes with lower robustness: Spearman ρ(λ₁(x), robust accuracy) "
                    "across batch sizes < 0",
                    f"{variant}, {input_column.split} samples; robust accuracy `{robust_key}`",
                    f"ρ per seed {_fmt(rhos)}",
                    _threshold_verdict(rhos, 0.0, "below"),
                    {"x": input_column.key, "y": robust_key, "values": rhos},
                )
            )

    if claims:
        claims += _context_claims(table, columns)
    return claims


def training_claims(tables: Sequence[VariantTable], columns: Sequence[Column]) -> list[Claim]:
    """Claim 5: every robustly (or noise-) trained variant against standard training at the same batch size.

    Args:
        tables: all variants' tables; the one named ``"standard"`` is the reference.
        columns: the report's columns.

    Returns:
        One claim per (variant, batch size, quantity) with numbers on both sides.
    """
    reference = next((t for t in tables if t.variant == STANDARD_VARIANT), None)
    if reference is None:
        return []
    rows = {row.batch_size: row for row in reference.rows}
    claims = []
    for table in tables:
        method = variant_method(table.variant)
        if method in ROBUST_METHODS:
            who = f"Robust training ({table.variant})"
        elif method in NOISE_METHODS:
            who = f"Noise training, the baseline ({table.variant})"
        else:
            continue
        for row in table.rows:
            standard = rows.get(row.batch_size)
            if standard is None:
                continue
            for base, words, prefer in (
                (TOP_EIGENVALUE, "λ₁(θ)", ("train", "val", "test")),
                (INPUT_EIG_1, "λ₁(x)", ("test", "val", "train")),
            ):
                column = _column(columns, base, prefer)
                if column is None:
                    continue
                a, b = _values(standard, column.key), _values(row, column.key)
                if not a or not b:
                    continue
                claims.append(
                    Claim(
                        f"{who} finds flatter points than standard training: lower {words}",
                        f"B={row.batch_size}, {column.split} samples",
                        f"standard: {_fmt(a)} vs {table.variant}: {_fmt(b)}",
                        compare(a, b, "smaller"),
                        {"key": column.key, "batch_size": row.batch_size, "standard": a, "variant": b},
                    )
                )
    return claims


def interpolation_claims(interpolations: Sequence[Interpolation]) -> list[Claim]:
    """Claim 6: the top eigenvalue at the two ends of each interpolated pair, over seeds.

    A pair of one variant at two batch sizes: the larger-batch end should be sharper. A pair of
    standard and robust (or noise) training at one batch size: the robust end should be flatter.

    Args:
        interpolations: the study's interpolations with their runs matched.

    Returns:
        One claim per pair with top eigenvalues at both ends.
    """
    claims = []
    for title, items in group_interpolations(interpolations).items():
        a_values = [v for item in items if (v := item.at(item.top_eigenvalue, 0.0)) is not None]
        b_values = [v for item in items if (v := item.at(item.top_eigenvalue, 1.0)) is not None]
        first = items[0]
        if not a_values or not b_values or first.run_a is None or first.run_b is None:
            continue
        a, b = first.run_a, first.run_b
        if (
            a.variant == b.variant
            and a.batch_size is not None
            and b.batch_size is not None
            and a.batch_size != b.batch_size
        ):
            claim = "Model interpolation: the large-batch end is sharper (larger λ₁ at its end of θ(α))"
            expect = "larger" if b.batch_size > a.batch_size else "smaller"
        elif a.batch_size == b.batch_size and {variant_method(a.variant), variant_method(b.variant)} & {
            *ROBUST_METHODS,
            *NOISE_METHODS,
        }:
            trained_b = variant_method(b.variant) in (*ROBUST_METHODS, *NOISE_METHODS)
            claim = "Model interpolation: the robustly trained end is flatter (smaller λ₁ at its end of θ(α))"
            expect = "smaller" if trained_b else "larger"
        else:
            continue
        split = first.eigenvalue_split or "?"
        claims.append(
            Claim(
                claim,
                f"{title}, {split} samples",
                f"α=0 ({first.labels[0]}): {_fmt(a_values)} vs α=1 ({first.labels[1]}): {_fmt(b_values)}",
                compare(a_values, b_values, expect),
                {"pair": title, "alpha_0": a_values, "alpha_1": b_values, "expect_alpha_1": expect},
            )
        )
    return claims


def evaluate_claims(
    tables: Sequence[VariantTable], columns: Sequence[Column], interpolations: Sequence[Interpolation] = ()
) -> list[Claim]:
    """All claims: per variant (batch size), robust against standard training, interpolations.

    Args:
        tables: the report's tables.
        columns: the report's columns.
        interpolations: the study's interpolations.

    Returns:
        The claims in that order.
    """
    claims: list[Claim] = []
    for table in tables:
        claims += batch_size_claims(table, columns)
    claims += training_claims(tables, columns)
    claims += interpolation_claims(interpolations)
    return claims
