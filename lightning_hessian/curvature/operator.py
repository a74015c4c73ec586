"""The Hessian of a model's mean loss over a fixed dataset, as a linear operator.

For batches :math:`B_1, \\dots, B_m` with :math:`n_b` samples each (:math:`N = \\sum_b n_b`) and
batch-mean losses :math:`L_b(\\theta)`, the operator is

.. math:: H = \\nabla^2_\\theta \\frac{1}{N} \\sum_b n_b L_b(\\theta),

the Hessian of the sample-weighted mean loss, exact for an unequal last batch. Across processes
(DDP) every rank sums :math:`n_b H_b V` over its shard; one all-reduce of that sum and one of the
sample count give the global product, exact for unequal shards.

Four ways to compute :math:`\\sum_b n_b H_b v` (``hvp_mode``), all exact up to rounding:

``"retained_graph"``
    The first-order graph :math:`g = \\sum_b n_b \\nabla L_b` (gradient with ``create_graph=True``)
    is built once per analysis context and kept; each product is one backward pass through it,
    :math:`H v = \\nabla_\\theta (g^\\top v)`, with ``retain_graph=True``. ``matmat`` loops over
    its K vectors. The graph costs the memory of all micro-batches' first-order graphs at once.
``"retained_graph_vmap"``
    The same retained graph; ``matmat`` pushes its K vectors through one ``vmap``-ed backward
    (``is_grads_batched=True``).
``"func"``
    Forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` over
    ``torch.func.functional_call``, with ``torch.func.vmap`` over the K vectors so that they share
    one primal forward and backward pass; nothing is kept between calls.
``"double_backward"``
    A new first-order graph per micro-batch and call (one micro-batch in memory at a time), K
    backward passes through it.

Cost per product in gradient passes over the same sample (``benchmarks/hvp_cost.py``, CPU, one
thread, a shared machine, so +-10%; small CNN with BatchNorm, 38,666 parameters, 512 samples,
K = 1/4/16/32 vectors per call): retained graph 1.39/1.38/1.39/1.39, double backward
2.38/1.63/1.46/1.47, ``func`` 2.48/3.57/5.64/5.89, ``vmap`` over the retained graph
1.36/2.08/4.41/4.70 (K=1 is the loop). MLP 784-256-128-10 on 1024 samples: 1.06/1.13/1.05/1.07,
2.08/1.31/1.13/1.12, 2.88/1.48/1.16/1.12 and 1.05/1.07/1.05/1.06. ``"auto"`` (the default)
therefore starts from the retained graph and switches only where another mode is measurably
faster on this model (the rule is in :mod:`~lightning_hessian.curvature.hvp_tuning`); the choice is
kept per model, parameter set, device and K range, so repeated analyses neither re-tune nor flip.

Where the retained graph does not fit in memory (an out-of-memory error while building it or in
a product through it, or on CUDA a first micro-batch whose graph, times the number of
micro-batches, exceeds the free memory), the operator frees it and uses double backward, which
holds one micro-batch's graph at a time. Where ``torch.func`` cannot run the model
(custom autograd functions without vmap support, data-dependent Python control flow), ``"auto"``
uses the graph modes; where the model has no double backward, ``"auto"`` uses ``torch.func``.
Chunks of ``vmap``-ed vectors halve on an out-of-memory error and retry.

This module holds the operator and the dispatch between the modes (the fallbacks above); the
retained graph itself is :mod:`~lightning_hessian.curvature.retained_graph`.
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
from lightning_hessian.curvature.context import analysis_mode, batch_norm_as_affine
from lightning_hessian.curvature.hvp_tuning import (
    ModelTuning,
    ModeTrial,
    k_bucket,
    known_errors,
    model_tuning,
    tuning_key,
)
from lightning_hessian.curvature.objective import BatchLoss, BatchLossModule, loss_of_outputs
from lightning_hessian.curvature.retained_graph import (
    RetainedGraph,
    RetainedGraphDoesNotFit,
    build_retained_graph,
    retained_products,
    retained_products_vmap,
    state_signature,
)
from lightning_hessian.errors import UserInputError

__all__ = ["HVP_MODES", "BatchLoss", "HessianOperator", "LossFunction"]

LossFunction = Callable[[Tensor, Any], Tensor]
ParamFilter = str | re.Pattern | Callable[[str, nn.Parameter], bool]

#: the values of ``HessianOperator(hvp_mode=...)``
HVP_MODES = ("auto", "retained_graph", "retained_graph_vmap", "func", "double_backward")
_RETAINED_MODES = ("retained_graph", "retained_graph_vmap")


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
    model if its weights change. Wrap many products in ``with op.analysis():`` (the spectral
    routines do) so that they share one state snapshot and, in the retained-graph modes, one
    first-order graph; the graph is released when the outermost context ends, and rebuilt inside
    it if the parameters, buffers or batches were changed in place meanwhile.

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
        hvp_mode: one of :data:`HVP_MODES` (see the module documentation). ``"auto"`` (default)
            uses the retained graph unless another mode is measured to be at least 15% faster on
            this model; the choice is readable as :attr:`selected_hvp_mode`.

    Raises:
        UserInputError: for an unknown ``hvp_mode`` or a non-positive ``max_chunk`` or
            ``micro_batch_size``.
        ValueError: without a loss, with both or neither of ``data`` and ``batches``, without
            parameters to analyse, or without samples.
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
        if batch_loss is not None:
            loss: BatchLoss = batch_loss
        elif loss_fn is not None:
            loss = loss_of_outputs(loss_fn)
        else:
            raise ValueError("HessianOperator needs `loss_fn(output, y)` or `batch_loss(module, batch)`.")
        if (data is None) == (batches is None):
            raise ValueError(
                "HessianOperator needs exactly one of `data` (a batch `(x, y)` or an iterable of batches) and"
                " `batches` (a sequence of batches, each passed to the loss as it is)."
            )
        if hvp_mode not in HVP_MODES:
            raise UserInputError(
                f"hvp_mode={hvp_mode!r} is not one of {HVP_MODES}; use 'auto' to let the operator choose."
            )
        if max_chunk is not None and max_chunk < 1:
            raise UserInputError(f"max_chunk={max_chunk} must be a positive integer or None (default 64).")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise UserInputError(
                f"micro_batch_size={micro_batch_size} must be a positive integer or None (default 512)."
            )
        model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: analyse the eager module
        self.model = model
        self.loss_fn = loss_fn
        self.batch_loss = batch_loss
        self.all_reduce = all_reduce
        self.max_chunk = max_chunk or 64
        self._hvp_mode = hvp_mode
        self._hvp_count = 0
        self._depth = 0
        self._chunk: int | None = None
        self._retained: RetainedGraph | None = None
        self._retained_error: str | None = None  # this sample's graphs do not fit in memory
        self._build_seconds = 0.0  # all retained-graph builds so far (excluded from the trial's timings)
        self._warned: set[str] = set()
        self._wrapper = BatchLossModule(model, loss)
        self._batch_norm_context = batch_norm_as_affine(model)

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
            self._batches: list[Any] = [map_tensors(b, self._prepare_tensor) for b in batches]
            self._batch_sizes: list[int] = [batch_size(b) for b in self._batches]
            self.num_local_samples: int = sum(self._batch_sizes)
            count = torch.tensor([float(self.num_local_samples)], device=self.device, dtype=torch.float64)
            self.num_samples: int = round(self._reduce(count).item())
        if self.num_samples == 0:
            raise ValueError("`data` holds no samples.")

    # ------------------------------------------------------------------------- public state
    @property
    def hvp_mode(self) -> str:
        """The ``hvp_mode`` setting as given to the constructor (never changed by the operator)."""
        return self._hvp_mode

    @property
    def hvp_count(self) -> int:
        """Every Hessian-vector product run on this operator's Hessian: those of :meth:`matmat`
        and :meth:`matvec` (``hvp_mode="auto"``'s timed calls included, they are real products)
        and those reported by :meth:`count_products`."""
        return self._hvp_count

    def count_products(self, count: int) -> None:
        """Add ``count`` products computed outside :meth:`matmat` to :attr:`hvp_count`.

        For engines that differentiate :attr:`loss_module` themselves (the PyHessian adapter), so
        that :attr:`hvp_count` stays the total work spent on this Hessian.

        Args:
            count: products run, a non-negative integer.

        Raises:
            ValueError: if ``count`` is negative or not an integer.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count_products(count={count!r}): count must be a non-negative int (products run).")
        self._hvp_count += count

    @property
    def loss_module(self) -> nn.Module:
        """The loss as a module: ``loss_module(batch)`` is the batch-mean loss of one entry of
        :attr:`batches`. It holds :attr:`model` as its submodule ``inner`` (the same parameter
        objects, in the model's own dtype; cast a copy for a ``dtype`` different from the
        model's). Call it inside :meth:`analysis` for the operator's numerical guarantees."""
        return self._wrapper

    @property
    def batches(self) -> list[Any]:
        """The micro-batches, on :attr:`device`, floating tensors in :attr:`dtype` (a new list; the
        batches themselves are the operator's, do not modify them)."""
        return list(self._batches)

    @property
    def batch_sizes(self) -> list[int]:
        """The sample count of each entry of :attr:`batches` (a new list)."""
        return list(self._batch_sizes)

    @property
    def selected_hvp_mode(self) -> str | None:
        """The mode single-vector products use now: the fixed ``hvp_mode`` (or its fallback, e.g.
        ``"double_backward"`` when the retained graph does not fit), ``"auto"``'s choice for K=1,
        or ``None`` while ``"auto"`` is still timing the candidates."""
        return self._selected_for(1)

    @property
    def selected_hvp_modes(self) -> dict[str, str | None]:
        """:attr:`selected_hvp_mode` for each range of K
        (:func:`~lightning_hessian.curvature.hvp_tuning.k_bucket`): ``{"1": ..., "2-4":
        ..., "5-16": ..., "17+": ...}``, a new dict."""
        return {k_bucket(size): self._selected_for(size) for size in (1, 4, 16, 17)}

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
        """Enter :func:`analysis_mode` once for many products (re-entrant; products nest inside).

        The retained first-order graph (``hvp_mode`` ``"retained_graph"``/``"auto"``) lives until
        the outermost context ends, also when it ends with an exception.
        """
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
                self._retained = None  # frees the graph and everything it saved

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
            tensors.update(zip(names, params, strict=True))
            with self._batch_norm_context():  # the same function, with a cheap double backward
                return torch.func.functional_call(self._wrapper, tensors, (batch,))

        return loss

    def _tangents(self, flat: Tensor) -> tuple[Tensor, ...]:
        return tuple(piece.view(shape) for piece, shape in zip(flat.split(self._sizes), self.param_shapes, strict=True))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

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
        return {
            n: piece.view(shape) for n, piece, shape in zip(self.param_names, pieces, self.param_shapes, strict=True)
        }

    # ------------------------------------------------------------------------------ quantities
    def loss(self) -> Tensor:
        """The sample-weighted mean loss over ``data`` (all ranks), a 0-d tensor in :attr:`dtype`."""
        with self.analysis(), torch.no_grad():
            constants = self._constants()
            primals = self._primals()
            total = torch.zeros((), device=self.device, dtype=torch.float64)
            for batch, count in zip(self._batches, self._batch_sizes, strict=True):
                total += count * self._batch_loss_fn(batch, constants)(*primals).double()
            total = self._reduce(total.reshape(1)).reshape(())
        return (total / self.num_samples).to(self.dtype)

    def gradient(self) -> Tensor:
        """The gradient of the mean loss, flat, in :attr:`dtype`."""
        with self.analysis():
            constants = self._constants()
            total = torch.zeros(self.num_params, device=self.device, dtype=self.dtype)
            for batch, count in zip(self._batches, self._batch_sizes, strict=True):
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
        self._hvp_count += num_vectors
        return (total / self.num_samples).T

    __matmul__ = matmat

    # ------------------------------------------------------------------------- mode selection
    def _model_tuning(self) -> ModelTuning:
        return model_tuning(self.model)

    def _tuning_key(self, bucket: str) -> tuple:
        """One ``"auto"`` choice per parameter set, precision, device, micro-batch size and K range."""
        return tuning_key(self.param_names, self.param_shapes, self.dtype, self.device, max(self._batch_sizes), bucket)

    def _graph_mode(self) -> str:
        """The graph-based mode this sample can run: the retained graph if it fits in memory."""
        return "double_backward" if self._retained_error is not None else "retained_graph"

    def _candidates(self, num_vectors: int) -> list[str]:
        """The modes ``"auto"`` chooses from for K vectors, the default first."""
        errors = known_errors(self.model)
        graph = [] if "graph" in errors else [self._graph_mode()]
        func = [] if "func" in errors else ["func"]
        candidates = graph + func
        if (
            self.device.type == "cuda" and num_vectors > 1 and graph == ["retained_graph"] and "vmap" not in errors
        ):  # vmap over the retained graph: 2-3x slower than the loop on CPU, unmeasured on GPUs
            candidates.append("retained_graph_vmap")
        return candidates

    def _fixed_mode(self) -> str:
        """The mode a fixed ``hvp_mode`` runs now, after the memory and capability fallbacks."""
        errors = known_errors(self.model)
        mode = self._hvp_mode
        if mode == "retained_graph_vmap" and "vmap" in errors:
            mode = "retained_graph"
        if mode in _RETAINED_MODES and self._retained_error is not None:
            mode = "double_backward"
        return mode

    def _selected_for(self, num_vectors: int) -> str | None:
        if self._hvp_mode != "auto":
            return self._fixed_mode()
        candidates = self._candidates(num_vectors)
        if len(candidates) == 1:
            return candidates[0]
        choice = self._model_tuning().choices.get(self._tuning_key(k_bucket(num_vectors)))
        if choice is None:
            return None
        return choice if choice in candidates else candidates[0]

    def _tuned_product(self, vectors: Tensor) -> Tensor:
        """``sum_b n_b H_b V`` with the fixed mode, ``"auto"``'s choice, or a timed trial call.

        With ``hvp_mode="auto"`` the first calls for a K range are the trial of
        :class:`~lightning_hessian.curvature.hvp_tuning.ModeTrial`: each computes the caller's
        products with one candidate and is timed (per product, without the time to build the
        retained graph, which a long analysis pays once). The choice is then kept for this model
        (:meth:`_tuning_key`).

        Returns:
            The (K, P) sum of products ``sum_b n_b H_b V`` (rows of ``vectors``), not yet divided
            by the sample count.

        Raises:
            RuntimeError: if an earlier call found that neither ``torch.func`` nor double backward
                can run this model.
        """
        if self._hvp_mode != "auto":
            return self._run(vectors, self._fixed_mode(), fixed=True)[0]
        num_vectors = vectors.shape[0]
        candidates = self._candidates(num_vectors)
        if not candidates:  # both families failed on an earlier call (which raised then)
            raise RuntimeError(
                f"Neither torch.func nor double backward can run this model ({self._model_tuning().errors})."
            )
        key = self._tuning_key(k_bucket(num_vectors))
        record = self._model_tuning()
        choice = record.choices.get(key)
        if len(candidates) == 1 or choice is not None:
            mode = choice if choice in candidates else candidates[0]
            return self._run(vectors, mode, fixed=False)[0]
        trial = record.trials.setdefault(key, ModeTrial())
        mode = trial.next_mode(candidates)
        result, ran, seconds = self._run(vectors, mode, fixed=False)
        if ran == mode:  # a fallback call measures nothing about the mode it stood in for
            trial.record(mode, seconds / num_vectors)
        candidates = self._candidates(num_vectors)
        decided = trial.decision(candidates, default=candidates[0]) if len(candidates) > 1 else candidates[0]
        if decided is not None:
            record.choices[key] = decided
            record.trials.pop(key, None)
        return result

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run(self, vectors: Tensor, mode: str, *, fixed: bool) -> tuple[Tensor, str, float]:
        """Run ``mode``, falling back where it cannot run.

        Returns:
            The (K, P) sum of products, the mode that actually ran and its seconds (without a
            retained-graph build).
        """
        self._synchronize()
        began = time.perf_counter()
        build_seconds_before = self._build_seconds
        try:
            if mode == "func":
                result = self._product(vectors, "func")
            elif mode in _RETAINED_MODES:
                result = self._retained_product(vectors, batched=mode == "retained_graph_vmap")
            else:
                result = self._product(vectors, "double_backward")
        except RetainedGraphDoesNotFit as error:
            return self._without_retained_graph(vectors, str(error), fixed=fixed)
        except Exception as error:
            if _is_oom(error) and mode in _RETAINED_MODES:
                reason = f"Out of memory in a product through the retained first-order graph ({error})"
                return self._without_retained_graph(vectors, reason, fixed=fixed)
            if _is_oom(error) or fixed:
                raise
            return self._unavailable(vectors, mode, error)
        self._synchronize()
        seconds = time.perf_counter() - began - (self._build_seconds - build_seconds_before)
        return result, mode, max(seconds, 0.0)

    def _without_retained_graph(self, vectors: Tensor, reason: str, *, fixed: bool) -> tuple[Tensor, str, float]:
        """The retained graph does not fit this sample: free it and use double backward from now on."""
        self._retained = None
        self._retained_error = reason
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if fixed:
            self._warn_once(
                "memory", f"{reason}; using hvp_mode='double_backward' instead (one micro-batch's graph at a time)."
            )
        return self._run(vectors, "double_backward", fixed=fixed)

    def _unavailable(self, vectors: Tensor, mode: str, error: BaseException) -> tuple[Tensor, str, float]:
        """``"auto"``: ``mode`` cannot run this model; remember that, warn once, use another."""
        record = self._model_tuning()
        family = "func" if mode == "func" else "graph"  # vmap failures are handled by _retained_product
        record.errors[family] = f"{type(error).__name__}: {error}"
        candidates = self._candidates(vectors.shape[0])
        if not candidates:
            raise RuntimeError(
                f"Neither torch.func nor double backward can run this model ({record.errors}); it needs"
                " second derivatives of its loss."
            ) from error
        if family == "func":
            message = (
                f"torch.func cannot run this model ({record.errors['func']}); using double backward"
                " instead. Pass hvp_mode='retained_graph' to skip the attempt."
            )
        else:
            message = (
                f"Double backward fails on this model ({record.errors['graph']}); using torch.func instead."
                " Pass hvp_mode='func' to skip the attempt."
            )
        warnings.warn(message, stacklevel=5)
        return self._run(vectors, candidates[0], fixed=False)

    # ------------------------------------------------------------------------------ internals
    def _product(self, vectors: Tensor, mode: str) -> Tensor:
        constants = self._constants()
        primals = self._primals()
        total = torch.zeros_like(vectors)
        for batch, count in zip(self._batches, self._batch_sizes, strict=True):
            total.add_(self._batch_hvp(batch, constants, primals, vectors, mode), alpha=count)
        return total

    def _batch_hvp(
        self, batch: Any, constants: dict[str, Tensor], primals: tuple[Tensor, ...], vectors: Tensor, mode: str
    ) -> Tensor:
        """Batch-mean-loss Hessian times each row of ``vectors`` (K, P) -> (K, P)."""
        loss = self._batch_loss_fn(batch, constants)
        if mode == "func":
            return self._chunked(lambda chunk: self._func_hvp(loss, primals, chunk), vectors)
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
            except Exception as error:
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
            products = torch.func.jvp(grad_fn, primals, self._tangents(flat))[1]  # (output, jvp) without has_aux
            return torch.cat([p.reshape(-1) for p in products])

        if chunk.shape[0] == 1:
            return hvp(chunk[0]).unsqueeze(0)
        return torch.func.vmap(hvp)(chunk)

    def _double_backward_hvp(self, loss: Callable[..., Tensor], primals: tuple[Tensor, ...], vectors: Tensor) -> Tensor:
        leaves = tuple(p.detach().requires_grad_() for p in primals)
        grads = torch.autograd.grad(loss(*leaves), leaves, create_graph=True, allow_unused=True)
        # gradients that depend on no parameter (unused, or a loss linear in them) have zero Hessian rows
        active = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        outputs = [grads[i] for i in active]
        total = torch.zeros_like(vectors)
        offsets = [0]
        for size in self._sizes:
            offsets.append(offsets[-1] + size)
        for row in range(vectors.shape[0] if active else 0):
            tangents = self._tangents(vectors[row])
            products = torch.autograd.grad(
                outputs,
                leaves,
                grad_outputs=[tangents[i] for i in active],
                retain_graph=row + 1 < vectors.shape[0],
                allow_unused=True,
            )
            for position, product in enumerate(products):
                if product is not None:
                    total[row, offsets[position] : offsets[position + 1]] = product.reshape(-1)
        return total

    # ---------------------------------------------------------------------- the retained graph
    def _retained_graph(self) -> RetainedGraph:
        """The retained first-order graph of the current parameters, built if missing or stale.

        Returns:
            The graph, kept in ``self._retained`` until the outermost analysis context ends.

        Raises:
            RetainedGraphDoesNotFit: if the build runs out of memory (or, on CUDA, would).
        """
        signature = state_signature(self._params, self.model.buffers(), self._batches)
        if self._retained is not None and self._retained.signature == signature:
            return self._retained
        self._retained = None  # free a stale graph before building the new one
        try:
            constants = self._constants()
            losses = [self._batch_loss_fn(batch, constants) for batch in self._batches]
            self._retained = build_retained_graph(self._primals(), losses, self._batch_sizes, signature, self.device)
            self._build_seconds += self._retained.build_seconds
        except Exception as error:
            if not _is_oom(error):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise RetainedGraphDoesNotFit(
                f"The first-order graphs of all micro-batches do not fit in memory ({error})"
            ) from error
        return self._retained

    def _retained_product(self, vectors: Tensor, *, batched: bool) -> Tensor:
        """``sum_b n_b H_b V`` by backward passes through the retained graph (K, P) -> (K, P)."""
        graph = self._retained_graph()
        if not graph.active:  # the loss is at most linear in every parameter: H = 0
            return torch.zeros_like(vectors)
        if batched and vectors.shape[0] > 1:
            try:
                return self._chunked(
                    lambda chunk: retained_products_vmap(graph, chunk, self._sizes, self.param_shapes), vectors
                )
            except Exception as error:
                if _is_oom(error):
                    raise
                self._model_tuning().errors["vmap"] = f"{type(error).__name__}: {error}"
                if self._hvp_mode == "retained_graph_vmap":
                    self._warn_once(
                        "vmap",
                        f"vmap over the retained graph fails on this model ({error});"
                        " looping over the vectors instead.",
                    )
        # Called outside any analysis context, the graph dies with this call: the last backward
        # pass may free it as it goes (retain_graph=False), as plain double backward does.
        retain = self._depth != 1
        if not retain:
            self._retained = None
        return retained_products(graph, vectors, self._sizes, self.param_shapes, retain=retain)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_params={self.num_params}, num_samples={self.num_samples},"
            f" batches={len(self._batches)}, dtype={self.dtype}, device={self.device}, hvp_mode={self._hvp_mode!r})"
        )


def _matches(param_filter: ParamFilter, name: str, param: nn.Parameter) -> bool:
    if isinstance(param_filter, str):
        return param_filter in name
    if isinstance(param_filter, re.Pattern):
        return param_filter.search(name) is not None
    if callable(param_filter):
        return bool(param_filter(name, param))
    raise TypeError(f"param_filter must be a str, compiled regex or callable, got {type(param_filter)}.")
