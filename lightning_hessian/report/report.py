"""``hessian-report``: the paper's tables and figures from finished runs.

Usage::

    hessian-report runs/sweeps/fashion_mnist_bs128 runs/sweeps/fashion_mnist_bs128-fgsm --out report/

finds every run directory below the given paths (any directory with TensorBoard event files),
reads the logged tags (see :mod:`lightning_hessian.report.tables` for which), groups runs by
training variant and batch size (see :mod:`lightning_hessian.report.runs`), and writes into
``--out``:

* ``report.md`` and ``report.html``: the table (mean ± std over seeds) and the figures;
* PNG figures: top eigenvalue vs epoch, final spectrum vs batch size, spectral densities, robust
  accuracy vs epsilon, loss landscapes (each only when some run logged what it needs);
* ``summary.json`` (the table's unrounded numbers) and ``runs.csv`` (final value of every tag of
  every run).

Runs whose ``sweep.json`` says they did not finish are skipped unless ``--include-unfinished``.
A truncated or corrupt event file is reported (a warning naming the file, and a list in the report)
and read up to the damage; a run with nothing readable is skipped with the reason.
``--min-accuracy PERCENT`` also leaves out runs whose final accuracy (``test/acc``, else
``val/acc``) is below it: runs that diverged to chance accuracy would otherwise swamp the means of
their batch size. Every left-out run is listed in the report with the reason.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from lightning_hessian.errors import UserInputError, format_user_error, run_console_script
from lightning_hessian.report import figures as figure_module
from lightning_hessian.report.events import DamagedEventFileWarning, find_run_dirs
from lightning_hessian.report.render import (
    ReportContent,
    render_html,
    render_markdown,
    write_runs_csv,
    write_summary_json,
)
from lightning_hessian.report.runs import SWEEP_FILE, Run, load_run
from lightning_hessian.report.tables import run_accuracy, summarize_runs

__all__ = ["build_report", "load_runs", "main"]

# (function, what a run must log for it): tried in this order, each may find nothing to draw.
_FIGURES = (
    (figure_module.plot_metrics_vs_batch_size, "metrics vs batch size: no run with a known batch size logged a metric"),
    (figure_module.plot_top_eigenvalue_vs_epoch, "top eigenvalue vs epoch: no run logged `hessian/eig_1`"),
    (figure_module.plot_spectrum_vs_batch_size, "spectrum vs batch size: no run with a known batch size logged `hessian/eig_k`"),
    (figure_module.plot_spectral_density, "spectral density: no run logged a density (spectrum callback with density enabled)"),
    (figure_module.plot_robust_accuracy_vs_epsilon, "robust accuracy vs ε: no run logged `robust/ATTACK/eps_E`"),
    (figure_module.plot_landscapes, "loss landscapes: no run wrote landscape grids (`.npz`)"),
)


def load_runs(
    paths: Sequence[str | Path], *, include_unfinished: bool = False, min_accuracy: float | None = None
) -> tuple[list[Run], list[tuple[Path, str]]]:
    """The runs below ``paths`` and the ones skipped with the reason.

    Args:
        paths: run directories or folders containing them.
        include_unfinished: keep runs whose ``sweep.json`` says failed/running.
        min_accuracy: leave out runs whose final accuracy in percent (``test/acc``, else
            ``val/acc``) is below this; runs that logged neither are kept.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no run directory was found, or ``min_accuracy`` is not in [0, 100].
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
            skipped.append((run_dir, f"{tag} {100 * accuracy:.2f}% is below --min-accuracy {min_accuracy:g}% (did not train)"))
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
    and ``min_accuracy`` as in :func:`load_runs`)."""
    runs, skipped = load_runs(paths, include_unfinished=include_unfinished, min_accuracy=min_accuracy)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not runs:
        reasons = "; ".join(f"{path}: {why}" for path, why in skipped)
        raise UserInputError(f"all {len(skipped)} runs found were skipped: {reasons}")
    figures, missing = [], []
    for plot, missing_note in _FIGURES:
        written = plot(runs, out)
        if written is None:
            missing.append(missing_note)
        else:
            figures.extend(written if isinstance(written, list) else [written])
    content = ReportContent(
        title=title,
        command=command or "hessian-report " + " ".join(shlex.quote(str(p)) for p in paths),
        runs=runs,
        tables=summarize_runs(runs),
        figures=figures,
        missing=missing,
        skipped=skipped,
        damaged=[problem for run in runs for problem in run.events.problems],
    )
    (out / "report.md").write_text(render_markdown(content))
    (out / "report.html").write_text(render_html(content))
    write_summary_json(content, out / "summary.json")
    write_runs_csv(runs, out / "runs.csv")
    return content


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessian-report",
        description="Tables and figures of the Hessian analysis (Yao et al. 2018) from TensorBoard runs.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories or folders containing them")
    parser.add_argument("--out", default="report", help="output directory (default: report/)")
    parser.add_argument("--title", default="Hessian analysis report", help="report title")
    parser.add_argument(
        "--include-unfinished", action="store_true", help="also report runs whose sweep.json says failed/running"
    )
    parser.add_argument(
        "--min-accuracy",
        type=float,
        metavar="PERCENT",
        help="leave out (and list) runs whose final test/acc, else val/acc, is below PERCENT, e.g. 30 for "
        "runs that diverged to chance accuracy (default: keep all)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hessian-report`` console script: 0, or 2 with one line
    ``hessian-report: error: ...`` for bad input (a missing path, no runs)."""
    return run_console_script("hessian-report", lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: Sequence[str]) -> int:
    arguments = _parser().parse_args(argv)
    command = "hessian-report " + " ".join(shlex.quote(a) for a in argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DamagedEventFileWarning)
        try:
            content = build_report(
                arguments.run_dirs,
                arguments.out,
                title=arguments.title,
                include_unfinished=arguments.include_unfinished,
                min_accuracy=arguments.min_accuracy,
                command=command,
            )
        finally:
            for warning in caught:  # the damaged event files, one line each; other warnings as usual
                if issubclass(warning.category, DamagedEventFileWarning):
                    print(f"hessian-report: warning: {format_user_error(warning.message)}", file=sys.stderr)
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    out = Path(arguments.out)
    print(f"Read {len(content.runs)} runs ({len(content.skipped)} skipped); wrote {out / 'report.md'}, {out / 'report.html'}")
    for item in content.missing:
        print(f"  not drawn: {item}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
