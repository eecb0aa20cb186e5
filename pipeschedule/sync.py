"""When the data-parallel hooks of a step run, derived from the rank's plan.

Gradient reduction across data-parallel replicas must run once per step, after the last
microbatch has added its share, not after every microbatch. The hooks here bracket the backwards
of each model chunk accordingly; :func:`pipeschedule.schedules` calls :meth:`GradSync.before` and
:meth:`GradSync.after` around every action.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from pipeschedule.config import PipelineConfig
from pipeschedule.plan import Action


def _per_chunk(hook: Any, v: int, name: str) -> list | None:
    if hook is None or callable(hook):
        return None if hook is None else [hook] * v
    hooks = list(hook)
    if len(hooks) != v or not all(callable(h) for h in hooks):
        raise TypeError(f"config.{name} must be a callable or a list of {v} callables (one per model chunk), got {hook!r}")
    return hooks


class GradSync:
    """The data-parallel hooks of one rank over one step.

    * ``no_sync_func``: one callable covers all chunks and is left before the rank's final
      backward (before the final microbatch's forward when ``sync_last_forward``: with no pipelining,
      DDP needs that forward outside ``no_sync`` to reduce in its backward). A list gives each chunk
      its own context, left before that chunk's final backward.
    * ``grad_sync_func``: after each chunk's final backward, with that chunk's parameters.
    * ``param_sync_func``: before each chunk's first forward, with that chunk's parameters.
    """

    def __init__(self, config: PipelineConfig, chunks: list, actions: tuple[Action, ...], *, sync_last_forward: bool = False) -> None:
        v = len(chunks)
        self._chunks = chunks
        self._grad_sync = _per_chunk(config.grad_sync_func, v, "grad_sync_func")
        self._param_sync = _per_chunk(config.param_sync_func, v, "param_sync_func")
        self._first_forward = {}
        self._last_backward = {}
        for action in actions:
            if action.kind == "F":
                self._first_forward.setdefault(action.chunk, action)
            else:
                self._last_backward[action.chunk] = action
        no_sync = config.no_sync_func
        self._contexts: dict[int, contextlib.ExitStack] = {}
        self._leave_at: dict[Action, list[int]] = {}
        if no_sync is None or not self._last_backward:
            return
        if callable(no_sync):
            last = actions[-1]
            if sync_last_forward:
                last = [a for a in actions if a.kind == "F"][-1]
            self._enter(0, no_sync)
            self._leave_at[last] = [0]
        else:
            for chunk, func in enumerate(_per_chunk(no_sync, v, "no_sync_func")):
                self._enter(chunk, func)
                self._leave_at.setdefault(self._last_backward[chunk], []).append(chunk)

    def _enter(self, key: int, func: Callable[[], contextlib.AbstractContextManager]) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(func())
        self._contexts[key] = stack

    def before(self, action: Action) -> None:
        for key in self._leave_at.get(action, ()):
            self._contexts.pop(key).close()
        if self._param_sync and self._first_forward.get(action.chunk) == action:
            self._param_sync[action.chunk](self._chunks[action.chunk].parameters())

    def after(self, action: Action) -> None:
        if self._grad_sync and self._last_backward.get(action.chunk) == action:
            self._grad_sync[action.chunk](self._chunks[action.chunk].parameters())

    def close(self) -> None:
        """Leave any context still open (a step that stopped early must not leave DDP in no_sync)."""
        while self._contexts:
            self._contexts.popitem()[1].close()
