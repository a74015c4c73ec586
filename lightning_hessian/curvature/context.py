"""The numerical and state guarantees every analysis in this package runs under.

Analysis (HVPs, attacks, landscape evaluation) happens in the middle of training, from callbacks
that may be called under ``torch.no_grad`` (validation inside ``fit``), ``torch.inference_mode``
(``trainer.validate``/``trainer.test``) or autocast. :func:`analysis_mode` puts the process into
a known state and :func:`preserved_state` promises that the model and the random number
generators are bit-identical afterwards, so that attaching an analysis never changes training.

Measured reasons (see ``docs/design.md``, "Numerical guarantees"): TF32 convolutions put the HVP of ResNet-18 1.9e-2 off
(relative) against float64, 2.9e-4 with TF32 off; BatchNorm in train mode changes the top
eigenvalue (83.4 vs 63.6) and overwrites the running statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "ModelStateSnapshot",
    "affine_batch_norm",
    "analysis_mode",
    "batch_norm_as_affine",
    "exact_float32",
    "preserved_state",
]


@dataclass
class ModelStateSnapshot:
    """Everything of a model and the process that an analysis may touch, saved to restore.

    ``.grad`` tensors are saved by reference *and* value: some libraries (foolbox through eagerpy)
    accumulate into them in place, so restoring the reference alone would not undo that.
    """

    training: list[tuple[nn.Module, bool]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    grads: list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor | None]]
    tensors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    cpu_rng: torch.Tensor | None = None
    cuda_rng: list[torch.Tensor] | None = None

    @classmethod
    def capture(cls, model: nn.Module, *, tensors: bool = False, rng: bool = True) -> ModelStateSnapshot:
        """Save ``model``'s mode flags, ``requires_grad``, ``.grad``, and optionally values.

        Args:
            model: the module to snapshot (all submodules are included).
            tensors: also clone every parameter and buffer, for analyses that write into them
                (loss-landscape evaluation, interpolation). Costs one copy of the model.
            rng: save the CPU and CUDA random number generator states.

        Returns:
            The snapshot; :meth:`restore` puts it back.
        """
        params = list(model.parameters())
        snapshot = cls(
            training=[(m, m.training) for m in model.modules()],
            requires_grad=[(p, p.requires_grad) for p in params],
            grads=[(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params],
        )
        if tensors:
            with torch.no_grad():
                snapshot.tensors = [(t, t.detach().clone()) for t in (*params, *model.buffers())]
        if rng:
            snapshot.cpu_rng = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                snapshot.cuda_rng = torch.cuda.get_rng_state_all()
        return snapshot

    def restore(self) -> None:
        """Put everything saved by :meth:`capture` back, bit for bit."""
        with torch.no_grad():
            for tensor, saved in self.tensors:
                if not torch.equal(tensor, saved):
                    tensor.copy_(saved)
            for param, grad, value in self.grads:
                if grad is not None and value is not None and not torch.equal(grad, value):
                    grad.copy_(value)
                param.grad = grad
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        for module, flag in self.training:
            module.train(flag)
        if self.cpu_rng is not None:
            torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, tensors: bool = False, rng: bool = True) -> Iterator[ModelStateSnapshot]:
    """Context manager: whatever happens inside, ``model`` and the RNGs leave as they came in.

    Args:
        model: the module whose state is saved and restored.
        tensors: also restore parameter and buffer values (set when the body writes into them).
        rng: also restore the CPU and CUDA generator states.

    Yields:
        The :class:`ModelStateSnapshot` taken on entry (restored on exit).
    """
    snapshot = ModelStateSnapshot.capture(model, tensors=tensors, rng=rng)
    try:
        yield snapshot
    finally:
        snapshot.restore()


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Turn TF32 off for matmuls and cuDNN convolutions, then restore the previous settings.

    Uses the ``fp32_precision`` API where torch has it (2.9 and newer), the ``allow_tf32`` flags
    otherwise; mixing the two raises in recent torch releases, so only one is touched.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        matmul = torch.backends.cuda.matmul
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
    else:  # pragma: no cover - torch < 2.9
        saved_flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_flags


_BATCH_NORM_ARGUMENTS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


class _AffineBatchNorm(TorchFunctionMode):
    """``F.batch_norm`` on running statistics computed as the affine map it is (see
    :func:`affine_batch_norm`); every other call, and batch norm on batch statistics, unchanged."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = dict(zip(_BATCH_NORM_ARGUMENTS, args, strict=False)) | kwargs
            mean, var = bound.get("running_mean"), bound.get("running_var")
            if not bound.get("training", False) and mean is not None and var is not None:
                weight, bias = bound.get("weight"), bound.get("bias")
                return _affine(bound["input"], mean, var, weight, bias, bound.get("eps", 1e-5))
        return func(*args, **kwargs)


def _affine(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel (dimension 1) as ``x * a + b``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


@contextlib.contextmanager
def affine_batch_norm() -> Iterator[None]:
    """Inside: BatchNorm on running statistics (eval mode) is computed as ``x * a + b`` per channel.

    The function is the same (to float rounding); its second derivatives are far cheaper.
    PyTorch's double backward of ``native_batch_norm`` runs the training-mode formula whatever
    the mode: on a small CNN with BatchNorm (``benchmarks/hvp_cost.py``) it was about half the
    time of a Hessian-vector product, where the affine map's double backward is a few
    elementwise products. BatchNorm on batch statistics (training mode, or no running
    statistics) is left to PyTorch.
    """
    with _AffineBatchNorm():
        yield


def batch_norm_as_affine(model: nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """:func:`affine_batch_norm` for a model with BatchNorm layers that keep running statistics,
    else a no-op context (the mode costs a few microseconds per torch call of the forward pass).

    Returns:
        A factory of the context to wrap each loss evaluation in.
    """
    batch_norms = (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    if any(m.running_mean is not None for m in batch_norms):
        return affine_batch_norm
    return contextlib.nullcontext


def _math_attention() -> contextlib.AbstractContextManager:
    """Force the math SDPA kernel: flash and memory-efficient kernels have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def analysis_mode(
    model: nn.Module, *, eval_mode: bool = True, tensors: bool = False, rng: bool = True
) -> Iterator[ModelStateSnapshot]:
    """Everything an analysis of ``model`` needs, undone on exit.

    Inside: gradients enabled (also under an outer ``torch.inference_mode``/``no_grad``), autocast
    off on every device type, TF32 off, the math attention kernel, ``model`` in eval mode
    (BatchNorm uses running statistics, dropout is off). On exit the model's flags,
    ``requires_grad``, ``.grad``, the RNG states and (with ``tensors=True``) its parameter and
    buffer values are restored bit for bit.

    Tensors created under ``inference_mode`` outside cannot take part in autograd: clone them
    inside this context (``x.clone()``) before use.

    Args:
        model: the module to analyse.
        eval_mode: put ``model`` in eval mode inside (restored on exit).
        tensors: snapshot and restore parameter and buffer values.
        rng: snapshot and restore the RNG states.

    Yields:
        The :class:`ModelStateSnapshot` taken on entry (restored on exit).
    """
    with contextlib.ExitStack() as stack:
        snapshot = stack.enter_context(preserved_state(model, tensors=tensors, rng=rng))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        stack.enter_context(exact_float32())
        stack.enter_context(_math_attention())
        if eval_mode:
            model.eval()
        yield snapshot
