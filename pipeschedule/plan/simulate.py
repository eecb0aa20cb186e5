"""A discrete-event simulation of a whole-pipeline plan: when each action runs, with no processes.

The semantics are those of :func:`pipeschedule.plan.check.check_pipeline`, with time added:

* every rank posts its ``first`` exchange at time 0;
* after an exchange completes, the rank runs the next step's actions back to back, then posts
  that step's exchange, runs the step's fill (weight passes, which carry no message) and waits for
  the exchange: the next step starts once both are done;
* the ``j``-th send from rank ``a`` to rank ``b`` meets the ``j``-th receive ``b`` posts from ``a``
  (posting order, never tags). The transfer starts once both sides have posted and takes the
  cost model's ``latency``; the receive *and the send* complete when it ends, because under
  rendezvous semantics (NCCL, gloo's unbuffered sends) the sender's buffer is in use until the
  data has left it. A send to the same rank (``p = 1``) is a local hand-over: it completes when
  posted and its receive completes once both sides have posted, with no latency;
* an exchange completes when all its operations have (an empty one at once).

Every time is a ``max`` of sums of earlier times, so every figure is monotone in each cost and in
the latency. Which operations eventually complete does not depend on the costs at all, so a plan
fails here exactly when :func:`~pipeschedule.plan.check.check_pipeline` rejects it (a deadlock, or a
message meeting a receive meant for another): the simulation raises :class:`~pipeschedule.plan.check.PlanError` with the rank x step grid, marking where
each stuck rank stopped and saying whom it waits for.

Costs may be ``float`` or :class:`fractions.Fraction`; with fractions every figure is exact.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeAlias

from pipeschedule.plan.check import PlanError, number_operations, peak_awaiting_backward, peak_live_activations, render_grid
from pipeschedule.plan.steps import Action, Message, RankPlan

__all__ = ["CostModel", "RankTimeline", "Simulation", "TimedAction", "TimedExchange", "simulate"]

logger = logging.getLogger(__name__)

Time: TypeAlias = "float | Fraction"  # only +, -, / and max are used


@dataclass(frozen=True)
class CostModel:
    """How long things take.

    ``tf``, ``tb`` and ``tw`` are the forward, input-gradient and weight-gradient times of a *whole
    microbatch through one rank's share of the model*, so with ``v`` chunks per rank one chunk
    costs ``tf / v``, ``tb / v`` and ``tw / v``. A whole backward ``B`` costs ``(tb + tw) / v``;
    a zero-bubble plan's ``I`` costs ``tb / v`` and its ``W`` ``tw / v``. With ``tw = 0`` (the
    default) ``tb`` is the whole backward, as before the split existed.
    ``overrides`` replaces that for single chunks: entries ``(rank, chunk, forward, backward)`` or
    ``(rank, chunk, forward, backward, weight)`` give the times of that one chunk on that rank (not
    divided by ``v``). ``latency`` is the time a message takes between two ranks once both sides
    have posted it.
    """

    tf: Time = 1.0
    tb: Time = 2.0
    latency: Time = 0
    overrides: tuple[tuple[Time, ...], ...] = ()
    tw: Time = 0

    def __post_init__(self) -> None:
        for name in ("tf", "tb", "tw", "latency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not value >= 0 or value == float("inf"):
                raise ValueError(f"CostModel.{name} must be a finite number >= 0, got {value!r}")
        for entry in self.overrides:
            if len(entry) not in (4, 5) or not all(x >= 0 for x in entry):
                raise ValueError(
                    f"each CostModel override is (rank, chunk, forward_time, backward_time) or (rank, chunk, "
                    f"forward_time, backward_time, weight_time) with non-negative entries, got {entry!r}"
                )

    def duration(self, action: Action, *, rank: int, v: int) -> Time:
        """The time ``action`` takes on ``rank`` in a plan with ``v`` chunks per rank."""
        for entry in self.overrides:
            if entry[0] == rank and entry[1] == action.chunk:
                forward, backward, weight = entry[2], entry[3], entry[4] if len(entry) == 5 else 0
                return _by_kind(action.kind, forward, backward, weight)
        # An int 0 stays 0 (0 / v would be a float, and would make Fraction costs inexact).
        return _by_kind(action.kind, self.tf / v, self.tb / v, self.tw / v if self.tw else self.tw)


def _by_kind(kind: str, forward: Time, backward: Time, weight: Time) -> Time:
    if kind == "F":
        return forward
    if kind == "I":
        return backward
    if kind == "W":
        return weight
    return backward + weight  # "B": both halves


@dataclass(frozen=True)
class TimedAction:
    """One action and when it ran: ``start < end`` unless its cost is 0."""

    action: Action
    start: Time
    end: Time


@dataclass(frozen=True)
class TimedExchange:
    """Exchange number ``index`` of a rank (0 is ``first``, ``i`` follows step ``i - 1``).

    ``filled`` is when the step's fill (its weight passes) ended, ``posted`` when there is none;
    ``completed`` is when the rank went on: the exchange done and the fill too. ``completed -
    filled`` is the time the rank spent blocked on it.
    """

    index: int
    posted: Time
    completed: Time
    filled: Time | None = None

    @property
    def blocked(self) -> Time:
        return self.completed - (self.posted if self.filled is None else self.filled)


@dataclass(frozen=True)
class RankTimeline:
    """What one rank did and when.

    ``warmup`` is the plan's warmup count ``W``. ``end`` is when its last exchange completed;
    ``busy`` the sum of its action times (fills included); ``wait`` the time it spent blocked in
    exchanges. ``busy + wait == end``; the rank then idles until the step time.
    ``bubble_fraction = 1 - busy / step_time``. ``peak_live_activations`` counts activations held
    until their whole backward (``B`` or ``W``), ``peak_awaiting_backward`` those whose ``B`` or
    ``I`` has not run.
    """

    rank: int
    warmup: int
    actions: tuple[TimedAction, ...]
    exchanges: tuple[TimedExchange, ...]
    busy: Time
    wait: Time
    end: Time
    bubble_fraction: float
    peak_live_activations: int
    peak_awaiting_backward: int = 0


@dataclass(frozen=True)
class Simulation:
    """The simulated step of a whole pipeline.

    ``step_time`` is the latest rank's ``end``; ``bubble_fraction`` is ``1 - sum(busy) /
    (p * step_time)``, the idle share of all ranks' time. (SCHEDULES.md's ``(p - 1) / m`` for 1F1B
    is instead idle time over compute time; ``idle_over_busy`` gives that figure.)
    """

    p: int
    v: int
    m: int
    forward_only: bool
    group_size: int
    cost: CostModel
    ranks: tuple[RankTimeline, ...]
    step_time: Time
    bubble_fraction: float

    @property
    def idle_over_busy(self) -> Time:
        busy = sum(rank.busy for rank in self.ranks)
        return (self.p * self.step_time - busy) / busy if busy else 0.0


def _validate(plans: list[RankPlan]) -> int:
    if not plans:
        raise ValueError("simulate needs the plans of all ranks, got none; pass build_pipeline(...)")
    p = plans[0].p
    if len(plans) != p or [plan.r for plan in plans] != list(range(p)):
        raise ValueError(
            f"simulate needs one plan per rank in rank order, got ranks {[plan.r for plan in plans]} "
            f"for p={p}; pass build_pipeline(...) or a list indexed by rank"
        )
    return p


class _Channel:
    """The posts on one directed rank pair, in posting order, matched by position."""

    def __init__(self) -> None:
        self.sends: list[tuple[Message, Time]] = []
        self.recvs: list[tuple[Message, Time]] = []


class _Replay:
    """The state of the replay: what each rank has posted and when its exchanges completed."""

    def __init__(self, plans: list[RankPlan], cost: CostModel) -> None:
        self.plans, self.cost, self.p = plans, cost, len(plans)
        self.channels: dict[tuple[int, int], _Channel] = defaultdict(_Channel)
        self.numbered = [number_operations(plan) for plan in plans]
        self.messages = [[ex.sends + ex.recvs for ex in plan.exchanges] for plan in plans]
        self.position = [0] * self.p  # the exchange each rank has posted and waits on
        self.posted: list[list[Time]] = [[] for _ in plans]
        self.completed: list[list[Time]] = [[] for _ in plans]
        self.filled: list[list[Time]] = [[] for _ in plans]  # when each exchange's fill ended
        self.timed: list[list[TimedAction]] = [[] for _ in plans]

    def post(self, rank: int, at: Time, fill: tuple[Action, ...] = ()) -> None:
        self.posted[rank].append(at)
        clock = at
        for action in fill:  # runs while the exchange is in flight
            end = clock + self.cost.duration(action, rank=rank, v=self.plans[rank].v)
            self.timed[rank].append(TimedAction(action=action, start=clock, end=end))
            clock = end
        self.filled[rank].append(clock)
        ops = self.numbered[rank][self.position[rank]]
        for (kind, channel, _), msg in zip(ops, self.messages[rank][self.position[rank]]):
            sides = self.channels[channel]
            (sides.sends if kind == "send" else sides.recvs).append((msg, at))

    def finish_time(self, rank: int) -> Time | None:
        """When the posted exchange completes, or ``None`` while some peer has not posted."""
        done = self.filled[rank][-1]
        for kind, (a, b), j in self.numbered[rank][self.position[rank]]:
            channel = self.channels[(a, b)]
            if kind == "send" and a == b:
                continue  # local hand-over: complete when posted
            if len(channel.sends) <= j or len(channel.recvs) <= j:
                return None
            (sent, sent_at), (expected, received_at) = channel.sends[j], channel.recvs[j]
            if sent != expected:
                raise PlanError(
                    f"message #{j} from rank {a} to rank {b}: the sender posts {sent.label()} but the "
                    f"receiver expects {expected.label()}\n{render_grid(self.plans)}"
                )
            # The transfer starts once both sides have posted; both ends wait for it to land.
            done = max(done, max(sent_at, received_at) + (0 if a == b else self.cost.latency))
        return done

    def advance(self, rank: int) -> bool:
        """Complete as many of ``rank``'s exchanges as its peers allow; whether any completed."""
        moved = False
        plan, last = self.plans[rank], len(self.numbered[rank]) - 1
        while self.position[rank] <= last and (done := self.finish_time(rank)) is not None:
            self.completed[rank].append(done)
            moved = True
            self.position[rank] += 1
            if self.position[rank] > last:
                break
            clock = done
            step = plan.steps[self.position[rank] - 1]
            for action in step.actions:
                end = clock + self.cost.duration(action, rank=rank, v=plan.v)
                self.timed[rank].append(TimedAction(action=action, start=clock, end=end))
                clock = end
            self.post(rank, clock, step.fill)
        return moved

    def blocked_on(self, rank: int) -> str:
        """Whom a stuck ``rank`` waits for, for the deadlock message."""
        ops = self.numbered[rank][self.position[rank]]
        for (kind, (a, b), j), msg in zip(ops, self.messages[rank][self.position[rank]]):
            channel = self.channels[(a, b)]
            if kind == "send" and a != b and len(channel.recvs) <= j:
                return f"rank {rank} waits for rank {b} to receive {msg.label()}"
            if kind == "recv" and len(channel.sends) <= j:
                return f"rank {rank} waits for rank {a} to send {msg.label()}"
        raise AssertionError(f"rank {rank} is not stuck")


