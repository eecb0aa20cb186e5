"""Job-wide failure notices, and the waits that watch them.

A rank whose step fails writes one notice, "rank G failed doing X", into the store that every
process group of the job shares (the default group's store). Every wait a step makes on another
rank (each point-to-point wait, each collective the library runs, the token count) watches the
notices of this step while it waits (save the overlapped mode's waits on old sends, see
:mod:`pipeschedule.runtime.overlap`), and raises
:class:`~pipeschedule.errors.PeerFailedError` naming the rank that really failed as soon as one
appears. So the news reaches every rank of the job at once: ranks two hops away, ranks of the
other data-parallel replicas, ranks blocked on a send or inside a collective. It does not depend
on the order of the messages on any channel, and the failing rank does not wait for anyone to
hear it.

Scope. A notice is kept per process group and per step: the key is the group's name and the
step's serial number on that group, which every member counts the same way (one per schedule
call, kept in the store, so nothing lives in this module). A step watches its pipeline group and
the groups its hooks declare with :func:`declare_groups` (the data-parallel group of
:class:`pipeschedule.training.data_parallel.DataParallelChunks`, the embedding group of
:func:`pipeschedule.training.tied.make_finalize_model_grads`); a failing rank writes its notice to each of
them, so a fault in one pipeline reaches the other replicas through their shared groups.

Why waits run on a thread. A gloo wait cannot be interrupted, and a gloo wait that times out closes
the connection, so it cannot be cut into short waits. The step's one waiter thread does the
blocking wait while this thread waits on an event in short slices: between slices it reads the
notices (a cheap ``check`` on the store at most every :data:`POLL_S`), and a Ctrl-C (SIGINT) is
handled there at once instead of when the backend returns. Collectives are started with
``async_op=True`` and their futures set the same event.
"""

from __future__ import annotations

import _thread
import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeschedule.errors import RESTART, PeerFailedError
from pipeschedule.wire.records import RECORD_LEN, AbortRecord, encode_abort, read_abort_marker

__all__ = ["FailureBoard", "Job", "Notice", "bounded_collective", "current_board", "declare_groups"]

logger = logging.getLogger(__name__)

POLL_S = 0.05  # how often a waiting rank reads the notices
_PREFIX = "pipeschedule/"
_GROUPS_ATTR = "pipeschedule_groups"
_LATEST = "failed/latest"

# The board of the step running in this context: found by every bounded wait, also those inside
# the user's hooks, without threading it through Megatron's hook signatures. Set only while a
# step runs (:meth:`FailureBoard.enter`).
_CURRENT: contextvars.ContextVar[FailureBoard | None] = contextvars.ContextVar("pipeschedule_board", default=None)


def current_board() -> FailureBoard | None:
    """The failure board of the step running in this context, or ``None`` outside a step."""
    return _CURRENT.get()


def declare_groups(func: Callable, *groups: Any) -> Callable:
    """Mark hook ``func`` as communicating over ``groups`` (``None`` entries are skipped).

    A step whose config holds such a hook watches those groups' notices and writes its own there
    when it fails, so the other members hear of it even when they never talk to this pipeline.
    """
    known = list(getattr(func, _GROUPS_ATTR, ()))
    for group in groups:
        if group is not None and not any(group is g for g in known):
            known.append(group)
    setattr(func, _GROUPS_ATTR, tuple(known))
    return func


def declared_groups(hooks: Sequence[Any]) -> list[Any]:
    """The groups declared by any of ``hooks`` (callables or lists of them), each once."""
    found: list[Any] = []
    for hook in hooks:
        for func in hook if isinstance(hook, (list, tuple)) else [hook]:
            for group in getattr(func, _GROUPS_ATTR, ()):
                if not any(group is g for g in found):
                    found.append(group)
    return found


@dataclass(frozen=True)
class Notice:
    """A failure written to the board: the wire record, and the sentence that describes it."""

    record: AbortRecord
    text: str  # "pipeline rank 1 (global rank 3) raised in loss_func at F2 (InjectedFault: ...)"

    def encode(self) -> bytes:
        return encode_abort(self.record, device=torch.device("cpu")).numpy().tobytes() + self.text.encode()

    @classmethod
    def decode(cls, value: bytes) -> Notice:
        head = RECORD_LEN * 8
        record = read_abort_marker(torch.frombuffer(bytearray(value[:head]), dtype=torch.int64))
        if record is None:
            raise ValueError("a failure notice without its record")
        return cls(record, value[head:].decode(errors="replace"))


