"""Architecture registry: the paper's networks and common CIFAR baselines, built by name.

Every architecture takes the same options:

* ``activation``: ``relu``, ``softplus`` (``softplus(x) = log(1 + exp(beta * x)) / beta``; it is
  twice differentiable and approaches ReLU as ``beta`` grows, which the paper's reviewers asked for),
  ``elu`` or ``gelu``;
* ``batch_norm``: with ``False`` every BatchNorm layer becomes an identity;
* ``bn_virtual_batch_size``: Ghost BatchNorm (Hoffer et al. 2017): every ``nn.BatchNorm1d``/``2d``
  of the built network is swapped for
  :class:`~lightning_hessian.models.ghost_batch_norm.GhostBatchNorm1d`/``2d``, which in training
  normalises each slice of that many samples with its own statistics (exactly as accumulating those
  slices as micro-batches); evaluation and ``state_dict`` are plain BatchNorm's;
* ``init``: ``default`` (PyTorch's initialisation of each layer) or ``he_normal``: every
  ``nn.Conv2d`` weight (3x3, 5x5 and the 1x1 projection shortcuts alike) drawn from
  ``N(0, 2 / fan_out)`` with ``fan_out = out_channels * kernel_height * kernel_width``
  (``kaiming_normal_(mode="fan_out", nonlinearity="relu")``), as the authors' ResNet code
  (HessianFlow ``models/resnet.py``: ``normal_(0, sqrt(2 / n))``, ``n = k * k * out_channels``) does;
  convolution biases, linear layers and BatchNorm (weight 1, bias 0) keep PyTorch's initialisation.

Networks map a batch ``(N, C, H, W)`` to logits ``(N, num_classes)``. The input size of the first
fully connected layer is computed with a dummy forward pass of the convolutional part, so every
network works for any image size its pooling allows (CIFAR 32x32, MNIST 28x28, digits 8x8 for the
MLP). Input normalisation is *not* part of these networks: :class:`Normalize` is prepended by the
classifier, see :mod:`lightning_hessian.models.classifier`.

Registered names (:data:`ARCHITECTURES`):

* ``m1``: LeNet-5-style MNIST network (conv5x5(20)-pool-conv5x5(50)-pool-FC500-classes).
* ``lenet5``: LeNet-5 at its original widths (LeCun et al. 1998): conv5x5(6)-pool-conv5x5(16)-pool-
  FC120-FC84-classes, with max-pooling; on 28x28 images 44k parameters and 0.28M multiply-adds per
  image, about 10x fewer than ``m1``: the small CNN of the README's CPU results.
* ``c1``: the authors' CIFAR model C1: [conv5x5(64, pad 2)-act-BN-maxpool(3, stride 2, pad 1)] x 2,
  then FC 384-192-classes (4096 inputs to the first FC on 32x32 images).
* ``c2``: the authors' CIFAR model C2: conv3x3(64)-act-BN, conv3x3(64)-act-BN, maxpool 2,
  conv3x3(128)-act-BN, conv3x3(128)-act-BN, maxpool 2, FC 256-256-classes (no padding: 3200 inputs
  to the first FC on 32x32 images).
* ``resnet20``: CIFAR ResNet of depth 6n+2 (n=3), widths 16/32/64 (He et al. 2016).
* ``resnet18``: ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool).
* ``wrn16_4``: Wide ResNet 16-4 (Zagoruyko & Komodakis 2016), pre-activation blocks.
* ``mlp``: fully connected 256-128-classes, for the 8x8 digits.

New architectures are added with :func:`register_architecture`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_hessian.errors import UserInputError
from lightning_hessian.models.ghost_batch_norm import check_virtual_batch_size, convert_to_ghost_batch_norm

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "INITS",
    "ArchitectureBuilder",
    "LayerFactory",
    "Normalize",
    "build_architecture",
    "he_normal_init",
    "make_activation",
    "register_architecture",
]

ACTIVATIONS: tuple[str, ...] = ("relu", "softplus", "elu", "gelu")
INITS: tuple[str, ...] = ("default", "he_normal")

LayerFactory = Callable[[], nn.Module]
"""A zero-argument callable that returns a fresh activation module."""


@dataclass(frozen=True)
class BuildOptions:
    """What every architecture builder receives besides its name."""

    input_shape: tuple[int, int, int]
    num_classes: int
    activation: LayerFactory
    batch_norm: bool

    def norm2d(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels) if self.batch_norm else nn.Identity()

    def norm1d(self, features: int) -> nn.Module:
        return nn.BatchNorm1d(features) if self.batch_norm else nn.Identity()


ArchitectureBuilder = Callable[[BuildOptions], nn.Module]
ARCHITECTURES: dict[str, ArchitectureBuilder] = {}


def register_architecture(name: str) -> Callable[[ArchitectureBuilder], ArchitectureBuilder]:
    """Decorator adding a builder ``f(options: BuildOptions) -> nn.Module`` under ``name``."""

    def decorator(builder: ArchitectureBuilder) -> ArchitectureBuilder:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = builder
        return builder

    return decorator


def make_activation(name: str, softplus_beta: float = 1.0) -> LayerFactory:
    """Return a factory of fresh activation modules for ``name`` (one of :data:`ACTIVATIONS`).

    Raises:
        UserInputError: (a ``ValueError``) for an unknown name or a non-positive ``softplus_beta``.
    """
    if name not in ACTIVATIONS:
        raise UserInputError(f"unknown activation {name!r}; valid names: {', '.join(ACTIVATIONS)}")
    if name == "softplus":
        if softplus_beta <= 0:
            raise UserInputError(f"softplus_beta must be positive, got {softplus_beta}")
        return lambda: nn.Softplus(beta=softplus_beta)
    # Not in-place: analyses take second derivatives through these graphs.
    return {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU}[name]


def build_architecture(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    activation: str = "relu",
    softplus_beta: float = 1.0,
    batch_norm: bool = True,
    bn_virtual_batch_size: int | None = None,
    init: str = "default",
) -> nn.Module:
    """Build the registered architecture ``name`` (see :data:`ARCHITECTURES`).

    Args:
        name: registered architecture name.
        input_shape: ``(channels, height, width)`` of one input image.
        num_classes: number of logits.
        activation: one of :data:`ACTIVATIONS`.
        softplus_beta: sharpness of ``softplus`` (ignored for other activations).
        batch_norm: use BatchNorm layers (identity otherwise).
        bn_virtual_batch_size: Ghost BatchNorm: in training, BatchNorm statistics per this many
            samples (:mod:`~lightning_hessian.models.ghost_batch_norm`); ``None``: over the whole
            batch. No effect on a network without BatchNorm layers (``batch_norm=False``).
        init: weight initialisation, one of :data:`INITS` (module docstring).

    Returns:
        The network, initialised as ``init`` says, with Ghost BatchNorm layers when
        ``bn_virtual_batch_size`` is given.

    Raises:
        UserInputError: (a ``ValueError``) unknown name, activation or initialisation, a
            ``bn_virtual_batch_size`` that is not a positive integer, or an input too small for the
            network.
    """
    if name not in ARCHITECTURES:
        raise UserInputError(f"unknown architecture {name!r}; valid names: {', '.join(sorted(ARCHITECTURES))}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise UserInputError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    if num_classes < 2:
        raise UserInputError(f"num_classes must be at least 2, got {num_classes}")
    if init not in INITS:
        raise UserInputError(f"unknown initialisation {init!r}; valid names: {', '.join(INITS)}")
    if bn_virtual_batch_size is not None:
        bn_virtual_batch_size = check_virtual_batch_size(bn_virtual_batch_size)
    options = BuildOptions(shape, num_classes, make_activation(activation, softplus_beta), batch_norm)
    network = ARCHITECTURES[name](options)
    if init == "he_normal":
        he_normal_init(network)
    if bn_virtual_batch_size is not None:
        network = convert_to_ghost_batch_norm(network, bn_virtual_batch_size)
    return network


def he_normal_init(network: nn.Module) -> nn.Module:
    """He-normal initialisation of every ``nn.Conv2d`` weight in ``network`` (in place):
    ``w ~ N(0, 2 / fan_out)``, ``fan_out = out_channels * prod(kernel_size)``, the authors' ResNet
    initialisation (HessianFlow ``models/resnet.py``); biases and other layers are untouched.

    Returns:
        ``network`` itself.
    """
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return network


def _flat_features(features: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Size of ``features(x).flatten(1)`` for one image, from a dummy forward pass in eval mode
    (eval so that BatchNorm running statistics are not touched).

    Returns:
        The number of features per image.

    Raises:
        UserInputError: the forward pass raises a ``RuntimeError`` (an input too small for ``features``).
    """
    was_training = features.training
    features.eval()
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, *input_shape))
    except RuntimeError as err:
        raise UserInputError(f"input shape {input_shape} is too small for this architecture: {err}") from err
    finally:
        features.train(was_training)
    return out.flatten(1).shape[1]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the first layer of a network.

    Keeping the normalisation inside the model makes its input space the pixel space ``[0, 1]``
    for everything that differentiates with respect to the input (attacks, input Hessians), so
    perturbation sizes mean the same thing whatever the data normalisation.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise UserInputError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise UserInputError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class _FeaturesClassifier(nn.Module):
    """``classifier(features(x).flatten(1))``: the shape of m1, c1, c2 and mlp."""

    def __init__(self, features: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def _fc_head(in_features: int, widths: Sequence[int], o: BuildOptions, *, batch_norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), o.activation()]
        if batch_norm:
            layers.append(o.norm1d(width))
        in_features = width
    layers.append(nn.Linear(in_features, o.num_classes))
    return nn.Sequential(*layers)


