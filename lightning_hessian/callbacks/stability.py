r"""The optimizer's quadratic stability limit, read from the live optimizer of any LightningModule.

Gradient descent with heavy-ball momentum :math:`\beta` and learning rate :math:`\eta` on a
quadratic with Hessian :math:`H` diverges along the top eigenvector once
:math:`\lambda_1 \eta > 2 (1 + \beta)`; with Nesterov momentum once
:math:`\lambda_1 \eta > (2 + 2\beta) / (1 + 2\beta)` (Cohen et al. 2021, "Gradient descent on
neural networks typically occurs at the edge of stability"). The spectrum callback logs the ratio
of the two sides, ``hessian/stability``: above 1 the step size is beyond the limit.

Adam-type optimizers precondition the step with
:math:`P_t = (1 - \beta_1^t)\,[\mathrm{diag}(\sqrt{\hat v_t}) + \epsilon]`,
:math:`\hat v_t = v_t / (1 - \beta_2^t)`; their limit is on the preconditioned sharpness
:math:`\lambda_1(P_t^{-1} H) < (2 + 2\beta_1) / ((1 - \beta_1)\eta)` (Cohen et al. 2022,
"Adaptive gradient methods at the edge of stability").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["StabilityLimit", "stability_limit"]


@dataclass
class StabilityLimit:
    """What the optimizer's step is stable for.

    Attributes:
        kind: ``"sgd"`` (heavy-ball or no momentum), ``"nesterov"`` or ``"adam"``.
        lr: the learning rate of the last step.
        threshold: the largest stable ``lambda_1 * lr`` (of ``P^-1 H`` for ``"adam"``).
        preconditioner: for ``"adam"``, the diagonal of ``P`` over the analysed parameters.
    """

    kind: str
    lr: float
    threshold: float
    preconditioner: Tensor | None = None


def _group_of(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> dict[str, Any] | None:
    """The one param group holding all ``params`` (``None`` if they are spread over groups with
    different step settings: the limit is then not a single number).

    Returns:
        The first group holding any of ``params`` (all those groups have the same step settings),
        or ``None``.
    """
    wanted = {id(p) for p in params}
    groups = [g for g in optimizer.param_groups if wanted & {id(p) for p in g["params"]}]
    keys = ("lr", "momentum", "nesterov", "dampening", "betas", "eps")
    settings = {tuple(repr(g.get(k)) for k in keys) for g in groups}
    return groups[0] if len(settings) == 1 else None


def stability_limit(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> StabilityLimit | None:
    """The stability limit of ``optimizer``'s next step on ``params``; ``None`` when not known.

    Known: ``torch.optim.SGD`` (any momentum, dampening 0) and ``Adam``/``AdamW`` (after their
    first step, without ``amsgrad``). Other optimizers (LARS, LAMB, ...) adapt the step per layer
    in ways the quadratic model does not cover: ``None``.

    Returns:
        The limit (for Adam with its preconditioner), or ``None``.
    """
    group = _group_of(optimizer, params)
    if group is None:
        return None
    lr = float(group["lr"])
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0))
        if group.get("dampening", 0.0):
            return None
        if group.get("nesterov", False):
            return StabilityLimit("nesterov", lr, (2 + 2 * beta) / (1 + 2 * beta))
        return StabilityLimit("sgd", lr, 2 * (1 + beta))
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and not group.get("amsgrad", False):
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        pieces = []
        for param in params:
            state = optimizer.state.get(param, {})
            if "exp_avg_sq" not in state:
                return None  # before the first step there is no preconditioner yet
            step = float(state["step"])
            v_hat = state["exp_avg_sq"].detach().double() / (1 - beta2**step)
            pieces.append(((1 - beta1**step) * (v_hat.sqrt() + eps)).reshape(-1))
        return StabilityLimit("adam", lr, (2 + 2 * beta1) / (1 - beta1), torch.cat(pieces))
    return None
