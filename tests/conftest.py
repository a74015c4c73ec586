"""The fixtures every test folder shares: a tiny CIFAR-10 folder, a clean run directory, one intra-op
thread for tiny models, a clean ``sys.argv`` for the CLI.

Shared code that is not a fixture (paths, dataset writers, tiny models, exact oracles) is in
``helpers.py`` (``from helpers import ...``); nothing imports this module.

The test folders mirror the package (``curvature/``, ``callbacks/``, ...; ``project/`` for the
project as a whole: docs, README, configs, benchmarks, conformance, faults). They have no
``__init__.py``: pytest imports each test file by its base name (so ``ddp_spawn`` workers can import
it too), and base names must be unique across all folders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# `lightning` gives its logger a stderr handler when first imported. Imported lazily inside a test
# that uses capsys, the handler would keep that test's stream, closed afterwards ("Logging error").
try:
    import lightning  # noqa: F401
except ImportError:  # pragma: no cover - `lightning` is a test extra
    pass

from helpers import write_cifar_folder


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """A tiny CIFAR-10 folder (100 train, 40 test images) written by the test."""
    return write_cifar_folder(tmp_path / "cifar")


@pytest.fixture
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty directory, so that ``runs/`` and ``data/`` land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole test module (restored after): fastest for tiny models, and far
    faster than torch's default on a shared, loaded machine. Test modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sys.argv`` as ``hessian-train`` alone: LightningCLI warns when ``sys.argv`` (pytest's) and
    ``args`` are both given."""
    monkeypatch.setattr("sys.argv", ["hessian-train"])
