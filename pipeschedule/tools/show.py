"""Show a simulated pipeline step: a rank x time grid in text, and optionally a PNG timeline.

Run as ``python -m pipeschedule.tools.show --p 4 --v 2 --m 8 [--schedule {1f1b,zero-bubble}]
[--group-size G] [--forward-only] [--tf 1 --tb 2 --tw 0] [--latency 0] [--[no-]overlapped]
[--png FILE]``. Each action is drawn where it starts in simulated time (``F3``: forward of
microbatch 3; ``F3.1``: microbatch 3 through chunk 1; ``B``: a whole backward; ``I`` and ``W``: the
input-gradient and weight-gradient halves of a zero-bubble backward); dots are time a rank spends
idle. Below the grid: the step time, the bubble fraction and the peak live activations, each next
to the figure the formulas in SCHEDULES.md (and ZERO_BUBBLE.md) predict.

The simulated mode is the one each schedule runs in by default: batched for 1F1B, overlapped
(receives posted ahead, an action waits only for its input) for zero bubble, whose weight passes
fill the waits only there; ``--overlapped`` / ``--no-overlapped`` choose.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from fractions import Fraction

from pipeschedule.plan.check import PlanError
from pipeschedule.plan import SCHEDULES, build_pipeline
from pipeschedule.plan.simulate import CostModel, Simulation, Time, simulate

__all__ = ["main", "render_summary", "render_timeline", "save_png"]

_IDLE = "."
# Colour maps of the picture, one per kind of action; darker shades for later chunks.
_COLOURS = {"F": "Blues", "B": "Oranges", "I": "Purples", "W": "Greens"}
_NAMES = {"F": "forward", "B": "backward", "I": "input-gradient backward", "W": "weight-gradient pass"}
_MODES = {
    False: "batched mode (each step's exchange posted and waited on together)",
    True: "overlapped mode (receives posted ahead; an action waits only for its input)",
}


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


def _per_microbatch(simulation: Simulation) -> Fraction:
    """The work of one microbatch on one rank: ``tf`` forward-only, else ``tf + tb + tw``."""
    cost = simulation.cost
    if simulation.forward_only:
        return Fraction(cost.tf)
    return Fraction(cost.tf) + Fraction(cost.tb) + Fraction(cost.tw)


def _formula_step_time(simulation: Simulation) -> Fraction:
    return (simulation.m + Fraction(simulation.p - 1, simulation.v)) * _per_microbatch(simulation)


def _zero_bubble_step_time(simulation: Simulation) -> Fraction:
    """ZERO_BUBBLE.md's ``m (tf + tb + tw) + (p - 1) max(tf, tb, tf + tb - tw) / v``: exact in the
    overlapped mode for ``m >= p`` with no latency."""
    tf, tb, tw = (Fraction(x) for x in (simulation.cost.tf, simulation.cost.tb, simulation.cost.tw))
    return simulation.m * (tf + tb + tw) + Fraction(simulation.p - 1, simulation.v) * max(tf, tb, tf + tb - tw)


def _zero_bubble_warmup(simulation: Simulation, r: int) -> int:
    """SCHEDULES.md's zero-bubble warmup ``W0`` of rank ``r``."""
    p, v, m = simulation.p, simulation.v, simulation.m
    if v == 1:
        return min(p - r - 1, m)
    return min((v - 1) * simulation.group_size + p - r - 1, m * v)


def _is_zero_bubble(simulation: Simulation) -> bool:
    """A step with split backwards (``I`` and ``W`` actions) is a zero-bubble step."""
    return any(t.action.kind in ("I", "W") for rank in simulation.ranks for t in rank.actions)


