"""Our per-rank order equals Megatron-core's wherever Megatron supports the configuration.

The oracle below is an independent transcription of Megatron-core's loop structure (warmup,
steady rounds of forward then backward, cooldown) with the closed-form chunk and microbatch of
the k-th virtual microbatch that Megatron used for the classic group size G = p (m % p == 0):
chunk = (k mod p·v) div p, microbatch = (k div p·v)·p + k mod p; backwards visit chunk v-1-chunk.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeschedule.plan import build_plan


def megatron_order(p, r, v, m, forward_only):
    total = m * v
    if forward_only:
        warmup = total
    elif v == 1:
        warmup = min(p - r - 1, m)
    else:
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total)

    def chunk(k, forward):
        c = (k % (p * v)) // p
        return c if forward else v - 1 - c

    def microbatch(k):
        return (k // (p * v)) * p + k % p if v > 1 else k

    order = [("F", microbatch(k), chunk(k, True)) for k in range(warmup)]
    if not forward_only:
        for i in range(total - warmup):
            k = warmup + i
            order.append(("F", microbatch(k), chunk(k, True)))
            order.append(("B", microbatch(i), chunk(i, False)))
        order += [("B", microbatch(k), chunk(k, False)) for k in range(total - warmup, total)]
    return order


@settings(max_examples=250, deadline=None)
@given(
    p=st.integers(1, 8), v=st.integers(1, 4), groups=st.integers(1, 6), extra=st.integers(0, 7), fo=st.booleans()
)
def test_order_equals_megatron(p, v, groups, extra, fo):
    # Interleaving: m a multiple of p (Megatron's classic setting); 1F1B: any m >= 1.
    m = groups * p if v > 1 else groups + extra
    for r in range(p):
        plan = build_plan(p=p, r=r, v=v, m=m, forward_only=fo)
        assert [(a.kind, a.microbatch, a.chunk) for a in plan.actions] == megatron_order(p, r, v, m, fo)
