"""Record what each rank did and when, and export it as a Chrome trace or a timeline picture.

A :class:`TraceRecorder` is an observer (``PipelineConfig(observer=recorder)``): it keeps one row
per action (kind ``F``, ``B``, ``I`` or ``W``, microbatch, chunk, phase, start, end) and one per
exchange (start, end, the number of sends and receives: the span is time spent posting and waiting
on communication).
Rows are plain numbers, so gathering them is one fixed-shape ``float64`` collective, with no
pickling.

Clocks. Each rank stamps events with its own ``time.perf_counter()``. On one host that is the same
monotonic clock in every process, but across hosts it is not, so before gathering, each rank
measures its offset to rank 0's clock by ping-pong (Cristian's method): it sends a message at
local ``t0``, rank 0 answers with its clock reading ``t_ref``, the answer arrives at local ``t1``,
and ``offset = t_ref - (t0 + t1) / 2``. The error is at most half the round trip, so of several
rounds the one with the shortest round trip is kept. Aligned time is ``local + offset``.

Invariants of a gathered :class:`PipelineTrace`: per rank, rows are in the order they were observed
(an observer is told after each action or exchange ends) and every ``end >= start``. Actions never
overlap each other on one rank. An exchange's span may hold the weight passes (``W``) a zero-bubble
step runs while that exchange is in flight: they end first, so their rows come first, and apart
from them starts are non-decreasing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeschedule.config import ScheduleEvent
from pipeschedule.plan import Action

__all__ = ["CriticalPath", "PipelineTrace", "TraceRecorder", "TracedEvent"]

# Row layout of the gathered float64 tensor; codes keep the exchange free of strings.
_KIND_CODES = {"F": 0, "B": 1, "X": 2, "I": 3, "W": 4}  # X: an exchange
_KINDS = {code: kind for kind, code in _KIND_CODES.items()}
# Chrome trace categories of the actions.
_CATEGORIES = {"F": "forward", "B": "backward", "I": "input-gradient", "W": "weight-gradient"}
_PHASE_CODES = {"warmup": 0, "steady": 1, "cooldown": 2}
_WIDTH = 9  # kind, microbatch, chunk, phase, start, end, sends, recvs, held bytes (-1: not recorded)
_PING_ROUNDS = 8


@dataclass(frozen=True)
class TracedEvent:
    """One action (``kind`` ``"F"``, ``"B"``, or a split backward's ``"I"`` and ``"W"``) or exchange
    (``kind`` ``"X"``) on ``rank``.

    ``start`` and ``end`` are seconds on the aligned clock, relative to the trace's origin once
    gathered. For an exchange, ``microbatch``, ``chunk`` and ``phase`` are ``-1`` / ``""`` and
    ``sends`` / ``recvs`` count its messages; for an action those counts are 0.
    """

    rank: int
    kind: str
    microbatch: int
    chunk: int
    phase: str
    start: float
    end: float
    sends: int = 0
    recvs: int = 0
    held_bytes: int | None = None  # after an action, with TraceRecorder(held_bytes=True)

    @property
    def duration(self) -> float:
        return self.end - self.start

    def label(self, v: int) -> str:
        """``F3`` / ``F3.1`` as in the plan grid, ``comm`` for an exchange."""
        if self.kind == "X":
            return "comm"
        return f"{self.kind}{self.microbatch}" if v == 1 else f"{self.kind}{self.microbatch}.{self.chunk}"


@dataclass(frozen=True)
class CriticalPath:
    """The chain of actions that bounds a measured step, and what its time was spent on.

    Walking back from the action that ended last: each action waited either for the action before
    it on its rank or for the message its input came in (the forward before it, one stage back, or
    the backward, ``B`` or ``I``, after it, one stage on), whichever ended later. A weight pass
    ``W`` takes no message; it waits for the action before it. ``actions`` lists the chain from
    the first action to the last; ``edges[i]`` says what ``actions[i + 1]`` waited for
    (``"message"`` or ``"local"``). The step, from its first event's start to its last event's
    end, splits exactly into::

        step == lead + compute + message_gaps + local_gaps + tail

    ``compute``: time inside the chain's actions. ``message_gaps``: from a producer's end to its
    consumer's start (sending, the transfer, waking the receiver). ``local_gaps``: between two
    actions of one rank (its exchanges, its bookkeeping). ``lead``: before the first action;
    ``tail``: after the last action until the step's last event ends.
    """

    actions: tuple[TracedEvent, ...]
    edges: tuple[str, ...]
    lead: float
    compute: float
    message_gaps: float
    local_gaps: float
    tail: float

    @property
    def hops(self) -> int:
        """How many edges of the chain are messages."""
        return self.edges.count("message")

    def summary(self, *, unit: float = 1e3, unit_name: str = "ms") -> str:
        """One line: the split of the span, in ``unit_name`` (seconds times ``unit``)."""
        n = len(self.actions)
        return (
            f"critical path: {n} actions, compute {self.compute * unit:.1f} {unit_name}, "
            f"{self.hops} message gaps {self.message_gaps * unit:.1f} {unit_name}, "
            f"{n - 1 - self.hops} local gaps {self.local_gaps * unit:.1f} {unit_name}, "
            f"lead {self.lead * unit:.1f} {unit_name}, tail {self.tail * unit:.1f} {unit_name}"
        )


@dataclass(frozen=True)
class PipelineTrace:
    """All ranks' events on one clock; ``ranks[r]`` lists rank ``r``'s events in the order they ran.

    The origin (time 0) is the earliest start of any event.
    """

    ranks: tuple[tuple[TracedEvent, ...], ...]

    @property
    def v(self) -> int:
        return 1 + max((e.chunk for rank in self.ranks for e in rank), default=0)

    def comm_wait(self) -> list[float]:
        """Seconds each rank spent in exchanges (posting and waiting on communication), not counting
        the weight passes that ran inside an exchange's span."""
        return [_outside_actions(rank) for rank in self.ranks]

    def peak_held_bytes(self) -> list[int | None]:
        """Per rank, the most bytes of stage inputs and outputs held after any action (``None`` if not recorded)."""
        peaks = []
        for rank in self.ranks:
            held = [e.held_bytes for e in rank if e.held_bytes is not None]
            peaks.append(max(held) if held else None)
        return peaks

    def busy(self) -> list[float]:
        """Seconds each rank spent in actions."""
        return [sum(e.duration for e in rank if e.kind != "X") for rank in self.ranks]

    def span(self) -> float:
        """From the first start to the last end, over all ranks."""
        return max((e.end for rank in self.ranks for e in rank), default=0.0)

    def critical_path(self) -> CriticalPath:
        """The chain of actions that bounds the step (see :class:`CriticalPath`).

        Which message feeds which action follows from the stages alone (stage ``s`` of chunk
        ``c`` on rank ``r`` is ``c * p + r``), so no plan is needed.
        """
        p = len(self.ranks)
        actions = [[e for e in rank if e.kind != "X"] for rank in self.ranks]
        if not any(actions):
            raise ValueError("the trace has no actions; record a step first")
        where = {(e.kind, e.microbatch, e.chunk * p + r): (r, i) for r, rank in enumerate(actions) for i, e in enumerate(rank)}
        if len(where) != sum(map(len, actions)):
            raise ValueError(
                "the trace holds an action twice (more than one step?); call recorder.clear() before the step to analyse"
            )
        r, i = max(((r, len(rank) - 1) for r, rank in enumerate(actions) if rank), key=lambda ri: actions[ri[0]][ri[1]].end)
        chain, edges = [actions[r][i]], []
        message_gaps = local_gaps = 0.0
        while True:
            e = chain[-1]
            stage = e.chunk * p + r
            source = stage - 1 if e.kind == "F" else stage + 1
            # None past either end of the pipeline, and for W, which takes no message.
            producer = None if e.kind == "W" else where.get((e.kind, e.microbatch, source))
            before = actions[r][i - 1] if i > 0 else None
            if producer is not None and (before is None or actions[producer[0]][producer[1]].end > before.end):
                r, i = producer
                message_gaps += e.start - actions[r][i].end
                edges.append("message")
            elif before is not None:
                i -= 1
                local_gaps += e.start - before.end
                edges.append("local")
            else:
                break
            chain.append(actions[r][i])
        chain.reverse()
        edges.reverse()
        origin = min((ev.start for rank in self.ranks for ev in rank), default=0.0)
        return CriticalPath(
            actions=tuple(chain), edges=tuple(edges), lead=chain[0].start - origin,
            compute=sum(e.duration for e in chain), message_gaps=message_gaps, local_gaps=local_gaps,
            tail=self.span() - chain[-1].end,
        )

    def to_chrome_trace(self) -> dict[str, Any]:
        """The Chrome trace-event JSON object (``{"traceEvents": [...]}``) that Perfetto opens.

        One process ("pipeline") with one thread track per rank; actions are complete events
        (``"ph": "X"``) named like the plan grid (``F3.1``), in category ``forward``, ``backward``,
        ``input-gradient`` (``I``) or ``weight-gradient`` (``W``); exchanges are ``comm`` events on
        the same track, a weight pass run while one was in flight nested in it. Timestamps and
        durations are microseconds.
        """
        v = self.v
        events: list[dict[str, Any]] = [{"ph": "M", "pid": 0, "name": "process_name", "args": {"name": "pipeline"}}]
        for r, rank in enumerate(self.ranks):
            events.append({"ph": "M", "pid": 0, "tid": r, "name": "thread_name", "args": {"name": f"rank {r}"}})
            events.append({"ph": "M", "pid": 0, "tid": r, "name": "thread_sort_index", "args": {"sort_index": r}})
            for e in rank:
                args: dict[str, Any]
                if e.kind == "X":
                    cat, args = "comm", {"sends": e.sends, "recvs": e.recvs}
                else:
                    cat = _CATEGORIES[e.kind]
                    args = {"microbatch": e.microbatch, "chunk": e.chunk, "phase": e.phase}
                events.append({
                    "ph": "X", "pid": 0, "tid": r, "name": e.label(v), "cat": cat,
                    "ts": e.start * 1e6, "dur": max(e.duration, 0.0) * 1e6, "args": args,
                })
                if e.held_bytes is not None:  # a counter track per rank
                    events.append({"ph": "C", "pid": 0, "name": f"held bytes, rank {r}", "ts": e.end * 1e6,
                                   "args": {"bytes": e.held_bytes}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write_chrome_trace(self, path: str) -> None:
        """Write :meth:`to_chrome_trace` to ``path`` as JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_chrome_trace(), f)

    def save_timeline_png(self, path: str, *, title: str | None = None) -> None:
        """The pipeline-diagram picture of the measured actions (needs matplotlib).

        Drawn by :func:`pipeschedule.tools.show.save_png`, the same picture as a simulated step, with
        time in milliseconds; gaps are time a rank spent outside actions (waiting, mostly).
        """
        from pipeschedule.tools.show import save_png

        picture = _as_simulation(self)
        if title is None:
            title = (
                f"measured: p={picture.p} v={picture.v} m={picture.m}: {picture.step_time:.1f} ms, "
                f"{picture.bubble_fraction:.1%} outside actions"
            )
        save_png(picture, path=path, title=title, time_unit="ms")


class TraceRecorder:
    """An observer that keeps this rank's events; callable, so pass it as ``observer=recorder``.

    Recording appends a tuple of numbers and nothing else, so it costs about a microsecond per
    event. :meth:`gather` (a collective) aligns clocks and brings every rank's rows to one rank.

    With ``held_bytes=True`` each action's row also gets the bytes of stage inputs and outputs the
    rank holds after it (:class:`~pipeschedule.config.ScheduleEvent`), which costs a walk over
    those tensors per action: use it to measure memory, not time.
    """

    def __init__(self, *, held_bytes: bool = False) -> None:
        self._rows: list[tuple[float, ...]] = []
        self._rank: int | None = None
        self.wants_held_bytes = held_bytes

    def __call__(self, event: ScheduleEvent) -> None:
        self._rank = event.rank
        if event.what == "action":
            a: Action = event.action  # type: ignore[assignment]
            held = -1 if event.held_bytes is None else event.held_bytes
            row = (_KIND_CODES[a.kind], a.microbatch, a.chunk, _PHASE_CODES[a.phase], event.start, event.end, 0, 0, held)
        else:
            ex = event.exchange
            row = (2, -1, -1, -1, event.start, event.end, len(ex.sends), len(ex.recvs), -1)  # type: ignore[union-attr]
        self._rows.append(row)

    # The executor tests ``observer is not None``, so an empty recorder is still called.
    @property
    def num_events(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        """Forget everything recorded (e.g. warmup steps)."""
        self._rows.clear()

    def local_events(self) -> list[TracedEvent]:
        """This rank's events, on its own clock (not aligned, no origin subtracted)."""
        rank = self._rank if self._rank is not None else 0
        return [_decode(rank, row) for row in self._rows]

    def gather(self, *, group: dist.ProcessGroup | None = None, dst: int = 0) -> PipelineTrace | None:
        """Every rank's events on one clock, returned on group rank ``dst`` (``None`` elsewhere).

        A collective over ``group``: every rank of it must call. Without an initialised process
        group this process is the whole pipeline. Rank ``r`` of the trace is group rank ``r``.
        """
        if not dist.is_initialized():
            return _build([torch.tensor(self._rows, dtype=torch.float64).reshape(-1, _WIDTH)])
        size, me = dist.get_world_size(group), dist.get_rank(group)
        offset = _clock_offset(group=group, me=me, size=size)
        rows = torch.tensor(self._rows, dtype=torch.float64).reshape(-1, _WIDTH)
        rows[:, 4:6] += offset
        # Gather needs one shape everywhere: agree on the longest, pad, and send the true length.
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
        dist.all_gather(lengths, torch.tensor([rows.shape[0]], dtype=torch.int64), group=group)
        longest = max(int(n) for n in lengths)
        padded = torch.zeros(longest, _WIDTH, dtype=torch.float64)
        padded[: rows.shape[0]] = rows
        bufs = [torch.empty_like(padded) for _ in range(size)] if me == dst else None
        dist.gather(padded, bufs, group=group, group_dst=dst)
        if me != dst:
            return None
        assert bufs is not None
        return _build([buf[: int(n)] for buf, n in zip(bufs, lengths)])

    # Thin collective wrappers, so a training script needs one call.

    def to_chrome_trace(self, *, group: dist.ProcessGroup | None = None, dst: int = 0) -> dict[str, Any] | None:
        """:meth:`PipelineTrace.to_chrome_trace` of the gathered trace on ``dst``; a collective."""
        trace = self.gather(group=group, dst=dst)
        return None if trace is None else trace.to_chrome_trace()

    def write_chrome_trace(self, path: str, *, group: dist.ProcessGroup | None = None, dst: int = 0) -> None:
        """Gather (a collective) and write the JSON on ``dst``; other ranks write nothing."""
        trace = self.gather(group=group, dst=dst)
        if trace is not None:
            trace.write_chrome_trace(path)

    def save_timeline_png(self, path: str, *, group: dist.ProcessGroup | None = None, dst: int = 0) -> None:
        """Gather (a collective) and draw the timeline on ``dst`` (needs matplotlib there)."""
        trace = self.gather(group=group, dst=dst)
        if trace is not None:
            trace.save_timeline_png(path)


def _decode(rank: int, row: Any) -> TracedEvent:
    code, mb, chunk, phase, start, end, sends, recvs, held = (float(x) for x in row)
    kind = _KINDS[int(code)]
    phase_name = "" if kind == "X" else ("warmup", "steady", "cooldown")[int(phase)]
    return TracedEvent(rank, kind, int(mb), int(chunk), phase_name, start, end, int(sends), int(recvs), None if held < 0 else int(held))


def _build(per_rank: list[torch.Tensor]) -> PipelineTrace:
    # Time 0 is the earliest start anywhere, so a trace reads from 0 whatever the clocks' epoch.
    starts = [float(rows[:, 4].min()) for rows in per_rank if rows.shape[0]]
    origin = min(starts, default=0.0)
    ranks = []
    for r, rows in enumerate(per_rank):
        events = [_decode(r, row) for row in rows.tolist()]
        ranks.append(tuple(
            TracedEvent(e.rank, e.kind, e.microbatch, e.chunk, e.phase, e.start - origin, e.end - origin, e.sends, e.recvs, e.held_bytes)
            for e in events
        ))
    return PipelineTrace(ranks=tuple(ranks))


def _outside_actions(events: tuple[TracedEvent, ...]) -> float:
    """The seconds of ``events``' exchanges that no action of theirs overlaps.

    Actions never overlap each other, so each exchange loses the sum of its overlaps with them.
    An action inside an exchange ends first and is observed first: it is among the rows before.
    """
    actions = [e for e in events if e.kind != "X"]
    total, first = 0.0, 0
    for e in events:
        if e.kind != "X":
            continue
        # Skip the actions that ended before this exchange began (rows are nearly sorted).
        while first < len(actions) and actions[first].end <= e.start:
            first += 1
        inside = 0.0
        for a in actions[first:]:
            if a.start >= e.end:
                break
            inside += max(0.0, min(a.end, e.end) - max(a.start, e.start))
        total += e.duration - inside
    return total


def _clock_offset(*, group: dist.ProcessGroup | None, me: int, size: int) -> float:
    """Seconds to add to this rank's ``perf_counter`` to read group rank 0's; 0 on rank 0."""
    buf = torch.zeros(1, dtype=torch.float64)
    if me == 0:
        # Serve each rank's pings in turn; the order is fixed, so no message meets the wrong peer.
        for peer in range(1, size):
            for _ in range(_PING_ROUNDS):
                dist.recv(buf, group=group, group_src=peer)
                buf[0] = time.perf_counter()
                dist.send(buf, group=group, group_dst=peer)
        return 0.0
    best_rtt, offset = float("inf"), 0.0
    for _ in range(_PING_ROUNDS):
        t0 = time.perf_counter()
        dist.send(buf, group=group, group_dst=0)
        dist.recv(buf, group=group, group_src=0)
        t1 = time.perf_counter()
        if t1 - t0 < best_rtt:
            best_rtt, offset = t1 - t0, float(buf[0]) - (t0 + t1) / 2
    return offset


def _as_simulation(trace: PipelineTrace) -> Any:
    """The measured actions dressed as a :class:`~pipeschedule.plan.simulate.Simulation`, times in ms,
    so that the simulator's picture draws them.

    Its cost model holds the measured mean times, per microbatch through one rank's share of the
    model as :class:`~pipeschedule.plan.simulate.CostModel` counts them: ``tf`` from the forwards,
    ``tb`` from the whole backwards or the input-gradient halves, ``tw`` from the weight passes.
    """
    from pipeschedule.plan.simulate import CostModel, RankTimeline, Simulation, TimedAction

    v = trace.v
    step = trace.span() * 1e3
    timelines, busy_total = [], 0.0
    for r, rank in enumerate(trace.ranks):
        actions = tuple(
            TimedAction(action=Action(e.kind, e.microbatch, e.chunk, e.phase), start=e.start * 1e3, end=e.end * 1e3)  # type: ignore[arg-type]
            for e in rank if e.kind != "X"
        )
        busy = sum(a.end - a.start for a in actions)
        wait = _outside_actions(rank) * 1e3
        busy_total += busy
        timelines.append(RankTimeline(
            rank=r, warmup=sum(1 for a in actions if a.action.phase == "warmup"), actions=actions, exchanges=(),
            busy=busy, wait=wait, end=max((a.end for a in actions), default=0.0),
            bubble_fraction=1 - busy / step if step else 0.0,
            peak_live_activations=_peak(actions, ("B", "W")), peak_awaiting_backward=_peak(actions, ("B", "I")),
        ))
    p = len(trace.ranks)
    m = 1 + max((e.microbatch for rank in trace.ranks for e in rank), default=0)
    durations: dict[str, list[float]] = {kind: [] for kind in _CATEGORIES}
    for timeline in timelines:
        for a in timeline.actions:
            durations[a.action.kind].append(float(a.end - a.start))

    def mean(*kinds: str) -> float:  # per microbatch through all v chunks of a rank
        values = [x for kind in kinds for x in durations[kind]]
        return v * sum(values) / len(values) if values else 0.0

    return Simulation(
        p=p, v=v, m=m, forward_only=not any(durations[kind] for kind in ("B", "I", "W")),
        group_size=p, cost=CostModel(tf=mean("F"), tb=mean("B", "I"), tw=mean("W")), ranks=tuple(timelines),
        step_time=step, bubble_fraction=1 - busy_total / (p * step) if step else 0.0,
    )


def _peak(actions: tuple[Any, ...], ends: tuple[str, ...]) -> int:
    """The most forwards whose ``ends`` action (``B`` or ``W``: released; ``B`` or ``I``: backward
    done) had not run yet, over the measured order."""
    live = peak = 0
    for timed in actions:
        if timed.action.kind == "F":
            live += 1
            peak = max(peak, live)
        elif timed.action.kind in ends:
            live -= 1
    return peak
