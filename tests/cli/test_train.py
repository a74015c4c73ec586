"""Tests of the ``hessian-train`` CLI and the shipped configs (in-process, CPU, tiny limits)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers import CONFIGS, QUICKSTART, QUIET_CLI, write_mnist_folder

from lightning_hessian.cli import HessianCLI, main
from lightning_hessian.data import ImageDataModule

pytestmark = pytest.mark.usefixtures("clean_argv")


def _print_config(capsys: pytest.CaptureFixture, config: Path, *extra: str) -> dict:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), *extra, "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_cifar_bs2048_print_config_shows_the_whole_experiment(capsys: pytest.CaptureFixture) -> None:
    config = _print_config(capsys, CONFIGS / "cifar_bs2048.yaml")
    assert config["model"]["arch"] == "resnet18"
    assert "batch_size" not in config["model"]  # linked from data.batch_size, not set twice
    assert config["data"]["class_path"] == "lightning_hessian.data.CIFAR10"
    assert config["data"]["init_args"]["batch_size"] == 2048
    assert config["trainer"]["precision"] == "bf16-mixed" and config["trainer"]["accelerator"] == "gpu"
    assert config["model"]["adversarial"]["method"] == "none"
    assert isinstance(config["trainer"]["callbacks"], list)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses_and_has_a_callback_list(capsys: pytest.CaptureFixture, name: str) -> None:
    config = _print_config(capsys, CONFIGS / f"{name}.yaml")
    assert config["data"]["init_args"]["batch_size"] > 0
    assert isinstance(config["trainer"]["callbacks"], list) and config["trainer"]["callbacks"]
    assert config["trainer"]["logger"]["init_args"]["save_dir"].startswith("runs")


def test_quickstart_fit_writes_a_tensorboard_run_then_test_and_validate(in_tmp_dir: Path) -> None:
    main(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            *QUIET_CLI,
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=2",
        ]
    )
    run = in_tmp_dir / "runs" / "quickstart" / "version_0"
    assert list(run.glob("events.out.tfevents.*"))
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["arch"] == "mlp" and hparams["batch_size"] == 64 and hparams["dataset"] == "Digits"
    assert hparams["num_classes"] == 10 and hparams["input_shape"] == [1, 8, 8] and hparams["mean"] == [0.3053]
    assert hparams["adversarial"]["method"] == "none"
    assert (run / "config.yaml").is_file()
    checkpoint = next((run / "checkpoints").glob("*.ckpt"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set(EventAccumulator(str(run)).Reload().Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= tags

    main(
        [
            "test",
            "--config",
            str(QUICKSTART),
            *QUIET_CLI,
            "--ckpt_path",
            str(checkpoint),
            "--trainer.limit_test_batches=2",
        ]
    )
    assert list((in_tmp_dir / "runs" / "quickstart" / "version_1").glob("events.out.tfevents.*"))
    main(
        [
            "validate",
            "--config",
            str(QUICKSTART),
            *QUIET_CLI,
            "--ckpt_path",
            str(checkpoint),
            "--trainer.limit_val_batches=1",
        ]
    )


def test_robust_training_from_the_command_line(in_tmp_dir: Path) -> None:
    main([
        "fit", "--config", str(QUICKSTART), *QUIET_CLI, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1", "--model.adversarial.method=fgsm", "--model.adversarial.epsilon=0.05",
        "--model.adversarial.attack_batch_size=16",
    ])  # fmt: skip
    hparams = yaml.safe_load((in_tmp_dir / "runs" / "quickstart" / "version_0" / "hparams.yaml").read_text())
    assert hparams["adversarial"]["method"] == "fgsm" and hparams["adversarial"]["epsilon"] == 0.05
    assert hparams["adversarial"]["attack_batch_size"] == 16


def test_bad_attack_batch_size_fails_before_training(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(
            [
                "fit",
                "--config",
                str(QUICKSTART),
                "--model.adversarial.method=pgd",
                "--model.adversarial.attack_batch_size=0",
            ]
        )
    assert info.value.code == 2
    assert "attack_batch_size must be a whole number >= 1 or null (the whole batch), got 0" in capsys.readouterr().err
    assert not (in_tmp_dir / "runs").exists()


@pytest.mark.parametrize(
    "override,expected",
    [
        ("--model.arch=vgg99", "unknown architecture 'vgg99'; valid names: c1, c2, lenet5, m1, mlp, resnet18"),
        ("--model.activation=swish", "unknown activation 'swish'; valid names: relu, softplus, elu, gelu"),
        ("--model.optimizer=rmsprop", "unknown optimizer 'rmsprop'; valid names: sgd, adam, lars, lamb"),
        ("--model.adversarial.method=free", "valid methods: none, fgsm"),
        ("--data=ImageNet", "Valid data modules: Digits, MNIST, FashionMNIST, CIFAR10, CIFAR100"),
    ],
)
def test_bad_names_fail_before_training_listing_valid_ones(
    in_tmp_dir: Path, capsys: pytest.CaptureFixture, override: str, expected: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(QUICKSTART), override])
    assert info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (in_tmp_dir / "runs").exists()


def _user_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run hessian-train expecting a user error: exit status 2 and one line `hessian-train: error: ...`
    on stderr, no traceback; returns that line."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    (line,) = [line for line in lines if line.startswith("hessian-train: error: ")]
    message = line.removeprefix("hessian-train: error: ")
    assert [line for line in lines if message in line] == [line]  # not also as the last line of a traceback
    return line


def test_indivisible_global_batch_fails_before_training(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    line = _user_error(capsys, "fit", "--config", str(QUICKSTART), *QUIET_CLI, "--trainer.accumulate_grad_batches=3")
    assert re.search("global batch_size 64 must be a positive multiple of .* 1 x 3 = 3", line)
    assert not list(in_tmp_dir.glob("runs/*/*/checkpoints"))


def test_missing_data_with_download_off_says_how_to_get_it(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    line = _user_error(
        capsys, "fit", "--config", str(CONFIGS / "cifar_bs128.yaml"), *QUIET_CLI, "--trainer.accelerator=cpu",
        "--data.init_args.download=false", "--data.init_args.data_dir=nowhere",
    )  # fmt: skip
    assert "data.download=true" in line


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--trainer.precision=16-true", "precision='16-mixed'"),
        ("--trainer.callbacks.init_args.num_samples=5000", "num_samples=5000 is larger than the train split"),
    ],
)
def test_settings_a_callback_refuses_are_one_line_errors(
    in_tmp_dir: Path, capsys: pytest.CaptureFixture, override: str, expected: str
) -> None:
    """The callbacks' own checks (plain ValueError, raised inside trainer.fit) are user errors too."""
    callback = "--trainer.callbacks+=lightning_hessian.callbacks.spectrum.HessianSpectrumCallback"
    line = _user_error(
        capsys, "fit", "--config", str(QUICKSTART), *QUIET_CLI, callback, override, "--trainer.max_epochs=1"
    )
    assert expected in line


