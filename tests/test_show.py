"""The command line of ``python -m pipeschedule.tools.show``: the grid, the summary, errors and the PNG."""

from __future__ import annotations

import re
import runpy
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from pipeschedule.plan import build_pipeline
from pipeschedule.plan.check import peak_awaiting_backward, peak_live_activations
from pipeschedule.tools.show import main


def _rows(out: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^rank (\d+) \|(.*)\|$", out, flags=re.MULTILINE)}


def test_1f1b_grid_cells_in_plan_order(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--p", "2", "--m", "2", "--tf", "1", "--tb", "1"]) == 0
    rows = _rows(capsys.readouterr().out)
    # Three columns per time unit: rank 1 idles for one forward, then rank 0 waits for each
    # gradient, and rank 1 idles after its last backward while rank 0 finishes (step time 6).
    assert rows == {
        0: "F0 F1 ...B0 ...B1 ",
        1: "...F0 B0 F1 B1 ...",
    }


def test_interleaved_grid_order_and_start_times(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--p", "2", "--v", "2", "--m", "2", "--tf", "2", "--tb", "2"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert re.findall(r"[FB]\d\.\d", rows[0]) == ["F0.0", "F1.0", "F0.1", "F1.1", "B0.1", "B1.1", "B0.0", "B1.0"]
    assert re.findall(r"[FB]\d\.\d", rows[1]) == ["F0.0", "F1.0", "F0.1", "B0.1", "F1.1", "B1.1", "B0.0", "B1.0"]
    # Each chunk takes 1 time unit = 5 columns; rank 1 starts one chunk-forward late.
    assert rows[1].startswith(".....F0.0 F1.0 ")
    assert rows[0].index("F0.1") == 10
    assert "step time       10   (formula (m + (p - 1)/v)·(tf + tb) = 10)" in out
    assert "peak live activations per rank 4 3   (plan's min(W + 1, m·v): 4 3)" in out


def test_summary_reports_step_time_and_bubble_against_formula(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--p", "4", "--v", "2", "--m", "8"]) == 0
    out = capsys.readouterr().out
    assert "step time       28.5   (formula (m + (p - 1)/v)·(tf + tb) = 28.5)" in out
    assert "bubble fraction 0.1579   (formula (p - 1)/(v·m + p - 1) = 0.1579" in out
    assert "formula (p - 1)/(v·m) = 0.1875" in out
    assert "peak live activations per rank 11 9 7 5" in out


def test_forward_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--p", "3", "--m", "3", "--forward-only"]) == 0
    out = capsys.readouterr().out
    assert "B" not in "".join(_rows(out).values())
    assert "step time       5   (formula (m + p - 1)·tf = 5)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--p", "4", "--v", "2", "--m", "3"], "needs at least as many microbatches as pipeline ranks"),
        (["--p", "2", "--v", "2", "--m", "5", "--group-size", "7"], "microbatch_group_size_per_vp_stage=7 is outside"),
        (["--p", "0", "--m", "3"], "--p must be an integer >= 1, got 0"),
        (["--p", "2", "--m", "3", "--tb", "0"], "--tf and --tb must be > 0"),
    ],
)
def test_bad_arguments_exit_2_with_the_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_module_runs_as_a_script(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process stand-in for `python -m pipeschedule.tools.show ...`: same __main__ path, no new interpreter.
    monkeypatch.delitem(sys.modules, "pipeschedule.tools.show", raising=False)  # as a fresh `-m` run
    monkeypatch.setattr(sys, "argv", ["pipeschedule.tools.show", "--p", "4", "--v", "2", "--m", "3"])
    with pytest.raises(SystemExit) as caught:
        runpy.run_module("pipeschedule.tools.show", run_name="__main__", alter_sys=True)
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith("error: the interleaved schedule needs")


def test_png_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "timeline.png"
    assert main(["--p", "3", "--v", "2", "--m", "6", "--png", str(target)]) == 0
    data = target.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > height > 100
    assert f"wrote {target}" in capsys.readouterr().out


# Zero bubble: F, I and W cells, the overlapped mode by default, its step-time formula and both peaks.


def _zero_bubble_formula(p: int, v: int, m: int, tf: Fraction, tb: Fraction, tw: Fraction) -> Fraction:
    return m * (tf + tb + tw) + Fraction(p - 1, v) * max(tf, tb, tf + tb - tw)


def _figures(out: str, line: str) -> list[list[int]]:
    """The numbers a summary line shows per rank, and those it shows for the plan's formula."""
    found = re.search(rf"^{re.escape(line)} +([\d ]+?)   \(plan's [^:]+: ([\d ]+)\)$", out, flags=re.MULTILINE)
    assert found, out
    return [[int(x) for x in group.split()] for group in found.groups()]


@pytest.mark.parametrize(
    ("p", "v", "m", "tf", "tb", "tw"),
    [
        (4, 1, 8, "1", "1", "1"), (4, 2, 8, "1", "2", "1"), (3, 2, 5, "2", "1", "1"),
        (2, 3, 4, "1", "3/2", "1/2"), (5, 1, 5, "1", "2", "3"),
    ],
)
def test_zero_bubble_summary_matches_the_formulas(
    p: int, v: int, m: int, tf: str, tb: str, tw: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--schedule", "zero-bubble", "--p", str(p), "--v", str(v), "--m", str(m), "--tf", tf, "--tb", tb, "--tw", tw]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "simulated       overlapped mode" in out
    formula = re.escape("(formula m·(tf + tb + tw) + (p - 1)·max(tf, tb, tf + tb - tw)/v = ")
    found = re.search(rf"^step time       (\S+)   {formula}(\S+)\)$", out, flags=re.MULTILINE)
    assert found, out
    expected = _zero_bubble_formula(p, v, m, Fraction(tf), Fraction(tb), Fraction(tw))
    # Printed with 6 significant digits, so the two must read alike.
    assert found.group(1) == found.group(2) and float(found.group(1)) == pytest.approx(float(expected), rel=1e-5)
    # Both memory peaks, against SCHEDULES.md's formulas computed here and the plan's own count.
    plans = build_pipeline(p=p, v=v, m=m, schedule="zero-bubble")
    total, g = m * v, plans[0].group_size
    warmups = [min(p - r - 1, m) if v == 1 else min((v - 1) * g + p - r - 1, total) for r in range(p)]
    live, live_formula = _figures(out, "peak live activations per rank (held until W)")
    awaiting, awaiting_formula = _figures(out, "peak awaiting backward per rank (until I)")
    assert live == live_formula == [min(w + 1 + r, total) for r, w in enumerate(warmups)]
    assert live == [peak_live_activations(plan) for plan in plans]
    assert awaiting == awaiting_formula == [min(w + 1, total) for w in warmups]
    assert awaiting == [peak_awaiting_backward(plan) for plan in plans]
    # Every forward, input-gradient and weight-gradient pass has its cell; no whole backward.
    rows = _rows(out)
    cell = r"[FIWB]\d+" if v == 1 else r"[FIWB]\d+\.\d+"
    for r, row in rows.items():
        kinds = [c[0] for c in re.findall(cell, row)]
        assert [kinds.count(k) for k in "FIWB"] == [total, total, total, 0], (r, row)
        assert [c for c in re.findall(cell, row)] == [a.label(v) for a in plans[r].actions]


def test_zero_bubble_cells_start_at_their_simulated_times(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--schedule", "zero-bubble", "--p", "2", "--m", "2", "--tf", "1", "--tb", "1", "--tw", "1"]) == 0
    rows = _rows(capsys.readouterr().out)
    # Three columns a time unit. Rank 1 starts a forward late; rank 0's weight pass W0 runs while
    # rank 1 computes I1, whose gradient rank 0's I1 needs, so rank 0 never waits once gradients flow.
    assert rows == {
        0: "F0 F1 ...I0 W0 I1 W1 ",
        1: "...F0 I0 F1 I1 W0 W1 ",
    }


def test_zero_bubble_batched_mode_is_named_and_slower(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--schedule", "zero-bubble", "--p", "4", "--v", "2", "--m", "8", "--tf", "1", "--tb", "1", "--tw", "1"]
    assert main(argv + ["--no-overlapped"]) == 0
    out = capsys.readouterr().out
    assert "simulated       batched mode" in out
    found = re.search(r"^step time       (\S+)   \(formula .* = (\S+); the overlapped mode's formula\)$", out, flags=re.MULTILINE)
    assert found, out
    assert float(found.group(1)) > float(found.group(2)) == 25.5


def test_zero_bubble_caveats_and_weight_passes_of_no_time(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--schedule", "zero-bubble", "--p", "4", "--m", "2", "--latency", "1/4"]) == 0
    out = capsys.readouterr().out
    assert "; exact for m >= p only, latency not counted)" in out
    # With the default --tw 0 the weight passes take no time: no cell, and a line saying so.
    assert "W" not in "".join(_rows(out).values()) and "I0" in _rows(out)[0]
    assert "(the W passes take no time here and are not drawn; give them time with --tw)" in out


def test_1f1b_with_weight_time_and_the_overlapped_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--p", "4", "--v", "2", "--m", "8", "--tb", "1", "--tw", "1", "--overlapped"]) == 0
    out = capsys.readouterr().out
    assert "simulated       overlapped mode" in out
    # A whole backward costs tb + tw.
    assert "step time       28.5   (formula (m + (p - 1)/v)·(tf + tb + tw) = 28.5)" in out
    assert "peak live activations per rank 11 9 7 5   (plan's min(W + 1, m·v): 11 9 7 5)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--schedule", "zero-bubble", "--p", "2", "--m", "3", "--tw", "-1"], "--tw must be >= 0, got --tw -1"),
        (["--schedule", "zero-bubble", "--p", "2", "--m", "3", "--latency=-1/2"], "--latency must be >= 0, got --latency -1/2"),
        (["--schedule", "zero-bubble", "--p", "4", "--v", "2", "--m", "3"],
         "needs at least as many microbatches as pipeline ranks"),
        (["--schedule", "zero-bubble", "--p", "2", "--m", "3", "--tf", "0"], "--tf and --tb must be > 0"),
    ],
)
def test_bad_zero_bubble_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err and captured.out == ""


def test_unknown_schedule_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--schedule", "zb", "--p", "2", "--m", "2"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    # Python versions differ in whether they quote the choices.
    assert "argument --schedule: invalid choice: 'zb' (choose from " in err and "1f1b" in err and "zero-bubble" in err


def _has_colour(pixels: Any, colour: tuple[float, ...]) -> bool:
    return bool((abs(pixels[..., :3] - colour[:3]).max(axis=-1) < 0.02).any())


def test_zero_bubble_png_draws_each_kind_in_its_colour(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib import colormaps, image

    shade = 0.55  # the single chunk's level in save_png
    maps = {"F": "Blues", "B": "Oranges", "I": "Purples", "W": "Greens"}
    colours = {kind: colormaps[name](shade) for kind, name in maps.items()}
    drawn = {}
    for schedule in ("zero-bubble", "1f1b"):
        target = tmp_path / f"{schedule}.png"
        assert main(["--schedule", schedule, "--p", "3", "--m", "6", "--tb", "1", "--tw", "1", "--png", str(target)]) == 0
        assert f"wrote {target}" in capsys.readouterr().out
        assert target.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        pixels = image.imread(str(target))
        drawn[schedule] = {kind for kind, colour in colours.items() if _has_colour(pixels, colour)}
    # The boxes and the legend: F, I, W for zero bubble; F and B (as before) for 1F1B.
    assert drawn == {"zero-bubble": {"F", "I", "W"}, "1f1b": {"F", "B"}}
