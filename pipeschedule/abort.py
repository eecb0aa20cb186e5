"""What a rank does when the step fails: tell the neighbours, take what is on its way, name who failed.

When anything raises on this rank (the user's functions, a shape check, a neighbour's failure),
the runner tells each neighbour it still owes a message: an abort record takes that message's
place on the channel (:mod:`pipeschedule.wire`), so the neighbour raises at once, naming the
failed rank, and passes the news on. A rank that died is noticed by the backend or by the bounded
wait (``config.p2p_timeout``). Either way every rank raises, none hangs.

:class:`FailureHandling` holds that part of :class:`pipeschedule.executor.PlanRunner`; it reads the
runner's state (plan, link, spec, what has been sent and received) and never raises from
:meth:`FailureHandling._abort`: the original error is what the caller must see.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pipeschedule.errors import RESTART, PeerFailedError, ShapeMismatchError
from pipeschedule.framed import Incoming, framed_exchange
from pipeschedule.p2p import TensorSpec, exchange, wait_bounded
from pipeschedule.plan import Message, build_plan
from pipeschedule.wire import RECORD_LEN, AbortRecord, Reason, dtype_code, encode_abort, read_abort_marker, write_abort_into

if TYPE_CHECKING:
    from pipeschedule.executor import PlanRunner

logger = logging.getLogger(__name__)


class FailureHandling:
    """The failure half of :class:`~pipeschedule.executor.PlanRunner` (see the module docstring)."""

    def _raise_if_abort(self: PlanRunner, tensor: torch.Tensor, msg: Message | None, *, from_rank: int | None = None) -> None:
        """With fixed shapes an abort record arrives in place of the data; recognise it by its marker."""
        record = read_abort_marker(tensor)
        if record is not None:
            peer = self.link.name(msg.src_stage % self.plan.p if msg is not None else from_rank)
            waited = f", waiting for {msg.label()}" if msg is not None else ""
            expects = ""
            if record.reason == Reason.SENT_SHAPE and self.spec is not None:
                expects = f" (this rank expects shape {list(self.spec.shape)}, {self.spec.dtype})"
            raise PeerFailedError(
                f"{record.describe(self.plan.v)}; {self.link.name(self.link.rank)} learnt it from {peer} while it "
                f"{self.where}{waited}{expects}. Look at the failed rank's log for its error; {RESTART}",
                record=record,
            )

    # -- failure ---------------------------------------------------------------------------------

    def _abort(self: PlanRunner, exc: BaseException) -> None:
        """Tell the neighbours that still expect a message from this rank that the step is lost.

        The record takes the place of the next message each neighbour expects from us, so it is
        matched by a receive the neighbour posts anyway. Then the messages still on their way to
        this rank are taken (:meth:`_drain`). Never raises: the original error is what the caller
        must see.
        """
        if self.plan.p == 1:
            return
        record = self._record_for(exc)
        p = self.plan.p
        owed = {msg.dst_stage % p for ex in self.plan.exchanges[self.next_exchange :] for msg in ex.sends}
        closing = self.passes_token_count and self.link.rank > 0 and not self.closing_sent
        targets = sorted((owed | ({self.link.rank - 1} if closing else set())) - {record.rank, record.reporter, self.link.rank})
        notice = dataclasses.replace(record, reporter=self.link.rank)
        sends = []
        for peer in targets:
            # The notice must be the size of the message the neighbour expects next from us: a
            # header or the token count (both RECORD_LEN values), or a fixed-shape tensor.
            if self.framed or self.spec is None or peer not in owed:
                sends.append((encode_abort(notice, device=self.device), peer))
            else:
                sends.append((write_abort_into(self.spec.empty(), notice), peer))
        desynced = {getattr(exc, "desynced_peer", -1)}  # its channel holds unread data: take nothing more
        # The failed rank and the neighbour that told us are not running their plans any more: they
        # send nothing else, so there is nothing to take from them.
        neighbours = sorted({self.link.prev, self.link.next} - {record.rank, record.reporter, self.link.rank} - desynced)
        due = {peer: self._due_from(peer) for peer in neighbours}
        told: list[int] = []

        def tell(tensor: torch.Tensor, peer: int) -> None:
            try:
                if not self.framed:
                    self._take(peer, *due.get(peer, ([], True)))
                works = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, group=self.link.group, group_peer=peer)])
                for work in works:
                    wait_bounded(work, link=self.link, peer=peer, what="sent an abort notice", timeout=self.config.p2p_timeout)
                told.append(peer)
            except Exception as err:  # the neighbour may be gone too; our own error matters more
                logger.warning("could not tell %s that the step failed: %s", self.link.name(peer), err)

        # With fixed shapes, a neighbour's pending sends to us are taken before our notice to it is
        # posted: it may have to finish them before it receives, and gloo was seen to leave a send
        # and a receive posted at once on one connection unmatched. Each neighbour is served on a
        # thread of its own: what one still sends us may wait on the other hearing from us first
        # (p = 3: both neighbours talk to each other), so no order of the two is safe in general.
        threads = [threading.Thread(target=tell, args=(tensor, peer), daemon=True) for tensor, peer in sends]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=3 * self.config.p2p_timeout + 5)  # every wait inside is bounded
        if told and hasattr(exc, "add_note"):
            exc.add_note(f"pipeschedule: told {', '.join(self.link.name(r) for r in sorted(told))} that the step failed")
        for peer in neighbours:
            if self.framed or peer not in targets:
                try:
                    self._take(peer, *due[peer])
                except Exception as err:
                    logger.warning("could not take the messages still on their way from %s: %s", self.link.name(peer), err)

    def _due_from(self: PlanRunner, peer: int) -> tuple[list[Message], bool]:
        """What neighbour ``peer`` still sends us before it can learn of our failure, and whether it can.

        A neighbour blocked on a send to this rank (a fixed-shape exchange, the token count, or the
        end-of-step wait for its sends) would never reach the receive that brings our notice, or
        would time out and blame this rank; a neighbour we owe nothing more can then finish its
        own, correct, part of the step.
        """
        p, plan, me = self.plan.p, self.plan, self.link.rank
        owed = {msg for ex in plan.exchanges[self.next_exchange :] for msg in ex.sends}
        theirs = build_plan(p=p, r=peer, v=plan.v, m=plan.m, forward_only=plan.forward_only, group_size=plan.group_size)
        due: list[Message] = []
        hears = self.passes_token_count and me > 0 and not self.closing_sent and peer == me - 1
        for ex in theirs.exchanges:
            if any(msg in owed for msg in ex.recvs):
                return due, True  # here the neighbour receives our notice
            due.extend(msg for msg in ex.sends if msg.dst_stage % p == me and msg not in self.received)
        return due, hears

    def _take(self: PlanRunner, peer: int, due: list[Message], hears_from_us: bool) -> None:
        """Receive and drop ``due`` from ``peer`` (each wait bounded), then its token count if it
        will never hear from us."""
        what = "took the messages still on their way after a failure"
        if due and self.framed:
            expect = None if self.config.variable_seq_lengths else self.spec
            framed_exchange(
                self.link, sends=[], recvs=[Incoming(peer, m.label(), expect) for m in due], device=self.device,
                fingerprint=self.fingerprint, max_numel=self.config.max_message_numel, timeout=self.config.p2p_timeout,
                pending=self.pending, what=what, v=self.plan.v,
            )
        elif due:
            ops = [dist.P2POp(dist.irecv, self.spec.empty(), group=self.link.group, group_peer=peer) for _ in due]
            for work in dist.batch_isend_irecv(ops):
                wait_bounded(work, link=self.link, peer=peer, what=what, timeout=self.config.p2p_timeout)
        if not hears_from_us and self.passes_token_count and peer == self.link.rank + 1 and not self.closing_received:
            # The token count comes last on this channel; take it so the neighbour can finish.
            buf = torch.empty(RECORD_LEN, dtype=torch.float64, device=self.device)
            dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, group=self.link.group, group_peer=peer)])

    def _record_for(self: PlanRunner, exc: BaseException) -> AbortRecord:
        if isinstance(exc, PeerFailedError) and exc.record is not None:
            return exc.record
        reason, action = self.doing
        if isinstance(exc, ShapeMismatchError) and self.bad_output is not None:
            reason = Reason.SENT_SHAPE
        elif isinstance(exc, ShapeMismatchError):
            reason = Reason.RECEIVED_SHAPE
            if self.spec is not None:  # tell the sender what this rank expects
                return AbortRecord(
                    reason=reason, rank=self.link.rank, global_rank=self.link.global_rank(self.link.rank),
                    action=None, reporter=self.link.rank, shape=self.spec.shape, dtype=_safe_code(self.spec.dtype),
                )
        elif type(exc).__name__ == "CorruptHeaderError":
            reason = Reason.CORRUPT
        elif self.where.startswith(("finished", "joined", "started")) or action is None:
            reason = Reason.OTHER
        bad = self.bad_output
        return AbortRecord(
            reason=reason, rank=self.link.rank, global_rank=self.link.global_rank(self.link.rank),
            action=(action.kind, action.microbatch, action.chunk) if action is not None else None,
            reporter=self.link.rank, shape=tuple(bad.shape) if bad is not None else None,
            dtype=_safe_code(bad.dtype) if bad is not None else 0,
        )

    def _pass_token_count(self: PlanRunner, total: torch.Tensor) -> torch.Tensor:
        """The last stage's token count, passed down the ranks ``p-1 -> ... -> 0`` (one small message each).

        A chain of point-to-point messages rather than a broadcast: each is a message a rank owes
        its previous neighbour, so a failure before it replaces it with an abort notice like any
        other message, and every rank below the failure learns who failed.
        """
        p, r = self.plan.p, self.link.rank
        if r < p - 1:
            self.where = "waited for the step's token count from the next rank"
            spec = TensorSpec((RECORD_LEN,), torch.float64, self.device)
            got = exchange(self.link, recvs=[(spec, r + 1)], timeout=self.config.p2p_timeout, what=self.where,
                           on_received=lambda t: self._raise_if_abort(t[0], None, from_rank=r + 1))
            total = got[0][0].cpu()
            self.closing_received = True
        if r > 0:
            self.where = "passed the step's token count to the previous rank"
            message = torch.zeros(RECORD_LEN, dtype=torch.float64, device=self.device)
            message[0] = total
            self.closing_sent = True
            exchange(self.link, sends=[(message, r - 1)], timeout=self.config.p2p_timeout, what=self.where)
        return total


def _safe_code(dtype: torch.dtype) -> int:
    try:
        return dtype_code(dtype)
    except TypeError:
        return 0