def _group_name(group: Any) -> str:
    return dist.distributed_c10d._get_process_group_name(group if group is not None else dist.group.WORLD)


class _Done:
    """Set once by the waiter thread, waited for by one thread: a bare lock, which costs a fraction
    of a ``threading.Event`` (no condition, no Python-level bookkeeping) on every wait of a step."""

    __slots__ = ("_lock", "_done")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._done = False

    def set(self) -> None:
        self._lock.release()

    def wait(self, timeout: float) -> bool:
        if not self._done:
            self._done = self._lock.acquire(timeout=timeout)
        return self._done


class Job:
    """A blocking wait handed to the waiter thread: ``done`` is set when it has run (or failed:
    ``error``). ``func`` is ``None`` once the thread has taken it up or it was withdrawn."""

    __slots__ = ("done", "error", "func")

    def __init__(self, func: Callable[[], Any]) -> None:
        self.done = _Done()
        self.error: BaseException | None = None
        self.func: Callable[[], Any] | None = func


class _Waiter:
    """A daemon thread that runs the blocking waits handed to it, one at a time, in the order given."""

    # Between a thread taking a job up and a job being withdrawn; one for every waiter, as a job
    # may outlive the waiter current when it is withdrawn (:meth:`FailureBoard.abandon_waits`).
    _lock = _thread.allocate_lock()

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, func: Callable[[], Any]) -> Job:
        """Run ``func`` on the thread after the jobs already given."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pipeschedule-waiter", daemon=True)
            self._thread.start()
        job = Job(func)
        self._queue.put(job)
        return job

    def cancel(self, job: Job) -> bool:
        """Withdraw ``job`` if the thread has not taken it up; ``False`` if it has (it runs to its end)."""
        with self._lock:
            withdrawn, job.func = job.func is not None, None
        return withdrawn

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                func, job.func = job.func, None
            if func is None:  # withdrawn
                continue
            try:
                func()
            except BaseException as exc:  # handed to the waiting thread
                job.error = exc
            job.done.set()

    def close(self) -> None:
        # A wait abandoned after a failure may still block the thread; it ends with its own bound
        # (the process group's timeout for a wait begun ahead of need).
        if self._thread is not None:
            self._queue.put(None)


class FailureBoard:
    """The notices of one step, seen from one rank (see the module docstring).

    ``me`` names this rank in messages; ``timeout`` is ``config.p2p_timeout``.
    """

    def __init__(self, store: Any, keys: list[str], *, me: str, timeout: float | None) -> None:
        self._store = store
        self._keys = keys
        self.me = me
        self.timeout = timeout
        self.notice: Notice | None = None
        self._published = False
        self._last_poll = 0.0
        self._waiter = _Waiter()
        self._token: contextvars.Token | None = None
        # What this rank adds to a notice it learns of (the shape it expects, say); set by the runner.
        self.detail: Callable[[AbortRecord], str] = lambda record: ""

    @classmethod
    def open(cls, groups: Sequence[Any], *, me: str, timeout: float | None) -> FailureBoard | None:
        """The board of a new step over ``groups`` (the pipeline group first); ``None`` without a store.

        Takes this rank's next step serial on each group: one ``add`` on the store per group.
        """
        if not dist.is_initialized():
            return None
        try:
            store = dist.PrefixStore(_PREFIX, dist.distributed_c10d._get_default_store())
            me_global = dist.get_rank()
            keys = []
            for group in groups:
                name = _group_name(group)
                serial = store.add(f"serial/{name}/{me_global}", 1)
                keys.append(f"failed/{name}/{serial}")
        except (RuntimeError, ValueError, AttributeError) as exc:  # no store to share: waits are bounded by the timeout only
            logger.warning("no store for failure notices (%s): failures are found by config.p2p_timeout only", exc)
            return None
        return cls(store, list(dict.fromkeys(keys)), me=me, timeout=timeout)

    def enter(self) -> None:
        """Make this the board every bounded wait in this context watches (until :meth:`leave`)."""
        self._token = _CURRENT.set(self)

    def leave(self) -> None:
        """The step is over: waits stop watching this board, and its waiter thread ends."""
        _CURRENT.reset(self._token)
        self._waiter.close()

    # -- notices ---------------------------------------------------------------------------------

    def publish(self, notice: Notice, *, origin: bool = False) -> None:
        """Write ``notice`` to every group of the step; the first notice on a group stays. Never raises.

        ``origin``: this rank is the one that failed; the notice is also kept as the job's latest
        failure (:meth:`latest`), for errors in groups the step does not know.
        """
        if self._published:
            return
        self._published = True
        value = notice.encode()
        keys = [(key, value) for key in self._keys]
        for key, data in keys + ([(_LATEST, repr(time.time()).encode() + b"|" + value)] if origin else []):
            try:
                if key == _LATEST:
                    self._store.set(key, data)
                else:
                    self._store.compare_set(key, "", data)
            except Exception as err:  # the store may be gone with the job; the caller's error matters more
                logger.warning("could not write the failure notice %s: %s", key, err)

    def latest(self, *, max_age: float) -> tuple[Notice, float] | None:
        """The job's latest failure by any rank, and how many seconds ago it was written, if at most ``max_age``.

        For a backend error in a group the step does not watch (a user's hook): a rank that failed
        shortly before is the likely cause. Clocks of different hosts make the age approximate.
        """
        try:
            if not self._store.check([_LATEST]):
                return None
            stamp, _, value = self._store.get(_LATEST).partition(b"|")
            age = time.time() - float(stamp)
            return (Notice.decode(value), age) if age <= max_age else None
        except Exception as err:  # no store, or a value it cannot read: nothing to name
            logger.debug("could not read the latest failure notice: %s", err)
            return None

    def poll(self, *, force: bool = False) -> Notice | None:
        """A notice of this step written by any rank, read at most every :data:`POLL_S` unless ``force``."""
        if self.notice is not None or self._published:
            return self.notice
        now = time.monotonic()
        if not force and now - self._last_poll < POLL_S:
            return None
        self._last_poll = now
        for key in self._keys:
            try:
                if self._store.check([key]):
                    self.notice = Notice.decode(self._store.get(key))
                    return self.notice
            except Exception as err:  # a store that went away: keep waiting on the backend alone
                logger.debug("could not read the failure notices: %s", err)
        return None

    def error(self, notice: Notice, where: str, *, detail: str = "") -> PeerFailedError:
        """The error of a rank that learnt of ``notice`` while it ``where``."""
        error = PeerFailedError(
            f"{notice.text}; {self.me} learnt it from the job's failure notices while it {where}{detail}"
            f"{self.detail(notice.record)}. Look at the "
            f"failed rank's log for its error; {RESTART}",
            record=notice.record,
        )
        error.notice_text = notice.text
        return error

    def raise_if_failed(self, where: str) -> None:
        """Raise the error for a notice already written, without waiting (a step that failed skips the rest)."""
        notice = self.poll(force=True)
        if notice is not None:
            raise self.error(notice, where)

    # -- waits -----------------------------------------------------------------------------------

    def wait(self, blocking: Callable[[], Any], *, timeout: float | None, where: str,
             on_error: Callable[[BaseException], BaseException]) -> None:
        """Run ``blocking()`` (a backend wait bounded by ``timeout`` itself) on the waiter thread and
        watch: raise at once when a notice appears, or after ``timeout`` seconds.

        ``on_error(exc)`` turns a backend error or a :class:`TimeoutError` into the error to raise,
        unless a notice explains it better.
        """
        self.finish(self.start(blocking), timeout=timeout, where=where, on_error=on_error)

    def start(self, blocking: Callable[[], Any]) -> Job:
        """Hand ``blocking()`` to the waiter thread now, ahead of need; :meth:`finish` waits for it.

        The waiter runs its waits one at a time, in the order they were started: a wait started
        early holds back every later one until it ends. So start waits in the order this rank
        needs them, and only waits whose end nothing this rank does meanwhile is waiting for.
        """
        return self._waiter.submit(blocking)

    def finish(self, job: Job, *, timeout: float | None, where: str,
               on_error: Callable[[BaseException], BaseException]) -> None:
        """Wait for a wait handed over by :meth:`start`, watching the notices as :meth:`wait` does."""
        self._watch(job.done, timeout=timeout, where=where, on_error=on_error)
        if job.error is not None:
            notice = self.poll(force=True)
            if notice is not None:
                raise self.error(notice, where) from job.error
            raise on_error(job.error) from job.error

    def cancel(self, job: Job) -> bool:
        """Withdraw a wait handed over by :meth:`start` that has not begun; ``False`` if it has."""
        return self._waiter.cancel(job)

    def abandon_waits(self) -> None:
        """The step failed: a wait started early may never end, so later waits get a thread of their own."""
        self._waiter.close()
        self._waiter = _Waiter()

    def wait_future(self, work: dist.Work, *, where: str, on_error: Callable[[BaseException], BaseException]) -> None:
        """Like :meth:`wait` for an ``async_op=True`` collective, whose future says when it is done."""
        done = threading.Event()
        work.get_future().add_done_callback(lambda _: done.set())
        self._watch(done, timeout=self.timeout, where=where, on_error=on_error)
        try:
            work.wait()
        except RuntimeError as exc:
            notice = self.poll(force=True)
            if notice is not None:
                raise self.error(notice, where) from exc
            raise on_error(exc) from exc

    def _watch(self, done: threading.Event | _Done, *, timeout: float | None, where: str,
               on_error: Callable[[BaseException], BaseException]) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(POLL_S):  # a signal (Ctrl-C) is handled here at once
            notice = self.poll()
            if notice is not None:
                raise self.error(notice, where)
            if deadline is not None and time.monotonic() > deadline:
                notice = self.poll(force=True)
                if notice is not None:
                    raise self.error(notice, where)
                raise on_error(TimeoutError(f"timed out after {timeout}s"))


def bounded_collective(
    start: Callable[[], dist.Work], *, group: Any, what: str, timeout: float | None = None
) -> None:
    """Run the collective ``start()`` posts (with ``async_op=True``) over ``group``, bounded like a p2p wait.

    Inside a step it is skipped when the step has already failed, watches the step's notices while
    it waits and lasts at most ``config.p2p_timeout``; outside a step it lasts at most ``timeout``
    seconds (``None``: the process group's own timeout). ``what`` names it in errors ("the
    data-parallel all-reduce in grad_sync_func"). Backend errors and timeouts become
    :class:`~pipeschedule.errors.PeerFailedError` naming the group's ranks.
    """
    board = current_board()
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    where = f"waited in {what} over global ranks {ranks}"
    if board is not None:
        board.raise_if_failed(f"was about to start {what} over global ranks {ranks} (skipped)")
    me = board.me if board is not None else f"global rank {dist.get_rank()}"
    limit = board.timeout if board is not None else timeout

    def on_error(exc: BaseException) -> PeerFailedError:
        text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        timed_out = isinstance(exc, TimeoutError) or "timed out" in text.lower()
        cause = (f"it did not finish within {limit}s: a member failed, died or is stuck" if timed_out
                 else f"the backend reported {text!r}: a member probably died")
        return PeerFailedError(
            f"{me} {where}, and {cause}. Look at those ranks' logs for the first error; {RESTART}"
        )

    try:
        work = start()
    except RuntimeError as exc:
        if board is not None:
            board.raise_if_failed(where)
        raise on_error(exc) from exc
    if board is not None:
        board.wait_future(work, where=where, on_error=on_error)
        return
    if limit is None:
        try:
            work.wait()
        except RuntimeError as exc:
            raise on_error(exc) from exc
        return
    done = threading.Event()
    work.get_future().add_done_callback(lambda _: done.set())
    if not done.wait(limit):
        raise on_error(TimeoutError(f"timed out after {limit}s"))
    try:
        work.wait()
    except RuntimeError as exc:
        raise on_error(exc) from exc
