"""The runtime: executes one rank's plan with the user's chunks.

:mod:`~pipeschedule.runtime.executor` runs the actions and exchanges (batched mode),
:mod:`~pipeschedule.runtime.overlap` the overlapped mode, :mod:`~pipeschedule.runtime.abort` what
happens when a step fails, :mod:`~pipeschedule.runtime.sync` when the data-parallel hooks run,
:mod:`~pipeschedule.runtime.memory` what a rank holds. A change to *how* a plan runs goes here.
Built on the plan layer and the wire; the schedules in :mod:`pipeschedule.schedules` call it.
"""
