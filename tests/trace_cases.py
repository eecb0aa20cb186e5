"""Jobs for the worker pool that run a schedule with a :class:`~pipeschedule.tools.trace.TraceRecorder`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from cases import BATCH, HIDDEN, SEQ, Batches, Case, Stage, forward_step


@dataclass(frozen=True)
class TracedCase:
    """A schedule case, and the group rank that gathers the trace."""

    case: Case
    dst: int = 0


def run_traced(job: TracedCase, rank: int, groups: dict) -> dict[str, Any] | None:
    """Run the case with a recorder, gather on ``job.dst``; report the Chrome trace there."""
    from pool import GROUPS

    import pipeschedule as ps
    from pipeschedule.tools.trace import TraceRecorder

    case = job.case
    ranks = GROUPS[case.group]
    if rank not in ranks:
        return None
    group = groups[case.group]
    r = ranks.index(rank)
    chunks = [Stage(c * case.p + r, case.p * case.v, case.seed) for c in range(case.v)]
    recorder = TraceRecorder()
    config = ps.PipelineConfig(hidden_size=HIDDEN, pipeline_dtype=torch.float64, observer=recorder)
    interleaved = case.schedule == "interleaved"
    func = ps.forward_backward_pipelining_with_interleaving if interleaved else ps.forward_backward_pipelining_without_interleaving
    func(
        forward_step_func=forward_step,
        data_iterator=[Batches(case) for _ in chunks] if interleaved else Batches(case),
        model=chunks if interleaved else chunks[0],
        num_microbatches=case.m, seq_length=SEQ, micro_batch_size=BATCH, config=config, group=group,
    )
    local = len(recorder.local_events())
    trace = recorder.gather(group=group, dst=job.dst)
    return {
        "group_rank": r,
        "local_events": local,
        "chrome": None if trace is None else trace.to_chrome_trace(),
        "comm_wait": None if trace is None else trace.comm_wait(),
        "critical_path": None if trace is None else trace.critical_path(),
        "span": None if trace is None else trace.span(),
    }