@register_architecture("m1")
def _m1(o: BuildOptions) -> nn.Module:
    c = o.input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 20, 5), o.activation(), o.norm2d(20), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), o.activation(), o.norm2d(50), nn.MaxPool2d(2),
    )  # fmt: skip
    return _FeaturesClassifier(features, _fc_head(_flat_features(features, o.input_shape), [500], o))


@register_architecture("lenet5")
def _lenet5(o: BuildOptions) -> nn.Module:
    c = o.input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 6, 5), o.activation(), o.norm2d(6), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), o.activation(), o.norm2d(16), nn.MaxPool2d(2),
    )  # fmt: skip
    return _FeaturesClassifier(features, _fc_head(_flat_features(features, o.input_shape), [120, 84], o))


@register_architecture("c1")
def _c1(o: BuildOptions) -> nn.Module:
    c = o.input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 64, 5, padding=2), o.activation(), o.norm2d(64), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(64, 64, 5, padding=2), o.activation(), o.norm2d(64), nn.MaxPool2d(3, 2, padding=1),
    )  # fmt: skip
    return _FeaturesClassifier(features, _fc_head(_flat_features(features, o.input_shape), [384, 192], o))


@register_architecture("c2")
def _c2(o: BuildOptions) -> nn.Module:
    c = o.input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 64, 3), o.activation(), o.norm2d(64),
        nn.Conv2d(64, 64, 3), o.activation(), o.norm2d(64),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3), o.activation(), o.norm2d(128),
        nn.Conv2d(128, 128, 3), o.activation(), o.norm2d(128),
        nn.MaxPool2d(2),
    )  # fmt: skip
    return _FeaturesClassifier(features, _fc_head(_flat_features(features, o.input_shape), [256, 256], o))


