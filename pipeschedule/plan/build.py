"""One rank's plan: a schedule's steps with their exchanges placed, by one generic pass.

A schedule (:mod:`pipeschedule.plan.orders`) says what rank ``r`` computes, step by step. This
module adds the communication, the same way for every schedule: each message leaves in the
exchange right after the step that produced it, and is received by a rule (:func:`lockstep_receives`)
either just before its consumer or in lockstep with its sender. Which exchange carries which message
is decided here, once, so that :func:`pipeschedule.plan.check.check_pipeline` can prove for every
configuration that each send meets its receive in posting order and that no rank waits forever.

Invariants of every plan (tested with hypothesis):

* each ``(microbatch, chunk)`` is forwarded exactly once and, unless forward-only, backwarded
  exactly once after its forward (``B``, or ``I`` then ``W``);
* the backwards (and the weight passes) of one chunk run in increasing microbatch order;
* the actions come in the phases of :func:`~pipeschedule.plan.orders.phase_counts`.

Only rank ``r``'s plan is built, from its own steps and its two neighbours' sends: ``O(m v)``.
"""

from __future__ import annotations

import contextlib
import functools
import gc

import pipeschedule.plan.orders as orders
from pipeschedule.plan.orders import _check_sizes, choose_group_size, order_table, phase_counts
from pipeschedule.plan.steps import RankPlan, message_table, new_action, new_exchange, new_message, new_step, rank_of

__all__ = ["build_pipeline", "build_plan", "lockstep_receives"]

SCHEDULES = ("1f1b", "zero-bubble")


def _steps(p: int, r: int, v: int, m: int, forward_only: bool, g: int, schedule: str, table: list) -> list[orders.StepTuple]:
    """Rank ``r``'s steps (tuples) from its schedule."""
    zb = schedule == "zero-bubble"
    counts = phase_counts(p=p, r=r, v=v, m=m, forward_only=forward_only, group_size=g, zero_bubble=zb)
    if forward_only:
        return orders.forward_only(counts, table, v)
    return orders.zero_bubble(counts, table, v, r) if zb else orders.one_f_one_b(counts, table, v)


def _sent_at(p: int, r: int, v: int, steps: list[orders.StepTuple], *, to: int | None = None) -> dict[tuple, int]:
    """For each message rank ``r`` sends (to rank ``to`` only, if given), the exchange that sends
    it, in sending order: by exchange, and within an exchange activations before gradients."""
    where: dict[tuple, int] = {}
    ranks = [rank_of(p, stage) for stage in range(p * v)]
    # Per kind and chunk, the message it sends (kind, src, dst), None if none goes to ``to``.
    out = {
        kind: [None if sent is None or (to is not None and ranks[sent[2]] != to) else sent for sent in per_chunk]
        for kind, per_chunk in message_table(p, r, v)[1].items()
    }
    for i, (actions, _) in enumerate(steps, start=1):  # exchange 0 is the initial receive; step i - 1 posts exchange i
        # Fills carry no messages; a step's activations leave before its gradients.
        grads = []
        for kind, mb, chunk, _ in actions:
            sent = out[kind][chunk]
            if sent is not None:
                if sent[0] == "act":
                    where[(sent[0], mb, sent[1], sent[2])] = i
                else:
                    grads.append((sent[0], mb, sent[1], sent[2]))
        for msg in grads:
            where[msg] = i
    return where


def _clock(p: int, r: int, v: int, m: int, g: int, schedule: str) -> tuple[int, int]:
    """``(W, lag)``: rank ``r``'s exchange ``i`` happens at pipeline time ``i + r`` while ``i <= W``
    (its warmup), at ``i + lag`` after. 1F1B keeps ``lag = r`` throughout; zero bubble's shorter
    warmup makes every rank wait ``p - 1 - r`` slots for its first gradient, so ``lag = p - 1``."""
    if schedule != "zero-bubble":
        return (0, r)
    return (phase_counts(p=p, r=r, v=v, m=m, group_size=g, zero_bubble=True).warmup, p - 1)


