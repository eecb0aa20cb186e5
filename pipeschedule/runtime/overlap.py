"""Overlapped communication (Megatron's ``overlap_p2p_comm``): receive early, wait late, send at once.

The plan is the one every schedule uses; only the waiting changes.

* Receives are posted in the plan's order, ahead of need: during step ``i``, always up to
  exchange ``i + 2`` at least (the strict plan has posted up to ``i + 1`` by the end of step
  ``i``), and up to ``i + 1 + W`` for a window ``W = config.overlap_recv_window``, topped up half a
  window at a time. On gloo every posted receive writes a ready notice to the sender, which wakes
  the sender's communication thread; posted in batches those wake-ups are shared, and the
  zero-compute step was measured about 15 % shorter with ``W = 8`` than with ``W = 2``
  (``docs/BENCHMARKS.md``).
* Each receive is waited on right before the action that consumes its tensor. The backend waits
  themselves run on the failure board's waiter thread (which watches the job's failure notices):
  it is handed every posted receive in the order this rank consumes them, and waits for each in
  turn while this thread computes. A tensor that has arrived by the time it is needed costs no
  thread hop then (a hop costs about 60 us here; before waits began ahead of need, waiting for
  every receive on this thread instead made the zero-bubble step at ``v = 2`` about 10 % shorter,
  but such a wait hears neither Ctrl-C nor a notice). Consumption order is what makes this safe:
  the waiter is never stuck on a tensor needed later than one this thread waits for, and nothing
  this rank does between two consumers waits for anything but sends, which are waited on here.
  ``p2p_timeout`` bounds each wait from when the tensor is needed; the backend wait, begun ahead
  of need, only by the process group's timeout.
* A send is posted as soon as its tensor exists, inside the action, before the action's own
  bookkeeping. The sends of step ``i`` are waited on during step ``i + 1``, by when their
  receivers have long posted the matching receives, so the wait is over at once and the tensors
  (gradients, released outputs) are freed a step after they are sent, not at the end of the
  training step. (On gloo nothing else frees them: a send's ``is_completed()`` stays false until
  it is waited on.) Those waits run on this thread, bounded by ``p2p_timeout`` but without the
  notices: the receiver posted the matching receive steps ago, and if it fails it takes what it
  was sent before it raises (:mod:`pipeschedule.runtime.abort`).
* That bookkeeping (waiting on old sends, posting receives) runs right after a send, or at the end
  of a step that sends nothing.

What runs between a rank's receive and its next compute, and between a compute and its send, is
what a pipeline's critical path is made of besides compute: every hop from one stage to the next
pays it. So that stretch does as little as it can (measured with ``scripts/bench.py``).

Why it cannot deadlock: a rank waits on a receive only right before the action that consumes it,
and on a send a step after the strict plan would have; every receive is posted no later than the
strict plan posts it. So each wait comes no earlier than the plan's own exchange waited for the same
operation, with its peer's side posted no later, and the plan's strict exchanges are proven
deadlock-free (:func:`pipeschedule.plan.check.check_pipeline`): delaying waits and advancing posts
removes reasons to block and adds none. A receive's wait begun early on the waiter thread blocks
nothing this rank does before its consumer: everything in between posts, computes or waits on
sends on this thread, and the receives the waiter takes before it are consumed before it. On every
channel both sides post in the plan's order, so each tensor lands in the buffer meant for it.

Backends: on gloo every operation completes on its own, which is what this mode relies on. NCCL
runs the point-to-point operations between two ranks on one stream in posting order, where an early
receive can hold back a later send. The batched default (``overlap_p2p_comm=False``) is the mode
proven for NCCL. With headers (``variable_seq_lengths`` or ``check_p2p_shapes``) the schedules use the
default mode, whose framed exchange already leaves sends unwaited.

On a failure, the waits the waiter has not begun are withdrawn and the one it may be in is left
to it; neighbours are told as in the default mode (:mod:`pipeschedule.runtime.abort`), and what a
neighbour still sends this rank is taken, so that a neighbour this rank owes nothing more can
finish its step instead of timing out: receives already posted for those messages are waited on,
the rest are posted then.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pipeschedule.config import ScheduleEvent
from pipeschedule.runtime.executor import PlanRunner
from pipeschedule.wire.p2p import begin_wait, post_recv, post_send, wait_bounded
from pipeschedule.plan import Action, Exchange, Message, Step
from pipeschedule.wire.records import read_abort_marker
from pipeschedule.errors import PeerFailedError

__all__ = ["OverlappedRunner"]

class OverlappedRunner(PlanRunner):
    """A :class:`~pipeschedule.runtime.executor.PlanRunner` that overlaps communication with compute (``p > 1``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.expected: dict[Message, tuple[Any, torch.Tensor, int]] = {}  # posted receives: work, buffer, peer
        # Posted receives handed to the waiter thread: (that wait, work, buffer, peer).
        self.early: dict[Message, tuple[Any, Any, torch.Tensor, int]] = {}
        # Every received message in the order this rank consumes them; the first ``queued`` have
        # been handed to the waiter (or consumed before it could be: before the call records were checked).
        self.consumed_order = [msg for a in self.plan.actions if (msg := self.plan.input_message(a)) is not None]
        self.queued = 0
        self.posted_upto = 0  # plan.exchanges[:posted_upto] have their receives posted
        self.steps_done = 0
        self.window = self.config.overlap_recv_window

    def _post_receives(self, upto: int) -> None:
        exchanges = self.plan.exchanges
        p = self.plan.p

        def what() -> str:  # called only for an error
            return f"{self.where}, posting receives"

        while self.posted_upto <= min(upto, len(exchanges) - 1):
            recvs = exchanges[self.posted_upto].recvs
            self.posted_upto += 1
            for msg in recvs:
                buffer, peer = self.spec.empty(), self.plan.rank_of(msg.src_stage)
                work = post_recv(self.link, buffer, peer, what=what, timeout=self.config.p2p_timeout)
                self.expected[msg] = (work, buffer, peer)
        self._queue_waits()

    def _start(self) -> None:
        self._post_receives(1 + self.window)

    def _housekeep(self) -> None:
        """Let go of the previous steps' sends; when less than half the receive window is posted, refill it."""
        self.pending.wait(link=self.link, timeout=self.config.p2p_timeout, before=self.steps_done, watch=False)
        full = self.steps_done + 1 + self.window
        if self.posted_upto <= full - self.window // 2:  # the last posted exchange is posted_upto - 1
            self._post_receives(full)

    def _finish_step(self, step: Step) -> None:
        self._run_fill(step.fill)  # the step's sends left inside its actions: the weight passes run now
        self.steps_done += 1
        # Every send of this step has been posted: failure notices now go to later messages' peers.
        self.next_exchange = self.steps_done + 1
        if not step.exchange.sends:  # otherwise done right after the send
            self._housekeep()
        if self.steps_done == len(self.plan.steps) and (self.expected or self.early):
            never = [*self.expected, *self.early]
            raise RuntimeError(f"the step ended with receives never consumed: {sorted(m.label() for m in never)}")

    def _timed_action(self, action: Action) -> None:
        msg = self.plan.input_message(action)
        if msg is not None and msg not in self.inbox:
            self._await(msg)
            if self.queued < len(self.consumed_order) and msg is self.consumed_order[self.queued]:
                self._queue_waits()  # consumed before its wait could be handed over
        super()._timed_action(action)

    def _queue_waits(self) -> None:
        """Hand the waiter every posted receive not yet handed over, in consumption order."""
        if self.board is None or self.handshake.unchecked:
            return  # the waits for the call records come first
        order = self.consumed_order
        while self.queued < len(order):
            msg = order[self.queued]
            if msg in self.expected:
                work, buffer, peer = self.expected.pop(msg)
                self.early[msg] = (begin_wait(work), work, buffer, peer)
            elif msg not in self.received:
                return  # not posted yet
            self.queued += 1

    def _abort(self, exc: BaseException) -> None:
        if self.early and self.board is not None:
            # Waits the waiter has not begun go back to being posted receives; the one it may be
            # in may never end now, so the failure handling's waits get a thread of their own.
            for msg, (job, work, buffer, peer) in list(self.early.items()):
                if self.board.cancel(job):
                    del self.early[msg]
                    self.expected[msg] = (work, buffer, peer)
            self.board.abandon_waits()
        super()._abort(exc)

    def _emit(self, msg: Message, tensor: torch.Tensor) -> None:
        peer = self.plan.rank_of(msg.dst_stage)
        if peer in self.handshake.unchecked:  # nothing goes to a neighbour before its call record is checked
            self._check_call((peer,))
        work = post_send(self.link, tensor, peer, what=lambda: f"{self.where}, sending {msg.label()}", timeout=self.config.p2p_timeout)
        self.pending.add(work, peer, tensor, self.steps_done)
        # Right after a send the communication code is warm in the caches: a rank's other
        # bookkeeping costs least here (measured: a cold irecv after compute costs several times more).
        self._housekeep()

    def _held_tensors(self) -> list[torch.Tensor | None]:
        return super()._held_tensors() + [buffer for _, buffer, _ in self.expected.values()] + [e[2] for e in self.early.values()]

    def _await(self, msg: Message) -> None:
        observer = self.config.observer
        start = time.perf_counter() if observer is not None else 0.0
        if self.plan.rank_of(msg.src_stage) in self.handshake.unchecked:
            self._check_call((self.plan.rank_of(msg.src_stage),))
        begun, work, buffer, peer = self._claim(msg)
        self.where = f"waited for {msg.label()}"
        wait_bounded(work, link=self.link, peer=peer, what=self.where, timeout=self.config.p2p_timeout, begun=begun)
        self._check_received((msg,), [buffer])
        self.inbox[msg] = buffer
        if observer is not None:
            observer(ScheduleEvent(self.link.rank, "exchange", None, Exchange(recvs=(msg,)), start, time.perf_counter()))

    def _claim(self, msg: Message) -> tuple[Any, Any, torch.Tensor, int]:
        """A posted receive, taken off the books: (its wait begun early or ``None``, work, buffer, peer)."""
        return self.early.pop(msg) if msg in self.early else (None, *self.expected.pop(msg))

    def _take(self, peer: int, due: list[Message], hears_from_us: bool) -> None:
        # Receives already posted for some of ``due`` come first on the channel (they were posted
        # in plan order): wait on those, and post new receives only for the rest.
        posted = [m for m in due if m in self.expected or m in self.early]
        for msg in posted:
            begun, work, buffer, _ = self._claim(msg)
            wait_bounded(work, link=self.link, peer=peer, what=f"took {msg.label()} after a failure",
                         timeout=self.config.p2p_timeout, begun=begun)
            self.received.add(msg)
            if read_abort_marker(buffer) is not None:  # it failed too: it sends nothing more
                raise PeerFailedError(f"{self.link.name(peer)} failed too while this rank took its messages")
        super()._take(peer, [m for m in due if m not in posted], hears_from_us)
