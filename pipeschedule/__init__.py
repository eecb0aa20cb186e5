"""Pipeline-parallel training schedules for PyTorch: plain functions you can read, print and trust.

The schedules (Megatron-core compatible):

* :func:`forward_backward_no_pipelining`
* :func:`forward_backward_pipelining_without_interleaving` (1F1B)
* :func:`forward_backward_pipelining_with_interleaving` (interleaved 1F1B, ``v`` chunks per rank)

The order of work of each is plain data from :mod:`pipeschedule.plan`; :mod:`pipeschedule.check`
proves a plan deadlock-free without starting a process.
"""

from pipeschedule.config import PipelineConfig, ScheduleEvent
from pipeschedule.errors import ArgumentMismatchError, PeerFailedError, PipelineError, ShapeMismatchError
from pipeschedule.plan import Action, build_pipeline, build_plan, phase_counts
from pipeschedule.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
)

__all__ = [
    "Action",
    "ArgumentMismatchError",
    "PeerFailedError",
    "PipelineConfig",
    "PipelineError",
    "ScheduleEvent",
    "ShapeMismatchError",
    "build_pipeline",
    "build_plan",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "get_forward_backward_func",
    "phase_counts",
]
