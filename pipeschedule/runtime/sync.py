"""When the data-parallel hooks of a step run, derived from the rank's plan, exactly where Megatron-core runs them.

Gradient reduction across data-parallel replicas must run once per step, after the last
microbatch has added its share, not after every microbatch; and a reduction that a hook starts
must not also be started by the data-parallel wrapper (Megatron's DDP refuses a second one
outstanding). Megatron-core 0.16.1's schedules settle both; the rules here are theirs, read off the
plan instead of counters:

* ``no_sync_func`` is entered before the first backward (a list: every chunk's, entered and left
  together) and left at the end of the step.
* Without ``grad_sync_func`` the wrapper reduces by itself once ``no_sync`` is left: interleaved,
  ``no_sync`` is left for the backward of each chunk's last microbatch and entered again after
  it; 1F1B, left before the rank's last backward; no pipelining, left before the last microbatch's
  forward (torch DDP arms its reducer in the forward).
* With ``grad_sync_func`` it starts the reduction, outside ``no_sync``. Interleaved, on rank ``r``
  chunk ``c``'s call comes after the backward ``r`` backwards later than ``c``'s last one (so
  ranks start reductions together), and at the end for chunks not yet synced. 1F1B, at the end on
  every rank but the first, which leaves ``no_sync`` before its last backward instead. No
  pipelining never calls it.
* ``param_sync_func`` (interleaved only): chunks 0 and 1 before the first forward, chunk
  ``c >= 2`` before forward ``k`` where forward ``k + r`` is chunk ``c - 1``'s first.
* Zero bubble (Megatron-core has no such schedule; the rule follows from what a reduction needs):
  a chunk's gradients are complete after its last weight pass ``W``, so ``grad_sync_func`` of a
  chunk runs right after that ``W`` (the weight passes are already delayed by ``r``), and without
  it ``no_sync`` is left for that ``W`` and entered again after it. ``param_sync_func`` as
  interleaved when ``v > 1``.

:class:`pipeschedule.runtime.executor.PlanRunner` calls :meth:`GradSync.before` and :meth:`GradSync.after`
around every action, :meth:`GradSync.finish` after the last one and :meth:`GradSync.close` always.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

from pipeschedule.config import PipelineConfig
from pipeschedule.plan import Action

Mode = Literal["none", "1f1b", "interleaved", "zero-bubble"]
_ENABLE, _DISABLE, _GRAD_SYNC, _PARAM_SYNC = "enable", "disable", "grad_sync", "param_sync"


def _per_chunk(hook: Any, v: int, name: str) -> list | None:
    if hook is None or callable(hook):
        return None if hook is None else [hook] * v
    hooks = list(hook)
    if len(hooks) != v or not all(callable(h) for h in hooks):
        raise TypeError(f"config.{name} must be a callable or a list of {v} callables (one per model chunk), got {hook!r}")
    return hooks


class GradSync:
    """The data-parallel hooks of one rank over one step (see the module docstring for when each runs)."""

    def __init__(
        self, config: PipelineConfig, chunks: list, actions: tuple[Action, ...], *, mode: Mode, rank: int, m: int
    ) -> None:
        v = len(chunks)
        self._chunks = chunks
        no_sync = _per_chunk(config.no_sync_func, v, "no_sync_func")
        self._no_sync = no_sync
        self._open: contextlib.ExitStack | None = None
        self._grad_sync = _per_chunk(config.grad_sync_func, v, "grad_sync_func") if mode != "none" else None
        interleaving = mode == "interleaved" or (mode == "zero-bubble" and v > 1)
        self._param_sync = _per_chunk(config.param_sync_func, v, "param_sync_func") if interleaving else None
        self._synced: set[int] = set()
        self._before: dict[Action, list[tuple[str, int]]] = {}
        self._after: dict[Action, list[tuple[str, int]]] = {}
        self._end: list[tuple[str, int]] = []
        forwards = [a for a in actions if a.kind == "F"]
        # The actions after which a microbatch's weight gradients are complete: B, or W when split.
        backwards = [a for a in actions if a.kind in ("B", "W")]
        if not backwards:  # forward only: no gradient, nothing to reduce or gather
            return
        # Entered before the first forward (torch's DDP decides in the forward whether to reduce),
        # and before the first parameter gathers, as Megatron-core does.
        self._at(self._before, forwards[0], _DISABLE)
        if self._param_sync is not None:
            self._plan_param_sync(forwards, rank, v)
        if mode == "none":
            self._at(self._before, forwards[-1], _ENABLE)
        elif mode == "1f1b":
            if self._grad_sync is None or rank == 0:
                self._at(self._before, backwards[-1], _ENABLE)
            else:
                self._end += [(_ENABLE, 0), (_GRAD_SYNC, 0)]
        elif mode == "zero-bubble":
            self._plan_interleaved(backwards, 0, v, m)  # the W's already come r passes late
        else:
            self._plan_interleaved(backwards, rank, v, m)
        self._end.append((_ENABLE, 0))

    def _at(self, where: dict[Action, list[tuple[str, int]]], action: Action, op: str, chunk: int = 0) -> None:
        where.setdefault(action, []).append((op, chunk))

    def _plan_interleaved(self, backwards: list[Action], rank: int, v: int, m: int) -> None:
        last = [k for k, b in enumerate(backwards) if b.microbatch == m - 1]  # each chunk's last backward
        if self._grad_sync is None:
            for k in last:
                self._at(self._before, backwards[k], _ENABLE)
                self._at(self._after, backwards[k], _DISABLE)
            return
        for k in last:
            if k + rank < len(backwards):
                after = backwards[k + rank]
                self._at(self._after, after, _ENABLE)
                self._at(self._after, after, _GRAD_SYNC, backwards[k].chunk)
                self._at(self._after, after, _DISABLE)
        # At the end, every chunk not synced yet, in chunk order (see _run).
        self._end += [(_ENABLE, 0)] + [(_GRAD_SYNC, -1)]

    def _plan_param_sync(self, forwards: list[Action], rank: int, v: int) -> None:
        if not forwards:
            return
        for chunk in (0, 1):
            self._at(self._before, forwards[0], _PARAM_SYNC, chunk)
        for k, action in enumerate(forwards):
            ahead = k + rank
            if ahead < len(forwards) and forwards[ahead].microbatch == 0 and 1 < forwards[ahead].chunk + 1 < v:
                self._at(self._before, action, _PARAM_SYNC, forwards[ahead].chunk + 1)

    # -- running -------------------------------------------------------------------------------

    def _run(self, ops: list[tuple[str, int]]) -> None:
        for op, chunk in ops:
            if op == _ENABLE:
                if self._open is not None:
                    self._open, stack = None, self._open
                    stack.close()
            elif op == _DISABLE:
                if self._open is None and self._no_sync is not None:
                    stack = contextlib.ExitStack()
                    # One context per distinct callable: a single no_sync_func covers all chunks.
                    for func in dict.fromkeys(self._no_sync):
                        stack.enter_context(func())
                    self._open = stack
            elif op == _GRAD_SYNC:
                for c in (range(len(self._chunks)) if chunk < 0 else (chunk,)):
                    if c not in self._synced:
                        self._synced.add(c)
                        self._grad_sync[c](self._chunks[c].parameters())
            else:
                self._param_sync[chunk](self._chunks[chunk].parameters())

    def before(self, action: Action) -> None:
        ops = self._before.get(action)
        if ops:
            self._run(ops)

    def after(self, action: Action) -> None:
        ops = self._after.get(action)
        if ops:
            self._run(ops)

    def finish(self) -> None:
        """After the last action: leave ``no_sync`` and start the reductions not started yet."""
        self._run(self._end)

    def close(self) -> None:
        """Leave ``no_sync`` if still inside it (a step that stopped early must not leave DDP there)."""
        if self._open is not None:
            self._open, stack = None, self._open
            stack.close()
