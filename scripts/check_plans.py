"""Prove the exchange-placement rule over every configuration of a range, every valid group size.

For each ``(p, v, m, G, forward_only)`` with ``p <= --max-p``, ``v <= --max-v``, ``m <= --max-m``
and every valid interleaved group size ``G``: the plans of :func:`pipeschedule.plan.build.build_plan`
(placement by :func:`pipeschedule.plan.build.lockstep_receives`) must pass
:func:`pipeschedule.plan.check.check_pipeline`, and where the other placement passes too, its simulated
step (``tf = 1``, ``tb = 2``) must be no shorter. Prints the counts and exits non-zero on the first
failure. The test suite runs the default group sizes and a sample; this runs them all (minutes).

    python scripts/check_plans.py                # p <= 8, v <= 4, m <= 32
    python scripts/check_plans.py --max-p 4 --max-m 16
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeschedule.plan import build as plan_module
from pipeschedule.plan.check import PlanError, check_pipeline
from pipeschedule.plan.simulate import CostModel, simulate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-p", type=int, default=8)
    parser.add_argument("--max-v", type=int, default=4)
    parser.add_argument("--max-m", type=int, default=32)
    args = parser.parse_args()
    cost = CostModel(tf=1.0, tb=2.0)
    start = time.perf_counter()
    counts = {"configurations": 0, "other placement deadlocks": 0, "same plans": 0, "rule strictly faster": 0, "tie": 0}
    for p in range(1, args.max_p + 1):
        for v in range(1, args.max_v + 1):
            for m in range(p if v > 1 else 1, args.max_m + 1):
                sizes = [m] if v == 1 else [g for g in range(p, m + 1) if m % g == 0 or m % g >= p]
                for g in sizes:
                    for fo in (False, True):
                        rule = plan_module.lockstep_receives(p=p, v=v, m=m, group_size=g, forward_only=fo)
                        chosen = [plan_module._plan(p, r, v, m, fo, g, "1f1b", rule) for r in range(p)]
                        other = [plan_module._plan(p, r, v, m, fo, g, "1f1b", not rule) for r in range(p)]
                        counts["configurations"] += 1
                        try:
                            check_pipeline(chosen)
                        except PlanError as exc:
                            print(f"FAIL p={p} v={v} m={m} G={g} forward_only={fo}: the rule's plan deadlocks\n{exc}")
                            return 1
                        if [x.exchanges for x in chosen] == [x.exchanges for x in other]:
                            counts["same plans"] += 1
                            continue
                        try:
                            check_pipeline(other)
                        except PlanError:
                            counts["other placement deadlocks"] += 1
                            continue
                        mine, theirs = simulate(chosen, cost=cost).step_time, simulate(other, cost=cost).step_time
                        if mine > theirs:
                            print(f"FAIL p={p} v={v} m={m} G={g} forward_only={fo}: rule {mine} > other {theirs}")
                            return 1
                        counts["rule strictly faster" if mine < theirs else "tie"] += 1
            plan_module._plan.cache_clear()
    print(", ".join(f"{k}: {n}" for k, n in counts.items()), f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