def simulate(plans: list[RankPlan], *, cost: CostModel | None = None, overlapped: bool = False) -> Simulation:
    """Time every action and exchange of ``plans`` (one :class:`RankPlan` per rank, by rank).

    ``overlapped=False`` times the batched mode (the module docstring). ``overlapped=True`` times
    the overlapped mode (``config.overlap_p2p_comm``) with an unbounded receive window: every
    receive is posted ahead, an action waits only for the message it consumes (sent ``latency``
    earlier), and a send never holds its sender back. The exchanges are then no points of
    waiting; each rank's timeline has none.

    Raises :class:`PlanError` if a message meets a receive meant for another message, or if the
    plan deadlocks (some rank waits forever); the error shows the grid with where each rank stopped.
    """
    p = _validate(plans)
    if overlapped:
        return _simulate_overlapped(plans, cost or CostModel())
    replay = _Replay(plans, cost or CostModel())
    for rank in range(p):
        replay.post(rank, 0)  # an int 0 keeps Fraction costs exact
    # Completion times never depend on the order ranks are visited in: each is a max of sums of
    # times fixed earlier. Sweep until a sweep moves nobody.
    progress = True
    while progress:
        progress = False
        for rank in range(p):
            progress = replay.advance(rank) or progress
    stuck = [rank for rank in range(p) if replay.position[rank] < len(replay.numbered[rank])]
    if stuck:
        marks = {rank: sum(len(s.actions) + len(s.fill) for s in plans[rank].steps[: replay.position[rank]]) for rank in stuck}
        reasons = "\n".join(replay.blocked_on(rank) for rank in stuck)
        raise PlanError(
            f"the plan deadlocks: ranks {stuck} wait forever at the marked points\n{reasons}\n"
            f"{render_grid(plans, marks=marks)}"
        )
    return _result(plans, replay.cost, replay.timed, replay.posted, replay.completed, replay.filled)


