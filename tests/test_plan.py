"""Properties of the plans, checked with no processes (SCHEDULES.md, "Counts")."""

import dataclasses
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeschedule.plan import build as plan_module
from pipeschedule.plan.check import PlanError, check_pipeline, peak_live_activations
from pipeschedule.plan import (
    Exchange,
    Message,
    RankPlan,
    Step,
    build_pipeline,
    build_plan,
    choose_group_size,
    lockstep_receives,
    order_table,
    phase_counts,
)
from pipeschedule.plan.simulate import CostModel, simulate


@st.composite
def configs(draw, max_p=8, max_v=4, max_m=32):
    """(p, v, m, forward_only, group_size) with interleaving only where it is defined (m >= p)."""
    p = draw(st.integers(1, max_p))
    v = draw(st.integers(1, max_v))
    m = draw(st.integers(p if v > 1 else 1, max(max_m, p)))
    g = None
    if v > 1 and draw(st.booleans()):
        valid = [x for x in range(p, m + 1) if m % x == 0 or m % x >= p]
        g = draw(st.sampled_from(valid))
    return p, v, m, draw(st.booleans()), g


def expected_warmup(p, r, v, m, forward_only, g):
    if forward_only:
        return m * v
    if v == 1:
        return min(p - r - 1, m)
    return min(2 * (p - r - 1) + (v - 1) * g, m * v)


@settings(max_examples=200, deadline=None)
@given(configs())
def test_counts_match_the_formulas(cfg):
    p, v, m, fo, g = cfg
    g = choose_group_size(p=p, m=m, v=v, requested=g)
    for r in range(p):
        plan = build_plan(p=p, r=r, v=v, m=m, forward_only=fo, group_size=g)
        w = expected_warmup(p, r, v, m, fo, g)
        assert plan.counts.warmup == w
        assert plan.counts.steady == m * v - w
        assert plan.counts.cooldown == (0 if fo else w)
        phases = Counter((a.phase, a.kind) for a in plan.actions)
        assert phases[("warmup", "F")] == w
        assert phases[("steady", "F")] == phases[("steady", "B")] == m * v - w
        assert phases[("cooldown", "B")] == (0 if fo else w)
        assert phases[("warmup", "B")] == phases[("cooldown", "F")] == 0


