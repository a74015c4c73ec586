r"""The loss of a batch, as every analysis sees it: one definition and three optional hooks.

Every analysis of this package (Hessian spectrum, input Hessian, loss landscape, sharpness,
interpolation, attacks) needs to evaluate a model on a batch. They all go through this module:

* :func:`batch_loss` — the batch-mean loss :math:`J(\theta; B)`. A module that defines
  ``hessian_loss(self, batch) -> Tensor`` gets it called with the batch exactly as its
  ``training_step`` receives it (one collated batch; a bare tensor stays a tensor; micro-batches
  are row slices of it with the same structure). Otherwise the batch must hold inputs and
  integer class targets (see :func:`inputs_and_targets`) and the loss is
  ``cross_entropy(module(x), y)``.
* :func:`batch_accuracy` — top-1 accuracy, NaN where it is not defined. A module may define
  ``hessian_accuracy(self, batch) -> Tensor | float``; a module with its own ``hessian_loss``
  and no ``hessian_accuracy`` has no accuracy (its ``forward`` need not be a classifier's).
* :func:`inputs_and_targets` — the input tensor and labels that attacks and input-space
  curvature perturb: ``hessian_inputs(self, batch) -> (inputs, labels)`` when the module defines
  it, else the first two entries of a ``(x, y, ...)`` batch or the ``x``/``y``-style keys of a
  dict (:data:`INPUT_TARGET_KEYS`).

The hooks are looked up by name (duck typing): any ``torch.nn.Module`` may define them, a
LightningModule of either Lightning package included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hessian.curvature.batches import INPUT_TARGET_KEYS, find_inputs_targets, map_tensors

__all__ = [
    "BatchLoss",
    "BatchLossModule",
    "batch_accuracy",
    "batch_loss",
    "has_custom_loss",
    "inputs_and_targets",
    "loss_and_accuracy",
    "loss_of_outputs",
    "replace_inputs",
]

#: ``batch_loss(module, batch) -> Tensor``: the batch-mean loss of ``module`` on ``batch``
BatchLoss = Callable[[nn.Module, Any], Tensor]

LOSS_HOOK = "hessian_loss"
ACCURACY_HOOK = "hessian_accuracy"
INPUTS_HOOK = "hessian_inputs"
_DEFAULT_LOSS = "The default loss (cross-entropy of module(inputs) against the labels)"


def _hook(module: nn.Module, name: str) -> Callable[[Any], Any] | None:
    hook = getattr(module, name, None)
    return hook if callable(hook) else None


def has_custom_loss(module: nn.Module) -> bool:
    """Whether ``module`` defines ``hessian_loss(batch)``."""
    return _hook(module, LOSS_HOOK) is not None


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"a bare tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {list(batch)}"
    if isinstance(batch, (list, tuple)):
        kinds = ", ".join(type(item).__name__ for item in batch)
        return f"a {type(batch).__name__} of {len(batch)} items ({kinds})"
    return f"a {type(batch).__name__}"


def inputs_and_targets(
    module: nn.Module, batch: Any, *, needed_by: str = "This analysis", integer_labels: bool = True
) -> tuple[Tensor, Tensor]:
    """The floating-point input tensor and the class labels of ``batch``.

    ``module.hessian_inputs(batch)`` when the module defines it; else ``(batch[0], batch[1])`` of
    a tuple/list batch, or the ``x``/``y`` (``input``/``target``, ``inputs``/``targets``,
    ``image``/``label``) entries of a dict batch.

    Returns:
        ``(inputs, targets)`` as found in the batch (not copied).

    Raises:
        TypeError: if the batch holds no such pair, or the pair is not (floating inputs, integer
            labels, unless ``integer_labels=False``: then any targets); the message says what
            ``needed_by`` needs and how to provide it.
    """
    hook = _hook(module, INPUTS_HOOK)
    pair = hook(batch) if hook is not None else find_inputs_targets(batch)
    keys = ", ".join(f"{x}/{y}" for x, y in INPUT_TARGET_KEYS)
    advice = (
        f"{needed_by} needs an input tensor (floating point, samples along dim 0) and integer class labels"
        f" from each batch: batches (inputs, labels, ...) or dicts with keys {keys}. For other batches"
        " define `hessian_inputs(self, batch) -> (inputs, labels)` on your LightningModule."
    )
    if pair is None:
        raise TypeError(f"Cannot find inputs and labels in {_describe(batch)}. {advice}")
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
        raise TypeError(
            f"`hessian_inputs(batch)` must return a pair of tensors (inputs, labels), got {_describe(pair)}."
        )
    inputs, targets = pair
    bad_labels = integer_labels and (targets.is_floating_point() or targets.is_complex())
    if not inputs.is_floating_point() or bad_labels:
        raise TypeError(
            f"Found inputs of dtype {inputs.dtype} and labels of dtype {targets.dtype} in {_describe(batch)}. {advice}"
        )
    return inputs, targets


def _default_loss_pair(module: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    try:
        return inputs_and_targets(module, batch, needed_by=_DEFAULT_LOSS, integer_labels=False)
    except TypeError as error:
        raise TypeError(
            f"{error} If your model's loss is not this cross-entropy, define `hessian_loss(self, batch) -> Tensor`"
            " (the batch-mean loss) on your LightningModule; every analysis then uses it."
        ) from None


def batch_loss(module: nn.Module, batch: Any) -> Tensor:
    """The batch-mean training loss of ``module`` on ``batch``, as every analysis sees it.

    ``module.hessian_loss(batch)`` when the module defines it, else
    ``cross_entropy(module(x), y)`` for the ``(x, y)`` of :func:`inputs_and_targets`.

    Returns:
        The batch-mean loss, a 0-d tensor.
    """
    custom = _hook(module, LOSS_HOOK)
    if custom is not None:
        return custom(batch)
    inputs, targets = _default_loss_pair(module, batch)
    return F.cross_entropy(module(inputs), targets)


def _accuracy_of_logits(logits: Tensor, targets: Tensor) -> Tensor:
    if targets.is_floating_point() or logits.dim() < 2 or logits.shape[:-1] != targets.shape:
        return torch.full((), math.nan, device=logits.device)
    return (logits.argmax(dim=-1) == targets).to(torch.float32).mean()


def batch_accuracy(module: nn.Module, batch: Any) -> Tensor:
    """Top-1 accuracy of ``module`` on ``batch`` as a 0-d tensor; NaN where it is not defined.

    ``module.hessian_accuracy(batch)`` when defined; NaN for a module with its own
    ``hessian_loss`` and no ``hessian_accuracy``; else ``argmax(module(x)) == y`` on the
    :func:`inputs_and_targets` pair (NaN if the batch has none or the outputs are not logits).

    Returns:
        A 0-d tensor: the fraction of correct predictions, or NaN.
    """
    hook = _hook(module, ACCURACY_HOOK)
    if hook is not None:
        return torch.as_tensor(hook(batch), dtype=torch.float32).reshape(())
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if has_custom_loss(module):
        return torch.full((), math.nan, device=device)
    try:
        inputs, targets = inputs_and_targets(module, batch)
    except TypeError:
        return torch.full((), math.nan, device=device)
    return _accuracy_of_logits(module(inputs), targets)


def loss_and_accuracy(module: nn.Module, batch: Any, accuracy: bool = True) -> tuple[Tensor, Tensor]:
    """:func:`batch_loss` and (if ``accuracy``) :func:`batch_accuracy`, NaN otherwise.

    For the default cross-entropy both come from one forward pass.

    Returns:
        ``(loss, accuracy)``, two 0-d tensors (accuracy NaN when not asked for or not defined).
    """
    if not accuracy or has_custom_loss(module) or _hook(module, ACCURACY_HOOK) is not None:
        loss = batch_loss(module, batch)
        acc = batch_accuracy(module, batch) if accuracy else torch.full((), math.nan, device=loss.device)
        return loss, acc.to(loss.device)
    inputs, targets = _default_loss_pair(module, batch)
    logits = module(inputs)
    return F.cross_entropy(logits, targets), _accuracy_of_logits(logits, targets)


def _path_to(batch: Any, target: Tensor) -> tuple[Any, ...] | None:
    """The keys/indices leading from ``batch`` to the tensor object ``target``, or None."""
    if batch is target:
        return ()
    if isinstance(batch, Mapping):
        items: Any = batch.items()
    elif isinstance(batch, (list, tuple)):
        items = enumerate(batch)
    else:
        return None
    for key, value in items:
        path = _path_to(value, target)
        if path is not None:
            return (key, *path)
    return None


def _replace_at(batch: Any, path: tuple[Any, ...], value: Tensor) -> Any:
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(batch, Mapping):
        mapping_type: Callable[..., Any] = type(batch)  # dict, OrderedDict, ...: built from (key, value) pairs
        return mapping_type((k, _replace_at(v, rest, value) if k == key else v) for k, v in batch.items())
    items = [_replace_at(v, rest, value) if i == key else v for i, v in enumerate(batch)]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*items)
    return type(batch)(items)


def replace_inputs(module: nn.Module, batch: Any) -> Callable[[Tensor, Tensor], Any]:
    """A function ``(new_inputs, rows) -> batch'`` for input-space derivatives of any batch.

    ``batch'`` is ``batch`` restricted to ``rows`` (an index tensor over dim 0 of every tensor)
    with its input tensor (the one :func:`inputs_and_targets` finds) replaced by ``new_inputs``,
    so that ``hessian_loss`` sees the batch structure it trains on.

    Returns:
        The function ``rebuild(new_inputs, rows)`` that builds the restricted batch.

    Raises:
        TypeError: as :func:`inputs_and_targets`, or if ``hessian_inputs`` returns a tensor that
            is not part of the batch (it must return the batch's own input tensor).
    """
    inputs, _ = inputs_and_targets(module, batch, needed_by="Input-space curvature")
    path = _path_to(batch, inputs)
    if path is None:
        raise TypeError(
            "`hessian_inputs(batch)` must return the input tensor stored in the batch itself (not a copy or a"
            " transformed tensor), so that the input-space analysis can perturb it inside the batch."
        )

    def rebuild(new_inputs: Tensor, rows: Tensor) -> Any:
        sliced = map_tensors(
            batch, lambda t: t[rows.to(t.device)] if t.dim() > 0 and t.shape[0] == inputs.shape[0] else t
        )
        return _replace_at(sliced, path, new_inputs)

    return rebuild


class BatchLossModule(nn.Module):
    """``forward(batch)`` is ``loss(inner, batch)``: makes any loss a module call.

    ``torch.func.functional_call`` on this wrapper, with tensor names prefixed ``inner.``,
    differentiates or vmaps any loss definition (``hessian_loss`` included) with respect to the
    inner module's parameters and buffers through public API.
    """

    def __init__(self, inner: nn.Module, loss: BatchLoss | None = None, *, accuracy: bool | None = None) -> None:
        super().__init__()
        self.inner = inner
        self._loss = loss
        self._accuracy = accuracy

    def forward(self, batch: Any) -> Any:
        if self._accuracy is not None:  # (loss, accuracy) pairs for the landscape
            if self._loss is None:
                return loss_and_accuracy(self.inner, batch, self._accuracy)
            loss = self._loss(self.inner, batch)
            acc = batch_accuracy(self.inner, batch) if self._accuracy else torch.full((), math.nan, device=loss.device)
            return loss, acc.to(loss.device)
        return (self._loss or batch_loss)(self.inner, batch)


def loss_of_outputs(loss_fn: Callable[[Tensor, Any], Tensor]) -> BatchLoss:
    """A :data:`BatchLoss` from ``loss_fn(model(x), y)`` on the ``(x, y)`` of each batch."""

    def loss(module: nn.Module, batch: Sequence[Any] | Mapping[str, Any]) -> Tensor:
        pair = find_inputs_targets(batch)
        if pair is None:
            raise TypeError(f"loss_fn(model(x), y) needs (x, y) batches, got {_describe(batch)}; pass batch_loss=.")
        return loss_fn(module(pair[0]), pair[1])

    return loss