def render_summary(simulation: Simulation, *, overlapped: bool = False) -> str:
    """Step time, bubble fraction and peak live activations, each beside its formula's value.

    ``overlapped`` says which mode ``simulation`` was run in; it is named unless it is 1F1B's
    batched default. A zero-bubble step (one with ``I`` and ``W`` actions) is compared with
    ZERO_BUBBLE.md's step time and both of its memory peaks.
    """
    if _is_zero_bubble(simulation):
        return _zero_bubble_summary(simulation, overlapped=overlapped)
    p, v, m = simulation.p, simulation.v, simulation.m
    formula = "(m + p - 1)" if v == 1 else "(m + (p - 1)/v)"
    work = "tf" if simulation.forward_only else "(tf + tb + tw)" if simulation.cost.tw else "(tf + tb)"
    ideal_bubble = Fraction(p - 1, v * m + p - 1)
    per_rank = " ".join(f"{rank.bubble_fraction:.3f}" for rank in simulation.ranks)
    lines = [f"simulated       {_MODES[True]}"] if overlapped else []
    lines += [
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


def _zero_bubble_summary(simulation: Simulation, *, overlapped: bool) -> str:
    p, v, m = simulation.p, simulation.v, simulation.m
    total = m * v
    formula = _zero_bubble_step_time(simulation)
    work = _per_microbatch(simulation)
    # The formula is exact only where ZERO_BUBBLE.md verified it; elsewhere say why it may differ.
    caveats = [
        text for text, holds in (
            ("the overlapped mode's formula", overlapped),
            ("exact for m >= p only", m >= p),
            ("latency not counted", not simulation.cost.latency),
        ) if not holds
    ]
    caveat = f"; {', '.join(caveats)}" if caveats else ""
    bubble = 1 - m * work / formula if formula else Fraction(0)
    idle = formula / (m * work) - 1 if work else Fraction(0)
    per_rank = " ".join(f"{rank.bubble_fraction:.3f}" for rank in simulation.ranks)
    warmups = [_zero_bubble_warmup(simulation, rank.rank) for rank in simulation.ranks]
    live = " ".join(str(rank.peak_live_activations) for rank in simulation.ranks)
    awaiting = " ".join(str(rank.peak_awaiting_backward) for rank in simulation.ranks)
    live_formula = " ".join(str(min(w + 1 + r, total)) for r, w in enumerate(warmups))
    awaiting_formula = " ".join(str(min(w + 1, total)) for w in warmups)
    lines = [
        f"simulated       {_MODES[overlapped]}",
        (
            f"step time       {float(simulation.step_time):g}   (formula m·(tf + tb + tw) + "
            f"(p - 1)·max(tf, tb, tf + tb - tw)/v = {float(formula):g}{caveat})"
        ),
        (
            f"bubble fraction {simulation.bubble_fraction:.4f}   (formula 1 - m·(tf + tb + tw)/step = "
            f"{float(bubble):.4f}; idle over compute {float(simulation.idle_over_busy):.4f}, formula "
            f"(p - 1)·max(tf, tb, tf + tb - tw)/(v·m·(tf + tb + tw)) = {float(idle):.4f})"
        ),
        f"  per rank      {per_rank}",
        f"peak live activations per rank (held until W) {live}   (plan's min(W0 + 1 + r, m·v): {live_formula})",
        f"peak awaiting backward per rank (until I)     {awaiting}   (plan's min(W0 + 1, m·v): {awaiting_formula})",
    ]
    if any(t.action.kind == "W" and t.end == t.start for rank in simulation.ranks for t in rank.actions):
        # A zero-time action has no width in the grid or the picture.
        lines.append("(the W passes take no time here and are not drawn; give them time with --tw)")
    return "\n".join(lines)


def save_png(simulation: Simulation, *, path: str, title: str | None = None, time_unit: str | None = None) -> None:
    """Write the timeline as a PNG: one row per rank, forwards blue, whole backwards orange,
    input-gradient backwards purple and weight-gradient passes green, darker for later chunks,
    each box labelled with its microbatch; a legend names the kinds drawn. Needs matplotlib (the
    ``plot`` extra).

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

    def shade(kind: str, chunk: int) -> tuple[float, float, float, float]:
        # Stay inside the colour map's middle so labels stay readable on every shade.
        level = 0.35 + (0.4 * chunk / (v - 1) if v > 1 else 0.2)
        return colormaps[_COLOURS[kind]](level)

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
            if length > 0:  # a zero-time action has no box to label
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
        + (" zero bubble" if _is_zero_bubble(simulation) else "")
        + f": step time {step_time:g}{'' if time_unit is None else ' ' + time_unit}, bubble {simulation.bubble_fraction:.1%}"
    )
    ax.set_title(default_title if title is None else title, fontsize=10)
    drawn = {t.action.kind for rank in simulation.ranks for t in rank.actions}
    kinds = [kind for kind in _COLOURS if kind in drawn] or ["F"]
    handles = [
        Patch(color=shade(kind, chunk), label=_NAMES[kind] + (f" chunk {chunk}" if v > 1 else ""))
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
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b",
                        help="1f1b (plain or interleaved) or zero-bubble (backwards split into I and W)")
    parser.add_argument("--p", type=int, required=True, help="pipeline ranks")
    parser.add_argument("--v", type=int, default=1, help="chunks per rank (1: plain 1F1B)")
    parser.add_argument("--m", type=int, required=True, help="microbatches per step")
    parser.add_argument("--group-size", type=int, default=None, help="microbatches per chunk group (interleaved)")
    parser.add_argument("--forward-only", action="store_true", help="no backward passes")
    parser.add_argument("--tf", type=Fraction, default=Fraction(1), help="forward time of a microbatch on one rank")
    parser.add_argument("--tb", type=Fraction, default=Fraction(2),
                        help="backward time of a microbatch on one rank (its input-gradient half when --tw is given)")
    parser.add_argument("--tw", type=Fraction, default=Fraction(0),
                        help="weight-gradient time of a microbatch on one rank (a whole backward takes tb + tw)")
    parser.add_argument("--latency", type=Fraction, default=Fraction(0), help="time of one message between ranks")
    parser.add_argument("--overlapped", action=argparse.BooleanOptionalAction, default=None,
                        help="simulate the overlapped mode (receives posted ahead) or, with --no-overlapped, the "
                             "batched one; default: overlapped for zero-bubble, batched for 1f1b")
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
        if args.tw < 0:
            raise ValueError(f"--tw must be >= 0, got --tw {args.tw}; pass 0 or a positive time")
        if args.latency < 0:
            raise ValueError(f"--latency must be >= 0, got --latency {args.latency}; pass 0 or a positive time")
        plans = build_pipeline(
            p=args.p, v=args.v, m=args.m, forward_only=args.forward_only, group_size=args.group_size, schedule=args.schedule,
        )
        # Each schedule is simulated in the mode it runs in unless told otherwise: zero bubble's
        # weight passes fill the waits of the overlapped mode, 1F1B runs batched.
        overlapped = args.schedule == "zero-bubble" if args.overlapped is None else args.overlapped
        cost = CostModel(tf=args.tf, tb=args.tb, tw=args.tw, latency=args.latency)
        simulation = simulate(plans, cost=cost, overlapped=overlapped)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(render_timeline(simulation))
    print()
    print(render_summary(simulation, overlapped=overlapped))
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
