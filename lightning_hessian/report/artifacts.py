"""What a study leaves beside the event files: loss-landscape grids and model interpolations.

* **Landscapes**: the ``.npz`` files of :class:`~lightning_hessian.callbacks.landscape.LossLandscapeCallback`
  (``<run>/landscape/epoch_XXX.npz`` during ``fit``, ``test_epoch_XXX.npz`` under
  ``hessian-train test``) and of ``hessian-landscape surface`` (``surface_<split>.npz``, written
  into a run's ``landscape/`` folder), read with :func:`~lightning_hessian.landscape.load_landscape`.
  The split of the samples is the file's ``split`` entry; files written before it existed are
  placed by their name (``test_`` prefix: the test split, else the split of the run's landscape
  callback during ``fit``).
* **Interpolations**: the ``interpolation.json`` files of ``hessian-landscape interpolate`` found
  below the report's paths. Their two checkpoints are matched to the reported runs (a checkpoint
  inside a run directory belongs to that run), so the report knows which end is the small or
  large batch, or the standard or robustly trained model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_hessian.landscape.evaluation import LossCurve, LossSurface
from lightning_hessian.landscape.export import load_landscape
from lightning_hessian.report.runs import Run

__all__ = [
    "INTERPOLATION_FILE",
    "Interpolation",
    "LandscapeFile",
    "find_interpolations",
    "group_interpolations",
    "interpolation_title",
    "landscape_files",
    "latest_landscapes",
]

INTERPOLATION_FILE = "interpolation.json"


@dataclass(frozen=True)
class LandscapeFile:
    """One landscape ``.npz`` of a run: its curves and surfaces and the split of their samples."""

    path: Path
    split: str
    curves: list[LossCurve]
    surfaces: list[LossSurface]
    modified: float


def _file_split(path: Path, extra: dict[str, np.ndarray], run: Run) -> str:
    if "split" in extra:
        return str(np.asarray(extra["split"]).reshape(()))
    if path.name.startswith("test_"):
        return "test"
    return run.fit_splits.get("landscape", "train")


def landscape_files(run: Run) -> list[LandscapeFile]:
    """Every readable landscape ``.npz`` below ``run.path`` (checkpoints excluded), oldest first.

    Args:
        run: the run.

    Returns:
        The files with curves or surfaces, sorted by modification time and name; other ``.npz``
        files are ignored.
    """
    found = []
    for path in run.path.rglob("*.npz"):
        if "checkpoints" in path.relative_to(run.path).parts:
            continue
        try:
            curves, surfaces, extra = load_landscape(path)
        except (OSError, ValueError, KeyError):
            continue
        if curves or surfaces:
            found.append(LandscapeFile(path, _file_split(path, extra, run), curves, surfaces, path.stat().st_mtime))
    return sorted(found, key=lambda f: (f.modified, f.path.name))


def latest_landscapes(run: Run) -> tuple[dict[str, dict[str, LossCurve]], dict[str, dict[str, LossSurface]]]:
    """The newest curve and surface of every name, per split (the final landscape of the run on
    that split's samples).

    Returns:
        ``(curves, surfaces)``, each ``split -> name -> grid``.
    """
    curves: dict[str, dict[str, LossCurve]] = {}
    surfaces: dict[str, dict[str, LossSurface]] = {}
    for file in landscape_files(run):  # oldest first: newer files overwrite
        for curve in file.curves:
            curves.setdefault(file.split, {})[curve.name] = curve
        for surface in file.surfaces:
            surfaces.setdefault(file.split, {})[surface.name] = surface
    return curves, surfaces


@dataclass
class Interpolation:
    """One ``hessian-landscape interpolate`` result: ``theta(alpha) = (1 - alpha) theta_A + alpha theta_B``.

    Attributes:
        path: the ``interpolation.json``.
        labels: the labels of A and B.
        alphas: the interpolation coefficients (0 and 1 included).
        loss, accuracy: per split (``train``, ``test``), one value per alpha.
        top_eigenvalue: the top Hessian eigenvalue per alpha, if computed.
        eigenvalue_split: the split it was computed on.
        batch_norm: how BatchNorm running statistics were set along the path (``"recompute"``,
            ``"interpolate"``; ``None``: no BatchNorm, or a file that does not say).
        batch_norm_samples: the training samples they were recomputed on.
        run_a, run_b: the reported runs the two checkpoints belong to, when found.
    """

    path: Path
    labels: tuple[str, str]
    alphas: np.ndarray
    loss: dict[str, np.ndarray]
    accuracy: dict[str, np.ndarray]
    top_eigenvalue: np.ndarray | None = None
    eigenvalue_split: str | None = None
    batch_norm: str | None = None
    batch_norm_samples: int | None = None
    run_a: Run | None = None
    run_b: Run | None = None
    checkpoints: tuple[str, str] = ("", "")
    seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    def at(self, values: np.ndarray | None, alpha: float) -> float | None:
        """``values`` at the coefficient ``alpha`` (0: model A, 1: model B), if on the grid and finite."""
        if values is None:
            return None
        matches = np.flatnonzero(np.isclose(self.alphas, alpha, rtol=0, atol=1e-9))
        if matches.size == 0:
            return None
        value = float(values[matches[0]])
        return value if math.isfinite(value) else None

    @property
    def seed(self) -> int | None:
        """The seed both runs share, else ``None``."""
        seeds = {run.seed for run in (self.run_a, self.run_b) if run is not None}
        return seeds.pop() if len(seeds) == 1 else None


def _match_run(checkpoint: str, runs: Sequence[Run], base: Path) -> Run | None:
    candidates = [Path(checkpoint)]
    if not Path(checkpoint).is_absolute():
        candidates += [Path.cwd() / checkpoint, base / checkpoint]
    for candidate in candidates:
        try:
            resolved = candidate.resolve()
        except OSError:
            continue
        for run in runs:
            if run.path.resolve() in resolved.parents:
                return run
    # paths from another working directory: match the run's last two path components
    for run in runs:
        if f"/{run.name}/" in "/" + Path(checkpoint).as_posix():
            return run
    return None


def find_interpolations(paths: Iterable[str | Path], runs: Sequence[Run]) -> list[Interpolation]:
    """Every ``interpolation.json`` below ``paths`` (hidden folders skipped), its ends matched to ``runs``.

    Args:
        paths: the report's input paths.
        runs: the reported runs.

    Returns:
        The interpolations, sorted by path; unreadable files are skipped.
    """
    found: dict[Path, Interpolation] = {}
    for root in map(Path, paths):
        if root.is_dir():
            files = list(root.rglob(INTERPOLATION_FILE))
        else:
            files = [root] if root.name == INTERPOLATION_FILE else []
        for file in files:
            relative = file.relative_to(root).parts if root.is_dir() else ()
            if any(part.startswith(".") for part in relative) or file.resolve() in found:
                continue
            try:
                data = json.loads(file.read_text())
                alphas = np.asarray(data["alphas"], dtype=np.float64)
                loss = {k: np.asarray(v, dtype=np.float64) for k, v in data["loss"].items()}
                accuracy = {k: np.asarray(v, dtype=np.float64) for k, v in data["accuracy"].items()}
            except (OSError, ValueError, KeyError, TypeError):
                continue
            top = data.get("top_eigenvalue")
            checkpoints = (str(data.get("ckpt_a", "")), str(data.get("ckpt_b", "")))
            labels = data.get("labels") or [Path(c).stem for c in checkpoints]
            found[file.resolve()] = Interpolation(
                path=file,
                labels=(str(labels[0]), str(labels[1])),
                alphas=alphas,
                loss=loss,
                accuracy=accuracy,
                top_eigenvalue=None if top is None else np.asarray(top, dtype=np.float64),
                eigenvalue_split=data.get("eigenvalue_split") or (next(iter(loss), None) if top is not None else None),
                batch_norm=data.get("batch_norm"),
                batch_norm_samples=data.get("batch_norm_samples"),
                run_a=_match_run(checkpoints[0], runs, file.parent),
                run_b=_match_run(checkpoints[1], runs, file.parent),
                checkpoints=checkpoints,
                seconds=data.get("seconds"),
            )
    return [found[key] for key in sorted(found)]


def interpolation_title(item: Interpolation) -> str:
    """The name of the pair an interpolation belongs to, the same for every seed.

    Returns:
        ``"B=128 → B=16384 (standard)"`` when the two ends are runs of one variant at two batch
        sizes, ``"standard → fgsm ε=0.1 (B=128)"`` for two variants at one batch size, else the
        labels of the two checkpoints (``"LABEL_A → LABEL_B"``).
    """
    a, b = item.run_a, item.run_b
    if a is not None and b is not None:
        if a.variant == b.variant and a.batch_size != b.batch_size:
            return f"B={a.batch_size} → B={b.batch_size} ({a.variant})"
        if a.batch_size == b.batch_size and a.variant != b.variant:
            return f"{a.variant} → {b.variant} (B={a.batch_size})"
    return f"{item.labels[0]} → {item.labels[1]}"


def group_interpolations(items: Sequence[Interpolation]) -> dict[str, list[Interpolation]]:
    """Interpolations by :func:`interpolation_title` (the seeds of one pair together), sorted."""
    groups: dict[str, list[Interpolation]] = {}
    for item in items:
        groups.setdefault(interpolation_title(item), []).append(item)
    return {
        title: sorted(groups[title], key=lambda i: (i.seed is None, i.seed or 0, str(i.path)))
        for title in sorted(groups)
    }
