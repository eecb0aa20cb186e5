"""The iteration's loss, made visible on every rank.

Only the last pipeline stage of each replica sees losses (the schedule returns the per-microbatch
dicts there and ``[]`` elsewhere). :func:`mean_loss_everywhere` averages them over the
microbatches, then over the data-parallel replicas (an all-reduce among the last stages), and
broadcasts the result from the last stage over the pipeline group, so that every rank, rank 0
included, holds the same number: the mean over all ``m * dp`` microbatches of the step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["mean_loss_everywhere"]


def mean_loss_everywhere(
    *,
    reduced_dicts: Sequence[Mapping[str, Any]],
    key: str,
    is_last_stage: bool,
    pipeline_group: Any = None,
    data_parallel_group: Any = None,
    dtype: torch.dtype = torch.float64,
) -> float:
    """The step's loss ``reduced_dicts[i][key]`` averaged over microbatches and replicas, on every rank.

    Collective: every rank of the pipeline group calls it, and every rank of the data-parallel
    group (the groups are ``None`` when ``torch.distributed`` is not initialised, i.e. one
    process). ``reduced_dicts`` is what the schedule returned: non-empty exactly on the last stage.
    """
    if is_last_stage != bool(reduced_dicts):
        raise ValueError(
            f"is_last_stage={is_last_stage} but the schedule returned {len(reduced_dicts)} loss dicts; the "
            f"last stage gets one per microbatch and every other stage none; pass the schedule's return value"
        )
    value = torch.zeros(1, dtype=dtype)
    if reduced_dicts:
        missing = [i for i, d in enumerate(reduced_dicts) if key not in d]
        if missing:
            raise KeyError(f"loss key {key!r} is missing from microbatch(es) {missing}; the dicts have {sorted(reduced_dicts[0])}")
        value[0] = torch.stack([torch.as_tensor(d[key], dtype=dtype).reshape(()) for d in reduced_dicts]).mean()
    if not dist.is_initialized():
        return float(value[0])
    # Non-last stages average zeros among themselves: the same collective on every rank keeps
    # the call pattern uniform, and only the last stage's result is broadcast.
    if dist.get_world_size(data_parallel_group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=data_parallel_group)
        value.div_(dist.get_world_size(data_parallel_group))
    pipeline_size = dist.get_world_size(pipeline_group)
    if pipeline_size > 1:
        dist.broadcast(value, group=pipeline_group, group_src=pipeline_size - 1)
    return float(value[0])
