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


@dataclass(frozen=True)
class SimulatedCase:
    """A simulated step replayed into a recorder on every group rank, as the executor would tell it."""

    p: int
    v: int
    m: int
    schedule: str = "zero-bubble"
    group: str = "all"
    dst: int = 0
    base: float = 1000.0  # the perf_counter reading the step starts at, in seconds


def simulated_events(job: SimulatedCase, r: int) -> list[Any]:
    """Rank ``r``'s actions and non-empty exchanges of the batched simulated step, in the order an
    observer hears of them (as each ends): a fill's weight passes before the exchange around them."""
    from pipeschedule.config import ScheduleEvent
    from pipeschedule.plan import build_pipeline
    from pipeschedule.plan.simulate import simulate

    plans = build_pipeline(p=job.p, v=job.v, m=job.m, schedule=job.schedule)
    rank = simulate(plans, cost=simulated_cost()).ranks[r]
    rows = [(t.end, 0, ScheduleEvent(r, "action", t.action, None, job.base + t.start, job.base + t.end)) for t in rank.actions]
    for timed, ex in zip(rank.exchanges, plans[r].exchanges):
        if ex:  # the executor tells of no empty exchange
            event = ScheduleEvent(r, "exchange", None, ex, job.base + timed.posted, job.base + timed.completed)
            rows.append((timed.completed, 1, event))
    return [event for _, _, event in sorted(rows, key=lambda row: row[:2])]


def simulated_cost() -> Any:
    from pipeschedule.plan.simulate import CostModel

    return CostModel(tf=1.0, tb=1.5, tw=0.5, latency=0.25)


def run_simulated(job: SimulatedCase, rank: int, groups: dict) -> dict[str, Any] | None:
    """Replay the simulated step into a recorder, gather on ``job.dst``; report the events there."""
    from pool import GROUPS

    from pipeschedule.tools.trace import TraceRecorder

    ranks = GROUPS[job.group]
    if rank not in ranks:
        return None
    r = ranks.index(rank)
    recorder = TraceRecorder()
    for event in simulated_events(job, r):
        recorder(event)
    trace = recorder.gather(group=groups[job.group], dst=job.dst)
    return {
        "group_rank": r,
        "ranks": None if trace is None else trace.ranks,
        "comm_wait": None if trace is None else trace.comm_wait(),
        "chrome": None if trace is None else trace.to_chrome_trace(),
    }
