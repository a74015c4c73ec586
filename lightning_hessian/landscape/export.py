"""Raw landscape numbers on disk (``.npz`` and ``.csv``), so users can replot without rerunning.

``.npz`` keys: ``curve__<name>__steps|loss|accuracy`` for every curve and
``surface__<d1>_<d2>__alphas|betas|loss|accuracy|names`` for every surface (loss/accuracy of
shape ``(len(alphas), len(betas))``, names the two direction names), plus any scalar ``extra``
values under their own names.
CSV files are long format: ``direction,t,loss,accuracy`` for curves and
``alpha,beta,loss,accuracy`` (one row per grid point) for each surface.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lightning_hessian.landscape.evaluation import LossCurve, LossSurface
from lightning_hessian.landscape.interpolation import InterpolationResult

__all__ = ["load_landscape", "save_landscape", "write_interpolation_csv"]


def save_landscape(
    stem: str | Path,
    curves: Sequence[LossCurve] = (),
    surfaces: Sequence[LossSurface] = (),
    extra: Mapping[str, float | str] | None = None,
) -> list[Path]:
    """Write ``<stem>.npz``, ``<stem>_curves.csv`` and ``<stem>_surface_<d1>_<d2>.csv``; return the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for curve in curves:
        for key in ("steps", "loss", "accuracy"):
            arrays[f"curve__{curve.name}__{key}"] = np.asarray(getattr(curve, key))
    for surface in surfaces:
        for key in ("alphas", "betas", "loss", "accuracy"):
            arrays[f"surface__{surface.name}__{key}"] = np.asarray(getattr(surface, key))
        arrays[f"surface__{surface.name}__names"] = np.asarray(surface.names, dtype=str)
    for key, value in (extra or {}).items():
        arrays[key] = np.asarray(value)
    written = [stem.with_suffix(".npz")]
    np.savez(written[0], allow_pickle=True, **arrays)  # numpy's default, given so no array can take its place
    if curves:
        path = stem.parent / f"{stem.name}_curves.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["direction", "t", "loss", "accuracy"])
            for curve in curves:
                for t, loss, acc in zip(curve.steps, curve.loss, curve.accuracy, strict=True):
                    writer.writerow([curve.name, repr(float(t)), repr(float(loss)), repr(float(acc))])
        written.append(path)
    for surface in surfaces:
        path = stem.parent / f"{stem.name}_surface_{surface.name}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["alpha", "beta", "loss", "accuracy"])
            for i, alpha in enumerate(surface.alphas):
                for j, beta in enumerate(surface.betas):
                    writer.writerow(
                        [
                            repr(float(alpha)),
                            repr(float(beta)),
                            repr(float(surface.loss[i, j])),
                            repr(float(surface.accuracy[i, j])),
                        ]
                    )
        written.append(path)
    return written


def load_landscape(path: str | Path) -> tuple[list[LossCurve], list[LossSurface], dict[str, np.ndarray]]:
    """Read a ``.npz`` written by :func:`save_landscape` back into curves, surfaces and extras."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    curves, surfaces, extra = [], [], {}
    for key in arrays:
        if key.startswith("curve__") and key.endswith("__steps"):
            name = key[len("curve__") : -len("__steps")]
            prefix = f"curve__{name}__"
            curves.append(
                LossCurve(name, arrays[prefix + "steps"], arrays[prefix + "loss"], arrays[prefix + "accuracy"])
            )
        elif key.startswith("surface__") and key.endswith("__alphas"):
            name = key[len("surface__") : -len("__alphas")]
            prefix = f"surface__{name}__"
            first, second = (str(n) for n in arrays[prefix + "names"])
            surfaces.append(
                LossSurface(
                    (first, second),
                    arrays[prefix + "alphas"],
                    arrays[prefix + "betas"],
                    arrays[prefix + "loss"],
                    arrays[prefix + "accuracy"],
                )
            )
        elif not key.startswith(("curve__", "surface__")):
            extra[key] = arrays[key]
    return curves, surfaces, extra


def write_interpolation_csv(path: str | Path, result: InterpolationResult) -> Path:
    """One row per alpha: ``alpha,<split>_loss,<split>_accuracy,...[,top_eigenvalue]``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = result.rows()
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(v) for k, v in row.items()})
    return path
