"""Tests of the ``hessian-train`` CLI and the shipped configs (in-process, CPU, tiny limits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import CONFIGS

from lightning_hessian.cli import HessianCLI, main
from lightning_hessian.data import ImageDataModule

QUICKSTART = str(CONFIGS / "quickstart.yaml")
# The configs' analysis callbacks are tested by their own test files; here they would only cost time.
TINY = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.callbacks=[]"]


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when sys.argv (pytest's) and args are both given."""
    monkeypatch.setattr("sys.argv", ["hessian-train"])


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
    main(["fit", "--config", QUICKSTART, *TINY, "--trainer.max_epochs=2", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2"])
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

    main(["test", "--config", QUICKSTART, *TINY, "--ckpt_path", str(checkpoint), "--trainer.limit_test_batches=2"])
    assert list((in_tmp_dir / "runs" / "quickstart" / "version_1").glob("events.out.tfevents.*"))
    main(["validate", "--config", QUICKSTART, *TINY, "--ckpt_path", str(checkpoint), "--trainer.limit_val_batches=1"])


def test_robust_training_from_the_command_line(in_tmp_dir: Path) -> None:
    main([
        "fit", "--config", QUICKSTART, *TINY, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1", "--model.adversarial.method=fgsm", "--model.adversarial.epsilon=0.05",
    ])  # fmt: skip
    hparams = yaml.safe_load((in_tmp_dir / "runs" / "quickstart" / "version_0" / "hparams.yaml").read_text())
    assert hparams["adversarial"]["method"] == "fgsm" and hparams["adversarial"]["epsilon"] == 0.05


@pytest.mark.parametrize(
    "override,expected",
    [
        ("--model.arch=vgg99", "unknown architecture 'vgg99'; valid names: c1, c2, lenet5, m1, mlp, resnet18"),
        ("--model.activation=swish", "unknown activation 'swish'; valid names: relu, softplus, elu, gelu"),
        ("--model.optimizer=lamb", "unknown optimizer 'lamb'; valid names: sgd, adam"),
        ("--model.adversarial.method=free", "valid methods: none, fgsm"),
        ("--data=ImageNet", "Valid data modules: Digits, MNIST, FashionMNIST, CIFAR10, CIFAR100"),
    ],
)
def test_bad_names_fail_before_training_listing_valid_ones(
    in_tmp_dir: Path, capsys: pytest.CaptureFixture, override: str, expected: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", QUICKSTART, override])
    assert info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (in_tmp_dir / "runs").exists()


def test_indivisible_global_batch_fails_before_training(in_tmp_dir: Path) -> None:
    with pytest.raises(ValueError, match="global batch_size 64 must be a positive multiple of .* 1 x 3 = 3"):
        main(["fit", "--config", QUICKSTART, *TINY, "--trainer.accumulate_grad_batches=3"])


def test_missing_data_with_download_off_says_how_to_get_it(in_tmp_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.download=true"):
        main([
            "fit", "--config", str(CONFIGS / "cifar_bs128.yaml"), *TINY, "--trainer.accelerator=cpu",
            "--data.init_args.download=false", "--data.init_args.data_dir=nowhere",
        ])  # fmt: skip


class RecordBatches(pl.Callback):
    """Writes, per rank, the world size and the size of every training micro-batch to a file."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.sizes.append(len(batch[1]))

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
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
            "--config", str(CONFIGS / "cifar_bs2048.yaml"), *TINY,
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
            "--config", QUICKSTART, *TINY, "--trainer.strategy=ddp_spawn", "--trainer.devices=2",
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
