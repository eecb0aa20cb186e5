"""Exchanges in which every tensor is preceded by its header (``variable_seq_lengths``, ``check_p2p_shapes``).

A receiver cannot allocate a buffer before it knows the shape, so a message becomes two transfers
on its channel: the header (:mod:`pipeschedule.wire.records`), then the data. The protocol of one exchange:

1. post every send of the exchange at once, header then data for each message, in plan order;
   do not wait for them (they are kept in :class:`PendingSends`);
2. for each receive, in plan order: receive the header, check it, allocate, receive the data.

Why this cannot deadlock. A receive completes as soon as its sender has posted the matching send,
and a rank posts all sends of an exchange on entering it, before it waits on anything. So an
exchange here completes once every rank it *receives from* has entered its matching exchange. The
plan's proof (:func:`pipeschedule.plan.check.check_pipeline`) lets an exchange complete only once every
rank it sends to or receives from has entered its matching exchange, a stronger condition; any
order in which the plan's exchanges complete is therefore an order in which these complete too.
The sends are waited on when the step ends, when every rank has posted every receive.

Why tensors land in the right buffers. On a channel, the sender posts ``header(M1), data(M1),
header(M2), data(M2), ...`` in the order it sends messages, and the receiver posts its receives in
the same message order (the plan guarantees it), each header before its data. Headers and data are
matched in posting order like everything else, so no tag is needed (NCCL ignores them).

On NCCL, whose batches complete as a whole and whose sends to a peer share a stream with the
receives from it, step 1's unwaited sends can delay step 2's receives; the protocol is verified on
gloo, where each operation completes on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pipeschedule.errors import RESTART, PeerFailedError, PipelineError, ShapeMismatchError
from pipeschedule.wire.p2p import Neighbours, TensorSpec, post, wait_bounded
from pipeschedule.wire.records import RECORD_LEN, AbortRecord, decode, describe_fingerprint, encode_header

__all__ = ["Incoming", "PendingSends", "framed_exchange"]


@dataclass
class PendingSends:
    """Sends posted and not yet waited on, with the tensors they read from (kept alive until then).

    Each entry is ``(work, peer, tensor, step)``, ``step`` being the step that posted it. On gloo,
    ``is_completed()`` stays false until ``wait()`` is called, so there a send and its tensor are let
    go only by waiting on it: callers wait where that cannot deadlock (``before``).
    """

    works: list[tuple[dist.Work, int, torch.Tensor, int]] = field(default_factory=list)

    def add(self, work: dist.Work, peer: int, tensor: torch.Tensor, step: int = 0) -> None:
        self.works.append((work, peer, tensor, step))

    def drop_completed(self) -> None:
        """Forget sends known to be finished (NCCL knows; gloo does not say), so their tensors can be freed."""
        self.works = [item for item in self.works if not item[0].is_completed()]

    def wait(self, *, link: Neighbours, timeout: float | None, before: int | None = None, watch: bool = True) -> None:
        """Wait on the sends posted before step ``before`` (all of them when ``None``), in posting
        order (``watch``: as :func:`~pipeschedule.wire.p2p.wait_bounded`)."""
        while self.works and (before is None or self.works[0][3] < before):
            work, peer, _, _ = self.works[0]
            wait_bounded(work, link=link, peer=peer, what="waited for its sends to be received", timeout=timeout, watch=watch)
            self.works.pop(0)


@dataclass(frozen=True)
class Incoming:
    """A message to receive: from group rank ``peer``; ``expect`` is the fixed spec to compare with
    (``check_p2p_shapes``), or ``None`` to take the shape from the header; ``label`` names it."""

    peer: int
    label: str
    expect: TensorSpec | None = None


def framed_exchange(
    link: Neighbours,
    *,
    sends: Sequence[tuple[torch.Tensor, int]],
    recvs: Sequence[Incoming],
    device: torch.device,
    fingerprint: int,
    max_numel: int,
    timeout: float | None,
    pending: PendingSends,
    what: str,
    v: int = 1,
    received: Callable[[int], object] | None = None,
) -> list[torch.Tensor]:
    """Run one exchange with headers; return the received tensors in the order of ``recvs``.

    ``received(i)`` is called as soon as ``recvs[i]`` is off the channel (also when an abort notice
    came in its place), so after a failure the caller knows exactly what is still on its way.

    Raises :class:`~pipeschedule.errors.PeerFailedError` when a header is an abort notice,
    :class:`~pipeschedule.errors.ShapeMismatchError` when a header differs from ``expect``, and
    :class:`~pipeschedule.errors.CorruptHeaderError` for a header that fails its bounds checks.
    """
    ops: list[dist.P2POp] = []
    keep: list[tuple[int, torch.Tensor]] = []
    for tensor, peer in sends:
        header = encode_header(tensor, fingerprint=fingerprint)
        for t in (header, tensor):
            ops.append(dist.P2POp(dist.isend, t, group=link.group, group_peer=peer))
            keep.append((peer, t))
    if ops:
        works = post(link, ops, peers=[peer for peer, _ in keep], what=what, timeout=timeout)
        if len(works) == len(ops):
            for w, (peer, t) in zip(works, keep):
                pending.add(w, peer, t)
        else:  # a coalescing backend: one work for the batch
            for w in works:
                pending.add(w, keep[0][0], keep[0][1])
    got = []
    for i, msg in enumerate(recvs):
        try:
            got.append(_receive(link, msg, device=device, fingerprint=fingerprint, max_numel=max_numel, timeout=timeout, what=what, v=v))
        except PeerFailedError as exc:
            if getattr(exc, "consumed", False) and received is not None:
                received(i)  # an abort notice took this message's place on the channel
            raise
        if received is not None:
            received(i)
    pending.drop_completed()
    return got


def _receive_one(link: Neighbours, buf: torch.Tensor, peer: int, *, what: str, timeout: float | None) -> torch.Tensor:
    works = post(link, [dist.P2POp(dist.irecv, buf, group=link.group, group_peer=peer)], peers=[peer], what=what, timeout=timeout)
    for work in works:
        wait_bounded(work, link=link, peer=peer, what=what, timeout=timeout)
    return buf


def _receive(
    link: Neighbours, msg: Incoming, *, device: torch.device, fingerprint: int, max_numel: int,
    timeout: float | None, what: str, v: int,
) -> torch.Tensor:
    try:
        return _receive_checked(link, msg, device=device, fingerprint=fingerprint, max_numel=max_numel, timeout=timeout, what=what, v=v)
    except (PipelineError, ValueError) as exc:
        # After a refused header the channel holds data nobody will read: no further receive
        # from this peer may be posted (the runner reads this to skip it when cleaning up).
        exc.desynced_peer = msg.peer  # type: ignore[attr-defined]
        raise


def _receive_checked(
    link: Neighbours, msg: Incoming, *, device: torch.device, fingerprint: int, max_numel: int,
    timeout: float | None, what: str, v: int,
) -> torch.Tensor:
    doing = f"{what}, waiting for {msg.label}"
    header = _receive_one(link, torch.empty(RECORD_LEN, dtype=torch.int64, device=device), msg.peer, what=doing, timeout=timeout)
    peer_name = link.name(msg.peer)
    decoded = decode(header, max_numel=max_numel, peer=peer_name)
    if isinstance(decoded, AbortRecord):
        notice = PeerFailedError(
            f"{decoded.describe(v)}; {link.name(link.rank)} learnt it from {peer_name} while it {doing}. "
            f"Look at the failed rank's log for its error; {RESTART}",
            record=decoded,
        )
        notice.consumed = True  # type: ignore[attr-defined]
        raise notice
    shape, dtype, theirs = decoded
    if theirs != fingerprint:
        raise PipelineError(
            f"{peer_name} runs the plan {describe_fingerprint(theirs)} but {link.name(link.rank)} runs "
            f"{describe_fingerprint(fingerprint)}; call the schedule with the same num_microbatches, number of "
            f"model chunks, microbatch_group_size_per_vp_stage and forward_only on every rank; {RESTART}"
        )
    if msg.expect is not None and (shape != msg.expect.shape or dtype != msg.expect.dtype):
        raise ShapeMismatchError(
            f"{peer_name} sends {msg.label} with shape {list(shape)} and dtype {dtype}, but "
            f"{link.name(link.rank)} expects {list(msg.expect.shape)} and {msg.expect.dtype}; give every rank the "
            f"same seq_length/micro_batch_size/hidden_size (or tensor_shape) and pipeline_dtype, or set "
            f"config.variable_seq_lengths=True if shapes vary by microbatch; {RESTART}"
        )
    return _receive_one(link, torch.empty(shape, dtype=dtype, device=device), msg.peer, what=doing, timeout=timeout)
