"""``scripts/bench.py``: its floor does the same work as our schedules, and the script runs end to end.

The figures themselves are not checked here (they are timings); what is checked is that every row
computes the same step, so that comparing their times means something.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_cases import bench_contenders
from pool import JobError

from pipeschedule.plan.check import peak_live_activations
from pipeschedule.plan import build_pipeline

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.mark.parametrize(("v", "m"), [(1, 6), (2, 8)])
def test_the_floor_computes_the_step_our_schedules_compute(pool, v, m):
    results = pool.run(bench_contenders, (v, m), timeout=90)
    errors = [out for out in results.values() if isinstance(out, JobError)]
    assert not errors, errors[0].traceback
    plans = build_pipeline(p=4, v=v, m=m)
    for rank, out in results.items():
        grads = out["batched"]["grads"]
        assert all(g.abs().sum() > 0 for g in grads), rank  # the step reached every chunk
        for name in ("overlap", "floor"):
            assert all(torch.equal(a, b) for a, b in zip(grads, out[name]["grads"], strict=True)), (rank, name)
        # Activations held at once, counted inside the chunks: the plan's figure, for every contender.
        assert {out[name]["peak"] for name in out} == {peak_live_activations(plans[rank])}, (rank, out)


def test_the_script_runs_and_prints_every_row():
    args = ["--mode", "both", "--tf", "1", "--tb", "2", "--v", "1", "2", "--m", "4", "--reps", "2", "--zero-reps", "2",
            "--warmup", "1", "--timeout", "150", "--p2p-timeout", "60"]
    proc = subprocess.Popen([sys.executable, str(_SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and the workers it spawned
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    for name in ("pipeschedule ", "pipeschedule+overlap", "torch.pipelining", "floor (raw gloo)"):
        # Two configurations in each of the two tables.
        assert sum(line.startswith(name) for line in stdout.splitlines()) == 4, (name, stdout)
    assert "/floor" in stdout and "critical path of the last measured" in stdout and "stage inputs and outputs held" in stdout
