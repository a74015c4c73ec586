"""The retained first-order graph: one gradient graph kept for many Hessian-vector products.

For micro-batches :math:`B_1, \\dots, B_m` with :math:`n_b` samples and batch-mean losses
:math:`L_b(\\theta)`, the first-order graph :math:`g = \\sum_b n_b \\nabla L_b` (gradient with
``create_graph=True``) is built once (:func:`build_retained_graph`, one micro-batch at a time) and
kept; each product is one backward pass through it, :math:`H v = \\nabla_\\theta (g^\\top v)`,
with ``retain_graph=True`` (:func:`retained_products`, a loop over the K vectors), or one
``vmap``-ed backward pass for a chunk of vectors (:func:`retained_products_vmap`,
``is_grads_batched=True``). The products are the unnormalised sum :math:`\\sum_b n_b H_b v`.

The graph costs the memory of all micro-batches' first-order graphs at once. On CUDA the build
stops with :class:`RetainedGraphDoesNotFit` when the first micro-batch's graph, times the number of
micro-batches, exceeds :data:`_RETAINED_MEMORY_FRACTION` of the free memory. The graph depends on
the parameters, buffers and batch tensors of its build; :func:`state_signature` tells when they
changed in place, so that the graph is stale.

When the graph is built, reused and freed, and what runs instead where it does not fit (double
backward), is decided by :class:`~lightning_hessian.curvature.operator.HessianOperator`; this
module imports none of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_hessian.curvature.batches import map_tensors

__all__ = [
    "RetainedGraph",
    "RetainedGraphDoesNotFit",
    "build_retained_graph",
    "retained_products",
    "retained_products_vmap",
    "state_signature",
]

# On CUDA the retained graph is kept only if all micro-batches' graphs (estimated from the first)
# plus one more for the products' temporaries fit in this fraction of the free memory.
_RETAINED_MEMORY_FRACTION = 0.8


class RetainedGraphDoesNotFit(RuntimeError):
    """The first-order graphs of all micro-batches would not fit in the free accelerator memory."""


@dataclass
class RetainedGraph:
    """The first-order graph :math:`g = \\sum_b n_b \\nabla L_b`, kept for many products.

    Attributes:
        leaves: the parameters as autograd leaves (detached, in the analysis dtype).
        outputs: the entries of ``g`` that depend on the parameters (the others have zero
            second derivative).
        active: the parameter index of each entry of ``outputs``.
        signature: versions and storage of the parameters, buffers and batch tensors at build
            time; a change means the graph is stale.
        build_seconds: the time the build took (excluded from the per-product timings).
    """

    leaves: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    active: tuple[int, ...]
    signature: tuple
    build_seconds: float


def _tensors_of(batch: Any) -> list[Tensor]:
    """Every tensor in a (nested) batch."""
    found: list[Tensor] = []

    def collect(tensor: Tensor) -> Tensor:
        found.append(tensor)
        return tensor

    map_tensors(batch, collect)
    return found


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parameter_shaped(flat: Tensor, sizes: Sequence[int], shapes: Sequence[torch.Size]) -> tuple[Tensor, ...]:
    """A flat vector split into views of the parameters' shapes."""
    return tuple(piece.view(shape) for piece, shape in zip(flat.split(list(sizes)), shapes, strict=True))


def state_signature(params: Iterable[Tensor], buffers: Iterable[Tensor], batches: Iterable[Any]) -> tuple:
    """Storage and version counter of every tensor the graph depends on.

    An in-place change (an optimizer step, ``load_state_dict``, ``copy_`` under ``no_grad``)
    bumps the version; writes through ``.data`` do not, and are not detected.

    Args:
        params: the analysed parameters.
        buffers: the model's buffers (e.g. BatchNorm statistics).
        batches: the micro-batches (nested containers of tensors).

    Returns:
        One ``(data_ptr, version)`` pair per parameter, buffer and batch tensor (version -1 for
        inference tensors).
    """
    tensors = [*params, *buffers]
    for batch in batches:
        tensors.extend(_tensors_of(batch))
    signature = []
    for tensor in tensors:
        try:
            version = tensor._version
        except RuntimeError:  # inference tensors have no version counter
            version = -1
        signature.append((tensor.data_ptr(), version))
    return tuple(signature)


