"""Stage outputs whose data is released once sent (Megatron's ``deallocate_pipeline_outputs``), and a
count of the activation bytes a rank holds.

A stage's output is kept until its backward only as the root of the autograd graph: backward
needs its ``grad_fn``, not its values. :func:`release_output` swaps the output's data for one
element, so the activation's memory goes as soon as nothing else uses it:

* the send: the schedules send a detached alias of the output, which keeps the data alive until
  the transfer is done, so releasing never races a send in flight;
* autograd: an operation that saved its own result for backward (``tanh``, ``sigmoid``, ``relu``)
  holds its own reference to that storage. The gradient stays exact, and that output's memory is
  simply not freed. ``held_bytes`` shows which case a model is in.

Backward then runs through :func:`pipeschedule.runtime.executor.run_backward`, which does not compare the
gradient with the output's (now one-element) data; autograd still checks it against the shape the
output had when it was made.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["held_bytes", "release_output"]


def release_output(output: torch.Tensor, *, keep: torch.Tensor | None = None) -> bool:
    """Replace ``output``'s data by one element; ``True`` if it was released.

    A view is left alone: its base holds the memory anyway. So is an output that is already one
    element, and one that shares its storage with ``keep`` (the stage's input): a stage that returns
    the tensor it received (no layers, an identity block) would otherwise lose its input, which
    backward still needs.
    """
    if output._base is not None or output.numel() <= 1:
        return False
    if keep is not None and output.untyped_storage().data_ptr() == keep.untyped_storage().data_ptr():
        return False
    output.data = torch.empty((1,), dtype=output.dtype, device=output.device)
    return True


def held_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by several counts once)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
