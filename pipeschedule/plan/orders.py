"""The schedules, each a short pure function from ``(p, r, v, m, G)`` to one rank's steps.

A schedule says only *what* rank ``r`` computes and in which order, cut into steps (one or two
actions each, plus the weight-gradient actions that fill the step's wait). Where messages go and
which exchange carries them is the generic pass of :mod:`pipeschedule.plan.build`, the same for
every schedule.

* :func:`one_f_one_b`: warmup forwards, steady rounds of one forward and one backward, cooldown
  backwards. ``v = 1`` is 1F1B, ``v > 1`` Megatron's interleaved 1F1B, forward ``k`` running
  ``order_table()[k]``.
* :func:`zero_bubble`: the same order table with each backward split into ``I`` and ``W``, a
  warmup shorter by ``p - r - 1`` when interleaving, and the weight pass of backward ``j`` right
  after backward ``j + r`` (ZB-H1 at ``v = 1``, Qi et al. 2024; torch's
  ``ScheduleInterleavedZeroBubble`` order at ``v > 1``).
* forward-only: every forward, in table order (:func:`forward_only`).
"""

from __future__ import annotations

from pipeschedule.plan.steps import PhaseCounts

__all__ = ["choose_group_size", "forward_only", "one_f_one_b", "order_table", "phase_counts", "zero_bubble"]

# A step, as the generic pass takes it: (actions, fill), each a tuple of action tuples
# ``(kind, microbatch, chunk, phase)``.
StepTuple = tuple[tuple[tuple, ...], tuple[tuple, ...]]


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
    *, p: int, r: int, v: int = 1, m: int, forward_only: bool = False, group_size: int | None = None,
    zero_bubble: bool = False,
) -> PhaseCounts:
    """Warmup, steady, cooldown (and zero-bubble ``tail``) sizes for rank ``r``.

    1F1B: ``W = min(p - r - 1, m)``. Interleaved: ``W = min(2 (p - r - 1) + (v - 1) G, m v)``.
    Zero bubble: ``W = min(p - r - 1, m)`` at ``v = 1``, ``min((v - 1) G + p - r - 1, m v)`` when
    interleaving, and a tail of ``min(r, m v)`` weight passes. Forward-only: everything is warmup.
    """
    _check_sizes(p, r, v, m)
    total = m * v
    if forward_only:
        warmup = total
    elif v == 1:
        warmup = min(p - r - 1, m)
    else:
        g = choose_group_size(p=p, m=m, v=v, requested=group_size)
        hops = p - r - 1 if zero_bubble else 2 * (p - r - 1)
        warmup = min(hops + (v - 1) * g, total)
    steady = total - warmup
    tail = min(r, total) if zero_bubble and not forward_only else 0
    return PhaseCounts(warmup=warmup, steady=steady, cooldown=0 if forward_only else warmup, total=total, tail=tail)


def forward_only(counts: PhaseCounts, table: list[tuple[int, int]], v: int) -> list[StepTuple]:
    """Every forward in table order, one a step."""
    return [((("F", *table[k], "warmup"),), ()) for k in range(counts.total)]


def one_f_one_b(counts: PhaseCounts, table: list[tuple[int, int]], v: int) -> list[StepTuple]:
    """1F1B (``v = 1``) and interleaved 1F1B: backward ``k`` runs ``table[k]``'s microbatch through
    chunk ``v - 1 - chunk``; steady round ``k`` is forward ``W + k`` then backward ``k``.

    Steps: at ``v = 1`` every action is a step, so each output leaves as soon as it exists; when
    interleaving a steady forward and backward share a step, which keeps the ranks in lockstep.
    """
    w = counts.warmup
    steps: list[StepTuple] = [((("F", *table[k], "warmup"),), ()) for k in range(w)]
    for k in range(counts.steady):
        mb, chunk = table[k]
        forward, backward = ("F", *table[w + k], "steady"), ("B", mb, v - 1 - chunk, "steady")
        steps.extend([((forward,), ()), ((backward,), ())] if v == 1 else [((forward, backward), ())])
    for k in range(counts.steady, counts.total):
        mb, chunk = table[k]
        steps.append(((("B", mb, v - 1 - chunk, "cooldown"),), ()))
    return steps


def zero_bubble(counts: PhaseCounts, table: list[tuple[int, int]], v: int, r: int) -> list[StepTuple]:
    """Zero bubble: :func:`one_f_one_b`'s order with backwards split into ``I`` and ``W``.

    The weight pass of backward number ``j`` fills the step of backward number ``j + r``, or the
    last step (the tail), so rank ``r`` holds at most ``r`` pending weight passes, and per chunk
    both halves run in increasing microbatch order.

    Every action is a step of its own, interleaved or not: each output leaves as soon as it exists.
    (Pairing a steady forward with its backward, as interleaved 1F1B does, holds the forward's
    output back by the backward's time; in the batched mode that cost 1.43x the formula's step on
    average over ``p <= 6, v <= 3``, against 1.10x for single steps.)
    """
    w, steady, total = counts.warmup, counts.steady, counts.total
    forwards = [("F", mb, chunk, "warmup") for mb, chunk in table[:w]] + [("F", mb, chunk, "steady") for mb, chunk in table[w:]]
    backwards = [(mb, v - 1 - chunk) for mb, chunk in table]
    inputs = [("I", mb, chunk, "steady") for mb, chunk in backwards[:steady]]
    inputs += [("I", mb, chunk, "cooldown") for mb, chunk in backwards[steady:]]
    # The weight pass of backward j fills the step of backward j + r (in that step's phase), or the last step.
    weights = [("W", mb, chunk, "steady") for mb, chunk in backwards[:max(0, steady - r)]]
    weights += [("W", mb, chunk, "cooldown") for mb, chunk in backwards[max(0, steady - r):]]

    steps: list[StepTuple] = [((forwards[k],), ()) for k in range(w)]
    for k in range(total):
        if k < steady:
            steps.append(((forwards[w + k],), ()))
        steps.append(((inputs[k],), (weights[k - r],) if k >= r else ()))
    tail = tuple(weights[max(0, total - r):])
    if tail:
        actions, fill = steps[-1]
        steps[-1] = (actions, fill + tail)
    return steps
