"""Properties of the zero-bubble plans (SCHEDULES.md, "Zero bubble"; ZERO_BUBBLE.md §5.5, §5.6).

With ``T = m v`` and ``W0`` the warmup of :func:`~pipeschedule.plan.orders.phase_counts`, every
rank's plan:

* runs each ``(microbatch, chunk)`` once as ``F``, then ``I``, then ``W``, per chunk in increasing
  microbatch order, with no ``B``;
* runs the weight pass of backward number ``j`` in the fill of backward number ``j + r``'s step,
  or in the tail, so it never holds more than ``r`` pending weight passes between steps;
* holds at most ``min(W0 + 1 + r, T)`` activations, ``min(W0 + 1, T)`` of them awaiting ``I``;
* is the order of torch's ``ScheduleInterleavedZeroBubble`` where torch defines it (``m % p == 0``);
* takes ``m (tf + tb + tw) + (p - 1) max(tf, tb, tf + tb - tw) / v`` in the overlapped mode for
  every ``m >= p``, exactly.

Every group size of every configuration in ``p <= 8, v <= 4, m <= 32`` is proven deadlock-free by
``python scripts/check_plans.py --schedule zero-bubble`` (minutes; the suite takes a sample).
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeschedule.plan import build_pipeline, build_plan, choose_group_size, order_table
from pipeschedule.plan.check import check_pipeline, peak_awaiting_backward, peak_live_activations
from pipeschedule.plan.simulate import CostModel, simulate

ZB = "zero-bubble"
costs = st.builds(Fraction, st.integers(0, 12), st.integers(1, 4))


@st.composite
def configs(draw, max_p=8, max_v=4, max_m=32, at_least_p=False):
    """(p, v, m, group_size) with interleaving only where it is defined (m >= p), and with ``m >= p``
    throughout if ``at_least_p``; the group size is sometimes drawn, else the default."""
    p = draw(st.integers(1, max_p))
    v = draw(st.integers(1, max_v))
    m = draw(st.integers(p if v > 1 or at_least_p else 1, max(max_m, p)))
    g = None
    if v > 1 and draw(st.booleans()):
        g = draw(st.sampled_from([x for x in range(p, m + 1) if m % x == 0 or m % x >= p]))
    return p, v, m, g


def _warmup(p: int, r: int, v: int, m: int, g: int) -> int:
    return min(p - r - 1, m) if v == 1 else min((v - 1) * g + p - r - 1, m * v)


def _formula(p: int, v: int, m: int, tf: Fraction, tb: Fraction, tw: Fraction) -> Fraction:
    return m * (tf + tb + tw) + (p - 1) * max(tf, tb, tf + tb - tw) / v


def _ids(plan, kind: str) -> list[tuple[int, int]]:
    return [(a.microbatch, a.chunk) for a in plan.actions if a.kind == kind]


# -- the order ----------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(configs())
def test_each_microbatch_forward_then_input_then_weight(cfg):
    p, v, m, g = cfg
    g = choose_group_size(p=p, m=m, v=v, requested=g)
    table = order_table(m=m, v=v, group_size=g)
    everything = sorted((mb, c) for mb in range(m) for c in range(v))
    for plan in build_pipeline(p=p, v=v, m=m, group_size=g, schedule=ZB):
        assert plan.zero_bubble and plan.schedule == ZB
        kinds = Counter(a.kind for a in plan.actions)
        assert kinds["B"] == 0 and set(kinds) == {"F", "I", "W"}
        for kind in "FIW":
            assert sorted(_ids(plan, kind)) == everything, (plan.r, kind)
        position = {(a.kind, a.microbatch, a.chunk): i for i, a in enumerate(plan.actions)}
        for mb, c in everything:
            assert position[("F", mb, c)] < position[("I", mb, c)] < position[("W", mb, c)], (plan.r, mb, c)
        for kind in "IW":
            for c in range(v):
                order = [mb for mb, cc in _ids(plan, kind) if cc == c]
                assert order == sorted(order), (plan.r, kind, c)
        # The forwards follow the order table, the input passes its mirror (as 1F1B's backwards).
        assert _ids(plan, "F") == table
        assert _ids(plan, "I") == [(mb, v - 1 - c) for mb, c in table]


@settings(max_examples=40, deadline=None)
@given(configs())
def test_forward_only_plans_are_the_1f1b_ones(cfg):
    p, v, m, g = cfg
    assert build_pipeline(p=p, v=v, m=m, group_size=g, forward_only=True, schedule=ZB) == build_pipeline(
        p=p, v=v, m=m, group_size=g, forward_only=True
    )


# -- phases and pending weight passes ------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(configs())
def test_phase_counts_match_the_formulas(cfg):
    p, v, m, g = cfg
    g = choose_group_size(p=p, m=m, v=v, requested=g)
    total = m * v
    for plan in build_pipeline(p=p, v=v, m=m, group_size=g, schedule=ZB):
        r, w = plan.r, _warmup(p, plan.r, v, m, g)
        assert (plan.counts.warmup, plan.counts.steady, plan.counts.cooldown) == (w, total - w, w)
        assert (plan.counts.total, plan.counts.tail) == (total, min(r, total))
        phases = Counter((a.phase, a.kind) for a in plan.actions)
        assert phases[("warmup", "F")] == w
        assert phases[("steady", "F")] == phases[("steady", "I")] == total - w
        assert phases[("cooldown", "I")] == w
        assert phases[("warmup", "I")] == phases[("warmup", "W")] == phases[("cooldown", "F")] == 0
        assert phases[("steady", "W")] == max(0, total - w - r)
        # After the last input pass: its own step's weight pass (that of backward T - 1 - r), then
        # the tail of min(r, T).
        last_i = max(i for i, a in enumerate(plan.actions) if a.kind == "I")
        assert [a.kind for a in plan.actions[last_i + 1:]] == ["W"] * ((total > r) + min(r, total))


@settings(max_examples=40, deadline=None)
@given(configs())
def test_weight_pass_j_fills_the_step_of_input_pass_j_plus_r(cfg):
    p, v, m, g = cfg
    total = m * v
    for plan in build_pipeline(p=p, v=v, m=m, group_size=g, schedule=ZB):
        r = plan.r
        inputs = [a for a in plan.actions if a.kind == "I"]
        position = {(a.kind, a.microbatch, a.chunk): i for i, a in enumerate(plan.actions)}
        step_of = {a: s for s, step in enumerate(plan.steps) for a in step.actions}
        weights = [("W", a.microbatch, a.chunk) for a in inputs]
        for j, weight in enumerate(weights):
            if j + r < total:
                later = inputs[j + r]
                assert position[weight] == position[("I", later.microbatch, later.chunk)] + 1, (r, j)
                step = plan.steps[step_of[later]]
                first = step.fill[0]
                assert step.actions == (later,) and (first.kind, first.microbatch, first.chunk) == weight
                # One weight pass a step, but the last step also carries the tail.
                assert len(step.fill) == 1 or step is plan.steps[-1]
        # The tail, in the fill of the last step after its own weight pass: backwards T - r .. T - 1.
        tail = [(a.kind, a.microbatch, a.chunk) for a in plan.steps[-1].fill][1 if total > r else 0:]
        assert tail == weights[max(0, total - r):], r


@settings(max_examples=40, deadline=None)
@given(configs())
def test_at_most_r_pending_weight_passes_between_steps(cfg):
    p, v, m, g = cfg
    for plan in build_pipeline(p=p, v=v, m=m, group_size=g, schedule=ZB):
        pending = most = 0
        after_steps = []
        for step in plan.steps:
            for a in step.actions + step.fill:
                pending += {"I": 1, "W": -1}.get(a.kind, 0)
                assert pending >= 0
                most = max(most, pending)
            after_steps.append(pending)
        assert max(after_steps) <= plan.r, (plan.r, after_steps)
        assert most <= plan.r + 1
        assert after_steps[-1] == 0


@settings(max_examples=40, deadline=None)
@given(configs())
def test_peak_activations(cfg):
    p, v, m, g = cfg
    total = m * v
    for plan in build_pipeline(p=p, v=v, m=m, group_size=g, schedule=ZB):
        w = plan.counts.warmup
        assert peak_live_activations(plan) == min(w + 1 + plan.r, total), plan.r
        assert peak_awaiting_backward(plan) == min(w + 1, total), plan.r
        # ZERO_BUBBLE.md §5.5: the same on every rank.
        assert peak_live_activations(plan) == (min(p, m) if v == 1 else min((v - 1) * plan.group_size + p, total))


# -- the exchanges -------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(configs())
def test_every_send_meets_its_receive_and_weight_passes_carry_no_message(cfg):
    p, v, m, g = cfg
    plans = build_pipeline(p=p, v=v, m=m, group_size=g, schedule=ZB)
    check_pipeline(plans)
    sent = Counter(x for plan in plans for ex in plan.exchanges for x in ex.sends)
    received = Counter(x for plan in plans for ex in plan.exchanges for x in ex.recvs)
    assert sent == received and set(sent.values()) <= {1}
    for plan in plans:
        have = set(plan.first.recvs)
        for step in plan.steps:
            assert all(a.kind != "W" for a in step.actions)
            assert all(a.kind == "W" for a in step.fill)
            for a in step.fill:
                assert plan.input_message(a) is None and plan.output_message(a) is None
            for action in step.actions:
                msg = plan.input_message(action)
                assert msg is None or msg in have, (plan.r, action, msg)
            have |= set(step.exchange.recvs)


@pytest.mark.parametrize(
    ("p", "v", "m"),
    [(1, 1, 1), (1, 3, 4), (2, 1, 1), (2, 2, 2), (2, 2, 5), (4, 1, 2), (4, 2, 4), (4, 2, 9), (8, 4, 32)],
)
def test_named_configurations(p, v, m):
    plans = build_pipeline(p=p, v=v, m=m, schedule=ZB)
    check_pipeline(plans)
    simulate(plans, cost=CostModel(tf=Fraction(1), tb=Fraction(1), tw=Fraction(1)))
    for plan in plans:
        assert plan.counts.warmup == _warmup(p, plan.r, v, m, plan.group_size)
        assert Counter(a.kind for a in plan.actions) == {"F": m * v, "I": m * v, "W": m * v}


def test_two_ranks_plain_order_is_zb_h1():
    # ZB-H1 at p = 2, m = 3: rank 1 delays each weight pass by one backward.
    plans = build_pipeline(p=2, m=3, schedule=ZB)
    assert [a.label() for a in plans[0].actions] == ["F0", "F1", "I0", "W0", "F2", "I1", "W1", "I2", "W2"]
    assert [a.label() for a in plans[1].actions] == ["F0", "I0", "F1", "I1", "W0", "F2", "I2", "W1", "W2"]


def test_schedule_name_is_checked():
    with pytest.raises(ValueError, match="schedule must be one of"):
        build_plan(p=2, r=0, m=2, schedule="zb")


# -- torch's order as the oracle ---------------------------------------------------------------

def _torch_order(p: int, v: int, m: int, r: int) -> list[tuple[str, int, int]]:
    """torch 2.13's ``ScheduleInterleavedZeroBubble`` order of rank ``r``, as (kind, microbatch, chunk)."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    kinds = {
        schedules._ComputationType.FORWARD: "F",
        schedules._ComputationType.BACKWARD_INPUT: "I",
        schedules._ComputationType.BACKWARD_WEIGHT: "W",
    }
    # The attributes the method reads, as its constructor sets them (it needs stages and a group).
    fake = SimpleNamespace(
        n_local_stages=v, microbatches_per_round=m // max(1, m // p), pp_group_size=p, _n_microbatches=m
    )
    ops = schedules.ScheduleInterleavedZeroBubble._calculate_single_rank_operations(fake, r)
    return [(kinds[a.computation_type], a.microbatch_index, a.stage_index // p) for a in ops if a is not None]


@pytest.mark.parametrize("p", range(1, 7))
@pytest.mark.parametrize("v", range(1, 4))
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_order_equals_torch_interleaved_zero_bubble(p, v, rounds):
    m = rounds * p
    for plan in build_pipeline(p=p, v=v, m=m, schedule=ZB):
        ours = [(a.kind, a.microbatch, a.chunk) for a in plan.actions]
        assert ours == _torch_order(p, v, m, plan.r), (p, v, m, plan.r)


@pytest.mark.parametrize(("p", "v", "m"), [(2, 2, 8), (4, 4, 16), (5, 2, 20), (7, 3, 14), (8, 4, 32)])
def test_order_equals_torch_for_larger_pipelines(p, v, m):
    for plan in build_pipeline(p=p, v=v, m=m, schedule=ZB):
        assert [(a.kind, a.microbatch, a.chunk) for a in plan.actions] == _torch_order(p, v, m, plan.r)


# -- simulated step times ------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(configs(at_least_p=True), costs, costs, costs)
def test_overlapped_step_meets_the_formula(cfg, tf, tb, tw):
    # Below one microbatch per rank (v = 1, m < p) there is no closed form.
    p, v, m, g = cfg
    plans = build_pipeline(p=p, v=v, m=m, group_size=g, schedule=ZB)
    sim = simulate(plans, cost=CostModel(tf=tf, tb=tb, tw=tw), overlapped=True)
    assert sim.step_time == _formula(p, v, m, tf, tb, tw)
    assert [rank.busy for rank in sim.ranks] == [m * (tf + tb + tw)] * p


@settings(max_examples=25, deadline=None)
@given(configs(at_least_p=True), costs, costs)
def test_overlapped_step_without_weight_time_is_the_1f1b_formula(cfg, tf, tb):
    p, v, m, g = cfg
    plans = build_pipeline(p=p, v=v, m=m, group_size=g, schedule=ZB)
    sim = simulate(plans, cost=CostModel(tf=tf, tb=tb, tw=0), overlapped=True)
    expected = (m + p - 1) * (tf + tb) if v == 1 else (m + Fraction(p - 1, v)) * (tf + tb)
    assert sim.step_time == expected


@pytest.mark.parametrize(("p", "v", "m"), [(4, 1, 4), (4, 1, 7), (3, 2, 7), (4, 2, 9), (5, 3, 10), (6, 4, 13)])
def test_overlapped_step_for_equal_costs(p, v, m):
    t = Fraction(3)
    sim = simulate(build_pipeline(p=p, v=v, m=m, schedule=ZB), cost=CostModel(tf=t, tb=t, tw=t), overlapped=True)
    assert sim.step_time == 3 * m * t + (p - 1) * t / v


@settings(max_examples=20, deadline=None)
@given(
    configs(max_p=6, max_m=16), costs, costs, costs,
    st.integers(1, 5).map(Fraction), st.sampled_from(["tf", "tb", "tw"]), st.booleans(),
)
def test_step_time_is_monotone_in_each_cost(cfg, tf, tb, tw, more, which, overlapped):
    p, v, m, g = cfg
    plans = build_pipeline(p=p, v=v, m=m, group_size=g, schedule=ZB)
    low = CostModel(tf=tf, tb=tb, tw=tw)
    high = CostModel(**{"tf": tf, "tb": tb, "tw": tw} | {which: {"tf": tf, "tb": tb, "tw": tw}[which] + more})
    before = simulate(plans, cost=low, overlapped=overlapped).step_time
    assert before <= simulate(plans, cost=high, overlapped=overlapped).step_time


@settings(max_examples=30, deadline=None)
@given(configs(), costs, costs, costs)
def test_never_slower_than_1f1b_with_the_whole_backward(cfg, tf, tb, tw):
    p, v, m, g = cfg
    zb_plans = build_pipeline(p=p, v=v, m=m, group_size=g, schedule=ZB)
    zb = simulate(zb_plans, cost=CostModel(tf=tf, tb=tb, tw=tw), overlapped=True)
    one = simulate(build_pipeline(p=p, v=v, m=m, group_size=g), cost=CostModel(tf=tf, tb=tb + tw), overlapped=True)
    assert zb.step_time <= one.step_time


@settings(max_examples=25, deadline=None)
@given(configs(), costs, costs, costs, st.integers(0, 2).map(Fraction))
def test_batched_simulation_completes(cfg, tf, tb, tw, latency):
    p, v, m, g = cfg
    plans = build_pipeline(p=p, v=v, m=m, group_size=g, schedule=ZB)
    batched = simulate(plans, cost=CostModel(tf=tf, tb=tb, tw=tw, latency=latency))
    overlapped = simulate(plans, cost=CostModel(tf=tf, tb=tb, tw=tw, latency=latency), overlapped=True)
    # Waiting for whole exchanges can only delay an action (p = 1 hands over locally, with no
    # latency in the batched mode).
    if latency == 0 or p > 1:
        assert batched.step_time >= overlapped.step_time
    for plan, rank in zip(plans, batched.ranks):
        assert [t.action for t in rank.actions] == list(plan.actions)
        assert rank.busy + rank.wait == rank.end <= batched.step_time
