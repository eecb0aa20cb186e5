"""The order of work of every schedule, as plain data.

Nothing here touches ``torch.distributed``: these functions take the pipeline size ``p``, the rank
``r``, the chunks per rank ``v`` and the microbatch count ``m`` and return what rank ``r`` does, in
order. The schedule functions in :mod:`pipeschedule.schedules` execute exactly these plans, and the
checks in :mod:`pipeschedule.plan.check` prove properties of them without starting a process.

Invariants of every plan (tested with hypothesis):

* each ``(microbatch, chunk)`` is forwarded exactly once and, unless forward-only, backwarded exactly
  once, after its forward;
* the backwards of one chunk run in increasing microbatch order;
* the actions come in three phases: ``warmup`` forwards, ``steady`` rounds of one forward then one
  backward, ``cooldown`` backwards.

Communication is part of the plan. A rank's step is one action, or in the interleaved steady phase
a forward and a backward, followed by one *exchange*: a batch of sends and receives posted
together and waited on together. Which exchange carries which message is decided here, once, so
that :func:`pipeschedule.plan.check.check_pipeline` can prove for every configuration that each send
meets its receive in posting order and that no rank waits forever.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Action",
    "Exchange",
    "Message",
    "PhaseCounts",
    "RankPlan",
    "Step",
    "build_pipeline",
    "build_plan",
    "choose_group_size",
    "lockstep_receives",
    "order_table",
    "phase_counts",
]

Phase = Literal["warmup", "steady", "cooldown"]


@dataclass(frozen=True)
class Action:
    """One forward (``"F"``) or backward (``"B"``) of ``microbatch`` through this rank's ``chunk``."""

    kind: Literal["F", "B"]
    microbatch: int
    chunk: int
    phase: Phase

    def label(self, v: int = 1) -> str:
        """``F3`` for plain 1F1B, ``F3.1`` (microbatch 3, chunk 1) when there are several chunks."""
        return f"{self.kind}{self.microbatch}" if v == 1 else f"{self.kind}{self.microbatch}.{self.chunk}"


@dataclass(frozen=True)
class Message:
    """A tensor crossing from virtual stage ``src_stage`` to ``dst_stage``.

    ``"act"`` messages flow forward (``dst = src + 1``), ``"grad"`` messages backward
    (``dst = src - 1``). A stage ``s`` lives on rank ``s % p``.
    """

    kind: Literal["act", "grad"]
    microbatch: int
    src_stage: int
    dst_stage: int

    def label(self) -> str:
        return f"{self.kind}{self.microbatch}:{self.src_stage}>{self.dst_stage}"


@dataclass(frozen=True)
class Exchange:
    """One batch of point-to-point operations, posted together and waited on together.

    Activations are always sent to the next rank and received from the previous one; gradients
    are sent to the previous rank and received from the next one. Within a batch activation
    traffic comes before gradient traffic, on the sending and the receiving side alike: with
    ``p = 2`` both neighbours are one rank, messages on one channel are matched in posting order,
    and this fixed order is what makes each tensor land in the buffer meant for it.
    """

    sends: tuple[Message, ...] = ()
    recvs: tuple[Message, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.sends or self.recvs)


@dataclass(frozen=True)
class Step:
    """One or two actions (a steady forward and backward) followed by one exchange.

    The exchange sends what the actions produced and receives what the next step consumes.
    """

    actions: tuple[Action, ...]
    exchange: Exchange


@dataclass(frozen=True)
class PhaseCounts:
    """How many actions fall in each phase. ``total`` is the number of forwards (``m * v``)."""

    warmup: int
    steady: int
    cooldown: int
    total: int


