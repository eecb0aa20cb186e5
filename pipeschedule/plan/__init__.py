"""The plan layer: what each rank does in a step, as plain data, and the proofs about it.

Pure: nothing here imports ``torch.distributed`` or anything else of the package. A schedule is a
short function from ``(p, r, v, m, G)`` to one rank's actions; one generic pass places the
exchanges; :mod:`~pipeschedule.plan.check` proves a whole pipeline deadlock-free and
:mod:`~pipeschedule.plan.simulate` times it, without starting a process. A change to *what* runs
when goes here.
"""

from pipeschedule.plan.build import (
    Action,
    Exchange,
    Message,
    PhaseCounts,
    RankPlan,
    Step,
    build_pipeline,
    build_plan,
    choose_group_size,
    lockstep_receives,
    order_table,
    phase_counts,
)

__all__ = [
    "Action",
    "Exchange",
    "Message",
    "PhaseCounts",
    "RankPlan",
    "Step",
    "build_pipeline",
    "build_plan",
    "choose_group_size",
    "lockstep_receives",
    "order_table",
    "phase_counts",
]
