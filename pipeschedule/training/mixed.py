"""Loss scaling across pipeline stages, and agreement on whether a step overflowed.

With loss scaling, the last stage multiplies the loss by ``scale`` before backward
(``config.grad_scale_func``, called by the schedule on the last stage only); the scaled
gradient flows back through every stage, so every stage's gradients carry the factor. Before the
optimizer step each rank divides its gradients by ``scale`` and checks them for inf/NaN.

An overflow usually shows up on some stages only. If those skipped the step while the others took
it, the model would silently fall apart (and tied copies would diverge), so the local flags are
max-reduced over the model-parallel group (here: the pipeline group) and every stage skips or
steps together. Data-parallel replicas need no vote of their own: an inf in one replica's
gradient reaches every replica through the data-parallel all-reduce, which runs before the check.

Scales are kept at powers of two (the initial scale must be one; growth and backoff are 2 and
1/2), so scaling and unscaling are exact in binary floating point: without overflow, scaled
training produces bit-identical parameters to unscaled training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeschedule import bounded_collective

__all__ = ["DynamicLossScaler", "agree_found_inf", "local_found_inf"]

logger = logging.getLogger(__name__)


def local_found_inf(parameters: Iterable[nn.Parameter]) -> bool:
    """Whether any gradient among ``parameters`` holds an inf or a NaN (this rank only)."""
    return any(param.grad is not None and not bool(torch.isfinite(param.grad).all()) for param in parameters)


def agree_found_inf(
    *, found_inf: bool, group: Any = None, device: torch.device | None = None, timeout: float | None = None
) -> bool:
    """The logical OR of ``found_inf`` over ``group`` (a max-reduce): the same answer on every member.

    Collective over ``group``; ``None`` means the default group when ``torch.distributed`` is
    initialised and this rank alone otherwise. ``device`` is where the flag travels (CPU for gloo,
    the current GPU for NCCL). The wait is bounded (:func:`pipeschedule.wire.notice.bounded_collective`):
    inside a step (a hook) by ``config.p2p_timeout`` and the step's failure notices, outside by
    ``timeout`` seconds (``None``: the process group's own timeout); a member that failed or hangs
    raises :class:`~pipeschedule.errors.PeerFailedError` instead of a hang.
    """
    if not dist.is_initialized():
        return bool(found_inf)
    flag = torch.tensor([1.0 if found_inf else 0.0], device=device or torch.device("cpu"))
    bounded_collective(
        lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group, async_op=True),
        group=group, what="the loss scaler's found_inf max-reduce", timeout=timeout,
    )
    return bool(flag.item() > 0)


def _is_power_of_two(value: float) -> bool:
    return value > 0 and math.isfinite(value) and math.frexp(value)[0] == 0.5


class DynamicLossScaler:
    """A loss scale that halves on overflow and doubles after ``growth_interval`` clean steps.

    :meth:`scale_loss` is ``config.grad_scale_func``. :meth:`step` replaces ``optimizer.step()``:
    it unscales, agrees on ``found_inf`` over ``group``, steps or skips, and updates the scale.
    Every rank calls it with the same ``group`` sequence, so the scale stays equal everywhere.
    """

    def __init__(
        self, *, initial_scale: float = 2.0**16, growth_interval: int = 1000, min_scale: float = 1.0
    ) -> None:
        if not _is_power_of_two(initial_scale) or not _is_power_of_two(min_scale):
            raise ValueError(
                f"initial_scale={initial_scale!r} and min_scale={min_scale!r} must be powers of two (e.g. "
                f"2.0**16), which keeps scaling exact; round them to a power of two"
            )
        if not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval must be an integer >= 1, got {growth_interval!r}")
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_interval = growth_interval
        self.clean_steps = 0
        self.skipped_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``; use as ``config.grad_scale_func``."""
        return loss * self.scale

    def unscale_and_check(self, *, parameters: Iterable[nn.Parameter], group: Any = None) -> bool:
        """Divide every gradient by the scale; return ``found_inf`` agreed over ``group``."""
        params = [param for param in parameters if param.grad is not None]
        grads = [param.grad for param in params if param.grad is not None]
        inverse = 1.0 / self.scale  # exact: the scale is a power of two
        for grad in grads:
            grad.mul_(inverse)
        device = grads[0].device if grads else None
        return agree_found_inf(found_inf=local_found_inf(params), group=group, device=device)

    def update(self, *, found_inf: bool) -> None:
        """Back off on overflow, grow after ``growth_interval`` clean steps in a row."""
        if found_inf:
            self.scale = max(self.scale * 0.5, self.min_scale)
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= 2.0
            self.clean_steps = 0

    def step(self, optimizer: torch.optim.Optimizer, *, group: Any = None) -> bool:
        """Unscale, agree on overflow over ``group``, then step (return True) or skip (return False).

        The optimizer's parameters are those unscaled and checked. On a skip the gradients are
        left as they are; zero them before the next step as usual.
        """
        params = [param for param_group in optimizer.param_groups for param in param_group["params"]]
        found_inf = self.unscale_and_check(parameters=params, group=group)
        if found_inf:
            logger.warning("inf or NaN in the gradients on some stage: step skipped, loss scale %g -> %g", self.scale, max(self.scale * 0.5, self.min_scale))
        else:
            optimizer.step()
        self.update(found_inf=found_inf)
        return not found_inf
