"""Checks of whole-pipeline plans that need no processes.

:func:`check_pipeline` replays the message exchange of all ranks under the strictest semantics a
backend may have (NCCL's, and gloo's for unbuffered sends): a batch completes only once every
operation in it has been posted by the peer too, and messages between one pair of ranks are matched
in posting order, never by tag. A plan that passes cannot deadlock and cannot deliver a tensor to
the wrong buffer on any backend.
"""

from __future__ import annotations

from collections import defaultdict

from pipeschedule.plan.steps import BACKWARDS, RELEASES, Message, RankPlan

__all__ = ["PlanError", "check_pipeline", "number_operations", "peak_awaiting_backward", "peak_live_activations", "render_grid"]


class PlanError(RuntimeError):
    """A plan that would deadlock or mismatch messages; the text shows the rank x step grid."""


def render_grid(plans: list[RankPlan], *, marks: dict[int, int] | None = None) -> str:
    """The rank x action grid, one row a rank (``F3`` / ``F3.1`` cells).

    ``marks`` maps a rank to an action index, drawn as ``>`` before that cell (where it stopped).
    """
    marks = marks or {}
    labels = [[a.label(plan.v) for a in plan.actions] for plan in plans]
    width = max((len(x) for row in labels for x in row), default=2) + 1
    lines = []
    for plan, row in zip(plans, labels):
        cells = [("> " if marks.get(plan.r) == i else "  ") + x.ljust(width) for i, x in enumerate(row)]
        if marks.get(plan.r) == len(row):
            cells.append("> (final send)")
        lines.append(f"rank {plan.r}: " + "".join(cells).rstrip())
    return "\n".join(lines)


def _channels(plans: list[RankPlan]) -> tuple[dict, dict]:
    """Per directed rank pair, the messages in the order the sender posts them and the receiver does."""
    sent: dict[tuple[int, int], list[Message]] = defaultdict(list)
    expected: dict[tuple[int, int], list[Message]] = defaultdict(list)
    for plan in plans:
        for ex in plan.exchanges:
            for msg in ex.sends:
                sent[(plan.r, plan.rank_of(msg.dst_stage))].append(msg)
            for msg in ex.recvs:
                expected[(plan.rank_of(msg.src_stage), plan.r)].append(msg)
    return sent, expected


def _check_matching(plans: list[RankPlan]) -> None:
    sent, expected = _channels(plans)
    for channel in sorted(set(sent) | set(expected)):
        a, b = sent.get(channel, []), expected.get(channel, [])
        for j in range(max(len(a), len(b))):
            x = a[j].label() if j < len(a) else "nothing"
            y = b[j].label() if j < len(b) else "nothing"
            if x != y:
                raise PlanError(
                    f"message #{j} from rank {channel[0]} to rank {channel[1]}: the sender posts {x} "
                    f"but the receiver expects {y}\n{render_grid(plans)}"
                )


# One operation of an exchange: "send" or "recv", its (sender, receiver) rank pair, its number there.
Operation = tuple[str, tuple[int, int], int]


def number_operations(plan: RankPlan) -> list[list[Operation]]:
    """Per exchange of ``plan``, its operations with their channel and their number on it.

    The ``j``-th send from rank ``a`` to rank ``b`` meets the ``j``-th receive that ``b`` posts from
    ``a``: backends match messages between one pair of ranks in posting order.
    """
    seen: dict[tuple[str, tuple[int, int]], int] = defaultdict(int)
    rows = []
    for ex in plan.exchanges:
        ops = [("send", (plan.r, plan.rank_of(msg.dst_stage))) for msg in ex.sends]
        ops += [("recv", (plan.rank_of(msg.src_stage), plan.r)) for msg in ex.recvs]
        row = []
        for op in ops:
            row.append((op[0], op[1], seen[op]))
            seen[op] += 1
        rows.append(row)
    return rows


def check_pipeline(plans: list[RankPlan]) -> None:
    """Raise :class:`PlanError` unless every message meets its receive and no rank can wait forever.

    Sends to the same rank (``p = 1`` with several chunks) are handed over locally, so they complete
    at once; the receive completes once the send has been posted.
    """
    if not plans:
        raise ValueError("check_pipeline needs the plans of all ranks, got none")
    _check_matching(plans)
    p = len(plans)
    # Per directed pair (a, b): how many sends a has posted to b, and how many receives b has posted.
    sends_posted: dict[tuple[int, int], int] = defaultdict(int)
    recvs_posted: dict[tuple[int, int], int] = defaultdict(int)
    numbered = [number_operations(plan) for plan in plans]

    position = [0] * p  # the exchange each rank has posted and waits on

    def post(rank: int) -> None:
        for kind, channel, _ in numbered[rank][position[rank]]:
            (sends_posted if kind == "send" else recvs_posted)[channel] += 1

    def complete(rank: int) -> bool:
        for kind, channel, j in numbered[rank][position[rank]]:
            if kind == "send" and channel[0] != channel[1] and recvs_posted[channel] <= j:
                return False
            if kind == "recv" and sends_posted[channel] <= j:
                return False
        return True

    # Advance ranks until none can: a rank is looked at again only when a neighbour has posted.
    for rank in range(p):
        post(rank)
    pending = list(range(p))
    while pending:
        rank = pending.pop()
        while position[rank] < len(numbered[rank]) and complete(rank):
            position[rank] += 1
            if position[rank] < len(numbered[rank]):
                post(rank)
                pending.extend(peer for _, channel, _ in numbered[rank][position[rank]] for peer in channel if peer != rank)
    stuck = {rank: position[rank] for rank in range(p) if position[rank] < len(numbered[rank])}
    if stuck:
        marks = {rank: sum(len(s.actions) + len(s.fill) for s in plans[rank].steps[:i]) for rank, i in stuck.items()}
        raise PlanError(
            f"the plan deadlocks: ranks {sorted(stuck)} wait forever at the marked steps\n"
            f"{render_grid(plans, marks=marks)}"
        )


def peak_live_activations(plan: RankPlan) -> int:
    """The most chunk-activations rank ``plan.r`` holds at once, waiting for their backward.

    An activation is held from its forward until its whole backward is done: ``B``, or in a
    zero-bubble plan its weight pass ``W`` (which needs the saved tensors too). Forward-only plans
    keep nothing for a backward; their figure is the one in flight, 1.
    """
    return _peak(plan, RELEASES)


def peak_awaiting_backward(plan: RankPlan) -> int:
    """The most chunk-activations whose input-gradient pass (``B`` or ``I``) has not run yet.

    Equal to :func:`peak_live_activations` for plans without a split backward.
    """
    return _peak(plan, BACKWARDS)


def _peak(plan: RankPlan, ends: tuple[str, ...]) -> int:
    if plan.forward_only:
        return 1 if plan.actions else 0
    live = peak = 0
    for action in plan.actions:
        if action.kind == "F":
            live += 1
            peak = max(peak, live)
        elif action.kind in ends:
            live -= 1
    return peak
