"""Tests of the architectures, the classifier module and the learning-rate rules."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers import INPUT_SHAPES, QUIET_TRAINER
from pytorch_lightning.core.saving import save_hparams_to_yaml
from torch import nn

from lightning_hessian.attacks.training import AdversarialTraining
from lightning_hessian.data import Digits
from lightning_hessian.errors import UserInputError
from lightning_hessian.models import (
    ACTIVATIONS,
    ARCHITECTURES,
    ImageClassifier,
    Normalize,
    build_architecture,
    lr_multiplier,
    scaled_learning_rate,
)


def test_registry_has_the_issue_architectures() -> None:
    assert set(INPUT_SHAPES) <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(INPUT_SHAPES))
def test_architecture_maps_images_to_logits(arch: str) -> None:
    torch.manual_seed(0)
    network = build_architecture(arch, input_shape=INPUT_SHAPES[arch], num_classes=7)
    logits = network(torch.rand(3, *INPUT_SHAPES[arch]))
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()


def test_paper_models_first_fc_sizes_are_computed() -> None:
    """C1: 64 x 8 x 8 = 4096, C2: 128 x 5 x 5 = 3200 on CIFAR; other sizes follow the input."""
    assert build_architecture("c1", input_shape=(3, 32, 32), num_classes=10).classifier[0].in_features == 4096
    assert build_architecture("c2", input_shape=(3, 32, 32), num_classes=10).classifier[0].in_features == 3200
    assert build_architecture("c2", input_shape=(1, 28, 28), num_classes=10).classifier[0].in_features == 128 * 4 * 4
    assert build_architecture("m1", input_shape=(1, 28, 28), num_classes=10).classifier[0].in_features == 50 * 4 * 4
    lenet = build_architecture("lenet5", input_shape=(1, 28, 28), num_classes=10)
    assert [m.out_features for m in lenet.classifier if isinstance(m, torch.nn.Linear)] == [120, 84, 10]
    assert lenet.classifier[0].in_features == 16 * 4 * 4


def test_resnet20_has_the_paper_size() -> None:
    """He et al.'s ResNet-20 has 0.27M parameters."""
    params = sum(
        p.numel() for p in build_architecture("resnet20", input_shape=(3, 32, 32), num_classes=10).parameters()
    )
    assert 0.26e6 < params < 0.28e6


@pytest.mark.parametrize(
    "activation,module_type", [("relu", nn.ReLU), ("elu", nn.ELU), ("gelu", nn.GELU), ("softplus", nn.Softplus)]
)
def test_activation_choice_replaces_every_activation(activation: str, module_type: type) -> None:
    network = build_architecture(
        "c2", input_shape=(3, 32, 32), num_classes=10, activation=activation, softplus_beta=7.0
    )
    found = {type(m) for m in network.modules() if isinstance(m, (nn.ReLU, nn.ELU, nn.GELU, nn.Softplus))}
    assert found == {module_type}
    assert sum(isinstance(m, module_type) for m in network.modules()) == 6  # 4 conv + 2 hidden FC
    if activation == "softplus":
        assert all(m.beta == 7.0 for m in network.modules() if isinstance(m, nn.Softplus))


def test_softplus_with_large_beta_approaches_relu() -> None:
    torch.manual_seed(0)
    relu_net = build_architecture("c1", input_shape=(3, 32, 32), num_classes=10, activation="relu").eval()
    soft_net = build_architecture(
        "c1", input_shape=(3, 32, 32), num_classes=10, activation="softplus", softplus_beta=1e4
    ).eval()
    soft_net.load_state_dict(relu_net.state_dict())
    x = torch.rand(4, 3, 32, 32)
    smooth = build_architecture(
        "c1", input_shape=(3, 32, 32), num_classes=10, activation="softplus", softplus_beta=1.0
    ).eval()
    smooth.load_state_dict(relu_net.state_dict())
    close = (soft_net(x) - relu_net(x)).abs().max()
    far = (smooth(x) - relu_net(x)).abs().max()
    assert close < 1e-2 * far


