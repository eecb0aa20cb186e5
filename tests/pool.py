"""A pool of gloo worker processes, started once per test session and given many jobs.

Starting a process that imports torch takes seconds, so the workers stay up: each job is a
picklable top-level function plus an argument, run on every worker (each decides from its rank
whether it takes part). Every wait is bounded; a job that overruns kills the pool (the next job
starts a fresh one) and fails the test instead of hanging it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

WORLD_SIZE = 4
# Pipeline groups the workers create at start-up, by name. Some are deliberately not ranks 0..p-1,
# so schedules must use group ranks and not assume they equal global ranks.
GROUPS = {"all": [0, 1, 2, 3], "0-1": [0, 1], "2-3": [2, 3], "1-3": [1, 2, 3], "0-2": [0, 1, 2]}


@dataclass
class JobError:
    """What a worker reports when the job raised."""

    type_name: str
    message: str
    traceback: str


def _worker(rank: int, init_file: str, tasks: mp.Queue, results: mp.Queue, p2p_timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
        timeout=timedelta(seconds=p2p_timeout_s),
    )
    groups = {name: (None if ranks == GROUPS["all"] else dist.new_group(ranks)) for name, ranks in GROUPS.items()}
    results.put(("ready", rank, None))
    while True:
        task = tasks.get()
        if task is None:
            break
        job, func, arg = task
        try:
            outcome = func(arg, rank, groups)
        except BaseException as exc:  # report everything; the pool decides what fails
            outcome = JobError(type(exc).__name__, str(exc), traceback.format_exc())
        results.put((job, rank, outcome))
    dist.destroy_process_group()


class WorkerPool:
    """``WORLD_SIZE`` gloo processes; :meth:`run` sends one job to all and gathers the results."""

    def __init__(self, *, start_timeout: float = 120.0, p2p_timeout_s: float = 30.0) -> None:
        self._ctx = mp.get_context("spawn")
        self._start_timeout = start_timeout
        self._p2p_timeout_s = p2p_timeout_s
        self._procs: list[Any] = []
        self._job = 0

    def _start(self) -> None:
        fd, self._init_file = tempfile.mkstemp(prefix="pipeschedule-pool-")
        os.close(fd)
        os.unlink(self._init_file)  # the file store creates it
        self._tasks = [self._ctx.Queue() for _ in range(WORLD_SIZE)]
        self._results = self._ctx.Queue()
        self._procs = [
            self._ctx.Process(
                target=_worker, args=(rank, self._init_file, self._tasks[rank], self._results, self._p2p_timeout_s),
                daemon=True,
            )
            for rank in range(WORLD_SIZE)
        ]
        for proc in self._procs:
            proc.start()
        ready = self._gather("ready", self._start_timeout)
        assert sorted(ready) == list(range(WORLD_SIZE)), ready

    def _gather(self, job: Any, timeout: float, *, allow_deaths: bool = False) -> dict[int, Any]:
        import time

        deadline = time.monotonic() + timeout
        out: dict[int, Any] = {}
        while len(out) < WORLD_SIZE:
            left = deadline - time.monotonic()
            try:
                # Short polls when deaths are expected, so a dead worker is reported, not waited for.
                got_job, rank, outcome = self._results.get(timeout=max(min(left, 0.2) if allow_deaths else left, 0.01))
            except queue.Empty:
                if allow_deaths and left > 0:
                    for r, proc in enumerate(self._procs):
                        if r not in out and not proc.is_alive():
                            out[r] = JobError("WorkerDied", f"worker {r} died (exit code {proc.exitcode})", "")
                    continue
                dead = [r for r, proc in enumerate(self._procs) if not proc.is_alive()]
                self.close()
                raise TimeoutError(
                    f"job {job} did not finish within {timeout:.0f}s: results from ranks {sorted(out)}, "
                    f"dead workers {dead}; the pool was stopped"
                ) from None
            if got_job == job:
                out[rank] = outcome
        return out

    def run(
        self, func: Callable[[Any, int, dict], Any], arg: Any, *, timeout: float = 60.0, allow_deaths: bool = False
    ) -> dict[int, Any]:
        """Run ``func(arg, rank, groups)`` on every worker; return ``{rank: result or JobError}``.

        With ``allow_deaths`` a worker that dies during the job is reported as a ``JobError`` of
        type ``WorkerDied`` instead of failing the whole job; the next job restarts the pool.
        """
        if not self._procs or not all(proc.is_alive() for proc in self._procs):
            self.restart()
        self._job += 1
        for q in self._tasks:
            q.put((self._job, func, arg))
        return self._gather(self._job, timeout, allow_deaths=allow_deaths)

    def restart(self) -> None:
        """Stop the workers (bounded) and start fresh ones: for after a job that broke a process group."""
        self.close()
        self._start()

    def close(self) -> None:
        """Stop the workers: ask, then terminate, then kill; each step bounded."""
        for proc, q in zip(self._procs, getattr(self, "_tasks", [])):
            if proc.is_alive():
                try:
                    q.put(None)
                except (OSError, ValueError):
                    pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._procs = []
        if getattr(self, "_init_file", None) and os.path.exists(self._init_file):
            os.unlink(self._init_file)
