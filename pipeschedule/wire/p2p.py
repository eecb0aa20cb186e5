"""Point-to-point communication between neighbouring pipeline ranks.

Every transfer goes through one primitive, :func:`exchange`: a list of sends and receives posted as
one ``torch.distributed.batch_isend_irecv`` batch and waited on together. Posting both directions
in one batch is what keeps criss-crossed sends (rank ``r`` sending forward while rank ``r + 1``
sends backward) from deadlocking.

Messages between one pair of ranks are matched in posting order (NCCL ignores tags, and we use
one tag everywhere so that gloo behaves the same and an ordering bug shows up in CPU tests too).
The direction-named helpers therefore always post activation traffic before gradient traffic;
with ``p = 2`` the previous and the next rank are one rank, and this fixed order is what sends
each tensor to the buffer meant for it.

Every wait can be bounded (``timeout`` in seconds): a peer that died, raised or went silent turns
into a :class:`~pipeschedule.errors.PeerFailedError` naming it, never into a hang. Receives are
waited on before sends, so a receive that brings a neighbour's abort notice is seen at once even
when a send to that neighbour can no longer complete.

Nothing here is specific to a device: buffers are made on the device the caller names, so gloo on
CPU and NCCL on GPU run the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeschedule.errors import RESTART, PeerFailedError
from pipeschedule.wire.notice import Job, current_board
from pipeschedule.wire.records import AbortRecord, Reason

__all__ = [
    "Neighbours",
    "TensorSpec",
    "exchange",
    "recv_backward",
    "recv_forward",
    "send_backward",
    "send_backward_recv_backward",
    "send_backward_recv_forward",
    "send_forward",
    "send_forward_backward_recv_forward_backward",
    "send_forward_recv_backward",
    "send_forward_recv_forward",
]


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and device of a tensor to receive."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def empty(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)


@dataclass(frozen=True)
class Neighbours:
    """This rank's place in the pipeline process group. Ranks here are *group* ranks.

    ``prev`` and ``next`` wrap around: the last rank's next is rank 0, which is where interleaved
    schedules hand chunk ``c``'s output to chunk ``c + 1``.
    """

    group: dist.ProcessGroup | None
    rank: int
    size: int

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.size

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.size

    @classmethod
    def of(cls, group: dist.ProcessGroup | None = None) -> Neighbours:
        """The neighbours in ``group`` (the default group when ``None``).

        Without an initialised process group and with ``group=None`` this is a pipeline of one rank,
        so a single process can run any schedule with no ``torch.distributed`` set-up.
        """
        if group is None and not dist.is_initialized():
            return cls(group=None, rank=0, size=1)
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(
                f"this process (global rank {dist.get_rank()}) is not a member of the pipeline group "
                f"it was given; call the schedule only on the group's ranks, or pass the right group"
            )
        return cls(group=group, rank=rank, size=dist.get_world_size(group))

    def global_rank(self, rank: int) -> int:
        """The default-group rank of group rank ``rank`` (itself without a process group)."""
        if self.group is None:
            return rank
        return dist.get_global_rank(self.group, rank)

    def name(self, rank: int) -> str:
        if rank < 0:
            return "a neighbouring pipeline rank"
        return f"pipeline rank {rank} (global rank {self.global_rank(rank)})"


def _link_failure(link: Neighbours, peer: int, what: str, exc: BaseException, timeout: float | None) -> PeerFailedError:
    """The error for a transfer with ``peer`` that the backend gave up on."""
    text = str(exc)
    timed_out = "timed out" in text.lower() or "timeout" in text.lower()
    reason = Reason.TIMEOUT if timed_out and "closed by peer" not in text.lower() else Reason.DIED
    record = AbortRecord(reason=reason, rank=peer, global_rank=link.global_rank(peer) if peer >= 0 else -1, reporter=link.rank)
    if reason == Reason.TIMEOUT:
        cause = f"nothing arrived from or reached it within config.p2p_timeout={timeout}s: it failed, died or is stuck"
    else:
        cause = f"its connection closed ({text.splitlines()[0][:200]}): the process probably died"
    return PeerFailedError(
        f"{link.name(peer)} stopped answering while {link.name(link.rank)} {what}; {cause}. Look at that "
        f"rank's log for the first error; {RESTART}",
        record=record,
    )


# The range of config.p2p_timeout: the backends take whole milliseconds (a wait of 0 ms means "no
# timeout"), and convert to nanoseconds in 64 bits (about 292 years; timedelta stops at 1e9 days).
MIN_P2P_TIMEOUT = 0.001
MAX_P2P_TIMEOUT = 30 * 24 * 3600.0


def _as_wait(timeout: float) -> timedelta:
    """``timeout`` seconds as the backend's wait: whole milliseconds, at least one, at most 30 days."""
    return timedelta(milliseconds=min(max(math.ceil(timeout * 1000), 1), MAX_P2P_TIMEOUT * 1000))


