"""Reading runs back from disk: TensorBoard event files, found by walking directories.

A *run directory* is any directory that directly holds TensorBoard event files
(``events.out.tfevents.*``), for example a Lightning ``TensorBoardLogger`` version directory.
Only the logged tags are read, so runs of any project that attaches this package's callbacks can
be reported. Several event files in one directory (``hessian-train fit`` then ``hessian-train
test`` into the same logger version, or a resumed run) are merged by TensorBoard's own
``EventAccumulator``, which also drops events orphaned by a restart.

The *final* value of a tag is the value logged last (latest wall time; ties go to the larger
step), so ``test/acc`` logged by a ``test`` after ``fit`` is the test accuracy of the model that
``test`` evaluated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "HistogramPoint",
    "RunEvents",
    "ScalarPoint",
    "final_value",
    "find_run_dirs",
    "has_event_files",
    "read_events",
]

EVENT_FILE_MARKER = "tfevents"


@dataclass(frozen=True)
class ScalarPoint:
    """One logged scalar."""

    step: int
    wall_time: float
    value: float


@dataclass(frozen=True)
class HistogramPoint:
    """One logged histogram: ``counts[i]`` values fell in ``(edges[i], edges[i + 1]]``."""

    step: int
    wall_time: float
    edges: np.ndarray
    counts: np.ndarray


@dataclass
class RunEvents:
    """All scalars and histograms of one run directory, by tag, each sorted by (wall time, step)."""

    scalars: dict[str, list[ScalarPoint]] = field(default_factory=dict)
    histograms: dict[str, list[HistogramPoint]] = field(default_factory=dict)

    def final(self, tag: str) -> float | None:
        """The last logged value of ``tag``, or ``None`` if the tag was never logged."""
        return final_value(self.scalars.get(tag, ()))

    def final_scalars(self) -> dict[str, float]:
        """The last logged value of every scalar tag."""
        return {tag: points[-1].value for tag, points in self.scalars.items() if points}


def has_event_files(directory: Path) -> bool:
    """Whether ``directory`` directly contains TensorBoard event files."""
    return any(p.is_file() and EVENT_FILE_MARKER in p.name for p in directory.iterdir())


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every run directory at or below ``paths``, sorted and without duplicates.

    Hidden directories (names starting with ``.``, where ``hessian-sweep`` moves failed attempts)
    and ``checkpoints`` directories are not searched.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"Run directory {str(path)!r} does not exist.")
        if path.is_file():
            # An event file given directly stands for its directory.
            path = path.parent
        candidates = [path, *(p for p in path.rglob("*") if p.is_dir())]
        for directory in candidates:
            relative = directory.relative_to(path).parts
            if any(part.startswith(".") or part == "checkpoints" for part in relative):
                continue
            if has_event_files(directory):
                found.add(directory.resolve())
    return sorted(found)


def read_events(run_dir: str | Path) -> RunEvents:
    """All scalars and histograms logged in ``run_dir`` (its own event files, not subfolders)."""
    # Imported here: the accumulator pulls in a part of TensorBoard that the rest does not need.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    # Size guidance 0 keeps every event (the default keeps one histogram per tag).
    accumulator = EventAccumulator(
        str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0, "images": 1}
    )
    accumulator.Reload()
    tags = accumulator.Tags()
    events = RunEvents()
    for tag in tags.get("scalars", []):
        points = [ScalarPoint(int(e.step), float(e.wall_time), float(e.value)) for e in accumulator.Scalars(tag)]
        events.scalars[tag] = sorted(points, key=lambda p: (p.wall_time, p.step))
    # Scalars written as tensor summaries (TF2-style writers, `new_style=True`): one-element floats.
    for tag in tags.get("tensors", []):
        if tag in events.scalars:
            continue
        points = []
        for e in accumulator.Tensors(tag):
            array = tensor_util.make_ndarray(e.tensor_proto)
            if array.size == 1 and array.dtype.kind in "fiu":
                points.append(ScalarPoint(int(e.step), float(e.wall_time), float(array.reshape(()))))
        if points:
            events.scalars[tag] = sorted(points, key=lambda p: (p.wall_time, p.step))
    for tag in tags.get("histograms", []):
        histograms = []
        for e in accumulator.Histograms(tag):
            edges, counts = _histogram_edges(e.histogram_value)
            histograms.append(HistogramPoint(int(e.step), float(e.wall_time), edges, counts))
        events.histograms[tag] = sorted(histograms, key=lambda p: (p.wall_time, p.step))
    return events


def final_value(points: Sequence[ScalarPoint]) -> float | None:
    """The value logged last, or ``None`` for no points. ``points`` are sorted by wall time."""
    return points[-1].value if points else None


def _histogram_edges(histogram: object) -> tuple[np.ndarray, np.ndarray]:
    """Bucket edges and counts of a TensorBoard ``HistogramProto``.

    Bucket ``i`` covers ``(bucket_limit[i - 1], bucket_limit[i]]``; the first bucket starts at the
    histogram's ``min``. Empty leading/trailing buckets are dropped.
    """
    limits = np.asarray(histogram.bucket_limit, dtype=np.float64)  # type: ignore[attr-defined]
    counts = np.asarray(histogram.bucket, dtype=np.float64)  # type: ignore[attr-defined]
    if counts.size == 0:
        return np.zeros(1), np.zeros(0)
    lower = float(histogram.min)  # type: ignore[attr-defined]
    edges = np.concatenate([[min(lower, limits[0])], limits])
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return edges, counts
    first, last = nonzero[0], nonzero[-1]
    edges = edges[first : last + 2].copy()
    # The last limit of TensorBoard histograms is a huge sentinel; clip it to the data's maximum.
    edges[-1] = min(edges[-1], float(histogram.max))  # type: ignore[attr-defined]
    edges[0] = max(edges[0], lower)
    return edges, counts[first : last + 1]