def build_retained_graph(
    primals: Sequence[Tensor],
    batch_losses: Sequence[Callable[..., Tensor]],
    batch_sizes: Sequence[int],
    signature: tuple,
    device: torch.device,
) -> RetainedGraph:
    """:math:`g = \\sum_b n_b \\nabla L_b` with ``create_graph=True``, one micro-batch at a time.

    Weighting the loss by :math:`n_b` before differentiating makes the sum of the batch
    gradients the weighted one without a per-entry multiplication.

    Args:
        primals: the parameters, detached, in the analysis dtype; made autograd leaves in place.
        batch_losses: per micro-batch, its batch-mean loss as a function of the parameters
            (``loss(*primals)``).
        batch_sizes: the sample count :math:`n_b` of each micro-batch.
        signature: :func:`state_signature` of the state the graph is built from, kept with it.
        device: the analysis device (CUDA: the memory check and synchronised timing).

    Returns:
        The graph, its build time and ``signature``.

    Raises:
        RetainedGraphDoesNotFit: on CUDA, when the first micro-batch's graph times the
            number of micro-batches (plus one for the products' temporaries) exceeds
            :data:`_RETAINED_MEMORY_FRACTION` of the free memory.
    """
    _synchronize(device)
    began = time.perf_counter()
    leaves = tuple(p.requires_grad_() for p in primals)
    sums: list[Tensor | None] = [None] * len(leaves)
    cuda = device.type == "cuda"
    allocated = torch.cuda.memory_allocated(device) if cuda else 0
    for index, (batch_loss, count) in enumerate(zip(batch_losses, batch_sizes, strict=True)):
        loss = batch_loss(*leaves)
        grads = torch.autograd.grad(loss * count, leaves, create_graph=True, allow_unused=True)
        for position, grad in enumerate(grads):
            if grad is not None:
                current = sums[position]
                sums[position] = grad if current is None else current + grad
        del loss, grads
        if cuda and index == 0 and len(batch_losses) > 1:
            per_batch = torch.cuda.memory_allocated(device) - allocated
            free, _ = torch.cuda.mem_get_info(device)
            needed = per_batch * len(batch_losses)  # the others' graphs, and room for the products
            if needed > _RETAINED_MEMORY_FRACTION * free:
                raise RetainedGraphDoesNotFit(
                    f"The first-order graphs of {len(batch_losses)} micro-batches need about"
                    f" {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free"
                )
    kept = [(i, s) for i, s in enumerate(sums) if s is not None and s.requires_grad]
    active = tuple(i for i, _ in kept)
    outputs = tuple(s for _, s in kept)
    _synchronize(device)
    return RetainedGraph(leaves, outputs, active, signature, time.perf_counter() - began)


def retained_products(
    graph: RetainedGraph,
    vectors: Tensor,
    sizes: Sequence[int],
    shapes: Sequence[torch.Size],
    *,
    retain: bool,
) -> Tensor:
    """``sum_b n_b H_b V``, one backward pass through ``graph`` per vector (K, P) -> (K, P).

    Args:
        graph: the retained graph.
        vectors: the K flat vectors as rows, in the graph's dtype and device.
        sizes: the number of entries of each parameter, in order.
        shapes: the shape of each parameter.
        retain: keep the graph after the last vector; ``False`` lets the last backward pass free
            it as it goes, as plain double backward does (for a graph used by this call only).

    Returns:
        The (K, P) products; zero rows where the loss is at most linear in every parameter.
    """
    total = torch.zeros_like(vectors)
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    num = vectors.shape[0]
    for row in range(num if graph.active else 0):
        tangents = _parameter_shaped(vectors[row], sizes, shapes)
        products = torch.autograd.grad(
            graph.outputs,
            graph.leaves,
            grad_outputs=[tangents[i] for i in graph.active],
            retain_graph=retain or row + 1 < num,
            allow_unused=True,
        )
        for position, product in enumerate(products):
            if product is not None:
                total[row, offsets[position] : offsets[position + 1]] = product.reshape(-1)
    return total


def retained_products_vmap(
    graph: RetainedGraph, chunk: Tensor, sizes: Sequence[int], shapes: Sequence[torch.Size]
) -> Tensor:
    """``sum_b n_b H_b V`` for a chunk of vectors in one ``vmap``-ed backward pass (K, P) -> (K, P).

    The graph is retained. A model whose operations have no batching rule raises here (the
    caller falls back to :func:`retained_products`); so does an out-of-memory error (the caller
    halves the chunk).

    Args:
        graph: the retained graph.
        chunk: the K flat vectors as rows, in the graph's dtype and device.
        sizes: the number of entries of each parameter, in order.
        shapes: the shape of each parameter.

    Returns:
        The (K, P) products; zero blocks for parameters without second derivative.
    """
    num = chunk.shape[0]
    if not graph.active:
        return torch.zeros_like(chunk)
    pieces = chunk.split(list(sizes), dim=1)
    tangents = [pieces[i].reshape(num, *shapes[i]) for i in graph.active]
    products = torch.autograd.grad(
        graph.outputs,
        graph.leaves,
        grad_outputs=tangents,
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=True,
    )
    return torch.cat(
        [
            (chunk.new_zeros(num, size) if h is None else h.reshape(num, size))
            for h, size in zip(products, sizes, strict=True)
        ],
        dim=1,
    )
