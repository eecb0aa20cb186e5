"""Gradient clipping on the global norm of a model cut into pipeline stages and data-parallel replicas.

The norm that clipping needs is that of the whole model's gradient, as one process would compute
it. Each pipeline rank holds some of the parameters, so each rank sums the squares of its
gradients and the sums are all-reduced over the pipeline group. Two things keep that equal to the
one-process norm:

* Data-parallel replicas are not summed over: after the data-parallel all-reduce every replica
  holds the same (averaged) gradients, so one pipeline's sum is already the whole model's, and
  every replica computes the same norm from the same numbers.
* A tied weight (token embedding and LM head, :mod:`pipeschedule.training.tied`) is one weight in the model
  but a Parameter on two stages, both holding the summed gradient. It counts once: only the copy
  in chunk 0 of pipeline rank 0 (the first stage's embedding) enters the sum.
  :func:`tied_copies_counted_elsewhere` names the others.

The clip coefficient is computed as ``torch.nn.utils.clip_grad_norm_`` does, ``max_norm / (norm +
1e-6)``, applied only when below 1, so in float64 the clipped gradients equal one process's to
the rounding of the norm's summation order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeschedule.training.tied import tied_embedding_weights

__all__ = ["clip_grad_norm", "global_grad_norm", "tied_copies_counted_elsewhere"]

_EPS = 1e-6  # as in torch.nn.utils.clip_grad_norm_ and Megatron


def tied_copies_counted_elsewhere(model_chunks: Sequence[nn.Module], *, is_first_pipeline_rank: bool) -> list[nn.Parameter]:
    """The tied-weight copies on this rank whose gradient is counted on another chunk or rank.

    Every copy but the one in chunk 0 of pipeline rank 0; pass them as ``skip`` to
    :func:`global_grad_norm` (they are still clipped).
    """
    copies = tied_embedding_weights(model_chunks)
    return copies[1:] if is_first_pipeline_rank else copies


def _check_skip(params: list[nn.Parameter], skip: Iterable[nn.Parameter]) -> set[int]:
    ids = {id(q) for q in params}
    skipped = {id(q) for q in skip}
    if not skipped <= ids:
        raise ValueError("skip holds a Parameter that is not among parameters; give a subset of parameters")
    return skipped


def global_grad_norm(
    *, parameters: Iterable[nn.Parameter], group: Any = None, skip: Iterable[nn.Parameter] = ()
) -> float:
    """The 2-norm of the gradients of ``parameters`` over every rank of ``group`` (the pipeline group).

    A collective over ``group`` (every member calls, with its own parameters); without an
    initialised process group this rank is the whole model. Parameters without a gradient count as
    zero, those in ``skip`` are left out. The squares are summed in float64. Returns ``inf`` or
    ``nan`` if a gradient holds one.
    """
    params = list(parameters)
    skipped = _check_skip(params, skip)
    grads = [q.grad for q in params if q.grad is not None and id(q) not in skipped]
    device = grads[0].device if grads else (params[0].device if params else torch.device("cpu"))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        total += grad.detach().to(torch.float64).square().sum()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return math.sqrt(float(total))


def clip_grad_norm(
    *, parameters: Iterable[nn.Parameter], max_norm: float, group: Any = None, skip: Iterable[nn.Parameter] = ()
) -> float:
    """Scale the gradients so that their global norm is at most ``max_norm``; return the norm before.

    The norm is :func:`global_grad_norm` (a collective over ``group``). Gradients are multiplied by
    ``max_norm / (norm + 1e-6)`` when that is below 1 and left alone otherwise, including the
    ``skip`` ones. A non-finite norm leaves every gradient as it is (the loss scaler's overflow
    check is the place that skips such a step).
    """
    if not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool) or not max_norm > 0 or not math.isfinite(max_norm):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}; to turn clipping off, do not call this")
    params = list(parameters)
    norm = global_grad_norm(parameters=params, group=group, skip=skip)
    coefficient = max_norm / (norm + _EPS)
    if math.isfinite(norm) and coefficient < 1.0:
        for q in params:
            if q.grad is not None:
                q.grad.mul_(coefficient)
    return norm
