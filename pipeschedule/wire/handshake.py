"""The call record: the first message on each channel of every step, so that ranks called differently
find out before any activation travels.

Ranks called with different arguments (``num_microbatches``, number of chunks, group size,
``forward_only``, activation shape or dtype, header mode) run plans whose messages differ in size
or order. Received as data, such a message is read into a buffer of the wrong size (gloo aborts
the process) or into the wrong buffer (silent garbage), or never comes (a timeout). So each rank
opens every step by posting, to both ring neighbours, a :data:`~pipeschedule.wire.records.RECORD_LEN`
int64 record of its arguments (:func:`pipeschedule.wire.records.encode_call`), and a receive for theirs.

The record from a neighbour is checked right before this rank's first exchange with it (a send or
a receive), and the rest at the end of the step. Every rank checks before it sends a neighbour
anything, so a neighbour called differently never receives data from this rank, nor this rank
from it: both raise :class:`~pipeschedule.errors.ArgumentMismatchError` with both sides'
arguments, and each tells its *other* neighbour (whose record matched) through the usual abort
notices (:mod:`pipeschedule.runtime.abort`), so every rank raises.

Why it cannot deadlock or cross messages: the record and the receive for it are the first
operations each rank posts on each channel, and every receive completes once its sender has
posted the matching send; a rank posts its records on entering the step, before it waits on
anything, so every wait on a record ends as soon as that neighbour has entered the step. The
records come first on every channel, in both directions, so everything after them is matched as
in the plan. Posting costs four small operations per step, and the wait happens when the
neighbour's record has long arrived (``docs/BENCHMARKS.md`` has the measured cost).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeschedule.errors import RESTART, ArgumentMismatchError, CorruptHeaderError
from pipeschedule.wire.p2p import Neighbours, post_recv, post_send, wait_bounded
from pipeschedule.wire.records import CALL_MAGIC, RECORD_LEN, AbortRecord, Reason, call_differences, describe_call, describe_differences

__all__ = ["Handshake"]


class Handshake:
    """This rank's call record sent to both ring neighbours, and theirs, checked once each per step."""

    def __init__(self, link: Neighbours, record: torch.Tensor, *, timeout: float, v: int) -> None:
        self.link = link
        self.record = record
        self.timeout = timeout
        self.v = v
        self.peers = sorted({link.prev, link.next})
        self.sends: list[tuple[dist.Work, int]] = []
        self.unchecked: dict[int, tuple[dist.Work, torch.Tensor]] = {}
        self.mismatched: set[int] = set()

    def post(self) -> None:
        """Send our record to each neighbour and post the receive for theirs; wait on nothing."""
        for peer in self.peers:
            what = lambda: "sent its call record at the start of the step"  # noqa: E731
            self.sends.append((post_send(self.link, self.record, peer, what=what, timeout=self.timeout), peer))
        for peer in self.peers:
            buffer = torch.empty(RECORD_LEN, dtype=torch.int64, device=self.record.device)
            what = lambda: "posted the receive of a call record"  # noqa: E731
            self.unchecked[peer] = (post_recv(self.link, buffer, peer, what=what, timeout=self.timeout), buffer)

    def check(self, peer: int) -> None:
        """Wait for ``peer``'s record (bounded) and raise if it was called with other arguments."""
        work, buffer = self.unchecked.pop(peer)
        wait_bounded(work, link=self.link, peer=peer, what="waited for a neighbour's call record", timeout=self.timeout)
        if torch.equal(buffer, self.record):
            return
        theirs, mine = buffer.tolist(), self.record.tolist()
        name, me = self.link.name(peer), self.link.name(self.link.rank)
        if theirs[0] != CALL_MAGIC:
            self.mismatched.add(peer)
            raise CorruptHeaderError(
                f"the first message of the step from {name} is not a call record (it starts with {theirs[0]:#x}); "
                f"every rank of the pipeline must run the same version of pipeschedule and call the schedule once "
                f"per step; {RESTART}"
            )
        differences = call_differences(mine, theirs)
        self.mismatched.add(peer)
        record = AbortRecord(
            reason=Reason.PLAN, rank=self.link.rank, global_rank=self.link.global_rank(self.link.rank),
            reporter=self.link.rank,
            mismatch=(peer, self.link.global_rank(peer), *[x for triple in _summary(differences) for x in triple]),
        )
        raise ArgumentMismatchError(
            f"{me} and {name} were called with different arguments ({describe_differences(differences, me, name)}). "
            f"{me}: {describe_call(mine)}. {name}: "
            f"{describe_call(theirs)}. Call the schedule with the same num_microbatches, model chunks, "
            f"microbatch_group_size_per_vp_stage, forward_only, seq_length/micro_batch_size/hidden_size (or "
            f"tensor_shape), pipeline_dtype, variable_seq_lengths and check_p2p_shapes on every rank; {RESTART}",
            record=record, mismatched_peers=frozenset({peer}),
        )

    def check_all(self) -> None:
        for peer in sorted(self.unchecked):
            self.check(peer)

    def finish(self) -> None:
        """At the end of the step: check the records not yet checked, and wait on our sends."""
        self.check_all()
        while self.sends:
            work, peer = self.sends[0]
            wait_bounded(work, link=self.link, peer=peer, what="waited for its call record to be received", timeout=self.timeout)
            self.sends.pop(0)

    def settle(self) -> set[int]:
        """After a failure: the neighbours called differently, checking the records still unchecked.

        Never raises; a neighbour that sent nothing is left to the abort's own bounded waits.
        """
        for peer in sorted(self.unchecked):
            try:
                self.check(peer)
            except Exception:  # noqa: BLE001 - a mismatch is recorded in self.mismatched; a dead peer is not ours to judge
                pass
        return set(self.mismatched)


def _summary(differences: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """At most three differences for an abort record, the plan's fields first (they matter most)."""
    return differences[:3]