def _result(
    plans: list[RankPlan],
    cost: CostModel,
    timed: list[list[TimedAction]],
    posted: list[list[Time]],
    completed: list[list[Time]],
    filled: list[list[Time]],
    *,
    waits: list[Time] | None = None,
    no_exchanges: bool = False,
) -> Simulation:
    ends = [done[-1] for done in completed]
    step_time = max(ends)
    ranks = []
    for rank, (plan, actions, post_times, done_times, fill_times, end) in enumerate(zip(plans, timed, posted, completed, filled, ends)):
        busy = sum((a.end - a.start for a in actions), 0)
        wait = waits[rank] if waits is not None else sum((d - f for f, d in zip(fill_times, done_times)), 0)
        ranks.append(
            RankTimeline(
                rank=plan.r,
                warmup=plan.counts.warmup,
                actions=tuple(actions),
                exchanges=() if no_exchanges else tuple(
                    TimedExchange(index=i, posted=s, completed=d, filled=f if f != s else None)
                    for i, (s, d, f) in enumerate(zip(post_times, done_times, fill_times))
                ),
                busy=busy,
                wait=wait,
                end=end,
                bubble_fraction=float(1 - busy / step_time) if step_time else 0.0,
                peak_live_activations=peak_live_activations(plan),
                peak_awaiting_backward=peak_awaiting_backward(plan),
            )
        )
    total_busy = sum(rank.busy for rank in ranks)
    first = plans[0]
    logger.debug("simulated p=%d v=%d m=%d: step time %s", first.p, first.v, first.m, step_time)
    return Simulation(
        p=first.p,
        v=first.v,
        m=first.m,
        forward_only=first.forward_only,
        group_size=first.group_size,
        cost=cost,
        ranks=tuple(ranks),
        step_time=step_time,
        bubble_fraction=float(1 - total_busy / (first.p * step_time)) if step_time else 0.0,
    )


