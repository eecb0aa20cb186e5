"""The schedules on real gloo process groups: exact gradients and the planned order, per rank."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases import BATCH, HIDDEN, SEQ, Case, reference, run_case
from pool import JobError

from pipeschedule.plan import build_plan

GROUP_FOR_P = {2: ["0-1", "2-3"], 3: ["1-3", "0-2"], 4: ["all"]}


@st.composite
def cases(draw):
    p = draw(st.integers(2, 4))
    schedule = draw(st.sampled_from(["1f1b", "interleaved"]))
    v = draw(st.integers(2, 3)) if schedule == "interleaved" else 1
    m = draw(st.integers(p if v > 1 else 1, 12))
    group_size = None
    if v > 1 and draw(st.booleans()):
        group_size = draw(st.sampled_from([g for g in range(p, m + 1) if m % g == 0 or m % g >= p]))
    return Case(
        schedule=schedule, p=p, v=v, m=m, group=draw(st.sampled_from(GROUP_FOR_P[p])),
        forward_only=draw(st.booleans()), loss_arity=draw(st.sampled_from([2, 3])), per_token=draw(st.booleans()),
        group_size=group_size, seed=draw(st.integers(0, 1000)), overlap=draw(st.booleans()),
        deallocate=draw(st.booleans()), recv_window=draw(st.integers(2, 2 * m + 3)),
    )


def check_against_reference(case, results, *, exact: bool = False):
    """``exact``: every gradient bit for bit equal to the reference's (else within 1e-12)."""
    errors = {rank: out for rank, out in results.items() if isinstance(out, JobError)}
    assert not errors, next(iter(errors.values())).traceback
    ran = [out for out in results.values() if out is not None]
    assert sorted(out["group_rank"] for out in ran) == list(range(case.p))
    ref = reference(case)
    for out in ran:
        r = out["group_rank"]
        # Losses only on the last stage, equal to the reference's bit for bit.
        assert out["losses"] == (ref["losses"] if r == case.p - 1 else [])
        # The actions that ran, with their phases, are exactly the plan's.
        plan = build_plan(
            p=case.p, r=r, v=case.v, m=case.m, forward_only=case.forward_only, group_size=case.group_size,
            schedule="zero-bubble" if case.schedule == "zero-bubble" else "1f1b",
        )
        assert out["actions"] == [(a.kind, a.microbatch, a.chunk, a.phase) for a in plan.actions]
        if case.forward_only:
            assert out["grads"] == {}
            continue
        assert sorted(out["grads"]) == [c * case.p + r for c in range(case.v)]
        for stage, grads in out["grads"].items():
            for got, want in zip(grads, ref["grads"][stage], strict=True):
                if exact:
                    assert np.array_equal(got, want), (stage, got - want)
                else:
                    assert np.max(np.abs(got - want)) <= 1e-12, (stage, got, want)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_exact_gradients_and_planned_order(pool, case):
    check_against_reference(case, pool.run(run_case, case))


@pytest.mark.parametrize(
    "case",
    [
        Case("interleaved", p=2, v=2, m=4, group="2-3"),  # p = 2: both neighbours are one rank
        Case("interleaved", p=2, v=3, m=5, group="0-1"),  # p = 2 with G = 5 > p
        Case("interleaved", p=4, v=2, m=8),  # the classic setting
        Case("interleaved", p=4, v=3, m=6, loss_arity=3),  # m % p != 0, per-microbatch token mean
        Case("interleaved", p=4, v=3, m=6, loss_arity=3, per_token=True),  # per-token loss over the step
        Case("1f1b", p=3, v=1, m=5, group="1-3", loss_arity=3, per_token=True),
        Case("interleaved", p=3, v=2, m=3, group="1-3"),  # m == p
        Case("1f1b", p=4, v=1, m=1),  # fewer microbatches than ranks
        Case("1f1b", p=4, v=1, m=7, forward_only=True),
        Case("interleaved", p=2, v=2, m=4, group="0-1", overlap=True),
        Case("interleaved", p=2, v=3, m=5, group="2-3", overlap=True, loss_arity=3, per_token=True),
        Case("interleaved", p=4, v=2, m=16, overlap=True),
        Case("interleaved", p=4, v=3, m=6, overlap=True),
        Case("1f1b", p=3, v=1, m=5, group="1-3", overlap=True),
        Case("interleaved", p=4, v=2, m=8, deallocate=True),
        Case("interleaved", p=2, v=3, m=5, group="0-1", overlap=True, deallocate=True, loss_arity=3),
        Case("1f1b", p=4, v=1, m=6, overlap=True, deallocate=True),
        Case("interleaved", p=4, v=2, m=8, overlap=True, recv_window=2),
        Case("1f1b", p=4, v=1, m=6, overlap=True, recv_window=64),
    ],
    ids=lambda c: f"{c.schedule}-p{c.p}-v{c.v}-m{c.m}-{c.group}" + (f"-overlap{c.recv_window}" if c.overlap else "") + ("-dealloc" if c.deallocate else ""),
)
def test_named_configurations(pool, case):
    check_against_reference(case, pool.run(run_case, case))


def test_get_forward_backward_func_follows_the_group(pool):
    from cases import chosen_schedules

    results = pool.run(chosen_schedules, None)
    plain, interleaved = "forward_backward_pipelining_without_interleaving", "forward_backward_pipelining_with_interleaving"
    for rank, picked in results.items():
        assert not isinstance(picked, JobError), picked
        for group in picked:
            assert picked[group] == [plain, plain, interleaved]


@pytest.mark.parametrize("overlap", [False, True], ids=["batched", "overlap"])
def test_deallocated_outputs_lower_the_bytes_held_on_every_sending_rank(pool, overlap):
    """Stage outputs wait for their backward with one element of data instead of the whole activation."""
    peaks = {}
    for deallocate in (False, True):
        case = Case("interleaved", p=4, v=2, m=8, overlap=overlap, deallocate=deallocate)
        results = pool.run(run_case, case)
        check_against_reference(case, results)
        peaks[deallocate] = {out["group_rank"]: out["peak_held_bytes"] for out in results.values()}
    # At the peak, 5-11 chunk-microbatches wait for their backward on each rank (the plan's peak
    # live activations); each holds its input and, without deallocation, its output of
    # SEQ x BATCH x HIDDEN float64 (the last stage's output is a loss, and not released).
    activation = SEQ * BATCH * HIDDEN * 8
    for r in range(4):
        assert peaks[False][r] - peaks[True][r] >= 2 * activation, (r, peaks)


def test_the_receive_window_bounds_the_buffers_posted_ahead(pool):
    """The last rank of 1F1B receives one activation per step; it holds what it has posted for."""
    activation = SEQ * BATCH * HIDDEN * 8
    peaks = {}
    for window in (2, 4, 12):
        case = Case("1f1b", p=4, v=1, m=12, overlap=True, recv_window=window)
        results = pool.run(run_case, case)
        check_against_reference(case, results)
        peaks[window] = {out["group_rank"]: out["peak_held_bytes"] for out in results.values()}
    for r in range(4):
        assert peaks[2][r] < peaks[4][r] < peaks[12][r], (r, peaks)
    # Window 2: at most exchanges i+1..i+3 posted, which carry two activations on the last rank (a
    # receive every other step), plus the input of the microbatch in flight, plus its 8-byte loss.
    assert peaks[2][3] <= 3 * activation + 8, peaks
    # Window 12: exchanges 0..13 are posted before the first action, seven of which carry one.
    assert peaks[12][3] >= 7 * activation, peaks
