"""Building the report: the paper's tables and figures from finished runs (``hessian-report``,
:mod:`lightning_hessian.cli.report`, is a thin layer over :func:`build_report`).

:func:`build_report` finds every run directory below the given paths (any directory with
TensorBoard event files), reads the logged tags (see :mod:`lightning_hessian.report.tables` for
which), groups runs by training variant and batch size (see :mod:`lightning_hessian.report.runs`),
and writes into ``out_dir``:

* ``report.md`` and ``report.html``: the paper's claims judged from the numbers
  (:mod:`lightning_hessian.report.claims`), the tables (mean ± std over seeds, every column naming
  the split of its samples; :mod:`lightning_hessian.report.tables`) and the figures;
* PNG figures (:mod:`lightning_hessian.report.figures`, :mod:`~lightning_hessian.report.spectrum_figures`,
  :mod:`~lightning_hessian.report.robustness_figures`, :mod:`~lightning_hessian.report.landscape_figures`):
  training loss and accuracy, the final metrics (accuracy and curvature) and median perturbation
  norms vs batch size, the final metrics vs the softplus sharpness β (softplus networks), top
  eigenvalue vs epoch, top-k spectrum per batch size, spectral densities overlaid, robust accuracy
  vs epsilon, loss along the top eigenvector and 2-D surfaces (smallest and largest batch), model
  interpolations (each only when some run logged what it needs);
* ``summary.json`` (the tables' unrounded numbers, the claims with their numbers, the columns and
  the interpolations) and ``runs.csv`` (final value of every tag of every run).

Besides the event files it reads the runs' landscape grids and the ``interpolation.json`` files of
``hessian-landscape interpolate`` below the given paths (:mod:`lightning_hessian.report.artifacts`).

Runs whose ``sweep.json`` says they did not finish are skipped unless ``include_unfinished``.
A truncated or corrupt event file is reported (a warning naming the file, and a list in the report)
and read up to the damage; a run with nothing readable is skipped with the reason.
``min_accuracy`` (percent) also leaves out runs whose final accuracy (``test/acc``, else
``val/acc``) is below it: runs that diverged to chance accuracy would otherwise swamp the means of
their batch size. Every left-out run is listed in the report with the reason.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_hessian.errors import UserInputError
from lightning_hessian.report.artifacts import find_interpolations
from lightning_hessian.report.claims import evaluate_claims
from lightning_hessian.report.events import find_run_dirs
from lightning_hessian.report.figures import (
    FigureFile,
    plot_metrics_vs_batch_size,
    plot_metrics_vs_softplus_beta,
    plot_training_vs_batch_size,
)
from lightning_hessian.report.landscape_figures import plot_interpolations, plot_landscapes
from lightning_hessian.report.render import (
    ReportContent,
    render_html,
    render_markdown,
    write_runs_csv,
    write_summary_json,
)
from lightning_hessian.report.robustness_figures import plot_median_norms_vs_batch_size, plot_robust_accuracy_vs_epsilon
from lightning_hessian.report.runs import Run, load_run
from lightning_hessian.report.spectrum_figures import (
    plot_spectral_density,
    plot_spectrum_vs_batch_size,
    plot_top_eigenvalue_vs_epoch,
    plot_topk_spectrum,
)
from lightning_hessian.report.tables import report_columns, run_accuracy, summarize_runs
from lightning_hessian.sweep.records import SWEEP_FILE

__all__ = ["build_report", "load_runs"]

# (function, what a run must log for it): tried in this order, each may find nothing to draw.
# Each takes (runs, out_dir) and, where named, the report's columns or interpolations.
# The calls differ by what is named, so the functions are typed by their result only.
_Drawn = FigureFile | list[FigureFile] | None
_FIGURES: tuple[tuple[Callable[..., _Drawn], str | None, str], ...] = (
    (plot_training_vs_batch_size, "columns",
     "training vs batch size: no run with a known batch size logged an accuracy or training loss"),
    (plot_metrics_vs_batch_size, "columns",
     "metrics vs batch size: no run with a known batch size logged an accuracy, `hessian/*` or "
     "`landscape/sharpness`"),
    (plot_metrics_vs_softplus_beta, "columns",
     "metrics vs softplus β: no run with a known batch size has a softplus activation (`model.activation`)"),
    (plot_top_eigenvalue_vs_epoch, None, "top eigenvalue vs epoch: no run logged `hessian/eig_1`"),
    (plot_spectrum_vs_batch_size, None,
     "spectrum vs batch size: no run with a known batch size logged `hessian/eig_k`"),
    (plot_topk_spectrum, None, "top-k spectrum: no run logged two or more eigenvalues `hessian/eig_k`"),
    (plot_spectral_density, None,
     "spectral density: no run logged a density (spectrum callback with density enabled)"),
    (plot_robust_accuracy_vs_epsilon, None, "robust accuracy vs ε: no run logged `robust/ATTACK/eps_E`"),
    (plot_median_norms_vs_batch_size, None,
     "median perturbation norms: no run logged `robust/ATTACK/median_norm` (DeepFool, CW)"),
    (plot_landscapes, None, "loss landscapes: no run wrote landscape grids (`.npz`)"),
    (plot_interpolations, "interpolations",
     "model interpolation: no `interpolation.json` (hessian-landscape interpolate) below the given paths"),
)  # fmt: skip


def load_runs(
    paths: Sequence[str | Path], *, include_unfinished: bool = False, min_accuracy: float | None = None
) -> tuple[list[Run], list[tuple[Path, str]]]:
    """The runs below ``paths`` and the ones skipped with the reason.

    Args:
        paths: run directories or folders containing them.
        include_unfinished: keep runs whose ``sweep.json`` says failed/running.
        min_accuracy: leave out runs whose final accuracy in percent (``test/acc``, else
            ``val/acc``) is below this; runs that logged neither are kept.

    A path that does not exist raises :class:`~lightning_hessian.errors.InputNotFoundError` (a
    ``FileNotFoundError``, from :func:`~lightning_hessian.report.events.find_run_dirs`).

    Returns:
        ``(runs, skipped)``: the runs to report, and ``(run directory, reason)`` of every run left
        out (no event files, unfinished, nothing readable, no scalars, below ``min_accuracy``).

    Raises:
        UserInputError: no run directory was found, or ``min_accuracy`` is not in [0, 100] (a
            ``ValueError``).
    """
    if min_accuracy is not None and not 0 <= min_accuracy <= 100:
        raise UserInputError(f"min_accuracy is a percentage in [0, 100], got {min_accuracy}; for 30% pass 30, not 0.3")
    run_dirs = find_run_dirs(paths)
    skipped: list[tuple[Path, str]] = []
    # Sweep runs that failed before logging anything have a sweep.json but no event files.
    for path in map(Path, paths):
        for sweep_file in sorted(path.rglob(SWEEP_FILE)) if path.is_dir() else []:
            directory = sweep_file.parent.resolve()
            hidden = any(part.startswith(".") for part in sweep_file.parent.relative_to(path).parts)
            if directory not in run_dirs and not hidden:
                status = load_run(directory, read=False).status
                skipped.append((directory, f"sweep.json status is {status!r}, no event files"))
    if not run_dirs and not skipped:
        raise UserInputError(
            f"No TensorBoard event files found under {[str(p) for p in paths]}. Pass run directories "
            "(for example runs/sweeps/NAME or lightning_logs/version_0) or folders containing them."
        )
    runs = []
    for run_dir in run_dirs:
        run = load_run(run_dir, read=False)
        if not run.finished and not include_unfinished:
            skipped.append((run_dir, f"sweep.json status is {run.status!r} (use --include-unfinished)"))
            continue
        run = load_run(run_dir)
        if run.events.problems and not run.events.scalars:
            skipped.append((run_dir, "nothing readable: " + "; ".join(run.events.problems)))
            continue
        if not run.events.scalars:  # e.g. a run that failed before its first logged step
            skipped.append((run_dir, "no scalars logged (the run stopped before training?)"))
            continue
        accuracy, tag = run_accuracy(run)
        if min_accuracy is not None and accuracy is not None and 100 * accuracy < min_accuracy:
            skipped.append(
                (run_dir, f"{tag} {100 * accuracy:.2f}% is below --min-accuracy {min_accuracy:g}% (did not train)")
            )
            continue
        runs.append(run)
    return runs, skipped


def build_report(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    title: str = "Hessian analysis report",
    include_unfinished: bool = False,
    min_accuracy: float | None = None,
    command: str | None = None,
) -> ReportContent:
    """Read the runs below ``paths`` and write the report files into ``out_dir`` (``include_unfinished``
    and ``min_accuracy`` as in :func:`load_runs`).

    Returns:
        What the report holds: the runs, tables, figures, claims, the skipped runs and the figures
        that had nothing to draw.

    Raises:
        UserInputError: every run found was skipped (the message lists the reasons), or as in
            :func:`load_runs`.
    """
    runs, skipped = load_runs(paths, include_unfinished=include_unfinished, min_accuracy=min_accuracy)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not runs:
        reasons = "; ".join(f"{path}: {why}" for path, why in skipped)
        raise UserInputError(f"all {len(skipped)} runs found were skipped: {reasons}")
    columns = report_columns(runs)
    tables = summarize_runs(runs)
    interpolations = find_interpolations(paths, runs)
    figures: list[FigureFile] = []
    missing: list[str] = []
    for plot, needs, missing_note in _FIGURES:
        if needs == "columns":
            written = plot(runs, out, columns)
        elif needs == "interpolations":
            written = plot(interpolations, out)
        else:
            written = plot(runs, out)
        if written is None:
            missing.append(missing_note)
        else:
            figures.extend(written if isinstance(written, list) else [written])
    content = ReportContent(
        title=title,
        command=command or "hessian-report " + " ".join(shlex.quote(str(p)) for p in paths),
        runs=runs,
        tables=tables,
        figures=figures,
        missing=missing,
        skipped=skipped,
        damaged=[problem for run in runs for problem in run.events.problems],
        columns=columns,
        claims=evaluate_claims(tables, columns, interpolations),
        interpolations=interpolations,
    )
    (out / "report.md").write_text(render_markdown(content))
    (out / "report.html").write_text(render_html(content))
    write_summary_json(content, out / "summary.json")
    write_runs_csv(runs, out / "runs.csv")
    return content
