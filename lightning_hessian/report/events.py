"""Reading runs back from disk: TensorBoard event files, found by walking directories.

A *run directory* is any directory that directly holds TensorBoard event files
(``events.out.tfevents.*``), for example a Lightning ``TensorBoardLogger`` version directory.
Only the logged tags are read, so runs of any project that attaches this package's callbacks can
be reported. Several event files in one directory (``hessian-train fit`` then ``hessian-train
test`` into the same logger version, or a resumed run) are merged by TensorBoard's own
``EventAccumulator``, which also drops events orphaned by a restart (a purge marker, as
``hessian-train fit --ckpt_path last`` writes, discards the earlier events at its step and later).

Each tag has at most one value per step: when several events share a tag and a step (a run
resumed by a writer that did not purge, two commands logging into one directory), the one written
last (read last) is kept.

The *final* value of a tag is the value logged last (latest wall time; ties go to the larger
step), so ``test/acc`` logged by a ``test`` after ``fit`` is the test accuracy of the model that
``test`` evaluated.

**Damaged event files.** TensorBoard stops reading a file at a truncated or corrupt record without
a word (a killed writer, a full disk), which silently drops the rest of the file, for example the
test phase's ``hessian/*`` values. :func:`read_events` checks every record's framing and CRC32C
checksums first (:func:`check_event_file`); for a damaged file it warns
(:class:`DamagedEventFileWarning`, naming the file and the record) and keeps what can be read: the
records before the damage, and the run's other event files. ``RunEvents.problems`` lists them.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from lightning_hessian.errors import InputNotFoundError

__all__ = [
    "DamagedEventFileWarning",
    "HistogramPoint",
    "RunEvents",
    "ScalarPoint",
    "check_event_file",
    "final_value",
    "find_run_dirs",
    "has_event_files",
    "read_events",
]

EVENT_FILE_MARKER = "tfevents"


class DamagedEventFileWarning(UserWarning):
    """An event file is truncated or corrupt; only the records before the damage are read."""


_Point = TypeVar("_Point", "ScalarPoint", "HistogramPoint")


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
    #: one line per damaged event file: the file, what is wrong, what was kept
    problems: list[str] = field(default_factory=list)

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

    Returns:
        The run directories, resolved (an event file given directly stands for its directory).

    Raises:
        InputNotFoundError: a path does not exist (a ``FileNotFoundError``).
    """
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise InputNotFoundError(f"Run directory {str(path)!r} does not exist.")
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


def check_event_file(path: str | Path) -> str | None:
    """Whether the event file is whole: every record complete and its checksums matching.

    The TFRecord framing of event files: a little-endian uint64 length, the masked CRC32C of
    those 8 bytes, the data, the masked CRC32C of the data.

    Returns:
        ``None`` if the file is whole, else what is wrong (truncated or corrupt, and how many intact
        records come before it).
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    records = 0
    with open(path, "rb") as handle:
        while True:
            header = handle.read(12)
            if not header:
                return None
            where = f"after {records} intact records"
            if len(header) < 12:
                return f"truncated {where} (the file ends inside a record header)"
            (length,) = struct.unpack("<Q", header[:8])
            if masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
                return f"corrupt {where} (record length checksum mismatch)"
            data = handle.read(length)
            footer = handle.read(4)
            if len(data) < length or len(footer) < 4:
                return f"truncated {where} (the file ends inside a record of {length} bytes)"
            if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                return f"corrupt {where} (record data checksum mismatch)"
            records += 1


def read_events(run_dir: str | Path) -> RunEvents:
    """All scalars and histograms logged in ``run_dir`` (its own event files, not subfolders).

    A damaged event file is reported with a :class:`DamagedEventFileWarning` and in
    ``RunEvents.problems``; the records before the damage, and the other files, are still read.

    Returns:
        The scalars and histograms by tag, each sorted by wall time with one point per step (the
        one written last), and the problems of damaged files.
    """
    # Imported here: the accumulator pulls in a part of TensorBoard that the rest does not need.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    problems = []
    for path in sorted(Path(run_dir).iterdir()):
        if path.is_file() and EVENT_FILE_MARKER in path.name:
            problem = check_event_file(path)
            if problem is not None:
                problems.append(f"{path}: {problem}; the records before it are read, the rest is lost")
                warnings.warn(f"damaged event file {problems[-1]}", DamagedEventFileWarning, stacklevel=2)

    # Size guidance 0 keeps every event (the default keeps one histogram per tag).
    accumulator = EventAccumulator(
        str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0, "images": 1}
    )
    accumulator.Reload()
    tags = accumulator.Tags()
    events = RunEvents(problems=problems)
    for tag in tags.get("scalars", []):
        points = [ScalarPoint(int(e.step), float(e.wall_time), float(e.value)) for e in accumulator.Scalars(tag)]
        events.scalars[tag] = sorted(_last_per_step(points), key=lambda p: (p.wall_time, p.step))
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
            events.scalars[tag] = sorted(_last_per_step(points), key=lambda p: (p.wall_time, p.step))
    for tag in tags.get("histograms", []):
        histograms = []
        for e in accumulator.Histograms(tag):
            edges, counts = _histogram_edges(e.histogram_value)
            histograms.append(HistogramPoint(int(e.step), float(e.wall_time), edges, counts))
        events.histograms[tag] = sorted(_last_per_step(histograms), key=lambda p: (p.wall_time, p.step))
    return events


def _last_per_step(points: Sequence[_Point]) -> list[_Point]:
    """One point per step: of several at the same step, the one written last.

    Returns:
        The kept points, in the order of their last writes (``points`` are in the order the event
        files were read).
    """
    by_step: dict[int, _Point] = {}
    for point in points:
        by_step.pop(point.step, None)  # re-insert: the dict keeps the order of the last writes
        by_step[point.step] = point
    return list(by_step.values())


def final_value(points: Sequence[ScalarPoint]) -> float | None:
    """The value logged last, or ``None`` for no points. ``points`` are sorted by wall time."""
    return points[-1].value if points else None


def _histogram_edges(histogram: object) -> tuple[np.ndarray, np.ndarray]:
    """Bucket edges and counts of a TensorBoard ``HistogramProto``.

    Bucket ``i`` covers ``(bucket_limit[i - 1], bucket_limit[i]]``; the first bucket starts at the
    histogram's ``min``. Empty leading/trailing buckets are dropped.

    Returns:
        ``(edges, counts)``, one more edge than counts.
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