@dataclass(frozen=True)
class RankPlan:
    """Everything rank ``r`` does in one step of training.

    ``first`` is posted before anything else (the receive of the first input); then each step runs
    its actions and posts its exchange.
    """

    p: int
    r: int
    v: int
    m: int
    forward_only: bool
    group_size: int
    counts: PhaseCounts
    first: Exchange
    steps: tuple[Step, ...]

    # Derived views are computed once per plan (plans are cached and reused every training step).

    @functools.cached_property
    def actions(self) -> tuple[Action, ...]:
        return tuple(a for step in self.steps for a in step.actions)

    @functools.cached_property
    def exchanges(self) -> tuple[Exchange, ...]:
        """All exchanges in posting order: ``first``, then one per step."""
        return (self.first,) + tuple(step.exchange for step in self.steps)

    @functools.cached_property
    def _messages(self) -> dict[Action, tuple[Message | None, Message | None]]:
        n = self.num_stages
        return {a: (_input_message(a, self.p, self.r, n), _output_message(a, self.p, self.r, n)) for a in self.actions}

    @property
    def num_stages(self) -> int:
        return self.p * self.v

    def stage(self, chunk: int) -> int:
        """The virtual stage of ``chunk`` on this rank."""
        return chunk * self.p + self.r

    def input_message(self, action: Action) -> Message | None:
        """What ``action`` consumes from a neighbour: an activation for F, a gradient for B."""
        known = self._messages.get(action)
        return known[0] if known is not None else _input_message(action, self.p, self.r, self.num_stages)

    def output_message(self, action: Action) -> Message | None:
        """What ``action`` hands to a neighbour (``None`` at the ends of the pipeline)."""
        known = self._messages.get(action)
        return known[1] if known is not None else _output_message(action, self.p, self.r, self.num_stages)


