"""``scripts/split_cost.py``: it measures the split it names, and the split it times is exact."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "split_cost.py"


def _script():
    spec = importlib.util.spec_from_file_location("split_cost", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_it_times_an_exact_split_and_counts_what_w_holds():
    script = _script()
    # measure raises on any gradient of the split that differs from the whole backward's.
    one, two = (script.measure(8, layers, seq=4, batch=2, dtype=torch.float64, reps=2, warmup=0) for layers in (1, 2))
    # W makes one engine call per group of weights: every layer has the same groups.
    assert one["calls"] > 1 and two["calls"] == 2 * one["calls"], (one, two)
    for result in (one, two):
        assert 0 < result["captured"] < result["saved"], result
        assert all(result[key] > 0 for key in ("whole", "I", "W", "I+W", "input only")), result
    assert two["saved"] > one["saved"] and two["captured"] == 2 * one["captured"], (one, two)


def test_the_command_line_prints_a_row_per_size(capsys, monkeypatch):
    script = _script()
    monkeypatch.setattr(sys, "argv", ["split_cost.py", "--sizes", "8x1", "12x2", "--seq", "4", "--batch", "1",
                                      "--reps", "1", "--warmup", "0", "--dtype", "float64"])
    script.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["8x1", "12x2"], lines


@pytest.mark.parametrize("bad", ["8", "7x2", "8x0", "axb"])
def test_a_bad_size_says_what_a_size_is(bad, capsys, monkeypatch):
    script = _script()
    monkeypatch.setattr(sys, "argv", ["split_cost.py", "--sizes", bad])
    with pytest.raises(SystemExit):
        script.main()
    assert "HIDDEN" in capsys.readouterr().err
