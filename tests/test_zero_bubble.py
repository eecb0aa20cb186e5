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


@pytest.mark.parametrize("split", ["autograd", "module"])
def test_pending_weight_bytes_follow_the_plans_pending_count(pool, split):
    # Autograd split: a pending W holds its graph's saved tensors and captured gradients, the same
    # for every microbatch; after each action the count of pending W's is the plan's.
    import numpy as np

    from pipeschedule.plan import build_plan

    case = Case("zero-bubble", p=4, v=1, m=8, split=split, variant="module" if split == "module" else "")
    results = {out["group_rank"]: out for out in pool.run(run_case, case).values() if out is not None}
    for r, out in results.items():
        per_count: dict[int, set[int]] = {}
        plan = build_plan(p=4, r=r, v=1, m=8, schedule="zero-bubble")
        pending, counts = set(), []
        for action in plan.actions:
            if action.kind == "I":
                pending.add(action.microbatch)
            elif action.kind == "W":
                pending.discard(action.microbatch)
            counts.append(len(pending))
        got = out["pending_weight_bytes"]
        assert len(got) == len(counts) and max(counts) == r + 1 if r else max(counts) <= 1
        if split == "module":
            assert set(got) == {0}  # the layers hold their deferred operands; the schedule holds nothing
            continue
        assert got[-1] == 0
        for count, nbytes in zip(counts, got, strict=True):
            assert (count == 0) == (nbytes == 0), (r, counts, got)
            if count:
                per_count.setdefault(count, set()).add(nbytes)
        # The figure grows with the count of pending W's. Off the last stage it is one figure per
        # count, growing by the same step (one pending W's bytes; the first also holds the
        # parameters the graphs share); the loss stage's graphs also hold microbatch-sized scalars
        # whose storages the allocator may place anywhere, so only the order is asserted there.
        ordered = [per_count[c] for c in sorted(per_count)]
        assert all(max(a) < min(b) for a, b in zip(ordered, ordered[1:])), (r, per_count)
        if r < 3:
            assert all(len(f) == 1 for f in ordered), (r, per_count)
            steps = np.diff([0] + [next(iter(f)) for f in ordered])
            assert len(set(steps[1:])) <= 1 and steps[0] >= steps[-1] > 0, (r, steps)


# -- on one process: the split's refusals, the API ------------------------------------------------

import torch  # noqa: E402

import pipeschedule as ps  # noqa: E402


class _Block(torch.nn.Module):
    def __init__(self, reentrant: bool | None = None) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4).double()
        self.reentrant = reentrant
        self.input_tensor = None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, x):
        h = x if self.input_tensor is None else self.input_tensor
        if self.reentrant is None:
            return torch.tanh(self.lin(h))
        from torch.utils.checkpoint import checkpoint

        return checkpoint(lambda t: torch.tanh(self.lin(t)), h, use_reentrant=self.reentrant)


def _step(it, model):
    x = next(it) if it is not None else None
    out = model(x)
    return out, lambda o: (o.square().mean(), {"loss": o.square().mean().detach()})


def _run(chunks, **config):
    data = [torch.randn(2, 4, dtype=torch.float64, requires_grad=False) for _ in range(3)]
    iterators = [iter(data)] + [None] * (len(chunks) - 1)
    return ps.forward_backward_pipelining_zero_bubble(
        forward_step_func=_step, data_iterator=iterators, model=chunks, num_microbatches=3,
        config=ps.PipelineConfig(pipeline_dtype=torch.float64, **config),
    )


def test_a_reentrant_checkpoint_is_refused_naming_the_chunk_and_what_to_change():
    with pytest.raises(RuntimeError, match="model chunk 1 uses a reentrant activation checkpoint.*use_reentrant=False"):
        _run([_Block(), _Block(reentrant=True)], weight_grad_split="autograd")


def test_a_compiled_chunk_is_refused_before_anything_runs():
    chunks = [_Block(), torch.compile(_Block())]
    ran = []
    chunks[0].register_forward_hook(lambda *args: ran.append(1))
    with pytest.raises(ValueError, match="model chunk 1 is compiled with torch.compile.*weight_grad_split='module'"):
        _run(chunks, weight_grad_split="autograd")
    assert not ran  # refused at entry: no forward ran


def test_module_split_needs_backward_dw_on_every_chunk():
    with pytest.raises(ValueError, match="backward_dw\\(\\) method on every model chunk.*chunks \\[0, 1\\]"):
        _run([_Block(), _Block()], weight_grad_split="module")


@pytest.mark.parametrize("value", ["fast", None, 1])
def test_weight_grad_split_takes_three_names(value):
    with pytest.raises(ValueError, match="weight_grad_split must be 'auto', 'autograd' or 'module'"):
        _run([_Block()], weight_grad_split=value)


def test_auto_picks_the_module_split_only_when_every_chunk_defers():
    from pipeschedule.runtime.split import AutogradSplit, ModuleSplit, choose_split

    class Deferring(_Block):
        def backward_dw(self):
            pass

    owner = lambda chunk: chunk  # noqa: E731
    assert isinstance(choose_split("auto", [Deferring(), Deferring()], owner), ModuleSplit)
    assert isinstance(choose_split("auto", [Deferring(), _Block()], owner), AutogradSplit)


def test_a_non_reentrant_checkpoint_and_plain_blocks_split_bit_exactly_on_one_process():
    torch.manual_seed(0)
    chunks = [_Block(), _Block(reentrant=False), _Block()]
    grads = {}
    for name, func in (("zb", ps.forward_backward_pipelining_zero_bubble), ("interleaved", ps.forward_backward_pipelining_with_interleaving)):
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
            chunk.input_tensor = None
        torch.manual_seed(1)
        data = [torch.randn(2, 4, dtype=torch.float64) for _ in range(3)]
        func(forward_step_func=_step, data_iterator=[iter(data), None, None], model=chunks, num_microbatches=3,
             config=ps.PipelineConfig(pipeline_dtype=torch.float64, weight_grad_split="autograd"))
        grads[name] = [q.grad.clone() for chunk in chunks for q in chunk.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads["zb"], grads["interleaved"], strict=True))


def test_get_forward_backward_func_gives_zero_bubble_on_request():
    assert ps.get_forward_backward_func(zero_bubble=True) is ps.forward_backward_pipelining_zero_bubble
    with pytest.raises(TypeError, match="zero_bubble must be True or False"):
        ps.get_forward_backward_func(zero_bubble="yes")