@settings(max_examples=200, deadline=None)
@given(configs())
def test_each_microbatch_once_and_backwards_in_order(cfg):
    p, v, m, fo, g = cfg
    for plan in build_pipeline(p=p, v=v, m=m, forward_only=fo, group_size=g):
        forwards = [(a.microbatch, a.chunk) for a in plan.actions if a.kind == "F"]
        backwards = [(a.microbatch, a.chunk) for a in plan.actions if a.kind == "B"]
        everything = sorted((mb, c) for mb in range(m) for c in range(v))
        assert sorted(forwards) == everything
        assert sorted(backwards) == ([] if fo else everything)
        position = {(a.kind, a.microbatch, a.chunk): i for i, a in enumerate(plan.actions)}
        for mb, c in backwards:
            assert position[("F", mb, c)] < position[("B", mb, c)]
        for c in range(v):
            assert [mb for mb, cc in backwards if cc == c] == sorted(mb for mb, cc in backwards if cc == c)
        # Steady rounds run one forward then one backward.
        steady = [a.kind for a in plan.actions if a.phase == "steady"]
        assert steady == ["F", "B"] * (len(steady) // 2)


@settings(max_examples=200, deadline=None)
@given(configs())
def test_forwards_follow_the_order_table(cfg):
    p, v, m, fo, g = cfg
    g = choose_group_size(p=p, m=m, v=v, requested=g)
    table = order_table(m=m, v=v, group_size=g)
    for plan in build_pipeline(p=p, v=v, m=m, forward_only=fo, group_size=g):
        assert [(a.microbatch, a.chunk) for a in plan.actions if a.kind == "F"] == table
        if not fo:
            assert [(a.microbatch, a.chunk) for a in plan.actions if a.kind == "B"] == [(mb, v - 1 - c) for mb, c in table]


@settings(max_examples=200, deadline=None)
@given(configs())
def test_peak_live_activations_is_warmup_plus_one(cfg):
    p, v, m, fo, g = cfg
    for plan in build_pipeline(p=p, v=v, m=m, forward_only=False, group_size=g):
        assert peak_live_activations(plan) == min(plan.counts.warmup + 1, m * v)
        if v == 1:
            assert peak_live_activations(plan) == min(p - plan.r, m)


@settings(max_examples=250, deadline=None)
@given(configs())
def test_every_send_meets_its_receive_without_deadlock(cfg):
    p, v, m, fo, g = cfg
    plans = build_pipeline(p=p, v=v, m=m, forward_only=fo, group_size=g)
    check_pipeline(plans)
    # Every message has exactly one sender and one receiver exchange, and is received no later than
    # the step that consumes it.
    sent = Counter(x for plan in plans for ex in plan.exchanges for x in ex.sends)
    received = Counter(x for plan in plans for ex in plan.exchanges for x in ex.recvs)
    assert sent == received and set(sent.values()) <= {1}
    for plan in plans:
        have = set(plan.first.recvs)
        for step in plan.steps:
            for action in step.actions:
                msg = plan.input_message(action)
                assert msg is None or msg in have, (plan.r, action, msg)
            have |= set(step.exchange.recvs)


def test_group_size_choice():
    assert choose_group_size(p=4, m=8, v=2) == 4
    assert choose_group_size(p=4, m=10, v=2) == 5  # 10 % 5 == 0
    assert choose_group_size(p=4, m=9, v=2) == 5  # 9 % 5 == 4 >= p
    for p in range(1, 9):
        for m in range(p, 40):
            g = choose_group_size(p=p, m=m, v=2)
            assert p <= g <= m and (m % g == 0 or m % g >= p)
            assert not any(m % x == 0 or m % x >= p for x in range(p, g))


def test_group_size_seven_microbatches_on_three_ranks():
    # The smallest G >= 3 with m % G == 0 or m % G >= 3: G = 4 leaves 3.
    assert choose_group_size(p=3, m=7, v=3) == 4


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(p=4, m=3, v=2), ["num_microbatches=3", "v=1"]),
        (dict(p=4, m=10, v=2, requested=3), ["outside [p, m]"]),
        (dict(p=4, m=10, v=2, requested=11), ["outside [p, m]"]),
        (dict(p=4, m=10, v=2, requested=7), ["last group of 3", "e.g. 5"]),
    ],
)
def test_group_size_refusals(kwargs, words):
    with pytest.raises(ValueError) as info:
        choose_group_size(**kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("bad", [dict(p=0), dict(m=0), dict(v=0), dict(r=4), dict(r=-1), dict(m=2.0)])
def test_bad_sizes_are_refused(bad):
    kwargs = dict(p=4, r=0, v=1, m=4) | bad
    with pytest.raises(ValueError):
        phase_counts(**kwargs)


def test_order_table_last_group_takes_the_rest():
    assert order_table(m=5, v=2, group_size=3) == [
        (0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (3, 0), (4, 0), (3, 1), (4, 1)
    ]


def _with_exchanges(plan: RankPlan, exchanges: list[Exchange]) -> RankPlan:
    steps = tuple(Step(actions=s.actions, exchange=ex) for s, ex in zip(plan.steps, exchanges[1:]))
    return dataclasses.replace(plan, first=exchanges[0], steps=steps)


def test_check_catches_megatron_style_crossed_order_at_p2():
    """Two messages to one peer in one batch, posted in different orders on the two sides."""
    plans = build_pipeline(p=2, v=2, m=4)
    # Find an exchange on rank 0 that sends both an activation and a gradient to rank 1, and post
    # the gradient first, as a send_prev-before-send_next batch would.
    exchanges = list(plans[0].exchanges)
    i = next(k for k, ex in enumerate(exchanges) if len(ex.sends) == 2)
    exchanges[i] = Exchange(sends=tuple(reversed(exchanges[i].sends)), recvs=exchanges[i].recvs)
    with pytest.raises(PlanError, match="the sender posts grad.* but the receiver expects act"):
        check_pipeline([_with_exchanges(plans[0], exchanges), plans[1]])


def test_check_catches_a_deadlock():
    """Rank 0 waits for gradient 0 before it has sent activation 0, which rank 1 needs to make it."""
    plans = build_pipeline(p=2, v=1, m=2)
    grad0 = Message("grad", 0, 1, 0)
    exchanges = list(plans[0].exchanges)
    assert grad0 in exchanges[2].recvs  # the plan receives it after forwarding microbatch 1
    exchanges[0] = Exchange(recvs=(grad0,))
    exchanges[2] = Exchange(sends=exchanges[2].sends, recvs=())
    with pytest.raises(PlanError, match="deadlocks: ranks \\[0, 1\\]"):
        check_pipeline([_with_exchanges(plans[0], exchanges), plans[1]])


# -- the placement rule -------------------------------------------------------------------------

def _placed(p, r, v, m, fo, g, lockstep, schedule="1f1b"):
    return plan_module._plan(p, r, v, m, fo, g, schedule, lockstep)


def test_the_rule_makes_deadlock_free_plans_for_every_default_configuration():
    # Exhaustive over p <= 8, v <= 4, m <= 32 with the default group size, training and forward
    # only. Every group size too: scripts/check_plans.py (too long for the suite on 2 cores).
    for p in range(1, 9):
        for v in range(1, 5):
            for m in range(p if v > 1 else 1, 33):
                for fo in (False, True):
                    check_pipeline(build_pipeline(p=p, v=v, m=m, forward_only=fo))
        plan_module._plan.cache_clear()


@settings(max_examples=60, deadline=None)
@given(configs())
def test_the_rule_is_never_slower_than_the_other_placement(cfg):
    # The rule replaces "simulate both placements, keep the faster deadlock-free one".
    p, v, m, fo, g = cfg
    g = choose_group_size(p=p, m=m, v=v, requested=g)
    rule = lockstep_receives(p=p, v=v, m=m, group_size=g, forward_only=fo)
    chosen = [_placed(p, r, v, m, fo, g, rule) for r in range(p)]
    other = [_placed(p, r, v, m, fo, g, not rule) for r in range(p)]
    check_pipeline(chosen)
    try:
        check_pipeline(other)
    except PlanError:
        return
    cost = CostModel(tf=1.0, tb=2.0)
    assert simulate(chosen, cost=cost).step_time <= simulate(other, cost=cost).step_time


@settings(max_examples=12, deadline=None)
@given(configs(max_p=32, max_v=8, max_m=256))
def test_large_pipelines_are_deadlock_free(cfg):
    p, v, m, fo, g = cfg
    check_pipeline(build_pipeline(p=p, v=v, m=m, forward_only=fo, group_size=g))
    plan_module._plan.cache_clear()


def test_a_rank_is_planned_from_its_neighbours_alone(monkeypatch):
    # O(m v) per rank: the steps of ranks r - 1, r and r + 1 are built, no others.
    built = []
    real = plan_module._steps
    monkeypatch.setattr(plan_module, "_steps", lambda p, q, *args: built.append(q) or real(p, q, *args))
    plan_module._plan.cache_clear()
    build_plan(p=16, r=5, v=2, m=32)
    assert sorted(built) == [4, 5, 6]
