"""Pipeline-parallel training schedules for PyTorch: plain functions you can read, print and trust.

The schedules (Megatron-core compatible):

* :func:`forward_backward_no_pipelining`
* :func:`forward_backward_pipelining_without_interleaving` (1F1B)
* :func:`forward_backward_pipelining_with_interleaving` (interleaved 1F1B, ``v`` chunks per rank)
* :func:`forward_backward_pipelining_zero_bubble` (ZB-H1, and interleaved zero bubble for ``v > 1``)

The package, one layer per folder, imports pointing down only:

* this module, :mod:`~pipeschedule.schedules`, :mod:`~pipeschedule.config` and
  :mod:`~pipeschedule.errors`: the public API;
* :mod:`pipeschedule.plan`: what each rank does, as plain data, with its proofs (pure);
* :mod:`pipeschedule.runtime`: executes a plan (modes, failure handling, hooks, memory);
* :mod:`pipeschedule.wire`: point-to-point waits, records and the failure board;
* :mod:`pipeschedule.tools`: printing, drawing and tracing schedules;
* :mod:`pipeschedule.training`: the kit for a training loop and the GPT, on the public API only.

Modules of the earlier flat layout (``pipeschedule.show``, ``pipeschedule.tied``, ...) still
import, as the same module objects (:mod:`pipeschedule._moved`).
"""

from pipeschedule import _moved
from pipeschedule.config import PipelineConfig, ScheduleEvent
from pipeschedule.errors import ArgumentMismatchError, PeerFailedError, PipelineError, ShapeMismatchError
from pipeschedule.plan import Action, build_pipeline, build_plan, phase_counts
from pipeschedule.runtime.wrapped import inner_module
from pipeschedule.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    forward_backward_pipelining_zero_bubble,
    get_forward_backward_func,
)
from pipeschedule.wire.notice import bounded_collective, declare_groups

_moved.install()

__all__ = [
    "Action",
    "ArgumentMismatchError",
    "PeerFailedError",
    "PipelineConfig",
    "PipelineError",
    "ScheduleEvent",
    "ShapeMismatchError",
    "bounded_collective",
    "build_pipeline",
    "build_plan",
    "declare_groups",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_zero_bubble",
    "get_forward_backward_func",
    "inner_module",
    "phase_counts",
]
