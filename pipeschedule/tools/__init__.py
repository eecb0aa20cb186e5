"""Tools to look at schedules: :mod:`~pipeschedule.tools.show` prints and draws a plan
(``python -m pipeschedule.tools.show``), :mod:`~pipeschedule.tools.trace` records measured steps
(Chrome traces, timelines, critical paths). Built on the plan layer and the public config.
"""
