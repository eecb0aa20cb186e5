"""deallocate_pipeline_outputs, the bytes a rank holds, backward from a released output, and the
profiler ranges, on one process (a pipeline of one rank; the gloo cases are in test_schedules_gloo)."""

import numpy as np
import pytest
import torch

import pipeschedule as ps
from cases import Case, reference
from pipeschedule.runtime.executor import run_backward
from pipeschedule.runtime.memory import held_bytes, release_output
from pipeschedule.tools.trace import TraceRecorder
from test_hooks import run


@pytest.mark.parametrize(
    ("name", "last_op", "freed"),
    [
        ("add", lambda h: h + 1.0, True),  # saves nothing: the data goes
        ("mul", lambda h: h * h, True),  # saves its inputs, not its result
        ("tanh", torch.tanh, False),  # saves its result: autograd keeps the data, gradient exact
        ("sigmoid", torch.sigmoid, False),
    ],
)
def test_release_output_keeps_the_gradient_exact_and_frees_what_autograd_does_not_hold(name, last_op, freed):
    from torch.multiprocessing.reductions import StorageWeakRef

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 4, dtype=torch.float64)
    (want,) = torch.autograd.grad(last_op(x @ torch.eye(4, dtype=torch.float64)), x, grad)
    out = last_op(x @ torch.eye(4, dtype=torch.float64))
    storage = StorageWeakRef(out.untyped_storage())
    assert release_output(out)
    assert out.numel() == 1 and out.grad_fn is not None
    assert storage.expired() == freed
    run_backward(out, grad)
    assert torch.equal(x.grad, want)


def test_release_output_leaves_views_and_one_element_outputs_alone():
    x = torch.randn(4, 4, requires_grad=True)
    view = (x * 2).view(16)
    assert not release_output(view) and view.numel() == 16
    loss = (x * 2).sum()
    assert not release_output(loss)


def test_run_backward_checks_the_gradient_against_the_shape_the_output_had():
    x = torch.randn(3, 4, requires_grad=True)
    out = x * 2
    release_output(out)
    with pytest.raises(RuntimeError, match="shape"):
        run_backward(out, torch.ones(4, 3))
    with pytest.raises(RuntimeError, match="one-element"):
        run_backward(x * 2, None)


def test_held_bytes_counts_each_storage_once():
    a = torch.zeros(10, dtype=torch.float32)
    b = a[2:5]  # same storage
    c = torch.zeros(3, dtype=torch.float64)
    assert held_bytes([a, b, None, c]) == 40 + 24
    assert held_bytes([]) == 0


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved"])
def test_deallocation_on_one_process_gives_the_reference_gradients_with_fewer_bytes_held(schedule):
    v = 3 if schedule == "interleaved" else 1
    case = Case(schedule, p=1, v=v, m=5, seed=3)
    peaks = {}
    for deallocate in (False, True):
        recorder = TraceRecorder(held_bytes=True)
        out, chunks = run(schedule, case, {"deallocate_pipeline_outputs": deallocate, "observer": recorder})
        ref = reference(case)
        assert [d["loss"].item() for d in out] == ref["losses"]
        for chunk in chunks:
            for got, want in zip((p.grad.numpy() for p in chunk.parameters()), ref["grads"][chunk.stage]):
                assert np.max(np.abs(got - want)) <= 1e-12
        (peaks[deallocate],) = recorder.gather().peak_held_bytes()
    if schedule == "interleaved":
        # One rank runs all three stages: the outputs of stages 0 and 1 wait for their backward.
        assert peaks[True] < peaks[False]
    else:
        # A single stage's output is the loss, which is never released.
        assert peaks[True] == peaks[False]


def test_the_trace_keeps_held_bytes_only_when_asked():
    case = Case("interleaved", p=1, v=2, m=3)
    plain, counting = TraceRecorder(), TraceRecorder(held_bytes=True)
    run("interleaved", case, {"observer": plain})
    run("interleaved", case, {"observer": counting})
    assert plain.gather().peak_held_bytes() == [None]
    trace = counting.gather()
    assert all(e.held_bytes is not None and e.held_bytes >= 0 for e in trace.ranks[0] if e.kind != "X")
    counters = [e for e in trace.to_chrome_trace()["traceEvents"] if e["ph"] == "C"]
    assert len(counters) == 2 * case.v * case.m
    assert max(c["args"]["bytes"] for c in counters) == trace.peak_held_bytes()[0] > 0


def test_each_action_is_a_profiler_range_when_a_profiler_records():
    case = Case("interleaved", p=1, v=2, m=3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run("interleaved", case, {})
    names = [e.name for e in prof.events() if e.name.startswith("pipeschedule.")]
    plan = ps.build_plan(p=1, r=0, v=2, m=3)
    assert sorted(names) == sorted(f"pipeschedule.{a.label(2)}" for a in plan.actions)
