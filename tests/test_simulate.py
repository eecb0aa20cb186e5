"""The simulator against the SCHEDULES.md formulas, against check_pipeline, and on broken plans.

Facts these tests pin down (exact ``Fraction`` arithmetic, zero latency, uniform costs):

* 1F1B plans meet ``(m + p - 1)(tf + tb)`` for every ``p``, ``m``, ``tf`` and ``tb``.
* Interleaved plans meet ``(m + (p - 1)/v)(tf + tb)`` for every ``tf``, ``tb`` when ``m`` is a
  multiple of ``p``, and for most other ``m``. Where the default group size is ``G = m`` with
  ``p < m < 2p``, every exchange placement that is deadlock-free under rendezvous semantics is
  slower; the plan stays within 1.3 times the formula there (``p <= 8``).
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeschedule.plan.check import PlanError, check_pipeline
from pipeschedule.plan import Exchange, Message, RankPlan, Step, build_pipeline
from pipeschedule.plan.simulate import CostModel, Time, simulate

FAST = settings(max_examples=40, deadline=None)
times = st.integers(min_value=1, max_value=6).map(Fraction)


def _one_f_one_b(p: int, m: int, tf: Fraction, tb: Fraction) -> Fraction:
    return (m + p - 1) * (tf + tb)


def _interleaved(p: int, v: int, m: int, tf: Fraction, tb: Fraction) -> Fraction:
    return (m + Fraction(p - 1, v)) * (tf + tb)


@FAST
@given(p=st.integers(1, 6), m=st.integers(1, 10), tf=times, tb=times)
def test_1f1b_step_time_and_bubble_match_formulas(p: int, m: int, tf: Fraction, tb: Fraction) -> None:
    sim = simulate(build_pipeline(p=p, m=m), cost=CostModel(tf=tf, tb=tb))
    assert sim.step_time == _one_f_one_b(p, m, tf, tb)
    assert sim.idle_over_busy == Fraction(p - 1, m)  # SCHEDULES.md's bubble: idle over compute
    assert sim.bubble_fraction == float(Fraction(p - 1, m + p - 1))
    assert [r.bubble_fraction for r in sim.ranks] == [float(Fraction(p - 1, m + p - 1))] * p
    assert [r.busy for r in sim.ranks] == [m * (tf + tb)] * p


@FAST
@given(p=st.integers(2, 5), v=st.integers(2, 3), k=st.integers(1, 3), tf=times, tb=times)
def test_interleaved_plan_meets_formula_when_m_multiple_of_p(p: int, v: int, k: int, tf: Fraction, tb: Fraction) -> None:
    m = k * p
    sim = simulate(build_pipeline(p=p, v=v, m=m), cost=CostModel(tf=tf, tb=tb))
    assert sim.step_time == _interleaved(p, v, m, tf, tb)
    assert sim.idle_over_busy == Fraction(p - 1, v * m)
    assert sim.bubble_fraction == float(Fraction(p - 1, v * m + p - 1))


@pytest.mark.parametrize(("p", "v", "m", "g"), [(3, 2, 4, 4), (3, 3, 5, 5), (4, 2, 7, 7), (4, 2, 9, 5), (2, 3, 5, 5), (4, 2, 10, 5)])
def test_interleaved_plan_meets_formula_for_other_group_sizes(p: int, v: int, m: int, g: int) -> None:
    tf, tb = Fraction(1), Fraction(3)
    sim = simulate(build_pipeline(p=p, v=v, m=m, group_size=g), cost=CostModel(tf=tf, tb=tb))
    assert sim.step_time == _interleaved(p, v, m, tf, tb)


def test_interleaved_known_gap_is_bounded() -> None:
    tf, tb = Fraction(1), Fraction(2)
    for p in range(2, 9):
        for v in range(2, 5):
            for m in range(p, 3 * p + 1):
                plans = build_pipeline(p=p, v=v, m=m)
                ratio = simulate(plans, cost=CostModel(tf=tf, tb=tb)).step_time / _interleaved(p, v, m, tf, tb)
                if p < m < 2 * p and m % p:
                    assert 1 <= ratio <= Fraction(13, 10), (p, v, m, ratio)
                else:
                    assert ratio == 1, (p, v, m, ratio)


@FAST
@given(p=st.integers(1, 4), v=st.integers(1, 3), k=st.integers(1, 3), tf=times)
def test_forward_only_step_time(p: int, v: int, k: int, tf: Fraction) -> None:
    m = k * p
    sim = simulate(build_pipeline(p=p, v=v, m=m, forward_only=True), cost=CostModel(tf=tf, tb=Fraction(100)))
    assert sim.step_time == (m + Fraction(p - 1, v)) * tf
    assert [r.peak_live_activations for r in sim.ranks] == [1] * p


@FAST
@given(p=st.integers(1, 5), v=st.integers(1, 3), k=st.integers(1, 3))
def test_peak_live_activations_is_warmup_plus_one(p: int, v: int, k: int) -> None:
    m = k * p
    plans = build_pipeline(p=p, v=v, m=m)
    sim = simulate(plans)
    for plan, rank in zip(plans, sim.ranks):
        assert rank.warmup == plan.counts.warmup
        assert rank.peak_live_activations == min(plan.counts.warmup + 1, m * v)


@FAST
@given(p=st.integers(1, 4), v=st.integers(1, 3), m=st.integers(4, 8), latency=st.integers(0, 3).map(Fraction))
def test_timeline_respects_order_and_data(p: int, v: int, m: int, latency: Fraction) -> None:
    if v > 1 and m < p:
        return
    plans = build_pipeline(p=p, v=v, m=m)
    sim = simulate(plans, cost=CostModel(tf=Fraction(2), tb=Fraction(3), latency=latency))
    ends: dict[tuple[str, int, int], Time] = {}
    for plan, rank in zip(plans, sim.ranks):
        assert [t.action for t in rank.actions] == list(plan.actions)
        assert all(a.end <= b.start for a, b in zip(rank.actions, rank.actions[1:]))
        assert rank.busy + rank.wait == rank.end <= sim.step_time
        ends.update({(t.action.kind, t.action.microbatch, plan.stage(t.action.chunk)): t.end for t in rank.actions})
    for plan, rank in zip(plans, sim.ranks):
        for t in rank.actions:
            msg = plan.input_message(t.action)
            if msg is not None:
                producer = ("F" if msg.kind == "act" else "B", msg.microbatch, msg.src_stage)
                hop = latency if msg.src_stage % p != plan.r else 0
                assert t.start >= ends[producer] + hop
    assert sim.step_time == max(r.end for r in sim.ranks)


@FAST
@given(p=st.integers(2, 4), v=st.integers(1, 2), m=st.integers(4, 6), l1=st.integers(0, 4), l2=st.integers(1, 4))
def test_latency_increases_step_time(p: int, v: int, m: int, l1: int, l2: int) -> None:
    plans = build_pipeline(p=p, v=v, m=m)
    low = simulate(plans, cost=CostModel(tf=Fraction(1), tb=Fraction(2), latency=Fraction(l1))).step_time
    high = simulate(plans, cost=CostModel(tf=Fraction(1), tb=Fraction(2), latency=Fraction(l1 + l2))).step_time
    # Every message crosses ranks when p > 1, and the first activation is on the critical path.
    assert high >= low + l2


def test_overrides_replace_one_chunk_cost() -> None:
    cost = CostModel(tf=Fraction(1), tb=Fraction(2), overrides=((0, 1, Fraction(5), Fraction(7)),))
    sim = simulate(build_pipeline(p=1, v=2, m=3), cost=cost)
    assert sim.step_time == 3 * (Fraction(1, 2) + 1 + 5 + 7)
    assert {t.end - t.start for t in sim.ranks[0].actions if t.action.chunk == 1} == {5, 7}


def test_cost_model_rejects_negative_times() -> None:
    with pytest.raises(ValueError, match="tb must be a finite number >= 0, got -1"):
        CostModel(tb=-1)


def _both_receive_first() -> list[RankPlan]:
    plans = build_pipeline(p=2, m=1)
    grad = Message("grad", 0, 1, 0)
    rank0 = plans[0]
    steps = tuple(replace(s, exchange=Exchange(sends=s.exchange.sends)) for s in rank0.steps)
    return [replace(rank0, first=Exchange(recvs=(grad,)), steps=steps), plans[1]]


def test_both_ranks_receiving_first_is_a_deadlock() -> None:
    plans = _both_receive_first()
    with pytest.raises(PlanError) as caught:
        simulate(plans)
    text = str(caught.value)
    assert "the plan deadlocks: ranks [0, 1]" in text
    assert "rank 0 waits for rank 1 to send grad0:1>0" in text
    assert "rank 1 waits for rank 0 to send act0:0>1" in text
    assert "rank 0: > F0   B0" in text and "rank 1: > F0   B0" in text
    with pytest.raises(PlanError):
        check_pipeline(plans)


def test_deadlock_mid_plan_marks_after_the_actions_that_ran() -> None:
    # Rank 0 waits, right after B0, for grad1 and grad2; rank 1 can send grad2 only after F2, whose
    # input act2 rank 0 would send only after that wait.
    plans = build_pipeline(p=2, m=3)
    steps = list(plans[0].steps)
    assert [x.label() for x in steps[3].exchange.recvs + steps[4].exchange.recvs] == ["grad1:1>0", "grad2:1>0"]
    steps[2] = replace(steps[2], exchange=Exchange(recvs=steps[3].exchange.recvs + steps[4].exchange.recvs))
    steps[3] = replace(steps[3], exchange=Exchange(sends=steps[3].exchange.sends))
    steps[4] = replace(steps[4], exchange=Exchange())
    plans[0] = replace(plans[0], steps=tuple(steps))
    texts = {}
    for check in (simulate, check_pipeline):
        with pytest.raises(PlanError) as caught:
            check(plans)
        texts[check] = str(caught.value)
        assert "rank 0:   F0   F1   B0 > F2   B1   B2" in texts[check]
        assert "rank 1:   F0   B0   F1   B1 > F2   B2" in texts[check]
    assert "rank 0 waits for rank 1 to send grad2:1>0" in texts[simulate]
    assert "rank 1 waits for rank 0 to send act2:0>1" in texts[simulate]


def test_receive_from_own_later_send_is_a_deadlock() -> None:
    # p = 1, v = 2: chunk 1's input is received up front, before chunk 0 has sent it.
    plan = build_pipeline(p=1, v=2, m=1, forward_only=True)[0]
    act = Message("act", 0, 0, 1)
    steps = tuple(replace(s, exchange=Exchange(sends=s.exchange.sends)) for s in plan.steps)
    broken = replace(plan, first=Exchange(recvs=(act,)), steps=steps)
    with pytest.raises(PlanError, match="rank 0 waits for rank 0 to send act0:0>1"):
        simulate([broken])


@settings(max_examples=60, deadline=None)
@given(p=st.integers(2, 3), v=st.integers(1, 2), data=st.data())
def test_deadlock_verdict_agrees_with_check_pipeline(p: int, v: int, data: st.DataObject) -> None:
    plans = build_pipeline(p=p, v=v, m=p + 1)
    rank = data.draw(st.integers(0, p - 1))
    plan = plans[rank]
    exchanges = list(plan.exchanges)
    source = data.draw(st.sampled_from([i for i, ex in enumerate(exchanges) if ex.recvs]))
    target = data.draw(st.integers(0, len(exchanges) - 1))
    moved = exchanges[source].recvs[0]
    exchanges[source] = Exchange(sends=exchanges[source].sends, recvs=exchanges[source].recvs[1:])
    exchanges[target] = Exchange(sends=exchanges[target].sends, recvs=(moved,) + exchanges[target].recvs)
    steps = tuple(Step(actions=s.actions, exchange=ex) for s, ex in zip(plan.steps, exchanges[1:]))
    plans[rank] = replace(plan, first=exchanges[0], steps=steps)
    try:
        check_pipeline(plans)
        valid = True
    except PlanError:
        valid = False
    if valid:
        assert simulate(plans).step_time > 0
    else:
        with pytest.raises(PlanError):
            simulate(plans)


def test_plans_must_cover_every_rank() -> None:
    plans = build_pipeline(p=3, m=3)
    with pytest.raises(ValueError, match=r"got ranks \[0, 2\] for p=3"):
        simulate([plans[0], plans[2]])


# -- the weight-gradient time and five-entry overrides ---------------------------------------------

def test_weight_time_is_charged_to_w_and_to_whole_backwards() -> None:
    from pipeschedule.plan import Action

    cost = CostModel(tf=Fraction(3), tb=Fraction(4), tw=Fraction(2))
    durations = {kind: cost.duration(Action(kind, 0, 1, "steady"), rank=0, v=2) for kind in "FBIW"}
    assert durations == {"F": Fraction(3, 2), "B": 3, "I": 2, "W": 1}
    # Without a weight time a W is free and stays exact (an int 0, not 0.0).
    free = CostModel(tf=Fraction(3), tb=Fraction(4)).duration(Action("W", 0, 1, "steady"), rank=0, v=2)
    assert free == 0 and not isinstance(free, float)


@FAST
@given(p=st.integers(1, 5), v=st.integers(1, 3), k=st.integers(1, 3), tf=times, tb=times, tw=times)
def test_weight_time_in_a_1f1b_plan_is_part_of_the_backward(
    p: int, v: int, k: int, tf: Fraction, tb: Fraction, tw: Fraction
) -> None:
    plans = build_pipeline(p=p, v=v, m=k * p)
    split = simulate(plans, cost=CostModel(tf=tf, tb=tb, tw=tw))
    whole = simulate(plans, cost=CostModel(tf=tf, tb=tb + tw))
    assert split.step_time == whole.step_time
    assert [r.busy for r in split.ranks] == [r.busy for r in whole.ranks] == [k * p * (tf + tb + tw)] * p


@FAST
@given(p=st.integers(1, 6), v=st.integers(1, 3), k=st.integers(1, 3), tf=times, tb=times, overlapped=st.booleans())
def test_zero_weight_time_keeps_the_1f1b_figures(
    p: int, v: int, k: int, tf: Fraction, tb: Fraction, overlapped: bool
) -> None:
    m = k * p
    plans = build_pipeline(p=p, v=v, m=m)
    sim = simulate(plans, cost=CostModel(tf=tf, tb=tb, tw=0), overlapped=overlapped)
    assert sim.step_time == (_one_f_one_b(p, m, tf, tb) if v == 1 else _interleaved(p, v, m, tf, tb))
    assert sim.step_time == simulate(plans, cost=CostModel(tf=tf, tb=tb), overlapped=overlapped).step_time
    assert [r.busy for r in sim.ranks] == [m * (tf + tb)] * p


def test_five_entry_override_sets_the_weight_time_of_one_chunk() -> None:
    tf, tb, tw = Fraction(1), Fraction(2), Fraction(4)
    cost = CostModel(tf=tf, tb=tb, tw=tw, overrides=((0, 1, Fraction(5), Fraction(7), Fraction(3)),))
    zb = simulate(build_pipeline(p=1, v=2, m=3, schedule="zero-bubble"), cost=cost)
    assert zb.step_time == 3 * ((tf + tb + tw) / 2 + 5 + 7 + 3)
    times = {(t.action.kind, t.action.chunk): t.end - t.start for t in zb.ranks[0].actions}
    assert times == {("F", 1): 5, ("I", 1): 7, ("W", 1): 3, ("F", 0): tf / 2, ("I", 0): tb / 2, ("W", 0): tw / 2}
    # In a 1F1B plan the override's backward and weight times add up to the chunk's B.
    one = simulate(build_pipeline(p=1, v=2, m=3), cost=cost)
    assert {t.action.kind: t.end - t.start for t in one.ranks[0].actions if t.action.chunk == 1} == {"F": 5, "B": 10}
    assert one.step_time == zb.step_time


def test_four_entry_override_has_no_weight_time() -> None:
    cost = CostModel(tf=Fraction(1), tb=Fraction(2), tw=Fraction(4), overrides=((0, 0, Fraction(5), Fraction(7)),))
    sim = simulate(build_pipeline(p=1, v=2, m=2, schedule="zero-bubble"), cost=cost)
    assert {t.end - t.start for t in sim.ranks[0].actions if t.action.chunk == 0 and t.action.kind == "W"} == {0}
    assert sim.step_time == 2 * (5 + 7 + Fraction(1 + 2 + 4, 2))


@pytest.mark.parametrize("entry", [(0, 0, 1), (0, 0, 1, 2, 3, 4), (0, 0, 1, 2, -1)])
def test_cost_model_rejects_malformed_overrides(entry: tuple) -> None:
    with pytest.raises(ValueError, match="override is \\(rank, chunk, forward_time, backward_time\\) or"):
        CostModel(overrides=(entry,))


def test_cost_model_rejects_negative_weight_time() -> None:
    with pytest.raises(ValueError, match="tw must be a finite number >= 0, got -1"):
        CostModel(tw=-1)
