"""The zero-bubble schedule on real gloo process groups: gradients bit for bit, the planned order, what is refused."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases import Case, run_case
from test_schedules_gloo import GROUP_FOR_P, check_against_reference


@st.composite
def zero_bubble_cases(draw):
    p = draw(st.integers(2, 4))
    v = draw(st.integers(1, 3))
    m = draw(st.integers(p if v > 1 else 1, 12))
    split = draw(st.sampled_from(["autograd", "module"]))
    return Case(
        schedule="zero-bubble", p=p, v=v, m=m, group=draw(st.sampled_from(GROUP_FOR_P[p])),
        forward_only=draw(st.booleans()) and draw(st.booleans()), loss_arity=draw(st.sampled_from([2, 3])),
        per_token=draw(st.booleans()), seed=draw(st.integers(0, 1000)), overlap=draw(st.booleans()),
        deallocate=draw(st.booleans()), split=split,
        variant="module" if split == "module" else draw(st.sampled_from(["", "", "view", "checkpoint"])),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=zero_bubble_cases())
def test_zero_bubble_gradients_are_bit_exact(pool, case):
    check_against_reference(case, pool.run(run_case, case), exact=True)


NAMED = [
    Case("zero-bubble", p=2, v=1, m=4, group="0-1", split="autograd"),
    Case("zero-bubble", p=2, v=2, m=4, group="2-3", split="autograd"),
    Case("zero-bubble", p=4, v=2, m=8, split="autograd", overlap=True),
    Case("zero-bubble", p=4, v=1, m=8, split="module", variant="module"),
    Case("zero-bubble", p=3, v=3, m=5, group="1-3", split="autograd", deallocate=True, variant="view"),
    Case("zero-bubble", p=4, v=2, m=6, split="autograd", variant="checkpoint", loss_arity=3, per_token=True),
    Case("zero-bubble", p=4, v=2, m=8, split="module", variant="module", overlap=True, loss_arity=3),
]


@pytest.mark.parametrize("case", NAMED, ids=lambda c: f"p{c.p}v{c.v}m{c.m}-{c.split}{'-' + c.variant if c.variant else ''}{'-overlap' if c.overlap else ''}")
def test_named_zero_bubble_configurations(pool, case):
    check_against_reference(case, pool.run(run_case, case), exact=True)
