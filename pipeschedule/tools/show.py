"""Show a simulated pipeline step: a rank x time grid in text, and optionally a PNG timeline.

Run as ``python -m pipeschedule.tools.show --p 4 --v 2 --m 8 [--group-size G] [--forward-only]
[--tf 1 --tb 2] [--latency 0] [--png FILE]``. Each action is drawn where it starts in simulated
time (``F3``: forward of microbatch 3; ``F3.1``: microbatch 3 through chunk 1); dots are time a
rank spends idle. Below the grid: the step time, the bubble fraction and the peak live
activations, each next to the figure the formulas in SCHEDULES.md predict.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from fractions import Fraction

from pipeschedule.plan.check import PlanError
from pipeschedule.plan import build_pipeline
from pipeschedule.plan.simulate import CostModel, Simulation, Time, simulate

__all__ = ["main", "render_summary", "render_timeline", "save_png"]

_IDLE = "."


def _column(t: Time, scale: Fraction) -> int:
    # floor(x + 1/2) rather than round(): round() goes to even on halves, and then an action of
    # k whole columns could come out k + 1 or k - 1 wide depending on where it starts.
    return math.floor(Fraction(t) * scale + Fraction(1, 2))


def render_timeline(simulation: Simulation) -> str:
    """The rank x time grid: one row per rank, each action's label at its simulated start.

    The shortest action gets one column more than the longest label, so every label fits and
    at least one blank separates it from the next action; idle time shows as dots up to the
    step time. Exact (``Fraction``) times draw exactly; float times are rounded to columns.
    """
    v = simulation.v
    actions = [timed for rank in simulation.ranks for timed in rank.actions]
    width = max((len(t.action.label(v)) for t in actions), default=2) + 1
    shortest = min((Fraction(t.end - t.start) for t in actions if t.end > t.start), default=Fraction(1))
    scale = width / shortest
    total = _column(simulation.step_time, scale)
    rows = []
    for rank in simulation.ranks:
        cells = [_IDLE] * total
        for timed in rank.actions:
            start, end = _column(timed.start, scale), _column(timed.end, scale)
            text = timed.action.label(v).ljust(end - start)
            cells[start:end] = list(text[: end - start])
        rows.append(f"rank {rank.rank} |" + "".join(cells) + "|")
    axis = _axis(simulation.step_time, scale, total)
    return "\n".join([axis] + rows)


def _axis(step_time: Time, scale: Fraction, total: int) -> str:
    """A time ruler above the grid, with ticks far enough apart for their labels."""
    step = 1
    while step * scale < 8:
        step *= 2
    line = [" "] * (total + 8)
    t = 0
    while t <= step_time:
        label = f"{t:g}"
        at = _column(Fraction(t), scale)
        line[at : at + len(label)] = list(label)
        t += step
    return "time   |" + "".join(line).rstrip()


def _formula_step_time(simulation: Simulation) -> Fraction:
    cost = simulation.cost
    per_microbatch = Fraction(cost.tf) if simulation.forward_only else Fraction(cost.tf) + Fraction(cost.tb)
    return (simulation.m + Fraction(simulation.p - 1, simulation.v)) * per_microbatch


def render_summary(simulation: Simulation) -> str:
    """Step time, bubble fraction and peak live activations, each beside its formula's value."""
    p, v, m = simulation.p, simulation.v, simulation.m
    formula = "(m + p - 1)" if v == 1 else "(m + (p - 1)/v)"
    work = "tf" if simulation.forward_only else "(tf + tb)"
    ideal_bubble = Fraction(p - 1, v * m + p - 1)
    per_rank = " ".join(f"{rank.bubble_fraction:.3f}" for rank in simulation.ranks)
    lines = [
        (
            f"step time       {float(simulation.step_time):g}   "
            f"(formula {formula}·{work} = {float(_formula_step_time(simulation)):g})"
        ),
        (
            f"bubble fraction {simulation.bubble_fraction:.4f}   (formula (p - 1)/(v·m + p - 1) = "
            f"{float(ideal_bubble):.4f}; idle over compute {float(simulation.idle_over_busy):.4f}, "
            f"formula (p - 1)/(v·m) = {(p - 1) / (v * m):.4f})"
        ),
        f"  per rank      {per_rank}",
    ]
    peaks = " ".join(str(rank.peak_live_activations) for rank in simulation.ranks)
    if simulation.forward_only:
        lines.append(f"peak live activations per rank {peaks}   (forward-only keeps none for a backward)")
    else:
        expected = " ".join(str(min(rank.warmup + 1, m * v)) for rank in simulation.ranks)
        lines.append(f"peak live activations per rank {peaks}   (plan's min(W + 1, m·v): {expected})")
    return "\n".join(lines)


