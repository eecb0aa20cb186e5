"""The failure board's waits, on one process with an in-memory store: a wait started ahead of need,
a notice that stops a wait that would never end, and the waits that come after it."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from pipeschedule.errors import PeerFailedError
from pipeschedule.wire.notice import POLL_S, FailureBoard, Notice, _Done
from pipeschedule.wire.records import AbortRecord, Reason


def _board() -> FailureBoard:
    return FailureBoard(dist.HashStore(), ["failed/test/1"], me="pipeline rank 0 (global rank 0)", timeout=30.0)


def _raise(exc: BaseException) -> BaseException:
    return exc


def test_done_is_false_until_set_and_true_after():
    done = _Done()
    assert done.wait(0.01) is False
    done.set()
    assert done.wait(0.01) is True
    assert done.wait(0.0) is True  # stays set


def test_a_wait_started_early_ends_when_finished_and_keeps_its_error():
    board = _board()
    ran = threading.Event()
    job = board.start(ran.set)
    board.finish(job, timeout=5.0, where="waited", on_error=_raise)
    assert ran.is_set()

    def fails() -> None:
        raise RuntimeError("connection closed by peer")

    with pytest.raises(ValueError, match="named by on_error"):
        board.finish(board.start(fails), timeout=5.0, where="waited", on_error=lambda exc: ValueError(f"named by on_error: {exc}"))
    board._waiter.close()


def test_a_notice_stops_a_wait_that_never_ends_and_later_waits_do_not_queue_behind_it():
    board = _board()
    never = threading.Event()
    stuck = board.start(lambda: never.wait(10.0))  # an early wait whose tensor never comes
    record = AbortRecord(reason=Reason.FORWARD, rank=2, global_rank=2, action=("F", 1, 0), reporter=2)
    writer = FailureBoard(board._store, board._keys, me="pipeline rank 2 (global rank 2)", timeout=30.0)
    threading.Timer(0.2, lambda: writer.publish(Notice(record, "pipeline rank 2 (global rank 2) raised at F1"))).start()
    start = time.monotonic()
    with pytest.raises(PeerFailedError, match="pipeline rank 2 .* raised at F1"):
        board.finish(stuck, timeout=30.0, where="waited for act1:1>2", on_error=_raise)
    assert time.monotonic() - start < 0.2 + 10 * POLL_S
    # The failure handling's own waits get a thread of their own: without it this one would wait
    # for the stuck wait's 10 s.
    board.abandon_waits()
    start = time.monotonic()
    board.wait(lambda: None, timeout=30.0, where="sent an abort notice", on_error=_raise)
    assert time.monotonic() - start < 1.0
    never.set()
    board._waiter.close()


def test_waits_run_in_the_order_started_and_one_not_begun_can_be_withdrawn():
    board = _board()
    begun, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def first() -> None:
        begun.set()
        release.wait(10.0)
        ran.append("first")

    jobs = [board.start(first), board.start(lambda: ran.append("second")), board.start(lambda: ran.append("third"))]
    assert begun.wait(5.0)
    assert board.cancel(jobs[0]) is False  # already running: it runs to its end
    assert board.cancel(jobs[1]) is True  # queued behind it: withdrawn, never runs
    release.set()
    board.finish(jobs[2], timeout=5.0, where="waited", on_error=_raise)
    board.finish(jobs[0], timeout=5.0, where="waited", on_error=_raise)
    assert ran == ["first", "third"]
    assert board.cancel(jobs[2]) is False  # done
    board._waiter.close()