def _rank_plan(
    p: int, r: int, v: int, m: int, forward_only: bool, g: int, schedule: str,
    *, steps: list[orders.StepTuple], sent_at: dict[int, dict[tuple, int]], lockstep: bool,
) -> RankPlan:
    """Rank ``r``'s plan from its own ``steps`` and when each sender sends it each message
    (``sent_at[q]``: its neighbours ``q = r - 1, r + 1``, and ``r`` itself when ``p = 1``)."""
    ranks = [rank_of(p, stage) for stage in range(p * v)]
    inputs, outputs = message_table(p, r, v)
    # The exchange that receives each input: just before its consumer, or, in lockstep, at the
    # pipeline time its sender sends it if that is earlier.
    # Pipeline time of exchange e on rank q: e + q up to q's warmup W_q, e + lag_q after (_clock).
    my_warmup, my_lag = _clock(p, r, v, m, g, schedule) if lockstep else (0, r)
    # Per kind and chunk: (message kind, src, dst, when its sender sends, sender, sender's warmup and lag).
    inputs = {
        kind: [None if got is None else (*got, sent_at[ranks[got[1]]], ranks[got[1]], *_clock(p, ranks[got[1]], v, m, g, schedule))
               for got in per_chunk]
        for kind, per_chunk in inputs.items()
    }
    placed: dict[tuple, int] = {}
    for i, (actions, _) in enumerate(steps):
        for kind, mb, chunk, _ in actions:
            got = inputs[kind][chunk]
            if got is None:
                continue
            msg = (got[0], mb, got[1], got[2])
            if lockstep:
                e = got[3][msg]
                t = e + (got[4] if e <= got[5] else got[6])
                # Rank r's exchange at pipeline time t (the latest not after it).
                at = t - r if t - r <= my_warmup else max(my_warmup, t - my_lag)
                placed[msg] = max(0, min(i, at))
            else:
                placed[msg] = i
    # A receive may not come after a later message from the same sender: pull it earlier. What
    # a sender sends rank r is exactly what rank r consumes from it, in the sender's order.
    recvs: list[list[tuple]] = [[] for _ in range(len(steps) + 1)]
    for sender in sorted({got[4] for per_chunk in inputs.values() for got in per_chunk if got is not None}):
        earliest = len(steps)
        for msg in reversed(sent_at[sender]):
            earliest = placed[msg] = min(placed[msg], earliest)
        for msg in sent_at[sender]:
            recvs[placed[msg]].append(msg)

    # The plan's objects, step by step: its actions, and the exchange that sends what they
    # produce (activations first) and receives what was placed there.
    plan_steps = []
    for (actions, fill), received in zip(steps, recvs[1:]):
        sends, grads = [], []
        for kind, mb, chunk, _ in actions:
            sent = outputs[kind][chunk]
            if sent is not None:
                (sends if sent[0] == "act" else grads).append(new_message(sent[0], mb, sent[1], sent[2]))
        exchange = new_exchange(tuple(sends + grads), tuple([new_message(*msg) for msg in received]))
        plan_steps.append(new_step(tuple([new_action(*a) for a in actions]), exchange, tuple([new_action(*a) for a in fill])))
    return RankPlan(
        p=p, r=r, v=v, m=m, forward_only=forward_only, group_size=g,
        counts=phase_counts(p=p, r=r, v=v, m=m, forward_only=forward_only, group_size=g, zero_bubble=schedule == "zero-bubble"),
        first=new_exchange((), tuple([new_message(*msg) for msg in recvs[0]])),
        steps=tuple(plan_steps),
        schedule="zero-bubble" if schedule == "zero-bubble" and not forward_only else "1f1b",
    )


