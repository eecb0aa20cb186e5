"""What a rank does when the step fails: tell the neighbours, take what is on its way, name who failed.

When anything raises on this rank (the user's functions, a shape check, a neighbour's failure),
the runner tells each neighbour it still owes a message: an abort record takes that message's
place on the channel (:mod:`pipeschedule.wire.records`), so the neighbour raises at once, naming the
failed rank, and passes the news on. A rank that died is noticed by the backend or by the bounded
wait (``config.p2p_timeout``). Either way every rank raises, none hangs.

:class:`FailureHandling` holds that part of :class:`pipeschedule.runtime.executor.PlanRunner`; it reads the
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

from pipeschedule.errors import RESTART, ArgumentMismatchError, PeerFailedError, PipelineError, ShapeMismatchError
from pipeschedule.wire.framed import Incoming, framed_exchange
from pipeschedule.wire.notice import FailureBoard, Notice, declared_groups
from pipeschedule.wire.p2p import TensorSpec, exchange, wait_bounded
from pipeschedule.plan import Action, Message, build_plan
from pipeschedule.wire.records import RECORD_LEN, AbortRecord, Reason, dtype_code, encode_abort, read_abort_marker, write_abort_into

if TYPE_CHECKING:
    from pipeschedule.runtime.executor import PlanRunner

logger = logging.getLogger(__name__)

TELL_GRACE_S = 0.5  # how long a failing rank lets its channel notices go out before it raises


class FailureHandling:
    """The failure half of :class:`~pipeschedule.runtime.executor.PlanRunner` (see the module docstring)."""

    def _raise_if_abort(self: PlanRunner, tensor: torch.Tensor, msg: Message | None, *, from_rank: int | None = None) -> None:
        """With fixed shapes an abort record arrives in place of the data; recognise it by its marker."""
        record = read_abort_marker(tensor)
        if record is not None:
            peer = self.link.name(self.plan.rank_of(msg.src_stage) if msg is not None else from_rank)
            waited = f", waiting for {msg.label()}" if msg is not None else ""
            text = record.describe(self.plan.v)
            # The failed rank's own notice says more (its error, a Ctrl-C, the hook it ran).
            notice = self.board.poll(force=True) if self.board is not None else None
            if notice is not None and notice.record.global_rank == record.global_rank:
                text = notice.text
            error = PeerFailedError(
                f"{text}; {self.link.name(self.link.rank)} learnt it from {peer} while it "
                f"{self.where}{waited}{self._expects(record)}. Look at the failed rank's log for its error; {RESTART}",
                record=record,
            )
            error.notice_text = text
            raise error

    def _expects(self: PlanRunner, record: AbortRecord) -> str:
        """For a neighbour's wrong-shaped output: the shape this rank expects (fixed shapes)."""
        if record.reason == Reason.SENT_SHAPE and self.spec is not None:
            return f" (this rank expects shape {list(self.spec.shape)}, {self.spec.dtype})"
        return ""

    # -- the failure board -----------------------------------------------------------------------

    def _open_board(self: PlanRunner) -> None:
        """The step's failure board, over the pipeline group and the groups the hooks declare."""
        config = self.config
        hooks = [config.finalize_model_grads_func, config.grad_sync_func, config.no_sync_func, config.param_sync_func]
        self.board = FailureBoard.open(
            [self.link.group, *declared_groups([h for h in hooks if h is not None])],
            me=self.link.name(self.link.rank), timeout=config.p2p_timeout,
        )
        if self.board is not None:
            self.board.detail = self._expects
            self.board.enter()

    def _close_board(self: PlanRunner) -> None:
        if self.board is not None:
            self.board.leave()

    def _hook_failed(self: PlanRunner, where: str, action: Action | None = None) -> None:
        """A hook raised: that, not the action around it, is what this rank was doing."""
        self.where = where
        self.doing = (Reason.OTHER, action)

    def _explained(self: PlanRunner, exc: BaseException) -> BaseException:
        """A backend error (from a hook's collective, say) after another rank failed: the error naming that rank.

        A hook that runs its own collectives (Megatron's DDP) gets the backend's raw error, naming no
        rank, when a member failed; the notice on the board says who failed and doing what. Without
        a notice, the raw error gets a note saying where it came from.
        """
        if isinstance(exc, PipelineError) or not isinstance(exc, RuntimeError) or not _from_backend(exc):
            return exc
        notice = self.board.poll(force=True) if self.board is not None else None
        me = self.link.name(self.link.rank)
        first = str(exc).splitlines()[0][:200]
        if notice is not None and notice.record.global_rank != self.link.global_rank(self.link.rank):
            return self.board.error(notice, self.where, detail=f" (the backend raised {type(exc).__name__}: {first})")
        # A hook's own group is not watched by the step: the job's latest failure, if recent, is the likely cause.
        latest = self.board.latest(max_age=self.config.p2p_timeout + 60) if self.board is not None else None
        if latest is not None and latest[0].record.global_rank != self.link.global_rank(self.link.rank):
            return self.board.error(
                latest[0], self.where,
                detail=f" (the backend raised {type(exc).__name__}: {first}; that failure was reported {latest[1]:.1f}s before)",
            )
        if hasattr(exc, "add_note"):
            exc.add_note(
                f"pipeschedule: the communication backend raised this on {me} while it {self.where}; no rank reported "
                f"a failure, so a rank of that communication probably died or hangs: look for the first error in the "
                f"other ranks' logs; {RESTART}"
            )
        return exc

    # -- failure ---------------------------------------------------------------------------------

    def _abort(self: PlanRunner, exc: BaseException) -> None:
        """Tell the whole job that the step is lost, then the neighbours; never raises.

        First the notice on the failure board (:mod:`pipeschedule.wire.notice`): every rank of the job
        watches it while it waits, so each raises within a poll of it, whatever it waits on. Then
        the channel notices (:meth:`_tell_neighbours`), on a thread of their own that this rank
        waits for at most :data:`TELL_GRACE_S`: the failing rank raises its own error at once, and
        the original error is what the caller must see.
        """
        record = self._record_for(exc)
        if self.board is not None:
            origin = record.global_rank == self.link.global_rank(self.link.rank)
            self.board.publish(Notice(dataclasses.replace(record, reporter=self.link.rank), self._notice_text(exc, record)), origin=origin)
        if self.plan.p == 1:
            return
        told: list[int] = []
        thread = threading.Thread(target=self._tell_neighbours, args=(exc, record, told), daemon=True)
        thread.start()
        thread.join(timeout=TELL_GRACE_S if self.board is not None else None)
        if hasattr(exc, "add_note"):
            if self.board is not None:
                exc.add_note(f"pipeschedule: {self.link.name(self.link.rank)} wrote the failure notice every rank of the job watches")
            if told and not thread.is_alive():
                exc.add_note(f"pipeschedule: told {', '.join(self.link.name(r) for r in sorted(told))} that the step failed")

    def _notice_text(self: PlanRunner, exc: BaseException, record: AbortRecord) -> str:
        """The sentence every other rank reads: who failed, doing what, with which error."""
        if getattr(exc, "notice_text", None):
            return exc.notice_text
        me = self.link.name(self.link.rank)
        if isinstance(exc, KeyboardInterrupt):
            return f"{me} was interrupted (KeyboardInterrupt: Ctrl-C or SIGINT) while it {self.where}"
        text = record.describe(self.plan.v)
        if record.rank == self.link.rank and not isinstance(exc, PeerFailedError):
            if record.reason == Reason.OTHER:
                text += f" while it {self.where}"
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            text += f" ({type(exc).__name__}{': ' + first if first else ''})"
        return text

    def _tell_neighbours(self: PlanRunner, exc: BaseException, record: AbortRecord, told: list[int]) -> None:
        """Replace each message this rank still owes a neighbour by an abort record, and take theirs.

        The record takes the place of the next message each neighbour expects from us, so it is
        matched by a receive the neighbour posts anyway. Then the messages still on their way to
        this rank are taken (:meth:`_take`).
        """
        p = self.plan.p
        owed = {self.plan.rank_of(msg.dst_stage) for ex in self.plan.exchanges[self.next_exchange :] for msg in ex.sends}
        closing = self.passes_token_count and self.link.rank > 0 and not self.closing_sent
        # Neighbours called with other arguments run another plan: nothing is sent to or taken from them.
        mismatched = self.handshake.settle() if self.handshake is not None else set()
        targets = sorted((owed | ({self.link.rank - 1} if closing else set())) - {record.rank, record.reporter, self.link.rank} - mismatched)
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
        neighbours = sorted({self.link.prev, self.link.next} - {record.rank, record.reporter, self.link.rank} - desynced - mismatched)
        due = {peer: self._due_from(peer) for peer in neighbours}

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
        theirs = build_plan(
            p=p, r=peer, v=plan.v, m=plan.m, forward_only=plan.forward_only, group_size=plan.group_size, schedule=plan.schedule
        )
        due: list[Message] = []
        hears = self.passes_token_count and me > 0 and not self.closing_sent and peer == me - 1
        for ex in theirs.exchanges:
            if any(msg in owed for msg in ex.recvs):
                return due, True  # here the neighbour receives our notice
            due.extend(msg for msg in ex.sends if self.plan.rank_of(msg.dst_stage) == me and msg not in self.received)
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
            # One at a time: a neighbour that failed too sends one abort notice instead of the rest,
            # and then expects nothing more from us (as with headers, where framed_exchange raises).
            for _ in due:
                buf = self.spec.empty()
                for work in dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, group=self.link.group, group_peer=peer)]):
                    wait_bounded(work, link=self.link, peer=peer, what=what, timeout=self.config.p2p_timeout)
                if read_abort_marker(buf) is not None:
                    raise PeerFailedError(f"{self.link.name(peer)} failed too while this rank took its messages")
        if not hears_from_us and self.passes_token_count and peer == self.link.rank + 1 and not self.closing_received:
            # The token count comes last on this channel; take it so the neighbour can finish.
            buf = torch.empty(RECORD_LEN, dtype=torch.float64, device=self.device)
            dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, group=self.link.group, group_peer=peer)])

    def _record_for(self: PlanRunner, exc: BaseException) -> AbortRecord:
        if isinstance(exc, (PeerFailedError, ArgumentMismatchError)) and exc.record is not None:
            return exc.record
        reason, action = self.doing
        if isinstance(exc, KeyboardInterrupt):
            reason, action = Reason.OTHER, None
        elif isinstance(exc, ShapeMismatchError) and self.bad_output is not None:
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


def _from_backend(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a communication backend's error (gloo, NCCL, the store)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "closed by peer", "timed out", "pair closure"))
