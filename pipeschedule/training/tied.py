"""Tied embedding / LM-head weights split across pipeline stages.

The token embedding (first stage) and the LM head (last stage) are one weight in the model, but
with ``p > 1`` they live on two ranks, each as its own Parameter with the same initial value. The
one-process model's gradient of that weight is the sum of both uses' gradients, so after the
schedule each copy's gradient is replaced by the sum over all copies. Given identical values and
identical gradients, any element-wise optimizer (SGD, Adam, ...) keeps the copies identical.

Which Parameter is a tied copy is asked of the chunk: a chunk that has
``shared_embedding_weight()`` returns its copy or ``None`` (see
:meth:`pipeschedule.training.models.GPTChunk.shared_embedding_weight`). Wrappers such as
``DistributedDataParallel`` are looked through via ``.module``.

Cases, by where the copies are:

* ``p > 1``: one copy on the first and one on the last rank of each pipeline; their gradients are
  all-reduced (sum) over the two-rank embedding group
  (:attr:`pipeschedule.training.layout.ParallelGroups.embedding`).
* ``p = 1, v > 1``: both copies on one rank (chunk 0 and chunk ``v - 1``): summed locally.
* ``p = 1, v = 1``: one chunk is first and last and uses a single Parameter: nothing to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeschedule import bounded_collective, declare_groups
from pipeschedule import inner_module

__all__ = ["make_finalize_model_grads", "sum_tied_embedding_grads", "tied_embedding_weights"]

logger = logging.getLogger(__name__)


def tied_embedding_weights(model_chunks: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The distinct tied-weight Parameters held by ``model_chunks``, in chunk order (maybe empty)."""
    found: list[nn.Parameter] = []
    for chunk in model_chunks:
        getter = getattr(inner_module(chunk, having="shared_embedding_weight"), "shared_embedding_weight", None)
        weight = getter() if getter is not None else None
        if weight is not None and not any(weight is w for w in found):
            found.append(weight)
    return found


def sum_tied_embedding_grads(*, model_chunks: Sequence[nn.Module], group: Any = None) -> None:
    """Give every tied copy, on this rank and across ``group``, the sum of all copies' gradients.

    ``group`` is this rank's embedding group (``None`` on ranks without a tied copy, or when all
    copies are on this rank). Every member of ``group`` must call this after the schedule and
    hold at least one copy. A copy without a gradient counts as zero and receives the sum.
    """
    weights = tied_embedding_weights(model_chunks)
    if not weights:
        if group is not None:
            raise ValueError(
                "this rank is in an embedding group but none of its model chunks returns a weight from "
                "shared_embedding_weight(); only the ranks with the first and the last stage belong in "
                "that group (pass group=None elsewhere)"
            )
        return
    remote = group is not None and dist.get_world_size(group) > 1
    if len(weights) == 1 and not remote:
        return
    total = torch.zeros_like(weights[0])
    for weight in weights:
        if weight.grad is not None:
            total.add_(weight.grad)
    if remote:
        # Bounded, and skipped once the step has failed: a member that raised never joins.
        bounded_collective(
            lambda: dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group, async_op=True),
            group=group, what="the tied-embedding all-reduce of finalize_model_grads_func",
        )
    for weight in weights:
        if weight.grad is None:
            weight.grad = total.clone()
        else:
            weight.grad.copy_(total)
    logger.debug("tied embedding gradients summed over %d local copies%s", len(weights), " and the embedding group" if remote else "")


def make_finalize_model_grads(
    *, embedding_group: Any = None, then: Callable[[list, Any], None] | None = None
) -> Callable[[list, Any], None]:
    """A ``config.finalize_model_grads_func(model_chunks, num_tokens)`` that sums the tied gradients.

    The schedule calls it once per step, after every backward and after each chunk's
    ``grad_sync_func``, so the data-parallel average is already in the gradients and the sum here
    is of averaged gradients (equal to the average of the sums). ``then``, if given, runs after it
    with the same arguments.
    """

    def finalize_model_grads(model_chunks: list, num_tokens: Any = None) -> None:
        sum_tied_embedding_grads(model_chunks=model_chunks, group=embedding_group)
        if then is not None:
            then(model_chunks, num_tokens)

    # A failure in this step reaches the other member of the embedding group through its notices.
    return declare_groups(finalize_model_grads, embedding_group, *getattr(then, "pipeschedule_groups", ()))