def lockstep_receives(*, p: int, v: int, m: int, group_size: int, forward_only: bool = False, schedule: str = "1f1b") -> bool:
    """Whether receives are placed in lockstep with their sender rather than just in time (see :func:`build_plan`).

    The rule for zero bubble: lockstep when interleaving (``p > 1``, ``v > 1``) except for a
    single group the size of the pipeline (``m = G = p``). For 1F1B:
    lockstep when interleaving (``v > 1``, ``p > 1``) with a group larger than the pipeline
    (``G > p``), where just in time can deadlock; just in time otherwise, and also for a training
    step of a single group only a little larger than the pipeline (``G = m``,
    ``G - p <= (p - 3) // 2``), where it is valid and shorter.
    ``tests/test_plan.py`` proves it for every configuration with ``p <= 8, v <= 4, m <= 32``: the
    plans it makes pass :func:`pipeschedule.plan.check.check_pipeline`, and where the other placement
    passes too, the rule's simulated step is no longer.
    """
    if schedule == "zero-bubble" and not forward_only:
        # Its shorter warmup leaves no slack for just-in-time receives when interleaving; the
        # lockstep clock of :func:`_clock` accounts for the wait for the first gradient. A single
        # group the size of the pipeline (m = G = p) is the exception: just in time is valid there
        # and shorter.
        return p > 1 and v > 1 and not group_size == m == p
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
def _plan(p: int, r: int, v: int, m: int, forward_only: bool, g: int, schedule: str, lockstep: bool) -> RankPlan:
    # Rank r needs only its own steps and when its two neighbours send: O(m v) work.
    with _no_gc_pauses():
        return _plan_uncached(p, r, v, m, forward_only, g, schedule, lockstep)


def _plan_uncached(p: int, r: int, v: int, m: int, forward_only: bool, g: int, schedule: str, lockstep: bool) -> RankPlan:
    table = order_table(m=m, v=v, group_size=g)
    mine = _steps(p, r, v, m, forward_only, g, schedule, table)
    # Who sends to rank r: its two neighbours, one rank when p = 2, itself when p = 1.
    senders = {(r - 1) % p, (r + 1) % p}
    sent_at = {
        q: _sent_at(p, q, v, mine if q == r else _steps(p, q, v, m, forward_only, g, schedule, table), to=r)
        for q in senders
    }
    return _rank_plan(p, r, v, m, forward_only, g, schedule, steps=mine, sent_at=sent_at, lockstep=lockstep)


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")


def build_plan(
    *, p: int, r: int, v: int = 1, m: int, forward_only: bool = False, group_size: int | None = None,
    schedule: str = "1f1b",
) -> RankPlan:
    """The ordered actions and exchanges of rank ``r``.

    ``schedule="1f1b"``: the order equals Megatron-core's; forward number ``k`` runs
    ``order_table()[k]`` and backward number ``k`` runs the same microbatch through chunk
    ``v - 1 - chunk``; the steady phase pairs forward ``W + k`` with backward ``k``.
    ``schedule="zero-bubble"``: the same with every backward split into ``I`` and ``W``
    (:func:`pipeschedule.plan.orders.zero_bubble`).

    Steps: plain 1F1B makes every action a step of its own, so each output leaves as soon as it
    exists. Interleaving runs a steady forward and backward as one step with one exchange, which
    keeps all ranks in lockstep.

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
    _check_schedule(schedule)
    g = choose_group_size(p=p, m=m, v=v, requested=group_size)
    fo = bool(forward_only)
    if fo:
        schedule = "1f1b"  # forward only, every schedule runs the same forwards in table order
    lockstep = lockstep_receives(p=p, v=v, m=m, group_size=g, forward_only=fo, schedule=schedule)
    return _plan(p, r, v, m, fo, g, schedule, lockstep)


def build_pipeline(
    *, p: int, v: int = 1, m: int, forward_only: bool = False, group_size: int | None = None, schedule: str = "1f1b",
) -> list[RankPlan]:
    """The plans of all ``p`` ranks, indexed by rank (for checks, simulation and pictures)."""
    _check_sizes(p, 0, v, m)
    _check_schedule(schedule)
    return [
        build_plan(p=p, r=r, v=v, m=m, forward_only=forward_only, group_size=group_size, schedule=schedule)
        for r in range(p)
    ]
