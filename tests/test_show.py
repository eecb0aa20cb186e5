"""The command line of ``python -m pipeschedule.tools.show``: the grid, the summary, errors and the PNG."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

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
