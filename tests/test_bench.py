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
from bench_cases import bench_contenders, bench_zb_contenders
from pool import JobError

from pipeschedule.plan.check import peak_awaiting_backward, peak_live_activations
from pipeschedule.plan import build_pipeline
from pipeschedule.plan.simulate import CostModel, simulate

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


def _run_script(args: list[str], timeout: float) -> str:
    proc = subprocess.Popen([sys.executable, str(_SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and the workers it spawned
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def test_the_script_runs_and_prints_every_row():
    args = ["--mode", "both", "--tf", "1", "--tb", "2", "--v", "1", "2", "--m", "4", "--reps", "2", "--zero-reps", "2",
            "--warmup", "1", "--timeout", "150", "--p2p-timeout", "60"]
    stdout = _run_script(args, timeout=200)
    for name in ("pipeschedule ", "pipeschedule+overlap", "torch.pipelining", "floor (raw gloo)"):
        # Two configurations in each of the two tables.
        assert sum(line.startswith(name) for line in stdout.splitlines()) == 4, (name, stdout)
    assert "/floor" in stdout and "critical path of the last measured" in stdout and "stage inputs and outputs held" in stdout


def _bench() -> object:
    sys.path.insert(0, str(_SCRIPT.parent))
    import bench

    return bench


@pytest.mark.parametrize("costs", [(5.0, 5.0, 5.0), (5.0, 6.0, 4.0), (5.0, 10.0, 0.0), (2.0, 7.0, 3.0)])
@pytest.mark.parametrize("m", [8, 16])
def test_the_zero_bubble_formula_is_the_simulated_step(costs, m):
    bench = _bench()
    tf, tb, tw = costs
    setup = bench.ZbSetup(m=m, tf=tf, tb=tb, tw=tw)
    for entry in bench._lineup():
        if entry.family == "zb":
            plans = build_pipeline(p=4, v=entry.v, m=m, schedule="zero-bubble")
            sim = simulate(plans, cost=CostModel(tf=tf, tb=tb, tw=tw), overlapped=True)
        elif entry.family in ("1f1b", "floor-1f1b"):
            sim = simulate(build_pipeline(p=4, v=entry.v, m=m), cost=CostModel(tf=tf, tb=tb + tw))
        else:
            continue
        assert float(sim.step_time) == pytest.approx(bench._formula(entry, setup)), entry.name


def test_the_split_sleep_model_splits_its_backward():
    """A whole backward sleeps tb + tw; the autograd split's I sleeps tb and W tw; deferred, backward_dw() does W."""
    bench = _bench()
    from pipeschedule.runtime.split import AutogradSplit, ModuleSplit

    meter = bench.Meter()
    chunk = bench.SplitSleepChunk(meter=meter, tf=0.0, tb=0.02, tw=0.01)
    x = torch.randn(1, 16, 64, requires_grad=True)
    for split in (AutogradSplit(["chunk 0"]), ModuleSplit([chunk])):
        chunk.defer = split.name == "module"
        chunk.zero_grad(set_to_none=True)
        out = chunk(x)
        assert (meter.live, meter.awaiting) == (1, 1)
        pending = split.input_pass(x, out, torch.ones_like(out), 0)
        assert (meter.live, meter.awaiting) == (1, 0), split.name  # I done, W pending
        before = meter.compute
        split.weight_pass(pending, 0)
        assert meter.live == 0 and 0.009 < meter.compute - before < 0.05, split.name
        assert torch.equal(chunk.bias.grad, torch.full((64,), 16.0)), split.name
    assert meter.pending == 0 and not chunk.queue


def test_our_zero_bubble_contenders_compute_one_process_gradients(pool):
    m = 8
    results = pool.run(bench_zb_contenders, m, timeout=120)
    errors = [out for out in results.values() if isinstance(out, JobError)]
    assert not errors, errors[0].traceback
    zb = [build_pipeline(p=4, v=v, m=m, schedule="zero-bubble") for v in (1, 2)]
    whole = [build_pipeline(p=4, v=v, m=m) for v in (1, 2)]
    for rank, out in results.items():
        for name, got in out.items():
            assert got["unequal"] == 0, (rank, name, got)  # bit for bit one process's gradients
            v = 2 if " v2" in name else 1
            plans = whole[v - 1] if name.startswith(("ours 1F1B", "ours interleaved", "floor 1F1B", "floor interleaved")) else zb[v - 1]
            assert got["fw"] == peak_live_activations(plans[rank]), (rank, name, got)
            if rank:  # rank 0's first stage has no input to split: its I is done inside W
                assert got["fi"] == peak_awaiting_backward(plans[rank]), (rank, name, got)
            # Only the deferred weight halves are counted in a timed step: the queued bias gradients.
            assert (got["queued"] > 0) == (" module" in name), (rank, name, got)


def test_the_zero_bubble_mode_runs_and_prints_every_row():
    bench = _bench()
    args = ["--mode", "zb", "--m", "8", "--zb-costs", "1,1,1", "0,0,0", "--reps", "1", "--warmup", "1",
            "--timeout", "240", "--p2p-timeout", "60"]
    stdout = _run_script(args, timeout=300)
    assert "self-test, one process" in stdout and "targets" in stdout, stdout
    lines = stdout.splitlines()
    for entry in bench._lineup():
        rows = [line for line in lines if line[:27].rstrip() == entry.name]  # the name column is 27 wide
        assert len(rows) == 2, (entry.name, stdout)  # one per cost setting
        if entry.family != "torch":
            assert all(row.split()[-1] == "exact" for row in rows), rows