def _check_sizes(p: int, r: int, v: int, m: int) -> None:
    for name, value, low in (("p", p, 1), ("v", v, 1), ("m", m, 1), ("r", r, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if r >= p:
        raise ValueError(f"rank r={r} is outside the pipeline of size p={p}; use 0 <= r < p")


def choose_group_size(*, p: int, m: int, v: int, requested: int | None = None) -> int:
    """The number ``G`` of contiguous microbatches each chunk takes before the next chunk's turn.

    Plain 1F1B (``v == 1``) has no groups; ``G`` is then ``m``, which makes the order table the
    identity. For interleaving, a requested ``G`` is honoured if it is in ``[p, m]`` and leaves a
    last group of either ``G`` or at least ``p`` microbatches (a shorter last group would leave
    ranks waiting on each other). Without a request the smallest valid ``G >= p`` is chosen, which
    is ``p`` whenever ``m % p == 0`` (the classic interleaved schedule).
    """
    if v == 1:
        return m
    if m < p:
        raise ValueError(
            f"the interleaved schedule needs at least as many microbatches as pipeline ranks, got "
            f"num_microbatches={m} with p={p} and v={v}; use v=1 (plain 1F1B), or at least {p} "
            f"microbatches"
        )
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool):
            raise TypeError(f"microbatch_group_size_per_vp_stage must be an int, got {requested!r}")
        if not p <= requested <= m:
            raise ValueError(
                f"microbatch_group_size_per_vp_stage={requested} is outside [p, m] = [{p}, {m}]; "
                f"pick a value in that range or leave it unset to have one chosen"
            )
        rest = m % requested
        if 0 < rest < p:
            raise ValueError(
                f"microbatch_group_size_per_vp_stage={requested} leaves a last group of {rest} "
                f"microbatches (m={m}), fewer than p={p}; use a size that divides m or leaves at "
                f"least p, e.g. {choose_group_size(p=p, m=m, v=v)}, or leave it unset"
            )
        return requested
    for g in range(p, m + 1):
        if m % g == 0 or m % g >= p:
            return g
    raise AssertionError("unreachable: G = m always qualifies")


def order_table(*, m: int, v: int, group_size: int) -> list[tuple[int, int]]:
    """The ``(microbatch, chunk)`` pairs in forward order.

    Microbatches ``0 .. m-1`` are cut into consecutive groups of ``group_size`` (the last group
    takes the rest); each group contributes, for chunk ``0 .. v-1`` in turn, all its microbatches.
    """
    table = []
    for first in range(0, m, group_size):
        group = range(first, min(first + group_size, m))
        table.extend((mb, chunk) for chunk in range(v) for mb in group)
    return table


def phase_counts(
    *, p: int, r: int, v: int = 1, m: int, forward_only: bool = False, group_size: int | None = None
) -> PhaseCounts:
    """Warmup, steady and cooldown sizes for rank ``r``.

    1F1B: ``W = min(p - r - 1, m)``. Interleaved: ``W = min(2 (p - r - 1) + (v - 1) G, m v)``.
    Forward-only: everything is warmup.
    """
    _check_sizes(p, r, v, m)
    total = m * v
    if forward_only:
        warmup = total
    elif v == 1:
        warmup = min(p - r - 1, m)
    else:
        g = choose_group_size(p=p, m=m, v=v, requested=group_size)
        warmup = min(2 * (p - r - 1) + (v - 1) * g, total)
    steady = total - warmup
    return PhaseCounts(warmup=warmup, steady=steady, cooldown=0 if forward_only else warmup, total=total)


# Planning works on plain tuples, ``(kind, microbatch, chunk, phase)`` for an action and
# ``(kind, microbatch, src_stage, dst_stage)`` for a message: a large pipeline makes tens of
# thousands of them, and tuples cost a fraction of the frozen dataclasses a plan hands out.


def _action_tuples(counts: PhaseCounts, table: list[tuple[int, int]], v: int, forward_only: bool) -> list[tuple]:
    actions = [("F", *table[k], "warmup") for k in range(counts.warmup)]
    if forward_only:
        return actions
    for k in range(counts.steady):
        mb, chunk = table[k]
        actions.append(("F", *table[counts.warmup + k], "steady"))
        actions.append(("B", mb, v - 1 - chunk, "steady"))
    for k in range(counts.steady, counts.total):
        mb, chunk = table[k]
        actions.append(("B", mb, v - 1 - chunk, "cooldown"))
    return actions


def _actions(counts: PhaseCounts, table: list[tuple[int, int]], v: int, forward_only: bool) -> list[Action]:
    return [Action(*a) for a in _action_tuples(counts, table, v, forward_only)]


def _input_message(action: Action, p: int, r: int, num_stages: int) -> Message | None:
    msg = _input_tuple((action.kind, action.microbatch, action.chunk), p, r, num_stages)
    return None if msg is None else Message(*msg)


def _output_message(action: Action, p: int, r: int, num_stages: int) -> Message | None:
    msg = _output_tuple((action.kind, action.microbatch, action.chunk), p, r, num_stages)
    return None if msg is None else Message(*msg)


def _input_tuple(action: tuple, p: int, r: int, num_stages: int) -> tuple | None:
    kind, mb, chunk = action[:3]
    stage = chunk * p + r
    if kind == "F":
        return None if stage == 0 else ("act", mb, stage - 1, stage)
    return None if stage == num_stages - 1 else ("grad", mb, stage + 1, stage)


def _output_tuple(action: tuple, p: int, r: int, num_stages: int) -> tuple | None:
    kind, mb, chunk = action[:3]
    stage = chunk * p + r
    if kind == "F":
        return None if stage == num_stages - 1 else ("act", mb, stage, stage + 1)
    return None if stage == 0 else ("grad", mb, stage, stage - 1)


def _step_groups(p: int, r: int, v: int, m: int, forward_only: bool, g: int, table: list | None = None) -> list[tuple]:
    """Rank ``r``'s actions (tuples) cut into steps: one action each, or a steady forward and backward when interleaved."""
    counts = phase_counts(p=p, r=r, v=v, m=m, forward_only=forward_only, group_size=g)
    actions = _action_tuples(counts, order_table(m=m, v=v, group_size=g) if table is None else table, v, forward_only)
    if v == 1:
        return [(a,) for a in actions]
    w, steady = counts.warmup, 2 * counts.steady
    return (
        [(a,) for a in actions[:w]]
        + [(actions[i], actions[i + 1]) for i in range(w, w + steady, 2)]
        + [(a,) for a in actions[w + steady :]]
    )


def _sent_at(p: int, r: int, v: int, groups: list[tuple], *, to: int | None = None) -> dict[tuple, tuple[int, int]]:
    """For each message rank ``r`` sends (to rank ``to`` only, if given): (exchange index, position
    among that exchange's sends). Activations go first in an exchange."""
    where = {}
    n = p * v
    for i, group in enumerate(groups):
        outputs = [msg for a in group if (msg := _output_tuple(a, p, r, n)) is not None]
        if len(outputs) == 2 and outputs[0][0] != "act":
            outputs.reverse()
        for k, msg in enumerate(outputs):
            if to is None or msg[3] % p == to:
                where[msg] = (i + 1, k)  # exchange 0 is the initial receive; step i posts exchange i + 1
    return where


def _rank_plan(
    p: int, r: int, v: int, m: int, forward_only: bool, g: int,
    *, groups: dict[int, list[tuple]], sent_at: dict[int, dict[tuple, tuple[int, int]]], lockstep: bool,
) -> RankPlan:
    """Rank ``r``'s plan from its own steps (``groups[r]``) and when each neighbour sends it each
    message (``sent_at[q]`` for ``q = r - 1, r, r + 1``)."""
    mine = groups[r]
    stages = p * v

    # The exchange that receives each input: just before its consumer, or, in lockstep, at the
    # pipeline time its sender sends it if that is earlier.
    placed: dict[tuple, int] = {}
    for i, group in enumerate(mine):
        for action in group:
            msg = _input_tuple(action, p, r, stages)
            if msg is not None:
                sender = msg[2] % p
                placed[msg] = max(0, min(i, sent_at[sender][msg][0] + sender - r)) if lockstep else i
    # A receive may not come after a later message from the same sender: pull it earlier.
    by_sender: dict[int, list[tuple]] = {}
    for msg in placed:
        by_sender.setdefault(msg[2] % p, []).append(msg)
    recvs: list[list[Message]] = [[] for _ in range(len(mine) + 1)]
    for sender in sorted(by_sender):
        on_channel = sorted(by_sender[sender], key=sent_at[sender].__getitem__)
        for earlier, later in zip(reversed(on_channel[:-1]), reversed(on_channel[1:])):
            placed[earlier] = min(placed[earlier], placed[later])
        for msg in on_channel:
            recvs[placed[msg]].append(Message(*msg))
    sends: list[list[Message]] = [[] for _ in range(len(mine) + 1)]
    for msg, (i, _) in sorted(sent_at[r].items(), key=lambda item: item[1]):
        sends[i].append(Message(*msg))
    exchanges = [Exchange(sends=tuple(s), recvs=tuple(x)) for s, x in zip(sends, recvs)]
    return RankPlan(
        p=p, r=r, v=v, m=m, forward_only=forward_only, group_size=g,
        counts=phase_counts(p=p, r=r, v=v, m=m, forward_only=forward_only, group_size=g),
        first=exchanges[0],
        steps=tuple(Step(actions=tuple(Action(*a) for a in group), exchange=ex) for group, ex in zip(mine, exchanges[1:])),
    )


def lockstep_receives(*, p: int, v: int, m: int, group_size: int, forward_only: bool = False) -> bool:
    """Whether receives are placed in lockstep with their sender rather than just in time (see :func:`build_plan`).

    The rule: lockstep when interleaving (``v > 1``, ``p > 1``) with a group larger than the pipeline
    (``G > p``), where just in time can deadlock; just in time otherwise, and also for a training
    step of a single group only a little larger than the pipeline (``G = m``,
    ``G - p <= (p - 3) // 2``), where it is valid and shorter.
    ``tests/test_plan.py`` proves it for every configuration with ``p <= 8, v <= 4, m <= 32``: the
    plans it makes pass :func:`pipeschedule.plan.check.check_pipeline`, and where the other placement
    passes too, the rule's simulated step is no longer.
    """
    if p == 1 or v == 1 or group_size <= p:
        return False
    single_short_group = not forward_only and group_size == m and group_size - p <= (p - 3) // 2
    return not single_short_group


@contextlib.contextmanager
def _no_gc_pauses():
    """Planning allocates many small tuples and no reference cycles; the cycle collector, which
    would run every few hundred allocations, is held off meanwhile (restored as it was)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@functools.lru_cache(maxsize=256)
def _plan(p: int, r: int, v: int, m: int, forward_only: bool, g: int, lockstep: bool) -> RankPlan:
    # Rank r needs only its own steps and when its two neighbours send: O(m v) work.
    with _no_gc_pauses():
        return _plan_uncached(p, r, v, m, forward_only, g, lockstep)


def _plan_uncached(p: int, r: int, v: int, m: int, forward_only: bool, g: int, lockstep: bool) -> RankPlan:
    table = order_table(m=m, v=v, group_size=g)
    near = {r, (r - 1) % p, (r + 1) % p}
    groups = {q: _step_groups(p, q, v, m, forward_only, g, table) for q in near}
    sent_at = {q: _sent_at(p, q, v, groups[q], to=None if q == r else r) for q in near}
    return _rank_plan(p, r, v, m, forward_only, g, groups=groups, sent_at=sent_at, lockstep=lockstep)


def build_plan(
    *, p: int, r: int, v: int = 1, m: int, forward_only: bool = False, group_size: int | None = None
) -> RankPlan:
    """The ordered actions and exchanges of rank ``r``.

    The order equals Megatron-core's: forward number ``k`` runs ``order_table()[k]`` and backward
    number ``k`` runs the same microbatch through chunk ``v - 1 - chunk``; the steady phase pairs
    forward ``W + k`` with backward ``k``.

    Steps: plain 1F1B makes every action a step of its own, so each output leaves as soon as it
    exists. Interleaving runs a steady forward and backward as one step with one exchange, which
    keeps all ranks in lockstep: exchange ``i`` of rank ``r`` happens at pipeline time ``i + r``.

    Sends leave in the exchange right after the step that produced them. Receives have two
    placements: *just in time*, in the exchange right before the consuming step (Megatron's), and
    *lockstep*, at the pipeline time the sender sends, the early tensor waiting in the receiver's
    inbox. With an interleaved group size ``G > p`` just in time can deadlock: an activation for
    rank 0's next chunk is ready before rank 0 wants it, and its sender blocks while rank 0 waits
    on that sender's neighbours. :func:`lockstep_receives` picks the placement by a rule, with no
    simulation at run time; the tests prove that its plans are deadlock-free and never slower
    (simulated) than the other placement's.
    Receives from one rank are posted in the order that rank sends, so tensors land in the right
    buffers even when both neighbours are one rank (``p = 2``).

    Only rank ``r``'s plan is built, from its own steps and its two neighbours' sends: ``O(m v)``.
    """
    _check_sizes(p, r, v, m)
    g = choose_group_size(p=p, m=m, v=v, requested=group_size)
    fo = bool(forward_only)
    return _plan(p, r, v, m, fo, g, lockstep_receives(p=p, v=v, m=m, group_size=g, forward_only=fo))


def build_pipeline(
    *, p: int, v: int = 1, m: int, forward_only: bool = False, group_size: int | None = None
) -> list[RankPlan]:
    """The plans of all ``p`` ranks, indexed by rank (for checks, simulation and pictures)."""
    _check_sizes(p, 0, v, m)
    return [build_plan(p=p, r=r, v=v, m=m, forward_only=forward_only, group_size=group_size) for r in range(p)]
