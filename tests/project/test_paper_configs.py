"""The authors' large-batch recipe as configs (``configs/paper_*.yaml``): each parses with
``--print_config`` and holds the recipe (HessianFlow's SGD settings, the same learning rate at every
batch, step decay, 128-sample BatchNorm statistics); the Fashion-MNIST lenet5 one trains on the
CPU (a few steps, on the Debian package's data when installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import CONFIGS, PAPER_STUDY_CALLBACKS

from lightning_hessian.cli import main
from lightning_hessian.data import DEBIAN_FASHION_MNIST_DIR
from lightning_hessian.models import GhostBatchNorm2d, ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")

#: config -> (arch, dataset, lr, weight decay, milestones, gamma, epochs, init, normalised input)
RECIPES = {
    "paper_fashion_mnist_lenet5": ("lenet5", "FashionMNIST", 0.02, 0.0, [10, 20], 0.2, 30, "default", True),
    "paper_fashion_mnist_m1": ("m1", "FashionMNIST", 0.02, 0.0, [5, 10], 0.2, 15, "default", True),
    "paper_mnist_m1": ("m1", "MNIST", 0.02, 0.0, [30, 60], 0.2, 90, "default", True),
    "paper_cifar10_c1": ("c1", "CIFAR10", 0.02, 0.0, [30, 60], 0.2, 90, "default", False),
    "paper_cifar10_c2": ("c2", "CIFAR10", 0.02, 0.0, [30, 60], 0.2, 90, "default", False),
    "paper_cifar10_resnet20": ("resnet20", "CIFAR10", 0.1, 5e-4, [60, 120], 0.1, 160, "he_normal", False),
}


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["hessian-train"])


def test_the_paper_config_family_is_complete() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("paper_*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_config_parses_and_holds_the_authors_recipe(capsys: pytest.CaptureFixture, name: str) -> None:
    arch, dataset, lr, weight_decay, milestones, gamma, epochs, init, normalize = RECIPES[name]
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--data.batch_size", "8192", "--print_config"])
    assert info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    model, data = config["model"], config["data"]["init_args"]
    assert config["data"]["class_path"] == f"lightning_hessian.data.{dataset}"
    assert data["batch_size"] == 8192  # the one knob
    assert (model["arch"], model["lr"], model["weight_decay"], model["init"]) == (arch, lr, weight_decay, init)
    assert (model["optimizer"], model["momentum"], model["nesterov"]) == ("sgd", 0.9, False)
    assert model["lr_scaling"] == "none" and model["warmup_epochs"] == 0  # the same rate at every batch
    assert (model["lr_schedule"], model["lr_milestones"], model["lr_gamma"]) == ("step", milestones, gamma)
    assert model["batch_norm"] is True and model["bn_virtual_batch_size"] == 128
    assert model["adversarial"]["method"] == "none"
    assert data["augment"] is False and data["normalize"] is normalize
    assert config["trainer"]["max_epochs"] == epochs and config["trainer"]["precision"] == "32-true"
    assert config["trainer"]["logger"]["init_args"]["name"] == name


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_lenet5_paper_config_trains_on_the_cpu(in_tmp_dir: Path) -> None:
    """Two steps of 512 (4 virtual batches of 128 each) and one validation batch on the real data;
    the checkpoint loads into a plain-BatchNorm model."""
    main([
        "fit", "--config", str(CONFIGS / "paper_fashion_mnist_lenet5.yaml"), "--trainer.callbacks=[]",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--data.batch_size", "512",
    ])  # fmt: skip
    run = in_tmp_dir / "runs" / "paper" / "paper_fashion_mnist_lenet5" / "version_0"
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["bn_virtual_batch_size"] == 128 and hparams["batch_size"] == 512 and hparams["lr_scaling"] == "none"
    checkpoint = torch.load(next((run / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    bn_steps = [int(v) for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert bn_steps and all(steps == 2 * 4 for steps in bn_steps)  # one update per virtual batch
    model = ImageClassifier.load_from_checkpoint(next((run / "checkpoints").glob("*.ckpt")), map_location="cpu")
    assert any(isinstance(m, GhostBatchNorm2d) for m in model.modules())
    plain = ImageClassifier(**{**model.hparams, "bn_virtual_batch_size": None})
    plain.load_state_dict(state, strict=True)


#: overlay -> callback class names it installs (in order), extra trainer/model settings it must hold
OVERLAYS = {
    "absa": (
        ["LearningRateMonitor", "HessianSpectrumCallback", "AdaptiveBatchSizeCallback"],
        {"reload_dataloaders_every_n_epochs": 1},
    ),
    "stability_watch": (["LearningRateMonitor", "HessianSpectrumCallback"], {}),
    "no_analysis": (["LearningRateMonitor"], {}),
    "paper_study": (PAPER_STUDY_CALLBACKS, {}),
    "paper_study_same_loss": ([*PAPER_STUDY_CALLBACKS, "EarlyStopping"], {}),
}


def test_every_overlay_is_checked() -> None:
    assert sorted(p.stem for p in (CONFIGS / "overlays").glob("*.yaml")) == sorted(OVERLAYS)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
@pytest.mark.parametrize("name", ["paper_fashion_mnist_lenet5", "paper_cifar10_resnet20"])
def test_overlay_replaces_the_callbacks_and_keeps_the_recipe(
    capsys: pytest.CaptureFixture, name: str, overlay: str
) -> None:
    callbacks, trainer_settings = OVERLAYS[overlay]
    with pytest.raises(SystemExit) as info:
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / f"{name}.yaml"),
                "--config",
                str(CONFIGS / "overlays" / f"{overlay}.yaml"),
                "--print_config",
            ]
        )
    assert info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]] == callbacks
    for key, value in trainer_settings.items():
        assert config["trainer"][key] == value
    base = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    # The recipe's optimiser settings are untouched by an overlay.
    for key in ("lr", "lr_scaling", "lr_milestones", "momentum", "bn_virtual_batch_size"):
        assert config["model"][key] == base["model"][key]
    if overlay == "absa":
        absa = config["trainer"]["callbacks"][2]["init_args"]
        assert (absa["growth_factor"], absa["eigenvalue_factor"], absa["max_epochs_per_size"]) == (2, 2.0, 10)
        assert config["model"]["adversarial"]["method"] == "fgsm"
    if overlay == "stability_watch":
        spectrum = config["trainer"]["callbacks"][1]["init_args"]
        assert spectrum["every_n_train_steps"] == 2 and spectrum["every_n_epochs"] == 1
