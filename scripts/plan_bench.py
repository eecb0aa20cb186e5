"""How long one rank spends planning a step it has not seen before, against p, v and m.

A schedule function plans on its first call with a new ``(p, v, m)`` (batch-size ramp-up changes
``m`` every few hundred steps); the plan is cached after that. This times that first call of
:func:`pipeschedule.build_plan` on one rank, with the cache cleared before each measurement, and
prints the median of ``--repeat`` runs per configuration, on the middle rank and on rank 0 (the
rank with the longest warmup).

    python scripts/plan_bench.py
    python scripts/plan_bench.py --grid 16x8x512 64x2x1024 --repeat 5 --schedule zero-bubble
"""

from __future__ import annotations

import argparse
import statistics
import time

from pipeschedule.plan import build as plan_module

DEFAULT_GRID = ["4x1x16", "4x2x16", "8x4x64", "16x4x256", "16x8x512", "32x8x256", "64x2x1024"]


def time_first_plan(*, p: int, v: int, m: int, r: int, repeat: int, schedule: str = "1f1b") -> float:
    """Median milliseconds of a first ``build_plan`` call for rank ``r`` (cache cleared each time)."""
    times = []
    for _ in range(repeat):
        plan_module._plan.cache_clear()
        start = time.perf_counter()
        plan_module.build_plan(p=p, r=r, v=v, m=m, schedule=schedule)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", nargs="+", default=DEFAULT_GRID, metavar="PxVxM", help="configurations, e.g. 16x8x512")
    parser.add_argument("--repeat", type=int, default=5, help="runs per configuration (median reported)")
    parser.add_argument("--schedule", choices=(*plan_module.SCHEDULES, "both"), default="both", help="which schedule to plan")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    schedules = plan_module.SCHEDULES if args.schedule == "both" else (args.schedule,)
    print(f"{'schedule':>11} {'p':>4} {'v':>3} {'m':>6} {'actions':>8} {'rank 0 ms':>10} {'rank p/2 ms':>12} {'us/action':>10}")
    for item in args.grid:
        try:
            p, v, m = (int(x) for x in item.split("x"))
        except ValueError:
            parser.error(f"--grid takes PxVxM, e.g. 16x8x512; got {item!r}")
        for schedule in schedules:
            first = time_first_plan(p=p, v=v, m=m, r=0, repeat=args.repeat, schedule=schedule)
            middle = time_first_plan(p=p, v=v, m=m, r=p // 2, repeat=args.repeat, schedule=schedule)
            actions = (3 if schedule == "zero-bubble" else 2) * m * v  # F and B, or F, I and W
            print(f"{schedule:>11} {p:>4} {v:>3} {m:>6} {actions:>8} {first:>10.2f} {middle:>12.2f} {first * 1e3 / actions:>10.2f}")


if __name__ == "__main__":
    main()
