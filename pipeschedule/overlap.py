"""Overlapped communication (Megatron's ``overlap_p2p_comm``): receive early, wait late, never wait on a send.

The plan is the one every schedule uses; only the waiting changes.

* The receives of exchange ``i + 1 + LOOKAHEAD`` are posted before step ``i`` runs.
* Each receive is waited on right before the action that consumes its tensor.
* A send is posted right after the action that produced its tensor. It is waited on only at the end of
  the step; completed sends are forgotten as the step goes, so their tensors can be freed.

Why it cannot deadlock: during the step a rank waits only on receives, and only for data its next
action consumes. Each such wait is no earlier than the plan's own exchange waited for it, and the
plan's strict exchanges are proven deadlock-free (:func:`pipeschedule.check.check_pipeline`): taking
waits away removes reasons to block and adds none. On every channel both sides post in the plan's
order, so each tensor lands in the buffer meant for it.

Backends: on gloo every operation completes on its own, which is what this mode relies on. NCCL
runs the point-to-point operations between two ranks on one stream in posting order, where an early
receive can hold back a later send. The batched default (``overlap_p2p_comm=False``) is the mode
proven for NCCL. With headers (``variable_seq_lengths`` or ``check_p2p_shapes``) the schedules use the
default mode, whose framed exchange already leaves sends unwaited.

On a failure, neighbours are told as in the default mode (:mod:`pipeschedule.abort`), and what a
neighbour still sends this rank is taken, so that a neighbour this rank owes nothing more can
finish its step instead of timing out: receives already posted for those messages are waited on,
the rest are posted then.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from pipeschedule.config import ScheduleEvent
from pipeschedule.executor import PlanRunner
from pipeschedule.p2p import post, wait_bounded
from pipeschedule.plan import Action, Exchange, Message, Step

__all__ = ["OverlappedRunner"]

# How many exchanges beyond the next one have their receives posted. One more than needed buys
# nothing measurable here and holds more buffers.
LOOKAHEAD = 1


class OverlappedRunner(PlanRunner):
    """A :class:`~pipeschedule.executor.PlanRunner` that overlaps communication with compute (``p > 1``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.expected: dict[Message, tuple[Any, torch.Tensor, int]] = {}  # posted receives: work, buffer, peer
        self.posted_upto = 0  # plan.exchanges[:posted_upto] have their receives posted
        self.steps_done = 0

    def _post_receives(self, upto: int) -> None:
        exchanges = self.plan.exchanges
        p = self.plan.p
        while self.posted_upto <= min(upto, len(exchanges) - 1):
            recvs = exchanges[self.posted_upto].recvs
            self.posted_upto += 1
            if not recvs:
                continue
            buffers = [self.spec.empty() for _ in recvs]
            peers = [msg.src_stage % p for msg in recvs]
            ops = [dist.P2POp(dist.irecv, buf, group=self.link.group, group_peer=peer) for buf, peer in zip(buffers, peers)]
            works = post(self.link, ops, peers=peers, what=f"{self.where}, posting receives", timeout=self.config.p2p_timeout)
            for i, (msg, buf, peer) in enumerate(zip(recvs, buffers, peers)):
                # A coalescing backend (NCCL) returns one work for the whole batch.
                self.expected[msg] = (works[i] if len(works) == len(ops) else works[0], buf, peer)

    def _start(self) -> None:
        self._post_receives(1 + LOOKAHEAD)

    def _finish_step(self, step: Step) -> None:
        self.steps_done += 1
        # Every send of this step has been posted: failure notices now go to later messages' peers.
        self.next_exchange = self.steps_done + 1
        self._post_receives(self.steps_done + 1 + LOOKAHEAD)
        if self.steps_done == len(self.plan.steps) and self.expected:
            raise RuntimeError(f"the step ended with receives never consumed: {sorted(m.label() for m in self.expected)}")

    def _timed_action(self, action: Action) -> None:
        msg = self.plan.input_message(action)
        if msg is not None and msg not in self.inbox:
            self._await(msg)
        super()._timed_action(action)
        out = self.plan.output_message(action)
        if out is not None:
            tensor = self.outbox.pop(out)
            peer = out.dst_stage % self.plan.p
            op = dist.P2POp(dist.isend, tensor, group=self.link.group, group_peer=peer)
            works = post(self.link, [op], peers=[peer], what=f"{self.where}, sending {out.label()}", timeout=self.config.p2p_timeout)
            self.pending.works.extend((work, peer, tensor) for work in works)
            self.pending.drop_completed()

    def _await(self, msg: Message) -> None:
        observer = self.config.observer
        start = time.perf_counter() if observer else 0.0
        work, buffer, peer = self.expected.pop(msg)
        self.where = f"waited for {msg.label()}"
        wait_bounded(work, link=self.link, peer=peer, what=self.where, timeout=self.config.p2p_timeout)
        self._raise_if_abort(buffer, msg)
        self.inbox[msg] = buffer
        self.received.add(msg)
        if observer:
            observer(ScheduleEvent(self.link.rank, "exchange", None, Exchange(recvs=(msg,)), start, time.perf_counter()))

    def _take(self, peer: int, due: list[Message], hears_from_us: bool) -> None:
        # Receives already posted for some of ``due`` come first on the channel (they were posted
        # in plan order): wait on those, and post new receives only for the rest.
        posted = [m for m in due if m in self.expected]
        for msg in posted:
            work, _, _ = self.expected.pop(msg)
            wait_bounded(work, link=self.link, peer=peer, what=f"took {msg.label()} after a failure", timeout=self.config.p2p_timeout)
        self.received.update(posted)
        super()._take(peer, [m for m in due if m not in posted], hears_from_us)
