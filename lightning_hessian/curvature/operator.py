"""The Hessian of a model's mean loss over a fixed dataset, as a linear operator.

For batches :math:`B_1, \\dots, B_m` with :math:`n_b` samples each (:math:`N = \\sum_b n_b`) and
batch-mean losses :math:`L_b(\\theta)`, the operator is

.. math:: H = \\nabla^2_\\theta \\frac{1}{N} \\sum_b n_b L_b(\\theta),

the Hessian of the sample-weighted mean loss, exact for an unequal last batch. Across processes
(DDP) every rank sums :math:`n_b H_b V` over its shard; one all-reduce of that sum and one of the
sample count give the global product, exact for unequal shards.

Products are forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``) over
``torch.func.functional_call``, batched over K vectors with ``torch.func.vmap`` so that the K
products share one primal forward and backward pass. Chunks of vectors are sized to the free
accelerator memory; an out-of-memory error halves the chunk and retries. Where ``torch.func``
cannot run the model (custom autograd functions without vmap support, data-dependent Python
control flow), plain double backward is used instead.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian.curvature.batches import batch_size, map_tensors, slice_batch
from lightning_hessian.curvature.context import analysis_mode
from lightning_hessian.curvature.objective import BatchLoss, BatchLossModule, loss_of_outputs

__all__ = ["HessianOperator", "LossFunction", "BatchLoss"]

LossFunction = Callable[[Tensor, Any], Tensor]
ParamFilter = str | re.Pattern | Callable[[str, nn.Parameter], bool]

_HVP_MODES = ("auto", "func", "double_backward")


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _is_single_batch(data: Any) -> bool:
    """``(x, y)``/``{"x": x, ...}``/a bare tensor is one batch; anything else iterates batches."""
    if isinstance(data, Tensor):
        return True
    if isinstance(data, Mapping):
        return all(isinstance(v, Tensor) for v in data.values())
    if isinstance(data, (list, tuple)):
        return len(data) > 0 and all(isinstance(v, Tensor) for v in data)
    return False


def _split_batch(batch: Any, size: int) -> list[Any]:
    return [slice_batch(batch, start, start + size) for start in range(0, batch_size(batch), size)]


class HessianOperator:
    """The Hessian of the sample-weighted mean loss of ``model`` over ``data``.

    Vectors are flat 1-D tensors of length :attr:`num_params` (parameters concatenated in
    :attr:`param_names` order) in :attr:`dtype` on :attr:`device`; :meth:`flatten` and
    :meth:`unflatten` convert from and to parameter-shaped dictionaries.

    Every call runs inside :func:`~lightning_hessian.curvature.context.analysis_mode`: eval mode,
    gradients enabled (also under an outer ``inference_mode``), autocast and TF32 off; the
    model's flags, parameters, buffers, ``.grad``, ``requires_grad`` and the RNG states are
    bit-identical afterwards. The parameters are read at each call, so the operator follows the
    model if its weights change.

    Args:
        model: the network. A ``torch.compile``d module is unwrapped (compiled graphs cannot
            double-backward).
        loss_fn: ``loss_fn(model(x), y)`` returning the batch-mean loss (for example
            ``torch.nn.functional.cross_entropy``). Not needed when ``batch_loss`` is given.
        data: one batch (a tuple/list of tensors ``(x, y, ...)``, a dict of tensors, or a tensor),
            split into micro-batches of ``micro_batch_size``; or an iterable of such batches. The
            sample count of a batch is dim 0 of its first tensor. Tensors are moved to the model's
            device once (and cloned if created under ``inference_mode``). A list of tensors is
            read as one ``(x, y, ...)`` batch; pass ``batches=`` instead to be unambiguous.
        batches: instead of ``data``: a sequence of batches, each passed to the loss exactly as
            it is (a bare-tensor batch stays a tensor), split only if ``micro_batch_size`` is set.
        params: the parameters to differentiate, default all parameters requiring grad.
        batch_loss: ``batch_loss(module, batch)`` returning the batch-mean loss, for models whose
            loss is not ``loss_fn(model(x), y)``.
        param_filter: keep only parameters whose name matches: a substring, a compiled regex
            (``search``), or a callable ``(name, param) -> bool``. Gives per-layer spectra.
        all_reduce: ``all_reduce(t) -> t`` summing a tensor over processes (DDP); every rank must
            then make the same calls in the same order (probe vectors from a seeded generator).
        dtype: the precision of the analysis; ``torch.float64`` analyses a float64 copy of the
            parameters, buffers and floating inputs (the model is not modified). Default: the
            parameters' dtype, and a float32 copy for low-precision (``*-true``) parameters.
        max_chunk: at most this many vectors per vmapped product (default 64).
        micro_batch_size: split a single ``data`` batch into micro-batches of this size
            (default 512).
        hvp_mode: ``"auto"`` (times ``torch.func`` against double backward on the second call and
            keeps the faster; falls back to double backward with a warning where ``torch.func``
            fails), ``"func"`` or ``"double_backward"``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction | None = None,
        data: Any = None,
        params: Iterable[nn.Parameter] | None = None,
        *,
        batches: Sequence[Any] | None = None,
        batch_loss: BatchLoss | None = None,
        param_filter: ParamFilter | None = None,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        dtype: torch.dtype | None = None,
        max_chunk: int | None = None,
        micro_batch_size: int | None = None,
        hvp_mode: str = "auto",
    ) -> None:
        if loss_fn is None and batch_loss is None:
            raise ValueError("HessianOperator needs `loss_fn(output, y)` or `batch_loss(module, batch)`.")
        if (data is None) == (batches is None):
            raise ValueError(
                "HessianOperator needs exactly one of `data` (a batch `(x, y)` or an iterable of batches) and"
                " `batches` (a sequence of batches, each passed to the loss as it is)."
            )
        if hvp_mode not in _HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r} is not one of {_HVP_MODES}.")
        if max_chunk is not None and max_chunk < 1:
            raise ValueError(f"max_chunk={max_chunk} must be a positive integer or None.")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be a positive integer or None.")
        model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: analyse the eager module
        self.model = model
        self.loss_fn = loss_fn
        self.batch_loss = batch_loss
        self.all_reduce = all_reduce
        self.max_chunk = max_chunk or 64
        self.hvp_mode = hvp_mode
        self.hvp_count = 0
        self._depth = 0
        self._chunk: int | None = None
        self._warm: set[str] = set()
        self._tuned: dict[str, str] = {}
        self._wrapper = BatchLossModule(model, batch_loss or loss_of_outputs(loss_fn))  # type: ignore[arg-type]

        named = list(model.named_parameters())
        if params is not None:
            wanted = {id(p) for p in params}
            named = [(n, p) for n, p in named if id(p) in wanted]
        else:
            named = [(n, p) for n, p in named if p.requires_grad]
        if param_filter is not None:
            named = [(n, p) for n, p in named if _matches(param_filter, n, p)]
        if not named:
            raise ValueError(
                f"No parameters to analyse (params={'given' if params is not None else 'default'},"
                f" param_filter={param_filter!r}); names are {[n for n, _ in model.named_parameters()]}."
            )
        self.param_names: list[str] = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.param_shapes: list[torch.Size] = [p.shape for p in self._params]
        self._sizes = [p.numel() for p in self._params]
        self.num_params: int = sum(self._sizes)
        first = self._params[0]
        self.device: torch.device = first.device
        if dtype is None:
            dtype = first.dtype if first.dtype in (torch.float32, torch.float64) else torch.float32
        self.dtype: torch.dtype = dtype

        with torch.inference_mode(False), torch.no_grad():
            if batches is not None:
                batches = list(batches)
            elif _is_single_batch(data):
                batches = _split_batch(data, micro_batch_size or 512)
            else:
                batches = list(data)
                if len(batches) == 1 and _is_single_batch(batches[0]):
                    batches = _split_batch(batches[0], micro_batch_size or 512)
            if micro_batch_size is not None:
                batches = [piece for batch in batches for piece in _split_batch(batch, micro_batch_size)]
            self.batches: list[Any] = [map_tensors(b, self._prepare_tensor) for b in batches]
            self.batch_sizes: list[int] = [batch_size(b) for b in self.batches]
            self.num_local_samples: int = sum(self.batch_sizes)
            count = torch.tensor([float(self.num_local_samples)], device=self.device, dtype=torch.float64)
            self.num_samples: int = int(round(self._reduce(count).item()))
        if self.num_samples == 0:
            raise ValueError("`data` holds no samples.")

    # ----------------------------------------------------------------------------------- helpers
    def _prepare_tensor(self, tensor: Tensor) -> Tensor:
        tensor = tensor.to(self.device)
        if tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)  # float64 analysis, or float32 analysis of a low-precision model
        if tensor.is_inference():
            tensor = tensor.clone()
        return tensor

    def _reduce(self, tensor: Tensor) -> Tensor:
        return tensor if self.all_reduce is None else self.all_reduce(tensor)

    @contextlib.contextmanager
    def analysis(self) -> Iterator[None]:
        """Enter :func:`analysis_mode` once for many products (re-entrant; products nest inside)."""
        if self._depth > 0:  # callers may have turned gradients off in between: on again
            self._depth += 1
            try:
                with torch.inference_mode(False), torch.enable_grad():
                    yield
            finally:
                self._depth -= 1
            return
        with analysis_mode(self.model):
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0

    def _constants(self) -> dict[str, Tensor]:
        """Every parameter and buffer, detached (and cast for float64 analysis), prefixed."""
        out = {}
        for name, tensor in (*self.model.named_parameters(), *self.model.named_buffers()):
            tensor = tensor.detach()
            if tensor.is_floating_point() and tensor.dtype != self.dtype:
                tensor = tensor.to(self.dtype)
            out["inner." + name] = tensor
        return out

    def _primals(self) -> tuple[Tensor, ...]:
        return tuple(p.detach().to(self.dtype) for p in self._params)

    def _batch_loss_fn(self, batch: Any, constants: dict[str, Tensor]) -> Callable[..., Tensor]:
        names = ["inner." + n for n in self.param_names]

        def loss(*params: Tensor) -> Tensor:
            tensors = dict(constants)
            tensors.update(zip(names, params))
            return torch.func.functional_call(self._wrapper, tensors, (batch,))

        return loss

    # ------------------------------------------------------------------------- flat <-> params
    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors (dict keyed by name, or a sequence in order)."""
        if isinstance(tensors, Mapping):
            missing = [n for n in self.param_names if n not in tensors]
            if missing:
                raise KeyError(f"flatten: missing parameters {missing}")
            tensors = [tensors[n] for n in self.param_names]
        if len(tensors) != len(self._sizes):
            raise ValueError(f"flatten: expected {len(self._sizes)} tensors, got {len(tensors)}.")
        return torch.cat([t.detach().reshape(-1).to(self.device, self.dtype) for t in tensors])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into a dict of parameter-shaped tensors keyed by name."""
        if flat.shape != (self.num_params,):
            raise ValueError(f"unflatten: expected shape ({self.num_params},), got {tuple(flat.shape)}.")
        pieces = flat.split(self._sizes)
        return {n: piece.view(shape) for n, piece, shape in zip(self.param_names, pieces, self.param_shapes)}

    # ------------------------------------------------------------------------------ quantities
    def loss(self) -> Tensor:
        """The sample-weighted mean loss over ``data`` (all ranks), a 0-d tensor in :attr:`dtype`."""
        with self.analysis(), torch.no_grad():
            constants = self._constants()
            primals = self._primals()
            total = torch.zeros((), device=self.device, dtype=torch.float64)
            for batch, count in zip(self.batches, self.batch_sizes):
                total += count * self._batch_loss_fn(batch, constants)(*primals).double()
            total = self._reduce(total.reshape(1)).reshape(())
        return (total / self.num_samples).to(self.dtype)

    def gradient(self) -> Tensor:
        """The gradient of the mean loss, flat, in :attr:`dtype`."""
        with self.analysis():
            constants = self._constants()
            total = torch.zeros(self.num_params, device=self.device, dtype=self.dtype)
            for batch, count in zip(self.batches, self.batch_sizes):
                primals = tuple(p.requires_grad_() for p in self._primals())
                loss = self._batch_loss_fn(batch, constants)(*primals)
                grads = torch.autograd.grad(loss, primals)
                total += count * torch.cat([g.reshape(-1) for g in grads])
            total = self._reduce(total)
        return total / self.num_samples

    def matvec(self, v: Tensor) -> Tensor:
        """``H @ v`` for a flat vector ``v`` of length :attr:`num_params`."""
        if v.ndim != 1 or v.shape[0] != self.num_params:
            raise ValueError(f"matvec expects a vector of shape ({self.num_params},), got {tuple(v.shape)}.")
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def matmat(self, V: Tensor) -> Tensor:
        """``H @ V`` for ``V`` of shape ``(num_params, K)``: K products sharing the primal passes."""
        if V.ndim != 2 or V.shape[0] != self.num_params:
            raise ValueError(f"matmat expects shape ({self.num_params}, K), got {tuple(V.shape)}.")
        num_vectors = V.shape[1]
        vectors = V.detach().to(self.device, self.dtype).T.contiguous()  # (K, P)
        with self.analysis():
            if num_vectors == 0:
                total = torch.zeros_like(vectors)
            else:
                total = self._tuned_product(vectors)
            total = self._reduce(total)
        self.hvp_count += num_vectors
        return (total / self.num_samples).T

    __matmul__ = matmat

    # ------------------------------------------------------------------------------ internals
    def _tuned_product(self, vectors: Tensor) -> Tensor:
        """``sum_b n_b H_b V`` with the faster of forward-over-reverse and double backward.

        With ``hvp_mode="auto"`` the first call for single vectors (and for blocks) runs
        ``torch.func``, which also warms it up; the second times both implementations on the same
        vectors and keeps the faster for the rest of this operator's life. (On an H100,
        ``jvp(grad)`` with ``vmap`` wins clearly; on CPUs double backward is often faster for
        single vectors.) Both give the same product up to rounding.
        """
        bucket = "single" if vectors.shape[0] == 1 else "block"
        if self.hvp_mode != "auto":
            return self._product(vectors, self.hvp_mode)
        if bucket in self._tuned:
            return self._product(vectors, self._tuned[bucket])
        if bucket not in self._warm:
            self._warm.add(bucket)
            return self._product(vectors, "func")
        timings = {}
        for mode in ("func", "double_backward"):
            self._synchronize()
            began = time.perf_counter()
            result = self._product(vectors, mode)
            self._synchronize()
            timings[mode] = time.perf_counter() - began
            if mode == "func":
                kept = result
            if self.hvp_mode != "auto":  # torch.func failed and the operator fell back
                return result
        self._tuned[bucket] = min(timings, key=timings.get)
        return kept

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _product(self, vectors: Tensor, mode: str) -> Tensor:
        constants = self._constants()
        primals = self._primals()
        total = torch.zeros_like(vectors)
        for batch, count in zip(self.batches, self.batch_sizes):
            total.add_(self._batch_hvp(batch, constants, primals, vectors, mode), alpha=count)
        return total

    def _batch_hvp(
        self, batch: Any, constants: dict[str, Tensor], primals: tuple[Tensor, ...], vectors: Tensor, mode: str
    ) -> Tensor:
        """Batch-mean-loss Hessian times each row of ``vectors`` (K, P) -> (K, P)."""
        loss = self._batch_loss_fn(batch, constants)
        if mode == "func" and self.hvp_mode != "double_backward":
            try:
                return self._chunked(lambda chunk: self._func_hvp(loss, primals, chunk), vectors)
            except Exception as error:  # noqa: BLE001 - torch.func raises many types
                if _is_oom(error) or self.hvp_mode == "func":
                    raise
                warnings.warn(
                    f"torch.func cannot run this model ({type(error).__name__}: {error}); falling back to"
                    " double backward (slower). Pass hvp_mode='double_backward' to skip the attempt.",
                    stacklevel=5,
                )
                self.hvp_mode = "double_backward"
        return self._double_backward_hvp(loss, primals, vectors)

    def _chunked(self, fn: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        num = vectors.shape[0]
        chunk = min(num, self._chunk or self.max_chunk)
        outputs: list[Tensor] = []
        start = 0
        while start < num:
            size = min(chunk, num - start)
            try:
                outputs.append(fn(vectors[start : start + size]))
            except Exception as error:  # noqa: BLE001
                if not _is_oom(error) or size == 1:
                    raise
                chunk = max(1, (size + 1) // 2)
                self._chunk = chunk  # remember: later calls start at a size that fit
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start += size
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _func_hvp(self, loss: Callable[..., Tensor], primals: tuple[Tensor, ...], chunk: Tensor) -> Tensor:
        argnums = tuple(range(len(primals)))
        grad_fn = torch.func.grad(loss, argnums=argnums)

        def hvp(flat: Tensor) -> Tensor:
            tangents = tuple(piece.view(shape) for piece, shape in zip(flat.split(self._sizes), self.param_shapes))
            _, products = torch.func.jvp(grad_fn, primals, tangents)
            return torch.cat([p.reshape(-1) for p in products])

        if chunk.shape[0] == 1:
            return hvp(chunk[0]).unsqueeze(0)
        return torch.func.vmap(hvp)(chunk)

    def _double_backward_hvp(self, loss: Callable[..., Tensor], primals: tuple[Tensor, ...], vectors: Tensor) -> Tensor:
        leaves = tuple(p.detach().requires_grad_() for p in primals)
        grads = torch.autograd.grad(loss(*leaves), leaves, create_graph=True)
        rows = []
        for index in range(vectors.shape[0]):
            tangents = tuple(
                piece.view(shape) for piece, shape in zip(vectors[index].split(self._sizes), self.param_shapes)
            )
            products = torch.autograd.grad(
                grads, leaves, grad_outputs=tangents, retain_graph=index + 1 < vectors.shape[0], allow_unused=True
            )
            rows.append(
                torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1) for h, p in zip(products, leaves)])
            )
        return torch.stack(rows)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_params={self.num_params}, num_samples={self.num_samples},"
            f" batches={len(self.batches)}, dtype={self.dtype}, device={self.device})"
        )


def _matches(param_filter: ParamFilter, name: str, param: nn.Parameter) -> bool:
    if isinstance(param_filter, str):
        return param_filter in name
    if isinstance(param_filter, re.Pattern):
        return param_filter.search(name) is not None
    if callable(param_filter):
        return bool(param_filter(name, param))
    raise TypeError(f"param_filter must be a str, compiled regex or callable, got {type(param_filter)}.")
