"""Prove the exchange-placement rule over every configuration of a range, every valid group size.

For each ``(p, v, m, G, forward_only)`` with ``p <= --max-p``, ``v <= --max-v``, ``m <= --max-m``
and every valid interleaved group size ``G``: the plans of :func:`pipeschedule.plan.build.build_plan`
(placement by :func:`pipeschedule.plan.build.lockstep_receives`) must pass
:func:`pipeschedule.plan.check.check_pipeline`, and where the other placement passes too, its simulated
step (``tf = 1``, ``tb = 2``) must be no shorter. Prints the counts and exits non-zero on the first
failure. The test suite runs the default group sizes and a sample; this runs them all (minutes).

``--schedule zero-bubble`` does the same for the zero-bubble plans of every training configuration
(forward-only plans are the 1F1B ones): the rule's plans must pass ``check_pipeline``, and the
overlapped step (``tf = 1``, ``tb = 2``, ``tw = 1/2``) must equal ``m (tf + tb + tw) + (p - 1)
max(tf, tb, tf + tb - tw) / v`` wherever ``m >= p``. How the other placement fares in the batched
mode (deadlock, slower, tie, faster) is counted, not required.

    python scripts/check_plans.py                # 1F1B, p <= 8, v <= 4, m <= 32
    python scripts/check_plans.py --max-p 4 --max-m 16
    python scripts/check_plans.py --schedule zero-bubble
    python scripts/check_plans.py --schedule both
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from fractions import Fraction

from pipeschedule.plan import build as plan_module
from pipeschedule.plan.check import PlanError, check_pipeline
from pipeschedule.plan.simulate import CostModel, simulate


def _configurations(args: argparse.Namespace) -> Iterator[tuple[int, int, int, int]]:
    """Every ``(p, v, m, G)`` of the range, every valid group size; the plan cache is cleared per ``(p, v)``."""
    for p in range(1, args.max_p + 1):
        for v in range(1, args.max_v + 1):
            for m in range(p if v > 1 else 1, args.max_m + 1):
                sizes = [m] if v == 1 else [g for g in range(p, m + 1) if m % g == 0 or m % g >= p]
                for g in sizes:
                    yield p, v, m, g
            plan_module._plan.cache_clear()


def _check_1f1b(args: argparse.Namespace) -> dict[str, int] | None:
    cost = CostModel(tf=1.0, tb=2.0)
    counts = {"configurations": 0, "other placement deadlocks": 0, "same plans": 0, "rule strictly faster": 0, "tie": 0}
    for p, v, m, g in _configurations(args):
        for fo in (False, True):
            rule = plan_module.lockstep_receives(p=p, v=v, m=m, group_size=g, forward_only=fo)
            chosen = [plan_module._plan(p, r, v, m, fo, g, "1f1b", rule) for r in range(p)]
            other = [plan_module._plan(p, r, v, m, fo, g, "1f1b", not rule) for r in range(p)]
            counts["configurations"] += 1
            try:
                check_pipeline(chosen)
            except PlanError as exc:
                print(f"FAIL 1f1b p={p} v={v} m={m} G={g} forward_only={fo}: the rule's plan deadlocks\n{exc}")
                return None
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
                print(f"FAIL 1f1b p={p} v={v} m={m} G={g} forward_only={fo}: rule {mine} > other {theirs}")
                return None
            counts["rule strictly faster" if mine < theirs else "tie"] += 1
    return counts


def _check_zero_bubble(args: argparse.Namespace) -> dict[str, int] | None:
    tf, tb, tw = Fraction(1), Fraction(2), Fraction(1, 2)
    cost = CostModel(tf=tf, tb=tb, tw=tw)
    counts = {
        "configurations": 0, "overlapped step = formula": 0, "other placement deadlocks": 0, "same plans": 0,
        "rule strictly faster (batched)": 0, "tie": 0, "rule slower (batched)": 0,
    }
    slower: list[str] = []  # the first few configurations where the other placement is faster
    for p, v, m, g in _configurations(args):
        rule = plan_module.lockstep_receives(p=p, v=v, m=m, group_size=g, schedule="zero-bubble")
        chosen = [plan_module._plan(p, r, v, m, False, g, "zero-bubble", rule) for r in range(p)]
        counts["configurations"] += 1
        try:
            check_pipeline(chosen)
        except PlanError as exc:
            print(f"FAIL zero-bubble p={p} v={v} m={m} G={g}: the rule's plan deadlocks\n{exc}")
            return None
        if m >= p:
            step = simulate(chosen, cost=cost, overlapped=True).step_time
            formula = m * (tf + tb + tw) + (p - 1) * max(tf, tb, tf + tb - tw) / v
            if step != formula:
                print(f"FAIL zero-bubble p={p} v={v} m={m} G={g}: overlapped step {step} != formula {formula}")
                return None
            counts["overlapped step = formula"] += 1
        other = [plan_module._plan(p, r, v, m, False, g, "zero-bubble", not rule) for r in range(p)]
        if [x.exchanges for x in chosen] == [x.exchanges for x in other]:
            counts["same plans"] += 1
            continue
        try:
            check_pipeline(other)
        except PlanError:
            counts["other placement deadlocks"] += 1
            continue
        mine, theirs = simulate(chosen, cost=cost).step_time, simulate(other, cost=cost).step_time
        if mine < theirs:
            counts["rule strictly faster (batched)"] += 1
        elif mine == theirs:
            counts["tie"] += 1
        else:
            counts["rule slower (batched)"] += 1
            if len(slower) < 10:
                slower.append(f"p={p} v={v} m={m} G={g}: {mine} > {theirs}")
    if slower:
        print("zero-bubble: the rule's batched step is longer than the other placement's at", "; ".join(slower))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-p", type=int, default=8)
    parser.add_argument("--max-v", type=int, default=4)
    parser.add_argument("--max-m", type=int, default=32)
    parser.add_argument("--schedule", choices=("1f1b", "zero-bubble", "both"), default="1f1b")
    args = parser.parse_args()
    checks = {"1f1b": _check_1f1b, "zero-bubble": _check_zero_bubble}
    for name, check in checks.items():
        if args.schedule not in (name, "both"):
            continue
        start = time.perf_counter()
        counts = check(args)
        if counts is None:
            return 1
        print(f"{name}:", ", ".join(f"{k}: {n}" for k, n in counts.items()), f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