def _simulate_overlapped(plans: list[RankPlan], cost: CostModel) -> Simulation:
    """Each rank runs its actions in order; an action starts once the rank is free and its input was sent."""
    from pipeschedule.plan.check import check_pipeline  # the message order on every channel must match

    check_pipeline(plans)  # matching and freedom from deadlock under the strictest semantics
    p = len(plans)
    sent: dict[Message, Time] = {}
    timed: list[list[TimedAction]] = [[] for _ in plans]
    position, free = [0] * p, [0] * p
    sequences = [plan.actions for plan in plans]
    progress = True
    while progress:
        progress = False
        for rank, plan in enumerate(plans):
            actions = sequences[rank]
            while position[rank] < len(actions):
                action = actions[position[rank]]
                msg = plan.input_message(action)
                if msg is not None and msg not in sent:
                    break
                start = free[rank] if msg is None else max(free[rank], sent[msg] + cost.latency)
                end = start + cost.duration(action, rank=rank, v=plan.v)
                timed[rank].append(TimedAction(action=action, start=start, end=end))
                out = plan.output_message(action)
                if out is not None:
                    sent[out] = end
                free[rank] = end
                position[rank] += 1
                progress = True
    stuck = [rank for rank in range(p) if position[rank] < len(sequences[rank])]
    if stuck:  # an order whose dependencies form a cycle (the exchange check passed)
        marks = {rank: position[rank] for rank in stuck}
        raise PlanError(f"the plan deadlocks: ranks {stuck} wait forever\n{render_grid(plans, marks=marks)}")
    # No exchange is a point of waiting: a rank's only wait is for the input of an action.
    posted = [[] for _ in plans]
    done = [[free[rank]] for rank in range(p)]
    return _result(plans, cost, timed, [[0] for _ in plans], done, [[0] for _ in plans], waits=[
        sum((t.start - (timed[rank][i - 1].end if i else 0)) for i, t in enumerate(timed[rank])) for rank in range(p)
    ], no_exchanges=True)