@register_architecture("mlp")
def _mlp(o: BuildOptions) -> nn.Module:
    in_features = o.input_shape[0] * o.input_shape[1] * o.input_shape[2]
    return _FeaturesClassifier(nn.Identity(), _fc_head(in_features, [256, 128], o, batch_norm=True))


class BasicBlock(nn.Module):
    """Post-activation residual block ``act(bn(conv(act(bn(conv(x))))) + shortcut(x))``.

    The shortcut is a 1x1 convolution (+BN) when the shape changes (He et al.'s option B).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, o: BuildOptions) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=not o.batch_norm)
        self.bn1 = o.norm2d(out_channels)
        self.act1 = o.activation()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=not o.batch_norm)
        self.bn2 = o.norm2d(out_channels)
        self.act2 = o.activation()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=not o.batch_norm), o.norm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (stride 1, no max-pool), stages of :class:`BasicBlock`,
    global average pooling, one linear layer."""

    def __init__(self, o: BuildOptions, stem_width: int, widths: Sequence[int], blocks: Sequence[int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(o.input_shape[0], stem_width, 3, 1, 1, bias=not o.batch_norm),
            o.norm2d(stem_width),
            o.activation(),
        )
        stages: list[nn.Module] = []
        in_channels = stem_width
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if index == 0 else 2
            for block in range(count):
                stages.append(BasicBlock(in_channels, width, stride if block == 0 else 1, o))
                in_channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, o.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


@register_architecture("resnet20")
def _resnet20(o: BuildOptions) -> nn.Module:
    return ResNet(o, 16, [16, 32, 64], [3, 3, 3])  # depth 6n+2 with n=3


@register_architecture("resnet18")
def _resnet18(o: BuildOptions) -> nn.Module:
    return ResNet(o, 64, [64, 128, 256, 512], [2, 2, 2, 2])


class WideBlock(nn.Module):
    """Pre-activation wide residual block ``conv(act(bn(conv(act(bn(x)))))) + shortcut(x)``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, o: BuildOptions) -> None:
        super().__init__()
        self.bn1 = o.norm2d(in_channels)
        self.act1 = o.activation()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=not o.batch_norm)
        self.bn2 = o.norm2d(out_channels)
        self.act2 = o.activation()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=not o.batch_norm)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=not o.batch_norm)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """Wide ResNet of depth ``6n+4`` and widening factor ``k`` (widths 16k, 32k, 64k)."""

    def __init__(self, o: BuildOptions, depth: int, widen: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise UserInputError(f"Wide ResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(o.input_shape[0], 16, 3, 1, 1, bias=not o.batch_norm)
        blocks: list[nn.Module] = []
        in_channels = 16
        for index, width in enumerate([16 * widen, 32 * widen, 64 * widen]):
            for block in range(n):
                stride = 1 if index == 0 or block > 0 else 2
                blocks.append(WideBlock(in_channels, width, stride, o))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = o.norm2d(in_channels)
        self.act = o.activation()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, o.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.act(self.bn(self.blocks(self.stem(x))))).flatten(1))


@register_architecture("wrn16_4")
def _wrn16_4(o: BuildOptions) -> nn.Module:
    return WideResNet(o, depth=16, widen=4)