@pytest.mark.parametrize("arch", ["m1", "lenet5", "c1", "resnet20", "mlp"])
def test_batch_norm_flag(arch: str) -> None:
    with_bn = build_architecture(arch, input_shape=INPUT_SHAPES[arch], num_classes=10, batch_norm=True)
    without = build_architecture(arch, input_shape=INPUT_SHAPES[arch], num_classes=10, batch_norm=False)
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in with_bn.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in without.modules())
    assert without(torch.rand(2, *INPUT_SHAPES[arch])).shape == (2, 10)


def test_dummy_forward_does_not_touch_batchnorm_statistics() -> None:
    network = build_architecture("c1", input_shape=(3, 32, 32), num_classes=10)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.num_batches_tracked.item() == 0
            assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean))
    assert network.training


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"momentum": 5.0}, r"momentum must be in \[0, 1\).*got 5.0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\)"),
        ({"optimizer": "adam", "momentum": 1.5}, r"Adam's beta1\), got 1.5"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
    ],
)
def test_out_of_range_optimiser_settings_fail_before_training(kwargs: dict, match: str) -> None:
    with pytest.raises(UserInputError, match=match):
        ImageClassifier(arch="mlp", input_shape=(1, 8, 8), **kwargs)
    ImageClassifier(arch="mlp", input_shape=(1, 8, 8), momentum=0.0)  # the ends that are fine
    ImageClassifier(arch="mlp", input_shape=(1, 8, 8), momentum=0.99, weight_decay=0.0)


@pytest.mark.parametrize(
    "kwargs,bad",
    [
        ({"arch": "vgg99"}, "architecture 'vgg99'"),
        ({"activation": "swish"}, "activation 'swish'"),
        ({"optimizer": "rmsprop"}, "optimizer 'rmsprop'"),
        ({"lr_scaling": "cubic"}, "LR scaling rule 'cubic'"),
        ({"lr_schedule": "onecycle"}, "LR schedule 'onecycle'"),
    ],
)
def test_bad_names_list_the_valid_ones(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match="valid names") as info:
        ImageClassifier(input_shape=(1, 8, 8), **{"arch": "mlp", **kwargs})
    assert bad in str(info.value)
    valid = {
        "arch": "resnet18",
        "activation": "softplus",
        "optimizer": "sgd",
        "lr_scaling": "sqrt",
        "lr_schedule": "cosine",
    }
    assert valid[next(iter(kwargs))] in str(info.value)


def test_normalisation_is_inside_the_model() -> None:
    torch.manual_seed(0)
    model = ImageClassifier(arch="mlp", input_shape=(1, 8, 8), mean=(0.3,), std=(0.4,)).eval()
    assert isinstance(model.network[0], Normalize)
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(model(x), model.network[1]((x - 0.3) / 0.4))
    default = ImageClassifier(arch="mlp", input_shape=(1, 8, 8)).eval()
    torch.testing.assert_close(default.network[0](x), x)
    with pytest.raises(ValueError, match="mean/std need 3 entries"):
        ImageClassifier(arch="c1", mean=(0.5,), std=(0.5,))


def test_learning_rate_scaling_rules() -> None:
    assert scaled_learning_rate(0.1, 2048, 128, "linear") == pytest.approx(1.6)
    assert scaled_learning_rate(0.1, 2048, 128, "sqrt") == pytest.approx(0.4)
    assert scaled_learning_rate(0.1, 2048, 128, "none") == pytest.approx(0.1)
    assert scaled_learning_rate(0.1, 64, 128, "linear") == pytest.approx(0.05)
    assert ImageClassifier(
        arch="mlp", input_shape=(1, 8, 8), lr=0.2, batch_size=512, base_batch_size=128, lr_scaling="sqrt"
    ).learning_rate == pytest.approx(0.4)


