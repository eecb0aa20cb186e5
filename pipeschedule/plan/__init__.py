"""The plan layer: what each rank does in a step, as plain data, and the proofs about it.

Pure: nothing here imports ``torch.distributed`` or anything else of the package. The vocabulary
(actions ``F``, ``B``, ``I``, ``W``, messages, exchanges, steps, where stages live) is in
:mod:`~pipeschedule.plan.steps`; each schedule is a short function from ``(p, r, v, m, G)`` to one
rank's steps in :mod:`~pipeschedule.plan.orders`; one generic pass places the exchanges
(:mod:`~pipeschedule.plan.build`); :mod:`~pipeschedule.plan.check` proves a whole pipeline
deadlock-free and :mod:`~pipeschedule.plan.simulate` times it, without starting a process. A change
to *what* runs when goes here.
"""

from pipeschedule.plan.build import SCHEDULES, build_pipeline, build_plan, lockstep_receives
from pipeschedule.plan.orders import choose_group_size, order_table, phase_counts
from pipeschedule.plan.steps import Action, Exchange, Message, PhaseCounts, RankPlan, Step, rank_of, stage_of

__all__ = [
    "SCHEDULES",
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
    "rank_of",
    "stage_of",
]