def save_png(simulation: Simulation, *, path: str, title: str | None = None, time_unit: str | None = None) -> None:
    """Write the timeline as a PNG: one row per rank, forwards blue and backwards orange, darker
    for later chunks, each box labelled with its microbatch. Needs matplotlib (the ``plot`` extra).

    ``title`` replaces the default (the configuration, step time and bubble); ``time_unit`` names
    the unit of the times on the axis (measured timelines are drawn in ``"ms"``).
    """
    try:
        # A bare Figure, not pyplot: no display, and no change to the caller's pyplot backend.
        from matplotlib import colormaps
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as error:
        raise ImportError(
            "--png needs matplotlib, which is not installed; run `pip install matplotlib` "
            "(or install pipeschedule with the `plot` extra), or leave out --png"
        ) from error

    v = simulation.v
    forward, backward = colormaps["Blues"], colormaps["Oranges"]

    def shade(kind: str, chunk: int) -> tuple[float, float, float, float]:
        # Stay inside the colour map's middle so labels stay readable on every shade.
        level = 0.35 + (0.4 * chunk / (v - 1) if v > 1 else 0.2)
        return (forward if kind == "F" else backward)(level)

    step_time = float(simulation.step_time)
    shortest = min((float(t.end - t.start) for r in simulation.ranks for t in r.actions if t.end > t.start), default=1.0)
    # About a quarter inch for the shortest box, so microbatch numbers fit, within sane bounds.
    width = max(8.0, min(24.0, 0.25 * step_time / shortest + 2.0))
    fig = Figure(figsize=(width, 0.6 * simulation.p + 1.4))
    ax = fig.subplots()
    for rank in simulation.ranks:
        for timed in rank.actions:
            start, length = float(timed.start), float(timed.end - timed.start)
            ax.broken_barh([(start, length)], (rank.rank - 0.4, 0.8),
                           facecolors=shade(timed.action.kind, timed.action.chunk), edgecolor="white", linewidth=1)
            ax.text(start + length / 2, rank.rank, str(timed.action.microbatch),
                    ha="center", va="center", fontsize=8, color="black")
    ax.set_ylim(simulation.p - 0.5, -0.5)  # rank 0 on top, as pipeline diagrams draw it
    ax.set_yticks(range(simulation.p), [f"rank {r}" for r in range(simulation.p)])
    ax.set_xlim(0, step_time)
    ax.set_xlabel("time" if time_unit is None else f"time ({time_unit})")
    ax.set_facecolor("#f2f2f2")  # idle time reads as grey gaps between the boxes
    default_title = (
        f"p={simulation.p} v={v} m={simulation.m}"
        + (f" G={simulation.group_size}" if v > 1 else "")
        + (" forward-only" if simulation.forward_only else "")
        + f": step time {step_time:g}{'' if time_unit is None else ' ' + time_unit}, bubble {simulation.bubble_fraction:.1%}"
    )
    ax.set_title(default_title if title is None else title, fontsize=10)
    kinds = ("F",) if simulation.forward_only else ("F", "B")
    handles = [
        Patch(color=shade(kind, chunk), label=("forward" if kind == "F" else "backward") + (f" chunk {chunk}" if v > 1 else ""))
        for kind in kinds
        for chunk in range(v)
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeschedule.tools.show", description="Simulate one pipeline step and show its timeline."
    )
    parser.add_argument("--p", type=int, required=True, help="pipeline ranks")
    parser.add_argument("--v", type=int, default=1, help="chunks per rank (1: plain 1F1B)")
    parser.add_argument("--m", type=int, required=True, help="microbatches per step")
    parser.add_argument("--group-size", type=int, default=None, help="microbatches per chunk group (interleaved)")
    parser.add_argument("--forward-only", action="store_true", help="no backward passes")
    parser.add_argument("--tf", type=Fraction, default=Fraction(1), help="forward time of a microbatch on one rank")
    parser.add_argument("--tb", type=Fraction, default=Fraction(2), help="backward time of a microbatch on one rank")
    parser.add_argument("--latency", type=Fraction, default=Fraction(0), help="time of one message between ranks")
    parser.add_argument("--png", default=None, metavar="FILE", help="also write the timeline picture (needs matplotlib)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, print the grid and the summary; 0 on success, 2 on bad arguments."""
    args = _parser().parse_args(argv)
    try:
        if args.p < 1:  # build_pipeline(p=0) would return no plans rather than refuse
            raise ValueError(f"--p must be an integer >= 1, got {args.p}; pass the number of pipeline ranks")
        if args.tf <= 0 or args.tb <= 0:
            raise ValueError(f"--tf and --tb must be > 0, got --tf {args.tf} --tb {args.tb}; pass positive times")
        plans = build_pipeline(p=args.p, v=args.v, m=args.m, forward_only=args.forward_only, group_size=args.group_size)
        simulation = simulate(plans, cost=CostModel(tf=args.tf, tb=args.tb, latency=args.latency))
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(render_timeline(simulation))
    print()
    print(render_summary(simulation))
    if args.png:
        try:
            save_png(simulation, path=args.png)
        except ImportError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
