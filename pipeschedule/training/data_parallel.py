"""Data parallelism around pipeline chunks with ``torch.nn.parallel.DistributedDataParallel``.

Why DDP must not reduce by itself here
--------------------------------------
DDP's reducer is *armed by a forward pass* run with gradients enabled outside ``no_sync()``; the
next backward then all-reduces every gradient bucket as it fills. That is right when each forward
is followed by its own backward. In a pipeline a chunk has several microbatches in flight (1F1B
runs up to ``p - r`` forwards before the first backward), so an armed reducer would fire during
an early microbatch's backward, with partial gradients, and once more for the next forward.
Megatron's own DDP only gates its hooks with ``no_sync``; torch's DDP needs a different recipe:

* no forward ever arms the reducer: each DDP module's ``require_backward_grad_sync`` (the flag
  ``no_sync()`` clears) is cleared for good at construction. ``config.no_sync_func`` is still the
  list of the chunks' ``ddp.no_sync``, so the schedule can enter and leave it where Megatron-core
  does (where Megatron's DDP starts a reduction), and leaving it restores the cleared flag;
* ``config.grad_sync_func`` (called where Megatron-core calls it, :mod:`pipeschedule.runtime.sync`)
  averages a chunk's gradients over the data-parallel group itself: one flattened all-reduce per
  chunk and dtype, then a division by ``dp``. Megatron-core does not call it everywhere (1F1B's
  first pipeline rank leaves the reduction to its DDP hooks), so ``config.finalize_model_grads_func``
  from :meth:`DataParallelChunks.config_hooks` finishes every chunk not averaged yet, as
  Megatron's finalize finishes its DDP's reductions. That is exactly one all-reduce per chunk per step;
* a communication hook on each DDP module records any reduction DDP starts on its own (someone
  set the flag again), and the next grad sync raises if there was one, instead of gradients
  averaged twice or half-way.

DDP still does what it is good at: at construction it checks that the replicas' parameter shapes
agree and broadcasts replica 0's parameters, so all replicas start identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeschedule import bounded_collective, declare_groups

__all__ = ["DataParallelChunks"]

logger = logging.getLogger(__name__)


class DataParallelChunks:
    """This rank's model chunks, each wrapped in DDP over ``group``, with the schedule hooks.

    Use :attr:`modules` as the schedule's ``model`` and pass :meth:`config_hooks` to
    :class:`~pipeschedule.PipelineConfig`. Counters (per instance, since construction):
    :attr:`all_reduces` counts this class's all-reduces, :attr:`ddp_reductions` the buckets DDP
    tried to reduce on its own (always 0 when used as intended).
    """

    def __init__(self, *, chunks: Sequence[nn.Module], group: Any = None, **ddp_kwargs: Any) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DataParallelChunks needs torch.distributed initialised; call dist.init_process_group first")
        if not chunks:
            raise ValueError("chunks is empty; pass this rank's model chunks, one module per chunk")
        self.group = group
        self.size = dist.get_world_size(group)
        self.all_reduces = 0
        self.ddp_reductions = 0
        self.modules: list[DistributedDataParallel] = []
        self._averaged: set[int] = set()  # chunks whose gradients this step are already averaged
        for chunk in chunks:
            module = DistributedDataParallel(chunk, process_group=group, **ddp_kwargs)
            # DDP arms its reducer in a forward run with this flag set; a pipeline chunk's forwards
            # are many microbatches ahead of their backwards, so it must never be armed.
            module.require_backward_grad_sync = False
            module.register_comm_hook(state=self, hook=_record_ddp_reduction)
            self.modules.append(module)

    def no_sync_funcs(self) -> list[Callable[[], Any]]:
        """``config.no_sync_func``: each chunk's ``DistributedDataParallel.no_sync``."""
        return [module.no_sync for module in self.modules]

    def grad_sync_funcs(self) -> list[Callable[[Iterable[nn.Parameter]], None]]:
        """``config.grad_sync_func``: one per chunk, each averaging that chunk's gradients."""
        return [declare_groups(lambda params, c=c: self._average_chunk(c, params), self.group) for c in range(len(self.modules))]

    def finish_grad_sync(self, model_chunks: Any = None, *_: Any, **__: Any) -> None:
        """Average every chunk whose gradients no ``grad_sync_func`` call averaged this step; call once per step.

        Takes (and ignores) a finalize function's arguments, so it can be one.
        """
        for c, module in enumerate(self.modules):
            if c not in self._averaged:
                self.grad_sync(module.parameters())
        self._averaged.clear()

    def config_hooks(self, finalize_model_grads_func: Callable[..., None] | None = None) -> dict[str, Any]:
        """The :class:`~pipeschedule.PipelineConfig` hooks: ``no_sync_func``, ``grad_sync_func`` and
        ``finalize_model_grads_func``, which finishes the averaging (:meth:`finish_grad_sync`) and
        then calls the given ``finalize_model_grads_func`` with the schedule's arguments."""

        def finalize_model_grads(model_chunks: list, num_tokens: Any = None) -> None:
            self.finish_grad_sync()
            if finalize_model_grads_func is not None:
                finalize_model_grads_func(model_chunks, num_tokens)

        # The step watches the data-parallel group's failure notices (and the groups of the given
        # finalize): a replica that fails reaches the others even when they wait in an all-reduce.
        groups = getattr(finalize_model_grads_func, "pipeschedule_groups", ())
        return {
            "no_sync_func": self.no_sync_funcs(), "grad_sync_func": self.grad_sync_funcs(),
            "finalize_model_grads_func": declare_groups(finalize_model_grads, self.group, *groups),
        }

    def _average_chunk(self, chunk: int, params: Iterable[nn.Parameter]) -> None:
        self.grad_sync(params)
        self._averaged.add(chunk)

    def grad_sync(self, params: Iterable[nn.Parameter]) -> None:
        """Average the gradients of ``params`` over the data-parallel group: one all-reduce per dtype.

        Every replica passes the same parameters in the same order (the same chunk). A parameter
        without a gradient gets a zero one first, so every replica flattens the same layout.
        """
        if self.ddp_reductions:
            raise RuntimeError(
                f"DistributedDataParallel started {self.ddp_reductions} gradient reduction(s) by itself, so its "
                f"require_backward_grad_sync flag was set again after DataParallelChunks cleared it; leave it "
                f"cleared (DataParallelChunks averages the gradients through the schedule's hooks)"
            )
        grads: list[torch.Tensor] = []
        for param in params:
            if not param.requires_grad:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        if self.size == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for same_dtype in by_dtype.values():
            flat = torch.cat([grad.reshape(-1) for grad in same_dtype])
            bounded_collective(
                lambda flat=flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True),
                group=self.group, what="the data-parallel gradient all-reduce of grad_sync_func",
            )
            self.all_reduces += 1
            flat.div_(self.size)
            for grad, piece in zip(same_dtype, flat.split([grad.numel() for grad in same_dtype])):
                grad.copy_(piece.view_as(grad))
        logger.debug("averaged gradients of %d parameters over %d replicas", len(grads), self.size)


def _record_ddp_reduction(state: DataParallelChunks, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's communication hook: count the bucket and hand it back unreduced.

    DDP only gets here if a forward armed its reducer. The bucket is left alone (no communication
    that the other replicas might never join) and the next grad sync reports the misuse.
    """
    state.ddp_reductions += 1
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


# DDP checks the hook's annotations against the real types, and this module's annotations are
# strings (from __future__ import annotations).
_record_ddp_reduction.__annotations__.update(bucket=dist.GradBucket, state=DataParallelChunks, **{"return": torch.futures.Future[torch.Tensor]})
