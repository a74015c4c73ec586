"""The adversarial robustness figures of ``hessian-report``: robust accuracy against epsilon and the
median minimal perturbation norms against batch size.

The conventions and shared helpers are those of :mod:`lightning_hessian.report.figures`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from lightning_hessian.attacks.specs import ATTACKS
from lightning_hessian.metrics import CLEAN_ACC, MEDIAN_NORM_PATTERN, ROBUST_ACCURACY_PATTERN, parse_split_tag
from lightning_hessian.report.figures import (
    FigureFile,
    _batch_axis,
    _batch_size_colors,
    _batch_size_label,
    _figure_legend,
    _final_values,
    _grid,
    _group,
    _save,
    _seed_mean_curve,
    _sorted_batch_sizes,
    _split_phrase,
    use_log_scale,
)
from lightning_hessian.report.runs import Run
from lightning_hessian.report.tables import epsilon_value

__all__ = ["plot_median_norms_vs_batch_size", "plot_robust_accuracy_vs_epsilon"]

CLEAN_ACCURACY_TAG = CLEAN_ACC
# the norm symbol of each attack's epsilon and perturbation
_NORM_SYMBOL = {"linf": "‖δ‖∞", "l2": "‖δ‖₂"}


def _norm_of(attack: str) -> str:
    """``‖δ‖∞`` or ``‖δ‖₂`` for a known attack, ``‖δ‖`` for one this version does not know."""
    info = ATTACKS.get(attack)
    return "‖δ‖" if info is None else _NORM_SYMBOL[info.norm]


def plot_robust_accuracy_vs_epsilon(runs: Sequence[Run], out_dir: Path) -> FigureFile | None:
    """Robust accuracy against epsilon: a panel per (variant, attack, split), a curve per batch size.

    A row per variant, a column per (attack, split).

    The clean accuracy (``robust/clean_acc`` at the same split) is drawn at epsilon 0 when the
    attack has no ``eps_0`` tag of its own. All panels share the y axis (0-100 %).

    Returns:
        The figure (``robust_accuracy_vs_epsilon.png``), or ``None`` when no run logged a robust
        accuracy ``robust/[SPLIT/]ATTACK/eps_E``.
    """
    panels = []
    for variant, by_batch in _group(runs).items():
        members = [run for batch_runs in by_batch.values() for run in batch_runs]
        tags = {tag for run in members for tag in run.events.scalars}
        by_key: dict[tuple[str, str], list[tuple[str, float]]] = defaultdict(list)
        clean: dict[str, str] = {}
        for tag in tags:
            split, base = parse_split_tag(tag)
            label = split or "/".join(sorted({run.fit_splits.get("robust", "val") for run in members}))
            if base == CLEAN_ACC:
                clean[label] = tag
            match = ROBUST_ACCURACY_PATTERN.match(base)
            if match is not None and math.isfinite(value := epsilon_value(match.group("eps"))):
                by_key[(match.group("attack"), label)].append((tag, value))
        for (attack, label), tag_eps in sorted(by_key.items()):
            panels.append((variant, attack, label, by_batch, sorted(tag_eps, key=lambda t: t[1]), clean.get(label)))
    if not panels:
        return None
    # a row per variant and a column per (attack, split), so that a column compares one attack across
    # trainings; a cell is left empty where a variant lacks that attack
    variants = list(dict.fromkeys(panel[0] for panel in panels))
    attacks = sorted({(panel[1], panel[2]) for panel in panels})
    figure, grid = _grid(len(variants) * len(attacks), sharey=True, max_columns=len(attacks))
    cells = [variants.index(panel[0]) * len(attacks) + attacks.index((panel[1], panel[2])) for panel in panels]
    for index, ax in enumerate(grid):
        ax.set_visible(index in cells)
    axes = [grid[cell] for cell in cells]
    colors = _batch_size_colors([b for panel in panels for b in panel[3]])
    for ax, (variant, attack, label, by_batch, tag_eps, clean_tag) in zip(axes, panels, strict=True):
        has_zero = any(eps == 0 for _, eps in tag_eps)
        series = list(tag_eps) if has_zero or clean_tag is None else [(clean_tag, 0.0), *tag_eps]
        for batch_size in _sorted_batch_sizes(list(by_batch)):
            xs, means, stds = _seed_mean_curve(
                ((epsilon, _final_values(by_batch[batch_size], tag)) for tag, epsilon in series), scale=100.0
            )
            if xs:
                ax.errorbar(
                    xs, means, yerr=stds, marker="o", markersize=4, capsize=3,
                    color=colors[batch_size], label=_batch_size_label(batch_size),
                )  # fmt: skip
        ax.set_title(f"{variant} training\n{attack}, {label} samples")
        ax.set_xlabel(f"ε  ({_norm_of(attack)} ≤ ε)")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    _figure_legend(figure, axes)
    file_name = "robust_accuracy_vs_epsilon.png"
    _save(figure, out_dir, file_name)
    return FigureFile(
        file_name,
        "Robust accuracy vs ε",
        f"Final `robust/[SPLIT/]ATTACK/eps_E` on {_split_phrase([p[2] for p in panels])} (and the clean accuracy of "
        "the attacked samples at ε=0), mean ± std over seeds; each panel names the split of the attacked samples "
        "(test: `hessian-train test` on the last checkpoint) and its x axis the norm ε bounds (L∞ for FGSM and "
        "`linf_*`, L2 for `l2_*`) in the units of the model's input (pixels in [0, 1] for this project's datasets).",
    )


def plot_median_norms_vs_batch_size(runs: Sequence[Run], out_dir: Path) -> FigureFile | None:
    """Median minimal perturbation norms (DeepFool, CW) against batch size: a panel per (attack,
    split), a line per training variant.

    Returns:
        The figure (``median_norms_vs_batch_size.png``), or ``None`` when no run logged
        ``robust/[SPLIT/]ATTACK/median_norm`` or no run has a known batch size.
    """
    keys: dict[tuple[str, str], dict[Path, str]] = defaultdict(dict)
    for run in runs:
        for tag in run.events.scalars:
            named_split, base = parse_split_tag(tag)
            if (match := MEDIAN_NORM_PATTERN.match(base)) is not None:
                keys[(match.group("attack"), named_split or run.fit_splits.get("robust", "val"))][run.path] = tag
    known = [run for run in runs if run.batch_size is not None]
    if not keys or not known:
        return None
    grouped = _group(known)
    figure, axes = _grid(len(keys))
    for ax, ((attack, split), tag_of) in zip(axes, sorted(keys.items()), strict=True):
        panel_values: list[float] = []
        for position, (variant, by_batch) in enumerate(grouped.items()):
            xs, means, stds = _seed_mean_curve(
                (batch_size, [
                    v for run in by_batch[batch_size]
                    if run.path in tag_of and (v := run.events.final(tag_of[run.path])) is not None and math.isfinite(v)
                ])
                for batch_size in sorted(b for b in by_batch if b is not None)
            )  # fmt: skip
            if xs:
                panel_values += means
                ax.errorbar(
                    xs, means, yerr=stds, marker="o", markersize=4, capsize=3, color=f"C{position % 10}", label=variant
                )
        _batch_axis(ax, [run.batch_size for run in known])
        if use_log_scale(panel_values):
            ax.set_yscale("log")
        ax.set_title(f"{attack}, {split} samples")
        ax.set_ylabel(f"median minimal {_norm_of(attack)}")
        ax.grid(alpha=0.3, which="both")
    _figure_legend(figure, axes)
    file_name = "median_norms_vs_batch_size.png"
    _save(figure, out_dir, file_name)
    return FigureFile(
        file_name,
        "Median minimal adversarial perturbation vs batch size",
        f"Final `robust/[SPLIT/]ATTACK/median_norm` on {_split_phrase([split for _, split in keys])} (DeepFool, "
        "Carlini-Wagner: the median over the attacked samples of the smallest perturbation found, 0 for "
        "misclassified samples), in the attack's norm (L2 for `l2_*`, L∞ for `linf_*`) and the units of the model's "
        "input (pixels in [0, 1] for this project's datasets), mean ± std over seeds; larger is more robust; each "
        "panel names its split.",
    )
