"""Checkpoints when the disk fills up: hessian-train's checkpoint writer leaves the old file or the
whole new one, never a partial file; fit records the checkpoint it wrote."""

from __future__ import annotations

import errno
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import QUICKSTART, QUIET_CLI
from lightning_fabric.plugins import TorchCheckpointIO

from lightning_hessian.checkpoint_io import AtomicCheckpointIO, recorded_checkpoint
from lightning_hessian.cli import HessianCLI, main

pytestmark = pytest.mark.usefixtures("clean_argv")

TINY = [
    "--config", str(QUICKSTART), *QUIET_CLI, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
]  # fmt: skip


class FullDisk:
    """The file system under ``root`` fills up once ``full`` is set: a file written there gets
    ``room`` bytes, then ``OSError(ENOSPC)``. The system's temporary directory counts as another
    file system (a rename from it into ``root`` fails with ``EXDEV``, so movers copy), as when
    ``/tmp`` is a tmpfs. Both ways of writing a checkpoint hit it: ``torch.save`` into an open file
    and the kernel copy (``os.sendfile``) that ``shutil.move`` uses across file systems."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, room: int = 1000) -> None:
        self.root, self.room, self.full = root.resolve(), room, False
        real_save, real_sendfile, real_rename = torch.save, os.sendfile, os.rename

        def inside(name: object) -> bool:
            return isinstance(name, (str, os.PathLike)) and Path(name).resolve().is_relative_to(self.root)

        def save(obj, f, *args, **kwargs):
            if not (self.full and inside(getattr(f, "name", f))):
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()[: self.room]
            if hasattr(f, "write"):
                f.write(data)
                f.flush()
            else:
                Path(f).write_bytes(data)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def sendfile(out_fd: int, in_fd: int, offset, count: int) -> int:
            if self.full and inside(os.readlink(f"/proc/self/fd/{out_fd}")):
                written = os.fstat(out_fd).st_size
                if written >= self.room:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                count = min(count, self.room - written)
            return real_sendfile(out_fd, in_fd, offset, count)

        def rename(src, dst, *args, **kwargs):
            if inside(dst) and not inside(src):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
            return real_rename(src, dst, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(os, "sendfile", sendfile)
        monkeypatch.setattr(os, "rename", rename)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the full-disk model reads /proc/self/fd")
def test_disk_full_while_saving_leaves_no_partial_file_and_the_previous_checkpoint_loads(
    in_tmp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FullDisk(in_tmp_dir, monkeypatch)
    cli = HessianCLI(args=TINY, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    directory = in_tmp_dir / "checkpoints"
    good = directory / "good.ckpt"
    cli.trainer.save_checkpoint(good)
    before = good.read_bytes()

    disk.full = True
    with pytest.raises(OSError) as failure:
        cli.trainer.save_checkpoint(directory / "next.ckpt")  # a new file beside the good one
    assert failure.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        cli.trainer.save_checkpoint(good)  # overwriting the good one
    disk.full = False

    assert sorted(p.name for p in directory.iterdir()) == ["good.ckpt"]  # no partial or temporary file
    assert good.read_bytes() == before
    state = torch.load(good, map_location="cpu", weights_only=False)["state_dict"]
    for name, value in cli.model.state_dict().items():
        torch.testing.assert_close(state[name], value)


class OwnCheckpointIO(TorchCheckpointIO):
    """A user's own checkpoint writer (``--trainer.plugins=test_checkpoint_io.OwnCheckpointIO``)."""


def test_atomic_writer_is_installed_unless_the_user_configured_a_checkpoint_io(in_tmp_dir: Path) -> None:
    assert type(HessianCLI(args=TINY, run=False).trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    own = HessianCLI(args=[*TINY, "--trainer.plugins=test_checkpoint_io.OwnCheckpointIO"], run=False)
    assert type(own.trainer.strategy.checkpoint_io) is OwnCheckpointIO


def test_fit_records_the_checkpoint_it_wrote(in_tmp_dir: Path) -> None:
    main(["fit", *TINY])
    run = in_tmp_dir / "runs" / "quickstart" / "version_0"
    record = json.loads((run / "checkpoint.json").read_text())
    checkpoint, reason = recorded_checkpoint(run)
    assert reason == "" and checkpoint == Path(record["checkpoint"]) and checkpoint.is_file()
    assert checkpoint.parent == (run / "checkpoints").resolve() and record["status"] == "finished"
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == record["global_step"] == 2