def wait_bounded(
    work: dist.Work, *, link: Neighbours, peer: int, what: str, timeout: float | None, begun: Job | None = None,
    watch: bool = True,
) -> None:
    """``work.wait()``, at most ``timeout`` seconds (``None``: unbounded); failures name ``peer``.

    Inside a step the wait also watches the job's failure notices (:mod:`pipeschedule.wire.notice`)
    and raises as soon as any rank reports a failure, naming that rank. The backend wait then runs
    on the notices' waiter thread: ``begun`` is that wait if :func:`begin_wait` started it ahead of
    need. ``watch=False`` waits here, without the notices, for a wait known to end soon (a send
    whose receiver posted its receive steps ago): a thread hop costs more than such a wait.
    """
    board = current_board() if watch or begun is not None else None
    if board is not None:
        job = begun if begun is not None else board.start(_blocking(work, timeout))
        board.finish(job, timeout=timeout, where=what, on_error=lambda exc: _link_failure(link, peer, what, exc, timeout))
        return
    try:
        _blocking(work, timeout)()
    except RuntimeError as exc:
        raise _link_failure(link, peer, what, exc, timeout) from exc


def begin_wait(work: dist.Work) -> Job | None:
    """Start waiting for ``work`` now, on the notices' waiter thread, ahead of need, to be finished
    by :func:`wait_bounded` (``begun=``): the wait overlaps this rank's compute, and a tensor that
    has arrived by the time it is needed costs no thread hop then. ``None`` outside a step.

    The backend wait itself is bounded only by the process group's timeout: it may begin long
    before the tensor is due. The bound that counts, ``timeout`` of :func:`wait_bounded`, runs from
    when this rank needs the tensor.
    """
    board = current_board()
    return None if board is None else board.start(work.wait)


def _blocking(work: dist.Work, timeout: float | None) -> Callable[[], object]:
    if timeout is None:
        return work.wait
    wait = _as_wait(timeout)
    return lambda: work.wait(timeout=wait)


def post(link: Neighbours, ops: list[dist.P2POp], *, peers: Sequence[int], what: str, timeout: float | None) -> list:
    """``batch_isend_irecv(ops)``; a backend that refuses (a closed connection) names the peer."""
    try:
        return dist.batch_isend_irecv(ops)
    except RuntimeError as exc:
        raise _link_failure(link, peers[0] if len(set(peers)) == 1 else -1, what, exc, timeout) from exc


def post_send(link: Neighbours, tensor: torch.Tensor, peer: int, *, what: Callable[[], str], timeout: float | None) -> dist.Work:
    """``isend`` one tensor to group rank ``peer`` (no batch: one operation needs none); failures name the peer.

    ``what()`` says what this rank was doing; it is called only for an error, as this sits between
    a stage's compute and its send.
    """
    try:
        return dist.isend(tensor, group=link.group, group_dst=peer)
    except RuntimeError as exc:
        raise _link_failure(link, peer, what(), exc, timeout) from exc


def post_recv(link: Neighbours, buffer: torch.Tensor, peer: int, *, what: Callable[[], str], timeout: float | None) -> dist.Work:
    """``irecv`` one tensor from group rank ``peer`` into ``buffer``; failures name the peer."""
    try:
        return dist.irecv(buffer, group=link.group, group_src=peer)
    except RuntimeError as exc:
        raise _link_failure(link, peer, what(), exc, timeout) from exc


