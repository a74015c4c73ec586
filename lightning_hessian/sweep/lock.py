"""One writer per run directory: the lock a sweep holds while a run is in progress.

While a run is in progress its directory holds ``sweep.lock`` (:class:`RunLock`): an exclusive
``flock`` that the training process inherits, and the PIDs of the sweep and of that process. A
sweep that finds the lock held, or a PID in it alive, refuses that run with a message naming the
process (:class:`RunBusyError`); a lock whose processes are gone is taken over.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from lightning_hessian.errors import UserInputError
from lightning_hessian.sweep.records import utc_now

try:
    import fcntl
except ImportError:  # Windows: the PIDs in the lock file are the only guard
    fcntl = None  # type: ignore[assignment]


__all__ = ["LOCK_FILE", "RunBusyError", "RunLock"]

LOCK_FILE = "sweep.lock"


class RunBusyError(UserInputError):
    """A run directory is in use by another live process (a sweep, or training a killed sweep left)."""


def _process_state(pid: int) -> tuple[str, str] | None:
    """``(state letter, start time in clock ticks)`` of ``pid`` from ``/proc`` (Linux), else ``None``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (OSError, IndexError):
        return None
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _process_alive(pid: Any, started: Any = None) -> bool:
    """Whether process ``pid`` exists and is not a zombie; with ``started`` (its ``/proc`` start
    time when the lock was written) a reused PID does not count.

    Returns:
        ``False`` for a ``pid`` that is not a positive integer, a process that does not exist or
        is a zombie, or a reused PID; else ``True``.
    """
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    state = _process_state(pid)
    if state is None:
        return True
    return state[0] not in ("Z", "X") and (started is None or state[1] == started)


class RunLock:
    """The exclusive claim of one run directory by one sweep: ``<run_dir>/sweep.lock``.

    Held as an exclusive ``flock`` (POSIX) on the file, whose descriptor the training process
    inherits, so the claim lasts as long as the sweep or its training process lives, whichever
    ends last. The file holds JSON: host, ``sweep_pid``, ``child_pid`` (with their start times, so
    that a reused PID is not mistaken for them) and the time of the claim; a lock that is not held
    but names a live process of this host counts as held (file systems without ``flock``).

    Raises:
        RunBusyError: the directory is in use by a live process (the message names it).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.child: subprocess.Popen[str] | None = None
        self._info: dict[str, Any] = {}
        self.fd: int | None = self._acquire()

    def _acquire(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise RunBusyError(self._busy_message(_read_lock(fd), held=True)) from None
                    except OSError as error:  # no flock on this file system: the PIDs decide
                        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                            raise
                try:
                    same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same_file = False
                if not same_file:  # its holder removed it meanwhile: claim the new file
                    os.close(fd)
                    continue
                info = _read_lock(fd)
                if info.get("host") == socket.gethostname() and any(
                    info.get(f"{role}_pid") != os.getpid()
                    and _process_alive(info.get(f"{role}_pid"), info.get(f"{role}_started"))
                    for role in ("sweep", "child")
                ):
                    raise RunBusyError(self._busy_message(info, held=False))
                self._info = {
                    "host": socket.gethostname(),
                    "sweep_pid": os.getpid(),
                    "sweep_started": (_process_state(os.getpid()) or (None, None))[1],
                    "child_pid": None,
                    "child_started": None,
                    "since": utc_now(),
                }
                _write_lock(fd, self._info)
                return fd
            except BaseException:
                os.close(fd)
                raise

    def _busy_message(self, info: dict[str, Any], held: bool) -> str:
        roles = (("child_pid", "training"), ("sweep_pid", "sweep"))
        holders = [f"{role} pid {info[key]}" for key, role in roles if info.get(key)]
        who = ", ".join(holders) or "another process"
        where = f" on {info['host']}" if info.get("host") and info.get("host") != socket.gethostname() else ""
        since = f" since {info['since']}" if info.get("since") else ""
        hint = "" if held else f"; if that process does not write there, delete {self.path}"
        return (
            f"{self.path.parent} is in use by {who}{where}{since} (lock {self.path}){hint}. A run directory takes one "
            "writer: wait for that run to end, or stop it, then run the sweep again."
        )

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """The descriptor the training process inherits, so that it keeps the lock if the sweep dies."""
        return (self.fd,) if self.fd is not None and fcntl is not None else ()

    def record_child(self, process: subprocess.Popen[str]) -> None:
        """Name the training process in the lock file."""
        self.child = process
        if self.fd is not None:
            self._info.update(child_pid=process.pid, child_started=(_process_state(process.pid) or (None, None))[1])
            _write_lock(self.fd, self._info)

    def release(self) -> None:
        """Give the directory up: the file is removed (unless a training process still holds it)."""
        if self.fd is None:
            return
        try:
            if self.child is None or self.child.poll() is not None:
                if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                    self.path.unlink()
        except OSError:
            pass  # moved or removed already
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_lock(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 1 << 16) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _write_lock(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())
