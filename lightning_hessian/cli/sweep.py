"""``hessian-sweep``: one ``hessian-train fit`` (and ``test``) per batch size and seed.

(Also ``python -m lightning_hessian.cli.sweep``.) Usage::

    hessian-sweep --config configs/fashion_mnist_bs128.yaml --batch-sizes 64 256 1024 --seeds 0 1 2
    hessian-sweep --config configs/fashion_mnist_bs128.yaml --batch-sizes 64 1024 --seeds 0 \\
        --set model.adversarial.method=fgsm --set model.adversarial.epsilon=0.1
    hessian-sweep ... -- --trainer.max_epochs 5      # everything after ``--`` goes to hessian-train

The command line becomes a :class:`~lightning_hessian.sweep.SweepSettings` and
:func:`~lightning_hessian.sweep.run_sweep` runs it (:mod:`lightning_hessian.sweep` says how: run
directories, ``sweep.json``, skipping finished runs, resuming interrupted ones, one writer per
directory, signals). The exit
status is 0 when every run finished (or had finished before), 1 when one failed or was refused
(its directory in use), 130 when interrupted (Ctrl-C, SIGTERM), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from collections.abc import Sequence

from lightning_hessian.errors import run_console_script
from lightning_hessian.sweep import DEFAULT_TRAIN_COMMAND, SweepSettings, run_sweep, stop_on_signal

__all__ = ["main", "settings_from_args"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessian-sweep",
        description="Run hessian-train fit (and test) once per batch size and seed, one run after the other.",
        epilog="Arguments after `--` are passed to every hessian-train call, e.g. `-- --trainer.max_epochs 5`.",
    )
    parser.add_argument("--config", action="append", required=True, help="hessian-train config (repeatable, in order)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", required=True, metavar="B", help="global batch sizes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S", help="seeds (default: 0)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="hessian-train setting for every run, e.g. model.adversarial.method=fgsm (repeatable)",
    )  # fmt: skip
    parser.add_argument("--name", help="sweep name (default: config name plus the --set values)")
    parser.add_argument("--root", default="runs/sweeps", help="directory of sweeps (default: runs/sweeps)")
    parser.add_argument("--variant", help="training-variant label for hessian-report (default: from the config)")
    parser.add_argument("--no-test", action="store_true", help="do not run hessian-train test after fit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--echo", action="store_true", help="also print the runs' output (always in train.log)")
    parser.add_argument(
        "--restart", action="store_true",
        help="start interrupted runs again from the beginning (default: continue them from their last checkpoint)",
    )  # fmt: skip
    parser.add_argument(
        "--train-command", default=shlex.join(DEFAULT_TRAIN_COMMAND),
        help="command that starts hessian-train (default: %(default)s)",
    )  # fmt: skip
    return parser


def settings_from_args(argv: Sequence[str]) -> tuple[SweepSettings, argparse.Namespace]:
    """Parse a ``hessian-sweep`` command line (``--`` separates hessian-train's own arguments)."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    arguments = _parser().parse_args(argv)
    settings = SweepSettings(
        configs=tuple(arguments.config),
        batch_sizes=tuple(arguments.batch_sizes),
        seeds=tuple(arguments.seeds),
        overrides=tuple(arguments.overrides),
        extra_args=tuple(extra),
        name=arguments.name,
        root=arguments.root,
        variant=arguments.variant,
        test=not arguments.no_test,
        train_command=tuple(shlex.split(arguments.train_command)),
    )
    return settings, arguments


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hessian-sweep`` console script.

    Returns:
        The exit status: 0 when every run finished (or had finished before), 1 if any run
        failed or was refused (its directory in use), 2 for bad arguments (one line
        ``hessian-sweep: error: ...``), 130 when interrupted (Ctrl-C, SIGTERM).
    """
    return run_console_script("hessian-sweep", lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: Sequence[str]) -> int:
    settings, arguments = settings_from_args(argv)
    # SIGTERM (a job scheduler, `kill`) ends the sweep like Ctrl-C: the current run's process group
    # gets the same signal and its sweep.json says "interrupted".
    previous = signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        runs = run_sweep(settings, dry_run=arguments.dry_run, echo=arguments.echo, resume=not arguments.restart)
    except KeyboardInterrupt:
        print(
            "hessian-sweep: interrupted; run it again to continue (finished runs are skipped, the interrupted one"
            " continues from its last checkpoint)",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 1 if any(run.status in ("failed", "refused") for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