def test_truncated_dataset_file_is_a_one_line_error(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:

    folder = write_mnist_folder(in_tmp_dir / "mnist")
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:300])  # a download cut short
    line = _user_error(
        capsys, "fit", "--config", str(CONFIGS / "mnist_bs128.yaml"), *QUIET_CLI, "--trainer.accelerator=cpu",
        "--trainer.precision=32-true", f"--data.init_args.data_dir={folder}", "--data.init_args.download=false",
    )  # fmt: skip
    assert f"{images} is truncated or not a gzip file" in line and "download the dataset again" in line


def test_a_bug_keeps_its_traceback(in_tmp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the user's mistakes are shortened: a ValueError from inside a library propagates."""
    from lightning_hessian.data import Digits

    def broken(self: Digits, train: bool) -> None:
        torch.zeros(2).view(3)  # a bug: raises RuntimeError inside torch

    monkeypatch.setattr(Digits, "load_split", broken)
    with pytest.raises(RuntimeError, match="shape"):
        main(["fit", "--config", str(QUICKSTART), *QUIET_CLI, "--trainer.max_epochs=1"])

    def library_value_error(self: Digits, train: bool) -> None:
        int("eight")  # ValueError raised by Python itself, not by a check of the package

    monkeypatch.setattr(Digits, "load_split", library_value_error)
    with pytest.raises(ValueError, match="invalid literal"):
        main(["fit", "--config", str(QUICKSTART), *QUIET_CLI, "--trainer.max_epochs=1"])


def test_help_describes_the_project_and_offers_no_predict(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Lightning Trainer command line tool" not in out and "Hessian" in out
    assert "{fit,validate,test}" in out and "predict" not in out
    with pytest.raises(SystemExit) as info:
        main(["predict", "--config", str(QUICKSTART)])
    assert info.value.code == 2 and "invalid choice: 'predict'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert " object at 0x" not in out
    assert "_DataAttribute('num_classes')(data) --> model.num_classes" in out


class RecordBatches(pl.Callback):
    """Writes, per rank, the world size and the size of every training micro-batch to a file."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sizes.append(len(batch[1]))

    def on_train_end(self, trainer, pl_module) -> None:
        record = {
            "world_size": trainer.world_size,
            "accumulate": trainer.accumulate_grad_batches,
            "sizes": self.sizes,
            "global_step": trainer.global_step,
            "per_device": trainer.datamodule.per_device_batch_size,
        }
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_cifar_bs2048_config_runs_on_cpu_against_a_tiny_folder(in_tmp_dir: Path, cifar_dir: Path) -> None:
    """The GPU config with CPU overrides: global batch 16 as 2 accumulated micro-batches of 8."""
    cli = HessianCLI(
        args=[
            "--config", str(CONFIGS / "cifar_bs2048.yaml"), *QUIET_CLI,
            "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.max_steps=2",
            "--trainer.accumulate_grad_batches=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
            f"--data.init_args.data_dir={cifar_dir}", "--data.init_args.download=false",
            "--data.init_args.batch_size=16",
        ],
        run=False,
    )  # fmt: skip
    assert cli.model.hparams.arch == "resnet18" and cli.model.hparams.batch_size == 16
    assert cli.model.learning_rate == pytest.approx(0.1 * 16 / 128)
    assert list(cli.model.network[0].mean.flatten()) == pytest.approx([0.4914, 0.4822, 0.4465])
    cli.trainer.callbacks.append(RecordBatches(str(in_tmp_dir)))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    record = json.loads((in_tmp_dir / "rank0.json").read_text())
    assert record["sizes"] == [8, 8, 8, 8] and record["global_step"] == 2 and record["per_device"] == 8
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_quickstart_ddp_two_cpu_processes_keep_the_global_batch(in_tmp_dir: Path) -> None:
    """2 gloo processes (ddp_spawn): each rank loads 32 of the global 64 per step."""
    cli = HessianCLI(
        args=[
            "--config", str(QUICKSTART), *QUIET_CLI, "--trainer.strategy=ddp_spawn", "--trainer.devices=2",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
        ],
        run=False,
    )  # fmt: skip
    cli.trainer.callbacks.append(RecordBatches(str(in_tmp_dir)))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    records = [json.loads((in_tmp_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        assert record["world_size"] == 2 and record["per_device"] == 32
        assert record["sizes"] == [32, 32, 32] and record["global_step"] == 3
    assert sum(records[0]["sizes"][:1] + records[1]["sizes"][:1]) == 64 == cli.datamodule.batch_size
    assert "val/acc" in cli.trainer.callback_metrics  # returned from rank 0
    assert isinstance(cli.datamodule, ImageDataModule)


# ------------------------------------------------------------------ the console scripts, in one place


def test_every_console_script_is_a_main_in_lightning_hessian_cli() -> None:
    """pyproject's [project.scripts] point into the cli package, each at a callable ``main``, and
    the installed scripts (this environment's editable install) are the same entry points."""
    import importlib
    from importlib.metadata import entry_points

    import tomllib

    scripts = tomllib.loads((CONFIGS.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "hessian-train": "lightning_hessian.cli.train:main",
        "hessian-sweep": "lightning_hessian.cli.sweep:main",
        "hessian-report": "lightning_hessian.cli.report:main",
        "hessian-landscape": "lightning_hessian.cli.landscape:main",
    }
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name))
    installed = {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("hessian-")}
    assert installed == scripts
    assert (
        main is importlib.import_module("lightning_hessian.cli.train").main
    )  # `from lightning_hessian.cli import main`


@pytest.mark.parametrize(
    ("module", "usage"),
    [
        ("lightning_hessian.cli", "usage: hessian-train"),  # what hessian-sweep runs
        ("lightning_hessian.cli.sweep", "usage: hessian-sweep"),
        ("lightning_hessian.cli.report", "usage: hessian-report"),
        ("lightning_hessian.cli.landscape", "usage: hessian-landscape"),
    ],
)
def test_python_dash_m_runs_each_console_script(module: str, usage: str) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage)
    assert "Warning" not in result.stderr  # neither deprecated nor imported twice (runpy)
