"""The trace recorder: what it keeps, the Chrome trace it exports, and the timeline picture."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from cases import BATCH, HIDDEN, SEQ, Batches, Case, Stage, forward_step
from pool import JobError
from trace_cases import TracedCase, run_traced

import pipeschedule as ps
from pipeschedule.config import ScheduleEvent
from pipeschedule.plan import Action, Exchange, Message, build_plan
from pipeschedule.tools.trace import PipelineTrace, TraceRecorder


def _tracks(chrome: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Complete events per track, in file order."""
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for event in chrome["traceEvents"]:
        if event["ph"] == "X":
            out[event["tid"]].append(event)
    return out


def _check_chrome(chrome: dict[str, Any], *, p: int) -> dict[int, list[dict[str, Any]]]:
    """The structure every exported trace has; returns the tracks."""
    again = json.loads(json.dumps(chrome))  # plain JSON, nothing that only Python can read
    assert again == chrome
    names = {e["tid"]: e["args"]["name"] for e in chrome["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {r: f"rank {r}" for r in range(p)}
    tracks = _tracks(chrome)
    assert sorted(tracks) == list(range(p))
    for events in tracks.values():
        assert all(e["pid"] == 0 and e["dur"] >= 0 and e["ts"] >= 0 for e in events)
        starts = [e["ts"] for e in events]
        assert starts == sorted(starts)
        # Actions and exchanges never overlap on one rank: each starts after the previous ended.
        for a, b in itertools.pairwise(events):
            assert b["ts"] >= a["ts"] + a["dur"] - 1e-3
    return tracks


def _actions(track: list[dict[str, Any]]) -> list[tuple[str, int, int, str]]:
    return [
        (e["name"][0], e["args"]["microbatch"], e["args"]["chunk"], e["args"]["phase"])
        for e in track if e["cat"] in ("forward", "backward")
    ]


def _planned(plan: Any) -> list[tuple[str, int, int, str]]:
    return [(a.kind, a.microbatch, a.chunk, a.phase) for a in plan.actions]


def test_synthetic_events_become_chrome_events() -> None:
    recorder = TraceRecorder()
    f0 = Action("F", 0, 1, "warmup")
    recorder(ScheduleEvent(0, "action", f0, None, 10.0, 10.5))
    sent = Message("act", 0, 1, 2)
    recorder(ScheduleEvent(0, "exchange", None, Exchange(sends=(sent,), recvs=()), 10.5, 10.75))
    recorder(ScheduleEvent(0, "action", Action("B", 0, 1, "cooldown"), None, 11.0, 12.0))
    trace = recorder.gather()
    assert isinstance(trace, PipelineTrace)
    assert trace.comm_wait() == [0.25] and trace.busy() == [1.5] and trace.span() == 2.0
    tracks = _check_chrome(trace.to_chrome_trace(), p=1)
    # Times are microseconds from the earliest start.
    assert [(e["name"], e["cat"], e["ts"], e["dur"]) for e in tracks[0]] == [
        ("F0.1", "forward", 0.0, 500000.0),
        ("comm", "comm", 500000.0, 250000.0),
        ("B0.1", "backward", 1000000.0, 1000000.0),
    ]
    assert tracks[0][1]["args"] == {"sends": 1, "recvs": 0}
    assert tracks[0][0]["args"] == {"microbatch": 0, "chunk": 1, "phase": "warmup"}
    recorder.clear()
    assert recorder.num_events == 0


def test_one_process_schedule_is_recorded_in_plan_order(tmp_path: Path) -> None:
    case = Case(schedule="interleaved", p=1, v=2, m=3)
    chunks = [Stage(c, 2, 0) for c in range(2)]
    recorder = TraceRecorder()
    ps.forward_backward_pipelining_with_interleaving(
        forward_step_func=forward_step, data_iterator=[Batches(case) for _ in chunks], model=chunks,
        num_microbatches=3, seq_length=SEQ, micro_batch_size=BATCH,
        config=ps.PipelineConfig(hidden_size=HIDDEN, pipeline_dtype=torch.float64, observer=recorder),
    )
    trace = recorder.gather()
    assert trace is not None and len(trace.ranks) == 1
    tracks = _check_chrome(trace.to_chrome_trace(), p=1)
    assert _actions(tracks[0]) == _planned(build_plan(p=1, r=0, v=2, m=3))
    # Chunk 0 hands its output to chunk 1 on this same rank: those hand-overs are exchanges.
    assert [e for e in tracks[0] if e["cat"] == "comm"]
    path = tmp_path / "trace.json"
    trace.write_chrome_trace(str(path))
    assert json.loads(path.read_text()) == trace.to_chrome_trace()


@pytest.mark.parametrize(
    "job",
    [
        TracedCase(Case(schedule="interleaved", p=4, v=2, m=4)),
        TracedCase(Case(schedule="1f1b", p=3, v=1, m=5, group="1-3"), dst=2),
        TracedCase(Case(schedule="1f1b", p=2, v=1, m=3, group="2-3"), dst=1),
    ],
    ids=["interleaved-p4", "1f1b-p3-subgroup", "1f1b-p2-subgroup"],
)
def test_pool_trace_gathers_every_rank_on_one_clock(pool: Any, job: TracedCase) -> None:
    results = pool.run(run_traced, job)
    errors = [out for out in results.values() if isinstance(out, JobError)]
    assert not errors, errors[0].traceback
    ran = {out["group_rank"]: out for out in results.values() if out is not None}
    case = job.case
    assert sorted(ran) == list(range(case.p))
    # Only the destination gets the trace; every rank recorded its own events.
    assert [r for r, out in ran.items() if out["chrome"] is not None] == [job.dst]
    chrome = ran[job.dst]["chrome"]
    tracks = _check_chrome(chrome, p=case.p)
    plans = [build_plan(p=case.p, r=r, v=case.v, m=case.m) for r in range(case.p)]
    for r, plan in enumerate(plans):
        assert _actions(tracks[r]) == _planned(plan)
        comm = [e for e in tracks[r] if e["cat"] == "comm"]
        assert [(e["args"]["sends"], e["args"]["recvs"]) for e in comm] == [
            (len(ex.sends), len(ex.recvs)) for ex in plan.exchanges if ex
        ]
        assert len(tracks[r]) == ran[r]["local_events"]
    assert len(ran[job.dst]["comm_wait"]) == case.p and all(w >= 0 for w in ran[job.dst]["comm_wait"])
    # Aligned clocks: a stage's forward starts after the previous stage's forward of that
    # microbatch ended, although the two were stamped by different processes. The slack is far
    # above the alignment error (half a round trip) and far below the run's length.
    ends = {}
    for r, track in tracks.items():
        for e in track:
            if e["cat"] == "forward":
                ends[(e["args"]["chunk"] * case.p + r, e["args"]["microbatch"])] = (e["ts"], e["ts"] + e["dur"])
    for (stage, mb), (start, _) in ends.items():
        if stage > 0:
            assert start >= ends[(stage - 1, mb)][1] - 2000.0, (stage, mb)
    # The critical path runs from the first forward of microbatch 0 on rank 0 to the backward that
    # ended last, and splits the measured step exactly. That is stage 0's last backward, unless the
    # actions are shorter than the clocks' alignment error: then another rank's last backward may
    # seem to end later, by less than the slack used above.
    path = ran[job.dst]["critical_path"]
    first, last = path.actions[0], path.actions[-1]
    assert (first.rank, first.kind, first.microbatch, first.chunk) == (0, "F", 0, 0)
    assert (last.kind, last.microbatch, last.chunk) == ("B", case.m - 1, 0)

    def last_backward_end(r: int) -> float:
        (e,) = [e for e in tracks[r] if e["cat"] == "backward" and (e["args"]["microbatch"], e["args"]["chunk"]) == (case.m - 1, 0)]
        return e["ts"] + e["dur"]

    assert last_backward_end(0) >= last_backward_end(last.rank) - 2000.0
    split = path.lead + path.compute + path.message_gaps + path.local_gaps + path.tail
    assert split == pytest.approx(ran[job.dst]["span"], abs=1e-9)
    assert len(path.edges) == len(path.actions) - 1 and path.compute > 0


def test_timeline_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    recorder = TraceRecorder()
    for i, (kind, mb) in enumerate([("F", 0), ("F", 1), ("B", 0), ("B", 1)]):
        recorder(ScheduleEvent(0, "action", Action(kind, mb, 0, "steady"), None, 1.0 + i * 0.01, 1.0 + i * 0.01 + 0.008))
    path = tmp_path / "timeline.png"
    recorder.save_timeline_png(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timeline_png_without_matplotlib_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = TraceRecorder()
    recorder(ScheduleEvent(0, "action", Action("F", 0, 0, "warmup"), None, 0.0, 1.0))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        recorder.save_timeline_png(str(tmp_path / "never.png"))
    assert not (tmp_path / "never.png").exists()


def _event(rank: int, kind: str, microbatch: int, start: float, end: float, chunk: int = 0) -> Any:
    from pipeschedule.tools.trace import TracedEvent

    return TracedEvent(rank=rank, kind=kind, microbatch=microbatch, chunk=chunk, phase="" if kind == "X" else "steady",
                       start=start, end=end)


def test_the_critical_path_of_a_hand_made_trace() -> None:
    # p=2, m=1: F0 on rank 0, F0 and B0 on rank 1, B0 on rank 0, then rank 0's last exchange.
    trace = PipelineTrace(ranks=(
        (_event(0, "F", 0, 0.0, 1.0), _event(0, "B", 0, 5.0, 7.0), _event(0, "X", -1, 7.0, 7.3)),
        (_event(1, "F", 0, 1.5, 2.5), _event(1, "B", 0, 2.6, 4.6)),
    ))
    path = trace.critical_path()
    assert [(e.rank, e.kind) for e in path.actions] == [(0, "F"), (1, "F"), (1, "B"), (0, "B")]
    assert path.edges == ("message", "local", "message")
    assert path.hops == 2
    assert path.compute == pytest.approx(6.0)
    assert path.message_gaps == pytest.approx(0.5 + 0.4)
    assert path.local_gaps == pytest.approx(0.1)
    assert (path.lead, path.tail) == (0.0, pytest.approx(0.3))
    assert "4 actions, compute 6000.0 ms, 2 message gaps 900.0 ms, 1 local gaps 100.0 ms" in path.summary()


def test_a_later_local_predecessor_wins_over_an_earlier_message() -> None:
    # Rank 1's F1 got its input (rank 0's F1, ended at 2) before rank 1 finished F0 (at 3).
    trace = PipelineTrace(ranks=(
        (_event(0, "F", 0, 0.0, 1.0), _event(0, "F", 1, 1.0, 2.0)),
        (_event(1, "F", 0, 1.0, 3.0), _event(1, "F", 1, 3.5, 4.0)),
    ))
    path = trace.critical_path()
    assert [(e.rank, e.microbatch) for e in path.actions] == [(0, 0), (1, 0), (1, 1)]
    assert path.edges == ("message", "local")
    assert path.local_gaps == pytest.approx(0.5)


def test_an_empty_trace_has_no_critical_path() -> None:
    with pytest.raises(ValueError, match="the trace has no actions"):
        PipelineTrace(ranks=((), ())).critical_path()


def test_a_trace_of_two_steps_is_refused() -> None:
    one = (_event(0, "F", 0, 0.0, 1.0), _event(0, "B", 0, 1.0, 3.0))
    again = (_event(0, "F", 0, 4.0, 5.0), _event(0, "B", 0, 5.0, 7.0))
    with pytest.raises(ValueError, match=r"holds an action twice \(more than one step\?\); call recorder.clear\(\)"):
        PipelineTrace(ranks=(one + again,)).critical_path()


@pytest.mark.parametrize(("p", "v", "m"), [(2, 1, 3), (4, 1, 8), (4, 2, 8), (3, 2, 5), (4, 3, 12)])
@pytest.mark.parametrize("latency", [0.0, 0.3])
def test_the_critical_path_of_a_simulated_step_adds_up_to_the_step(p: int, v: int, m: int, latency: float) -> None:
    from pipeschedule.plan import build_pipeline
    from pipeschedule.plan.simulate import CostModel, simulate

    sim = simulate(build_pipeline(p=p, v=v, m=m), cost=CostModel(tf=1.0, tb=2.0, latency=latency))
    trace = PipelineTrace(ranks=tuple(
        tuple(_event(r, a.action.kind, a.action.microbatch, a.start, a.end, a.action.chunk) for a in rank.actions)
        for r, rank in enumerate(sim.ranks)
    ))
    path = trace.critical_path()
    assert path.lead == 0.0 and path.tail == 0.0
    assert path.lead + path.compute + path.message_gaps + path.local_gaps + path.tail == pytest.approx(sim.step_time)
    assert path.actions[0].kind == "F" and path.actions[0].microbatch == 0 and path.actions[-1].kind == "B"
    gaps = [b.start - a.end for a, b in itertools.pairwise(path.actions)]
    assert all(g >= -1e-9 for g in gaps)
    # A message never arrives sooner than the latency after its producer ends.
    assert all(g >= latency - 1e-9 for g, edge in zip(gaps, path.edges) if edge == "message")
    if latency == 0.0 and v == 1:
        # Nothing but compute bounds a 1F1B step: SCHEDULES.md's (m + p - 1)(tf + tb), action by action.
        assert path.message_gaps == pytest.approx(0.0) and path.local_gaps == pytest.approx(0.0)
        assert path.compute == pytest.approx((m + p - 1) * 3.0)
        assert len(path.actions) == 2 * (m + p - 1)


# Split backwards (zero bubble): I and W actions, and weight passes nested in an exchange's span.


def _check_chrome_nested(chrome: dict[str, Any], *, p: int) -> dict[int, list[dict[str, Any]]]:
    """Like :func:`_check_chrome`, except that a weight pass may lie inside an exchange's span
    (Perfetto draws it nested there); nothing else overlaps."""
    assert json.loads(json.dumps(chrome)) == chrome
    tracks = _tracks(chrome)
    assert sorted(tracks) == list(range(p))
    for events in tracks.values():
        outer = sorted((e for e in events if not _inside_comm(e, events)), key=lambda e: e["ts"])
        for a, b in itertools.pairwise(outer):
            assert b["ts"] >= a["ts"] + a["dur"] - 1e-3
        assert all(e["cat"] == "weight-gradient" for e in events if _inside_comm(e, events))
    return tracks


def _inside_comm(event: dict[str, Any], events: list[dict[str, Any]]) -> bool:
    return event["cat"] != "comm" and any(
        x["cat"] == "comm" and x["ts"] <= event["ts"] and event["ts"] + event["dur"] <= x["ts"] + x["dur"] and event["dur"] > 0
        for x in events
    )


def test_input_and_weight_passes_round_trip_through_the_recorder() -> None:
    recorder = TraceRecorder()
    steps = [("F", 0, 0.0, 1.0), ("I", 0, 1.0, 2.5), ("W", 0, 2.5, 3.0), ("B", 1, 3.0, 5.0)]
    for kind, mb, start, end in steps:
        recorder(ScheduleEvent(0, "action", Action(kind, mb, 1, "steady"), None, 10.0 + start, 10.0 + end))
    assert [(e.kind, e.microbatch, e.chunk, e.phase) for e in recorder.local_events()] == [
        (kind, mb, 1, "steady") for kind, mb, _, _ in steps
    ]
    trace = recorder.gather()
    assert trace is not None
    assert [(e.kind, e.start, e.end) for e in trace.ranks[0]] == [(kind, start, end) for kind, _, start, end in steps]
    tracks = _check_chrome(trace.to_chrome_trace(), p=1)
    assert [(e["name"], e["cat"]) for e in tracks[0]] == [
        ("F0.1", "forward"), ("I0.1", "input-gradient"), ("W0.1", "weight-gradient"), ("B1.1", "backward"),
    ]
    assert trace.busy() == [5.0] and trace.comm_wait() == [0.0]


def test_a_simulated_zero_bubble_step_recorded_on_one_process() -> None:
    from trace_cases import SimulatedCase, simulated_cost, simulated_events

    from pipeschedule.plan import build_pipeline
    from pipeschedule.plan.simulate import simulate

    job = SimulatedCase(p=3, v=2, m=6)
    plans = build_pipeline(p=job.p, v=job.v, m=job.m, schedule=job.schedule)
    sim = simulate(plans, cost=simulated_cost())
    for r in range(job.p):
        recorder = TraceRecorder()
        for event in simulated_events(job, r):
            recorder(event)
        trace = recorder.gather()
        assert trace is not None
        events = trace.ranks[0]
        assert [(e.kind, e.microbatch, e.chunk, e.phase) for e in events if e.kind != "X"] == _planned(plans[r])
        # The weight passes run while an exchange is in flight: inside its span, and not waiting.
        nested = [
            w for w in events if w.kind == "W"
            and any(x.kind == "X" and x.start <= w.start and w.end <= x.end for x in events)
        ]
        assert len(nested) == sum(len(step.fill) for step in plans[r].steps if step.exchange) > 0
        assert trace.comm_wait()[0] == pytest.approx(float(sim.ranks[r].wait))
        assert trace.busy()[0] == pytest.approx(float(sim.ranks[r].busy))
        cats = defaultdict(int)
        for e in _check_chrome_nested(trace.to_chrome_trace(), p=1)[0]:
            cats[e["cat"]] += 1
        assert dict(cats) == {
            "forward": job.m * job.v, "input-gradient": job.m * job.v, "weight-gradient": job.m * job.v,
            "comm": sum(1 for ex in plans[r].exchanges if ex),
        }


def test_pool_gathers_input_and_weight_passes(pool: Any) -> None:
    from trace_cases import SimulatedCase, run_simulated, simulated_cost

    from pipeschedule.plan import build_pipeline
    from pipeschedule.plan.simulate import simulate

    job = SimulatedCase(p=3, v=1, m=4, group="1-3", dst=1)
    results = pool.run(run_simulated, job)
    errors = [out for out in results.values() if isinstance(out, JobError)]
    assert not errors, errors[0].traceback
    ran = {out["group_rank"]: out for out in results.values() if out is not None}
    assert [r for r, out in ran.items() if out["ranks"] is not None] == [job.dst]
    plans = build_pipeline(p=job.p, v=job.v, m=job.m, schedule=job.schedule)
    sim = simulate(plans, cost=simulated_cost())
    gathered = ran[job.dst]
    for r, events in enumerate(gathered["ranks"]):
        assert [(e.kind, e.microbatch, e.chunk, e.phase) for e in events if e.kind != "X"] == _planned(plans[r])
        # One clock for all ranks: the times are the simulated ones, up to the alignment error.
        origin = min(t.start for rank in sim.ranks for t in rank.actions)
        assert [e.start for e in events if e.kind != "X"] == pytest.approx(
            [float(t.start - origin) for t in sim.ranks[r].actions], abs=0.05
        )
        assert gathered["comm_wait"][r] == pytest.approx(float(sim.ranks[r].wait), abs=1e-6)
    cats = {e["cat"] for track in _check_chrome_nested(gathered["chrome"], p=job.p).values() for e in track}
    assert cats == {"forward", "input-gradient", "weight-gradient", "comm"}


@pytest.mark.parametrize(("p", "v", "m"), [(2, 1, 3), (4, 1, 8), (4, 2, 8), (3, 2, 5)])
def test_the_critical_path_of_a_simulated_zero_bubble_step(p: int, v: int, m: int) -> None:
    from pipeschedule.plan import build_pipeline
    from pipeschedule.plan.simulate import CostModel, simulate

    sim = simulate(build_pipeline(p=p, v=v, m=m, schedule="zero-bubble"), cost=CostModel(tf=1.0, tb=1.0, tw=1.0), overlapped=True)
    trace = PipelineTrace(ranks=tuple(
        tuple(_event(r, a.action.kind, a.action.microbatch, a.start, a.end, a.action.chunk) for a in rank.actions)
        for r, rank in enumerate(sim.ranks)
    ))
    path = trace.critical_path()
    assert path.lead + path.compute + path.message_gaps + path.local_gaps + path.tail == pytest.approx(sim.step_time)
    assert path.actions[0].kind == "F" and path.actions[0].microbatch == 0
    # A weight pass takes no message: whatever precedes it on the path ran on its rank.
    for edge, before, after in zip(path.edges, path.actions, path.actions[1:]):
        if after.kind == "W":
            assert edge == "local" and before.rank == after.rank
        if edge == "message":
            assert after.kind in ("F", "I") and before.kind == after.kind and before.rank != after.rank
    assert {e.kind for e in path.actions} <= {"F", "I", "W"}
    assert path.message_gaps == pytest.approx(0.0) and path.local_gaps == pytest.approx(0.0)


def test_timeline_png_of_split_backwards_carries_their_times(tmp_path: Path) -> None:
    from pipeschedule.tools.trace import _as_simulation

    recorder = TraceRecorder()
    clock = 1.0
    steps = [("F", 0, 0.010), ("F", 1, 0.010), ("I", 0, 0.020), ("W", 0, 0.004), ("I", 1, 0.020), ("W", 1, 0.006)]
    for kind, mb, length in steps:
        recorder(ScheduleEvent(0, "action", Action(kind, mb, 0, "steady"), None, clock, clock + length))
        clock += length
    trace = recorder.gather()
    assert trace is not None
    picture = _as_simulation(trace)
    assert not picture.forward_only
    assert (picture.cost.tf, picture.cost.tb, picture.cost.tw) == (pytest.approx(10.0), pytest.approx(20.0), pytest.approx(5.0))
    assert picture.ranks[0].peak_live_activations == 2 and picture.ranks[0].peak_awaiting_backward == 2
    assert [t.action.kind for t in picture.ranks[0].actions] == ["F", "F", "I", "W", "I", "W"]
    if importlib.util.find_spec("matplotlib") is not None:
        path = tmp_path / "timeline.png"
        trace.save_timeline_png(str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
