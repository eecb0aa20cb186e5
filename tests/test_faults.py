"""Fault injection on real gloo groups: every surviving rank raises, naming the failed rank, in bounded time.

Each job runs on a process group made for it (``fresh_group``), because a failed step leaves its
group with unmatched messages; the pool's own groups stay usable. A killed worker is replaced by
the pool on the next job.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases import Case, fault_time_file, run_case, run_fault_case
from pool import GROUPS, JobError
from test_schedules_gloo import GROUP_FOR_P

from pipeschedule.plan import build_plan

TIMEOUT = 3.0  # config.p2p_timeout of these tests
SLACK = 2.0  # scheduling noise on a shared two-core machine


def must_hear(case: Case, failed: int, step_index: int) -> set[int]:
    """Group ranks that expect a message the failed rank would have sent at or after ``step_index``."""
    plan = build_plan(p=case.p, r=failed, v=case.v, m=case.m, group_size=case.group_size)
    later = [msg for step in plan.steps[step_index:] for msg in step.exchange.sends]
    return {msg.dst_stage % case.p for msg in later} - {failed}


def check_outcome(case: Case, results: dict, failed: int, t_fault: float, step_index: int, expected_error: str) -> dict[int, float]:
    ranks = GROUPS[case.group]
    outcomes = {ranks.index(g): results[g] for g in ranks}
    assert outcomes[failed] is None or outcomes[failed]["error"] == expected_error, outcomes[failed]
    times = {}
    for r, out in outcomes.items():
        if r == failed:
            continue
        assert not isinstance(out, JobError), out
        if out["error"] is None:
            # Finishing is right only for a rank that needed nothing more from the failed one.
            assert r not in must_hear(case, failed, step_index), (r, out)
            continue
        assert out["error"] == "PeerFailedError", out
        assert out["failed_rank"] == failed, out
        assert f"pipeline rank {failed} (global rank {ranks[failed]})" in out["message"]
        assert "restart the job" in out["message"]
        times[r] = out["t_error"] - t_fault
        assert times[r] < TIMEOUT + SLACK, (r, times[r], out["message"])
    return times


@st.composite
def faults(draw):
    p = draw(st.integers(2, 4))
    v = draw(st.integers(1, 2))
    m = draw(st.integers(p if v > 1 else 1, 6))
    failed = draw(st.integers(0, p - 1))
    plan = build_plan(p=p, r=failed, v=v, m=m)
    index = draw(st.integers(0, len(plan.actions) - 1))
    action = plan.actions[index]
    kind = action.kind
    if kind == "F" and action.chunk * p + failed == p * v - 1 and draw(st.booleans()):
        kind = "L"  # the last stage can fail in loss_func instead
    step_index = next(i for i, step in enumerate(plan.steps) if action in step.actions)
    mode = draw(st.sampled_from(["fixed", "check", "variable", "overlap"]))
    case = Case(
        "interleaved" if v > 1 else "1f1b", p=p, v=v, m=m, group=draw(st.sampled_from(GROUP_FOR_P[p])),
        seed=draw(st.integers(0, 10**6)), p2p_timeout=TIMEOUT, fresh_group=True,
        mistake={"raise_at": (failed, kind, action.microbatch, action.chunk)},
        check_p2p_shapes=mode == "check", seq_lens=tuple([3] * m) if mode == "variable" else None,
        overlap=mode == "overlap", recv_window=draw(st.integers(2, 12)),
    )
    return case, failed, step_index


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fault=faults())
def test_an_exception_on_one_rank_stops_every_rank(pool, fault):
    case, failed, step_index = fault
    results = pool.run(run_fault_case, case, timeout=4 * TIMEOUT + 20)
    failing = results[GROUPS[case.group][failed]]
    assert failing["error"] == "InjectedFault", failing
    check_outcome(case, results, failed, failing["t_fault"], step_index, "InjectedFault")


@pytest.mark.parametrize("mode", ["fixed", "variable", "overlap"])
def test_a_killed_rank_is_named_by_every_survivor(pool, mode):
    case = Case("1f1b", p=4, v=1, m=6, seed=4242, p2p_timeout=TIMEOUT, fresh_group=True, mistake={"kill_at": (1, 2)},
                seq_lens=(3, 2, 4, 3, 1, 5) if mode == "variable" else None, overlap=mode == "overlap")
    path = fault_time_file(case.seed, os.getpid())
    if os.path.exists(path):
        os.unlink(path)
    results = pool.run(run_fault_case, case, timeout=4 * TIMEOUT + 20, allow_deaths=True)
    assert isinstance(results[1], JobError) and results[1].type_name == "WorkerDied"
    with open(path) as f:
        t_fault = float(f.read())
    os.unlink(path)
    plan = build_plan(p=4, r=1, m=6)
    step_index = next(i for i, s in enumerate(plan.steps) if s.actions[0].kind == "F" and s.actions[0].microbatch == 2)
    times = check_outcome(case, {k: (None if k == 1 else out) for k, out in results.items()}, 1, t_fault, step_index, "")
    assert set(times) == {0, 2, 3}  # in 1F1B every rank depends on rank 1 until the step ends
    for r in (0, 2, 3):  # neighbours see the closed connection; rank 3 hears of it from rank 2
        assert "probably died" in results[r]["message"] or "died or closed its connection" in results[r]["message"]
    # The pool replaces the dead worker and the next step is exact again.
    healthy = pool.run(run_case, Case("1f1b", p=4, v=1, m=3))
    assert all(not isinstance(out, JobError) for out in healthy.values()), healthy


@pytest.mark.parametrize(
    ("schedule", "v", "m", "failed", "kind", "microbatch", "chunk"),
    [
        ("1f1b", 1, 6, 1, "F", 2, 0),
        ("1f1b", 1, 6, 2, "B", 1, 0),
        ("interleaved", 2, 8, 2, "F", 5, 1),
        ("interleaved", 2, 8, 3, "L", 3, 1),
        ("interleaved", 2, 4, 0, "B", 0, 0),  # the failed rank owes nothing more: others must still finish or hear
    ],
)
def test_overlapped_communication_stops_every_rank(pool, schedule, v, m, failed, kind, microbatch, chunk):
    case = Case(schedule, p=4, v=v, m=m, seed=7, p2p_timeout=TIMEOUT, fresh_group=True, overlap=True,
                mistake={"raise_at": (failed, kind, microbatch, chunk)})
    results = pool.run(run_fault_case, case, timeout=4 * TIMEOUT + 20)
    failing = results[GROUPS[case.group][failed]]
    assert failing["error"] == "InjectedFault", failing
    plan = build_plan(p=4, r=failed, v=v, m=m)
    step_index = next(
        i for i, s in enumerate(plan.steps)
        for a in s.actions if (a.kind, a.microbatch, a.chunk) == ("F" if kind == "L" else kind, microbatch, chunk)
    )
    times = check_outcome(case, results, failed, failing["t_fault"], step_index, "InjectedFault")
    # Every rank still owed a message by the failed one raised, naming it; the others may finish.
    assert must_hear(case, failed, step_index) <= set(times)


@pytest.mark.parametrize("mode", ["fixed", "check", "overlap"])
def test_a_message_received_with_the_abort_notice_is_not_waited_for_again(pool, mode):
    """p = 3: rank 1's exchange brings an activation from rank 0 and, in place of a gradient, the
    notice from rank 2. Rank 1 must count the activation as received; waiting for it again in its
    clean-up would stall until the timeout while rank 0 waits on rank 1, and rank 0 would then
    blame rank 1."""
    case = Case("interleaved", p=3, v=2, m=4, group="1-3", seed=0, p2p_timeout=TIMEOUT, fresh_group=True,
                mistake={"raise_at": (2, "B", 1, 1)}, check_p2p_shapes=mode == "check", overlap=mode == "overlap")
    results = pool.run(run_fault_case, case, timeout=4 * TIMEOUT + 20)
    failing = results[GROUPS[case.group][2]]
    assert failing["error"] == "InjectedFault", failing
    plan = build_plan(p=3, r=2, v=2, m=4)
    step_index = next(i for i, s in enumerate(plan.steps) for a in s.actions if (a.kind, a.microbatch, a.chunk) == ("B", 1, 1))
    times = check_outcome(case, results, 2, failing["t_fault"], step_index, "InjectedFault")
    assert set(times) == {0, 1}
    assert max(times.values()) < TIMEOUT, times  # learnt from the notices, not from a timeout
