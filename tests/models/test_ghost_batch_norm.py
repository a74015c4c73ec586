"""Tests of Ghost BatchNorm (``model.bn_virtual_batch_size``) and the ``init`` option: ghost BN
equals accumulating micro-batches through plain BatchNorm (outputs, running statistics, gradients),
is plain BatchNorm in eval mode and in its ``state_dict``, and is wired through every architecture,
the classifier and the CLI."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import INPUT_SHAPES, QUICKSTART
from torch import nn

from lightning_hessian.cli import main
from lightning_hessian.errors import UserInputError
from lightning_hessian.models import (
    ARCHITECTURES,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    ImageClassifier,
    build_architecture,
    convert_to_ghost_batch_norm,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"rtol": 1e-6, "atol": 1e-6}


def _plain_bn(kind: str, momentum: float | None) -> nn.modules.batchnorm._BatchNorm:
    """A float64 BatchNorm with non-trivial affine parameters and running statistics."""
    torch.manual_seed(1)
    bn = (nn.BatchNorm2d(6, momentum=momentum) if kind == "2d" else nn.BatchNorm1d(6, momentum=momentum)).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(3)
    return bn


def _input(kind: str, batch: int) -> torch.Tensor:
    torch.manual_seed(2)
    shape = (batch, 6, 5, 5) if kind == "2d" else (batch, 6)
    return (torch.randn(shape, dtype=torch.float64) * 2.0 + 0.7).requires_grad_(True)


@pytest.mark.parametrize("kind", ["2d", "1d"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("batch", [512, 500])
def test_ghost_bn_equals_accumulating_micro_batches_through_plain_bn(
    kind: str, momentum: float | None, batch: int
) -> None:
    """A batch of 512 (or 500: a last chunk of 116) with virtual size 128 = micro-batches of 128
    through plain BatchNorm, one after the other: outputs, running mean/var (one momentum update per
    chunk, in order; cumulative average for momentum=None), num_batches_tracked (+ number of chunks),
    and the gradients of the batch-mean loss (sum over micro-batches of their mean loss x size / N)."""
    plain = _plain_bn(kind, momentum)
    ghost = convert_to_ghost_batch_norm(copy.deepcopy(plain), 128)
    assert type(ghost) is (GhostBatchNorm2d if kind == "2d" else GhostBatchNorm1d)
    x = _input(kind, batch)
    target = torch.randn_like(x)

    out = ghost(x)
    loss = (out * target).flatten(1).sum(1).mean()
    ghost_grads = torch.autograd.grad(loss, [x, ghost.weight, ghost.bias])

    x_ref = x.detach().clone().requires_grad_(True)
    outs, grads = [], [torch.zeros_like(x_ref), torch.zeros_like(plain.weight), torch.zeros_like(plain.bias)]
    for xs, ts in zip(x_ref.split(128), target.split(128), strict=True):
        y = plain(xs)
        outs.append(y)
        micro_loss = (y * ts).flatten(1).sum(1).mean() * len(xs) / batch  # = sum / 4 for equal chunks
        for total, g in zip(grads, torch.autograd.grad(micro_loss, [x_ref, plain.weight, plain.bias]), strict=True):
            total += g
    torch.testing.assert_close(out, torch.cat(outs), **TOL)
    for got, expected in zip(ghost_grads, grads, strict=True):
        torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(ghost.running_mean, plain.running_mean, **TOL)
    torch.testing.assert_close(ghost.running_var, plain.running_var, **TOL)
    chunks = math.ceil(batch / 128)
    assert int(ghost.num_batches_tracked) == int(plain.num_batches_tracked) == 3 + chunks


def test_batch_of_at_most_the_virtual_size_is_plain_batch_norm_bit_for_bit() -> None:
    plain = _plain_bn("2d", 0.1)
    ghost = convert_to_ghost_batch_norm(copy.deepcopy(plain), 128)
    x = _input("2d", 128).detach()
    assert torch.equal(ghost(x), plain(x))
    assert torch.equal(ghost.running_mean, plain.running_mean) and torch.equal(ghost.running_var, plain.running_var)


def _lenet_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = build_architecture("lenet5", input_shape=(1, 28, 28), num_classes=10).double()
    ghost = build_architecture("lenet5", input_shape=(1, 28, 28), num_classes=10, bn_virtual_batch_size=128).double()
    ghost.load_state_dict(plain.state_dict())
    return plain, ghost


def test_network_gradients_and_statistics_equal_four_accumulated_micro_batches() -> None:
    """lenet5 with ghost BN on a batch of 512 (virtual 128) = plain lenet5 accumulating 4
    micro-batches of 128 (gradient = sum of micro-batch gradients / 4 for the mean loss)."""
    plain, ghost = _lenet_pair()
    torch.manual_seed(3)
    x = torch.rand(512, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (512,))

    loss = F.cross_entropy(ghost(x), y)
    loss.backward()
    for xs, ys in zip(x.split(128), y.split(128), strict=True):
        (F.cross_entropy(plain(xs), ys) / 4).backward()

    ghost_state, plain_state = ghost.state_dict(), plain.state_dict()
    for name, parameter in plain.named_parameters():
        torch.testing.assert_close(dict(ghost.named_parameters())[name].grad, parameter.grad, **TOL, msg=name)
    for name, value in plain_state.items():  # running statistics (and the unchanged parameters)
        torch.testing.assert_close(ghost_state[name], value, **TOL, msg=name)


def test_eval_mode_is_plain_batch_norm() -> None:
    plain, ghost = _lenet_pair()
    x = torch.rand(512, 1, 28, 28, dtype=torch.float64)
    ghost(x), plain(x)
    plain.load_state_dict(ghost.state_dict())
    plain.eval(), ghost.eval()
    for batch in (512, 300, 7):
        assert torch.equal(ghost(x[:batch]), plain(x[:batch]))
    assert torch.equal(ghost(x[:200])[:100], ghost(x[:100]))  # per-sample: running statistics


def test_state_dict_is_plain_batch_norms_and_checkpoints_load_both_ways() -> None:
    plain, ghost = _lenet_pair()
    ghost(torch.rand(300, 1, 28, 28, dtype=torch.float64))  # move ghost's statistics away from plain's
    assert list(ghost.state_dict()) == list(plain.state_dict())
    for (name, a), b in zip(ghost.state_dict().items(), plain.state_dict().values(), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
    plain.load_state_dict(ghost.state_dict(), strict=True)
    fresh = build_architecture("lenet5", input_shape=(1, 28, 28), num_classes=10, bn_virtual_batch_size=64).double()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    for name, value in ghost.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    # the classifier too: a ghost-BN checkpoint loads into a plain model
    with_ghost = ImageClassifier(arch="mlp", input_shape=(1, 8, 8), bn_virtual_batch_size=32)
    ImageClassifier(arch="mlp", input_shape=(1, 8, 8)).load_state_dict(with_ghost.state_dict(), strict=True)


def test_conversion_keeps_settings_parameters_and_mode() -> None:
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.3)
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.running_var.fill_(4.0)
    bn.bias.requires_grad_(False)
    bn.eval()
    wrapper = nn.Sequential(nn.Conv2d(1, 4, 3), bn, nn.Sequential(nn.BatchNorm1d(3)), nn.SyncBatchNorm(2))
    converted = convert_to_ghost_batch_norm(wrapper, 16)
    assert converted is wrapper
    ghost = wrapper[1]
    assert isinstance(ghost, GhostBatchNorm2d) and isinstance(ghost, nn.BatchNorm2d)
    assert (ghost.eps, ghost.momentum, ghost.virtual_batch_size, ghost.training) == (1e-3, 0.3, 16, False)
    assert torch.equal(ghost.weight, torch.full((4,), 2.0)) and torch.equal(ghost.running_var, torch.full((4,), 4.0))
    assert ghost.weight.requires_grad and not ghost.bias.requires_grad
    assert isinstance(wrapper[2][0], GhostBatchNorm1d)
    assert type(wrapper[3]) is nn.SyncBatchNorm  # not a plain BatchNorm: left alone
    assert "virtual_batch_size=16" in repr(ghost)
    assert isinstance(convert_to_ghost_batch_norm(nn.BatchNorm1d(3), 8), GhostBatchNorm1d)  # a bare layer


@pytest.mark.parametrize("arch", sorted(INPUT_SHAPES))
def test_every_registered_architecture_gets_ghost_batch_norm(arch: str) -> None:
    assert set(INPUT_SHAPES) <= set(ARCHITECTURES)
    torch.manual_seed(0)
    plain = build_architecture(arch, input_shape=INPUT_SHAPES[arch], num_classes=10)
    ghost = build_architecture(arch, input_shape=INPUT_SHAPES[arch], num_classes=10, bn_virtual_batch_size=4)
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d)
    plain_bns = [name for name, m in plain.named_modules() if isinstance(m, bn_types)]
    ghost_bns = [name for name, m in ghost.named_modules() if isinstance(m, (GhostBatchNorm1d, GhostBatchNorm2d))]
    assert plain_bns and ghost_bns == plain_bns
    assert not [m for m in ghost.modules() if type(m) in bn_types]
    assert list(ghost.state_dict()) == list(plain.state_dict())
    logits = ghost.train()(torch.rand(11, *INPUT_SHAPES[arch]))  # chunks of 4, 4 and 3
    assert logits.shape == (11, 10) and torch.isfinite(logits).all()
    # without BatchNorm there is nothing to swap
    no_bn = build_architecture(
        arch, input_shape=INPUT_SHAPES[arch], num_classes=10, batch_norm=False, bn_virtual_batch_size=4
    )
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in no_bn.modules())


@pytest.mark.parametrize("bad", [0, -128, 2.5, True, "128"])
def test_bad_virtual_batch_size_names_the_value_and_the_fix(bad: object) -> None:
    with pytest.raises(UserInputError, match="bn_virtual_batch_size must be a positive integer") as info:
        ImageClassifier(arch="mlp", input_shape=(1, 8, 8), bn_virtual_batch_size=bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value) and "e.g. 128" in str(info.value) and "unset" in str(info.value)
    with pytest.raises(UserInputError, match="virtual_batch_size must be a positive integer"):
        GhostBatchNorm2d(4, virtual_batch_size=0)


def test_he_normal_init_draws_conv_weights_from_n_0_2_over_fan_out() -> None:
    """model.init=he_normal: every conv (3x3 and the 1x1 projection shortcuts) ~ N(0, 2 / fan_out),
    fan_out = out_channels x k x k, as in the authors' models/resnet.py; BN and linear untouched."""
    torch.manual_seed(0)
    network = build_architecture("resnet20", input_shape=(3, 32, 32), num_classes=10, init="he_normal")
    convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    assert any(m.kernel_size == (1, 1) for m in convs)
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        expected = math.sqrt(2.0 / fan_out)
        relative_se = 1.0 / math.sqrt(2 * conv.weight.numel())  # standard error of a sample std
        assert abs(conv.weight.std().item() / expected - 1) < 5 * relative_se, conv
        assert abs(conv.weight.mean().item()) < 5 * expected / math.sqrt(conv.weight.numel())
    for bn in (m for m in network.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    torch.manual_seed(0)
    default = build_architecture("resnet20", input_shape=(3, 32, 32), num_classes=10)
    torch.manual_seed(0)
    explicit = build_architecture("resnet20", input_shape=(3, 32, 32), num_classes=10, init="default")
    for a, b in zip(default.state_dict().values(), explicit.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the default is unchanged
    with pytest.raises(UserInputError, match=r"unknown initialisation 'xavier'; valid names: default, he_normal"):
        ImageClassifier(arch="mlp", input_shape=(1, 8, 8), init="xavier")


@pytest.mark.usefixtures("clean_argv")
def test_cli_accepts_bn_virtual_batch_size_and_refuses_a_bad_one(
    in_tmp_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    import yaml

    quickstart = str(QUICKSTART)
    with pytest.raises(SystemExit) as info:
        main(
            [
                "fit",
                "--config",
                quickstart,
                "--model.bn_virtual_batch_size",
                "128",
                "--model.init",
                "he_normal",
                "--print_config",
            ]
        )
    assert info.value.code in (0, None)
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["bn_virtual_batch_size"] == 128 and model["init"] == "he_normal"

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", quickstart, "--trainer.callbacks=[]", "--model.bn_virtual_batch_size", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: bn_virtual_batch_size must be a positive integer" in err and "got 0" in err
    assert "Traceback" not in err and not (in_tmp_dir / "runs").exists()