def exchange(
    link: Neighbours,
    *,
    sends: Sequence[tuple[torch.Tensor, int]] = (),
    recvs: Sequence[tuple[TensorSpec, int]] = (),
    timeout: float | None = None,
    what: str = "exchanged tensors",
    on_received: Callable[[list[torch.Tensor]], object] | None = None,
    between: Callable[[], object] | None = None,
) -> list[torch.Tensor]:
    """Post ``sends`` (tensor, group rank) and ``recvs`` (spec, group rank) as one batch; wait for all.

    Returns the received tensors in the order of ``recvs``. Operations towards one peer in one
    direction are posted in the order given, and the peer must post its side in the same order.
    Each wait lasts at most ``timeout`` seconds; ``what`` says what this rank was doing, for errors.
    ``on_received(buffers)`` runs once the receives are complete and before the sends are waited
    on, so it can raise on an abort notice while a send to the failed peer would never complete.
    ``between()`` runs after the batch is posted and before anything is waited on (work that
    sends nothing, done while the messages travel).
    """
    buffers = [spec.empty() for spec, _ in recvs]
    if not sends and not recvs and between is not None:
        between()
    ops = [dist.P2POp(dist.isend, tensor, group=link.group, group_peer=peer) for tensor, peer in sends]
    ops += [dist.P2POp(dist.irecv, buf, group=link.group, group_peer=peer) for buf, (_, peer) in zip(buffers, recvs)]
    if ops:
        peers = [peer for _, peer in sends] + [peer for _, peer in recvs]
        works = post(link, ops, peers=peers, what=what, timeout=timeout)
        if between is not None:
            between()
        if len(works) != len(ops):  # a coalescing backend (NCCL) returns one work for the batch
            for work in works:
                wait_bounded(work, link=link, peer=peers[0] if len(set(peers)) == 1 else -1, what=what, timeout=timeout)
            if on_received is not None:
                on_received(buffers)
            return buffers
        # Receives first: one of them may carry an abort notice from a peer our send waits on.
        for i in range(len(sends), len(ops)):
            wait_bounded(works[i], link=link, peer=peers[i], what=what, timeout=timeout)
        if on_received is not None:
            on_received(buffers)
        for i in range(len(sends)):
            wait_bounded(works[i], link=link, peer=peers[i], what=what, timeout=timeout)
    return buffers


# The direction-named helpers. Activations go to the next rank and come from the previous one;
# gradients go to the previous rank and come from the next one. Each helper lists activation
# traffic first (see the module docstring for why the order matters).


def _with_neighbours(
    link: Neighbours,
    *,
    send_next: torch.Tensor | None = None,
    send_prev: torch.Tensor | None = None,
    recv_prev: TensorSpec | None = None,
    recv_next: TensorSpec | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    sends = [(t, peer) for t, peer in ((send_next, link.next), (send_prev, link.prev)) if t is not None]
    recvs = [(s, peer) for s, peer in ((recv_prev, link.prev), (recv_next, link.next)) if s is not None]
    got = iter(exchange(link, sends=sends, recvs=recvs))
    return (next(got) if recv_prev is not None else None), (next(got) if recv_next is not None else None)


def recv_forward(link: Neighbours, spec: TensorSpec) -> torch.Tensor:
    """Receive an activation from the previous rank."""
    return _with_neighbours(link, recv_prev=spec)[0]


def recv_backward(link: Neighbours, spec: TensorSpec) -> torch.Tensor:
    """Receive a gradient from the next rank."""
    return _with_neighbours(link, recv_next=spec)[1]


def send_forward(link: Neighbours, output: torch.Tensor) -> None:
    """Send an activation to the next rank."""
    _with_neighbours(link, send_next=output)


def send_backward(link: Neighbours, input_grad: torch.Tensor) -> None:
    """Send a gradient to the previous rank."""
    _with_neighbours(link, send_prev=input_grad)


def send_forward_recv_backward(link: Neighbours, output: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """Send an activation to the next rank and receive a gradient from it, in one batch."""
    return _with_neighbours(link, send_next=output, recv_next=spec)[1]


def send_backward_recv_forward(link: Neighbours, input_grad: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """Send a gradient to the previous rank and receive an activation from it, in one batch."""
    return _with_neighbours(link, send_prev=input_grad, recv_prev=spec)[0]


def send_forward_recv_forward(link: Neighbours, output: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """Send an activation to the next rank and receive one from the previous rank, in one batch."""
    return _with_neighbours(link, send_next=output, recv_prev=spec)[0]


def send_backward_recv_backward(link: Neighbours, input_grad: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """Send a gradient to the previous rank and receive one from the next rank, in one batch."""
    return _with_neighbours(link, send_prev=input_grad, recv_next=spec)[1]


def send_forward_backward_recv_forward_backward(
    link: Neighbours,
    output: torch.Tensor | None,
    input_grad: torch.Tensor | None,
    *,
    recv_prev: TensorSpec | None,
    recv_next: TensorSpec | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both directions at once: returns (activation from the previous rank, gradient from the next)."""
    return _with_neighbours(link, send_next=output, send_prev=input_grad, recv_prev=recv_prev, recv_next=recv_next)
