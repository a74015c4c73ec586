"""``hessian-report``: the paper's tables and figures from finished runs.

(Also ``python -m lightning_hessian.cli.report``.) Usage::

    hessian-report runs/sweeps/fashion_mnist_bs128 runs/sweeps/fashion_mnist_bs128-fgsm --out report/

A thin layer over :func:`lightning_hessian.report.build_report` (:mod:`lightning_hessian.report`
says what is read and written). Prints what it wrote, how many of the paper's claims hold, are
contradicted or are not decided, and which figures had nothing to draw;
a damaged event file is one warning line ``hessian-report: warning: ...``. Exit status 0, or 2
with one line ``hessian-report: error: ...`` for bad input (a missing path, no runs).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from lightning_hessian.errors import format_user_error, run_console_script
from lightning_hessian.report.build import build_report
from lightning_hessian.report.events import DamagedEventFileWarning

__all__ = ["main"]


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
    """Entry point of the ``hessian-report`` console script.

    Returns:
        The exit status: 0, or 2 with one line ``hessian-report: error: ...`` for bad input (a
        missing path, no runs).
    """
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
                    # a recorded message is the Warning instance (warnings.warn makes one of a str)
                    message = warning.message
                    if not isinstance(message, Warning):
                        message = warning.category(message)
                    print(f"hessian-report: warning: {format_user_error(message)}", file=sys.stderr)
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    out = Path(arguments.out)
    print(
        f"Read {len(content.runs)} runs ({len(content.skipped)} skipped);"
        f" wrote {out / 'report.md'}, {out / 'report.html'}"
    )
    if content.claims:
        verdicts = Counter(claim.verdict for claim in content.claims)
        print(
            "  claims of the paper: " + ", ".join(f"{count} {verdict}" for verdict, count in sorted(verdicts.items()))
        )
    for item in content.missing:
        print(f"  not drawn: {item}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
