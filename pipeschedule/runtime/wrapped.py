"""Finding the user's module inside wrappers.

Wrappers such as ``DistributedDataParallel`` keep the module they wrap in ``.module``; the
schedules and the training helpers look through them for the methods a pipeline chunk provides
(``set_input_tensor``, ``shared_embedding_weight``).
"""

from __future__ import annotations

from torch import nn

__all__ = ["inner_module"]


def inner_module(module: nn.Module, *, having: str) -> nn.Module:
    """The first module, from ``module`` inwards through ``.module``, that has attribute ``having``.

    When none has it, the innermost module reached is returned; callers decide whether that is an error.
    """
    while not hasattr(module, having):
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module
