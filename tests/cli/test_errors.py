"""User errors versus bugs: every console script reports a mistake in its input as one line
`PROG: error: ...` with exit status 2, and keeps the traceback of a bug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import QUICKSTART

from lightning_hessian import InputNotFoundError, UserInputError
from lightning_hessian.attacks import AttackSpec
from lightning_hessian.data import DataNotFoundError
from lightning_hessian.errors import is_user_error, run_console_script


def _raised(function) -> BaseException:
    try:
        function()
    except BaseException as error:
        return error
    raise AssertionError("nothing raised")


def _library_value_error() -> None:
    int("eight")  # raised by Python, not by a check of the package


def test_which_errors_are_the_users() -> None:
    assert is_user_error(UserInputError("bad")) and is_user_error(DataNotFoundError("missing"))
    assert isinstance(InputNotFoundError("x"), FileNotFoundError) and isinstance(InputNotFoundError("x"), ValueError)
    # A plain ValueError from a `raise` in the package's own checks (the callbacks' still are such).
    assert is_user_error(_raised(lambda: AttackSpec(name="fgsm", epsilons=[-1.0])))
    # ... but not one from inside Python or a library, nor other exception types.
    assert not is_user_error(_raised(_library_value_error))
    assert not is_user_error(_raised(lambda: [].pop()))
    assert not is_user_error(ValueError("never raised, no traceback"))

    def rewrapped() -> None:  # a library re-raising the package's check
        try:
            AttackSpec(name="fgsm", epsilons=[-1.0])
        except ValueError as error:
            raise ValueError(f"could not build the callback: {error}") from error

    assert is_user_error(_raised(rewrapped))


def test_console_wrapper_prints_one_line_for_user_errors_and_keeps_bugs(capsys: pytest.CaptureFixture) -> None:
    def user_mistake() -> int:
        raise UserInputError("epsilon 8 is larger than\nthe input range; use 8/255")

    assert run_console_script("tool", user_mistake) == 2
    assert capsys.readouterr().err == "tool: error: epsilon 8 is larger than the input range; use 8/255\n"
    with pytest.raises(ValueError, match="invalid literal"):
        run_console_script("tool", _library_value_error)
    with pytest.raises(KeyError):
        run_console_script("tool", lambda: {}["key"])
    assert run_console_script("tool", lambda: 0) == 0


def test_sweep_report_and_landscape_report_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lightning_hessian.cli.landscape import main as landscape
    from lightning_hessian.cli.report import main as report
    from lightning_hessian.cli.sweep import main as sweep

    config = str(QUICKSTART)
    cases = [
        (
            sweep,
            ["--config", config, "--batch-sizes", "8", "--set", "model.lr"],
            "hessian-sweep: error: --set 'model.lr' must",
        ),
        (report, [str(tmp_path / "missing")], "hessian-report: error: Run directory"),
        (
            landscape,
            ["interpolate", "--ckpt-a", "a.ckpt", "--ckpt-b", "b.ckpt", "--config", config, "--num", "1"],
            "hessian-landscape: error: --num=1 must be at least 2",
        ),
    ]
    for main, argv, expected in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1, err


def test_console_script_process_exits_2_without_traceback(tmp_path: Path) -> None:
    """The installed entry point as a user runs it (a user error raised while fit runs)."""
    result = subprocess.run(
        [
            sys.executable, "-c", "from lightning_hessian.cli import main; main()", "fit",
            "--config", str(QUICKSTART), "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false", "--trainer.accumulate_grad_batches=3",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("hessian-train: error: the global batch_size 64")