def test_lr_multiplier_schedules() -> None:
    # linear warm-up over 4 steps: 1/4, 2/4, 3/4, 4/4
    assert [lr_multiplier(t, total_steps=100, warmup_steps=4) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # step decay at 10 and 20
    step = [lr_multiplier(t, total_steps=30, schedule="step", milestones=[10, 20], gamma=0.1) for t in (9, 10, 19, 20)]
    assert step == pytest.approx([1.0, 0.1, 0.1, 0.01])
    # cosine after 2 warm-up steps over 10 steps: halfway at step 6, ~0 at the end
    assert lr_multiplier(2, total_steps=10, warmup_steps=2, schedule="cosine") == pytest.approx(1.0)
    assert lr_multiplier(6, total_steps=10, warmup_steps=2, schedule="cosine") == pytest.approx(0.5)
    assert lr_multiplier(9, total_steps=10, warmup_steps=2, schedule="cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 7 / 8))
    )
    with pytest.raises(ValueError, match="finite"):
        lr_multiplier(5, total_steps=math.inf, schedule="cosine")


class _LearningRateRecorder(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_configured_schedule_follows_the_formula_in_a_fit(tmp_path) -> None:
    """2 epochs x 4 steps, warm-up of half an epoch (2 steps), cosine, linear scaling 64/32."""
    pl.seed_everything(0)
    model = ImageClassifier(
        arch="mlp", input_shape=(1, 8, 8), lr=0.05, base_batch_size=32, batch_size=64,
        warmup_epochs=0.5, lr_schedule="cosine",
    )  # fmt: skip
    recorder = _LearningRateRecorder()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[recorder],
        default_root_dir=tmp_path, **QUIET_TRAINER,
    )  # fmt: skip
    trainer.fit(model, datamodule=Digits(batch_size=64))
    expected = [0.1 * lr_multiplier(t, total_steps=8, warmup_steps=2, schedule="cosine") for t in range(8)]
    assert recorder.lrs == pytest.approx(expected)


def test_hparams_are_plain_yaml_with_adversarial_settings(tmp_path) -> None:
    model = ImageClassifier(
        arch="mlp", input_shape=(1, 8, 8), mean=(0.3,), std=(0.4,), batch_size=256,
        adversarial=AdversarialTraining(method="pgd", epsilon=0.1, steps=3),
    )  # fmt: skip
    save_hparams_to_yaml(tmp_path / "hparams.yaml", model.hparams_initial)
    loaded = yaml.safe_load((tmp_path / "hparams.yaml").read_text())
    assert loaded["arch"] == "mlp" and loaded["batch_size"] == 256 and loaded["lr"] == 0.1
    assert loaded["input_shape"] == [1, 8, 8] and loaded["mean"] == [0.3]
    assert loaded["adversarial"] == {
        "method": "pgd",
        "epsilon": 0.1,
        "steps": 3,
        "step_size": None,
        "ratio": 1.0,
        "beta": 6.0,
        "attack_batch_size": None,
    }
    # a checkpoint's hparams rebuild the same module, adversarial settings included
    rebuilt = ImageClassifier(**{k: v for k, v in loaded.items() if not k.startswith("_")})
    assert rebuilt.adversarial == model.adversarial


def test_robust_training_step_uses_the_attack() -> None:
    """Same weights and batch: the FGSM training loss is larger than the clean one, and noise
    training with epsilon 0 gives exactly the clean loss."""
    torch.manual_seed(0)
    dm = Digits(batch_size=64)
    dm.setup("fit")
    x, y = dm.train_dataset.batch(range(64))
    clean = ImageClassifier(arch="mlp", input_shape=(1, 8, 8), mean=dm.mean, std=dm.std)
    fgsm = ImageClassifier(
        arch="mlp",
        input_shape=(1, 8, 8),
        mean=dm.mean,
        std=dm.std,
        adversarial=AdversarialTraining(method="fgsm", epsilon=0.1),
    )
    noise0 = ImageClassifier(
        arch="mlp",
        input_shape=(1, 8, 8),
        mean=dm.mean,
        std=dm.std,
        adversarial=AdversarialTraining(method="uniform_noise", epsilon=0.0),
    )
    fgsm.load_state_dict(clean.state_dict())
    noise0.load_state_dict(clean.state_dict())
    for model in (clean, fgsm, noise0):
        model.eval()  # deterministic BatchNorm for the comparison
    clean_loss = clean.adversarial.training_loss(clean, x, y).loss
    assert fgsm.adversarial.training_loss(fgsm, x, y).loss > clean_loss + 0.05
    torch.testing.assert_close(noise0.adversarial.training_loss(noise0, x, y).loss, clean_loss)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_trains_a_step(activation: str) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(arch="mlp", input_shape=(1, 8, 8), activation=activation, softplus_beta=5.0)
    loss = model.adversarial.training_loss(model, torch.rand(8, 1, 8, 8), torch.arange(8)).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
