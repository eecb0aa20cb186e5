"""Loss handling and the data-parallel hooks, on one process (a pipeline of one rank)."""

import contextlib

import numpy as np
import pytest
import torch

import pipeschedule as ps
from cases import Batches, Case, Stage, forward_step, reference


class Recorder:
    """Tracks whether a no_sync context is open while each forward and backward runs."""

    def __init__(self, chunks):
        self.open: set[int] = set()
        self.log: list[tuple] = []
        for c, chunk in enumerate(chunks):
            chunk.register_forward_pre_hook(lambda mod, args, c=c: self.log.append(("F", c, frozenset(self.open))))
            chunk.weight.register_hook(lambda grad, c=c: self.log.append(("B", c, frozenset(self.open))) or grad)

    def no_sync(self, key):
        @contextlib.contextmanager
        def context():
            self.open.add(key)
            try:
                yield
            finally:
                self.open.discard(key)

        return context


def run(schedule_name, case, config_kwargs, chunks=None):
    chunks = chunks or [Stage(s, case.v, case.seed) for s in range(case.v)]
    config = ps.PipelineConfig(**config_kwargs)
    func = {
        "none": ps.forward_backward_no_pipelining,
        "1f1b": ps.forward_backward_pipelining_without_interleaving,
        "interleaved": ps.forward_backward_pipelining_with_interleaving,
        "zero-bubble": ps.forward_backward_pipelining_zero_bubble,
    }[schedule_name]
    listed = schedule_name == "interleaved" or (schedule_name == "zero-bubble" and len(chunks) > 1)
    model = chunks if listed else chunks[0]
    data = [Batches(case) for _ in chunks] if listed else Batches(case)
    out = func(forward_step_func=forward_step, data_iterator=data, model=model, num_microbatches=case.m,
               forward_only=case.forward_only, config=config)
    return out, chunks


def test_no_pipelining_runs_all_but_the_last_microbatch_under_no_sync():
    case = Case("none", p=1, v=1, m=4)
    chunks = [Stage(0, 1, 0)]
    rec = Recorder(chunks)
    run("none", case, {"no_sync_func": rec.no_sync("all")}, chunks)
    inside = [(kind, bool(state)) for kind, _, state in rec.log]
    assert inside == [("F", True), ("B", True)] * 3 + [("F", False), ("B", False)]


def test_one_no_sync_for_all_chunks_is_left_for_each_chunks_last_backward():
    # Interleaved without grad_sync_func (Megatron-core's rule): no_sync is left for the backward
    # of each chunk's last microbatch, so the wrapper reduces that chunk, and entered again after.
    case = Case("interleaved", p=1, v=3, m=2)
    chunks = [Stage(s, 3, 0) for s in range(3)]
    rec = Recorder(chunks)
    run("interleaved", case, {"no_sync_func": rec.no_sync("all")}, chunks)
    plan = ps.build_plan(p=1, r=0, v=3, m=2)
    last = [a.microbatch == case.m - 1 for a in plan.actions if a.kind == "B"]
    assert [bool(state) for kind, _, state in rec.log if kind == "B"] == [not x for x in last]
    assert all(state for kind, _, state in rec.log if kind == "F") and not rec.open


def test_per_chunk_no_sync_stays_entered_and_grad_sync_runs_once_per_chunk_after_its_last_backward():
    # With grad_sync_func the hook starts each reduction: every backward runs inside every chunk's
    # no_sync, and on rank 0 chunk c's grad sync comes right after its last backward.
    case = Case("interleaved", p=1, v=3, m=3)
    chunks = [Stage(s, 3, 0) for s in range(3)]
    rec = Recorder(chunks)
    synced, params_synced, finalized = [], [], []

    def grad_sync(params):
        params = list(params)
        chunk = next(c for c, ch in enumerate(chunks) if ch.weight is params[0])
        synced.append((chunk, len(rec.log), frozenset(rec.open)))

    def param_sync(params):
        params = list(params)
        params_synced.append((next(c for c, ch in enumerate(chunks) if ch.weight is params[0]), len(rec.log)))

    out, _ = run(
        "interleaved", case,
        {
            "no_sync_func": [rec.no_sync(c) for c in range(3)],
            "grad_sync_func": grad_sync,
            "param_sync_func": param_sync,
            "finalize_model_grads_func": lambda model, num_tokens: finalized.append((len(model), num_tokens, len(rec.log))),
        },
        chunks,
    )
    backwards = [(i, c, state) for i, (kind, c, state) in enumerate(rec.log) if kind == "B"]
    assert all(state == {0, 1, 2} for _, _, state in backwards)
    for c in range(3):
        mine = [i for i, cc, _ in backwards if cc == c]
        assert [(n, state) for cc, n, state in synced if cc == c] == [(mine[-1] + 1, frozenset())]
    first_forward = {c: next(i for i, (kind, cc, _) in enumerate(rec.log) if kind == "F" and cc == c) for c in range(3)}
    # Chunks 0 and 1 before the first forward; chunk c >= 2 when chunk c - 1 starts (r = 0 ahead).
    assert params_synced == [(0, 0), (1, 0), (2, first_forward[1])]
    assert finalized == [(3, None, len(rec.log))] and not rec.open
    assert len(out) == 3


def test_1f1b_on_the_first_rank_leaves_no_sync_before_its_last_backward_and_calls_no_grad_sync():
    case = Case("1f1b", p=1, v=1, m=3)
    chunks = [Stage(0, 1, 0)]
    rec = Recorder(chunks)
    calls = []
    run("1f1b", case, {"no_sync_func": rec.no_sync("all"), "grad_sync_func": calls.append}, chunks)
    assert [bool(state) for _, _, state in rec.log] == [True] * 5 + [False]
    assert calls == []


def test_hooks_do_not_run_forward_only():
    case = Case("interleaved", p=1, v=2, m=2, forward_only=True)
    chunks = [Stage(s, 2, 0) for s in range(2)]
    rec = Recorder(chunks)
    calls = []
    out, _ = run("interleaved", case, {"no_sync_func": rec.no_sync("all"), "grad_sync_func": calls.append,
                                       "finalize_model_grads_func": lambda *a: calls.append(a)}, chunks)
    assert calls == [] and not any(state for _, _, state in rec.log) and all(c.weight.grad is None for c in chunks)
    assert [d["loss"].item() for d in out] == reference(case)["losses"]


@pytest.mark.parametrize("arity", [2, 3])
@pytest.mark.parametrize("schedule", ["none", "1f1b", "interleaved"])
def test_one_process_gradients_equal_the_reference(schedule, arity):
    v = 3 if schedule == "interleaved" else 1
    case = Case(schedule, p=1, v=v, m=5, loss_arity=arity, seed=7)
    out, chunks = run(schedule, case, {})
    ref = reference(case)
    assert [d["loss"].item() for d in out] == ref["losses"]
    for chunk in chunks:
        for got, want in zip((p.grad.numpy() for p in chunk.parameters()), ref["grads"][chunk.stage]):
            assert np.max(np.abs(got - want)) <= 1e-12


def test_grad_scale_func_scales_the_loss_before_backward():
    case = Case("1f1b", p=1, v=1, m=3)
    _, plain = run("1f1b", case, {})
    _, scaled = run("1f1b", case, {"grad_scale_func": lambda loss: loss * 8.0})
    assert torch.equal(scaled[0].weight.grad, plain[0].weight.grad * 8.0)


def test_collect_non_loss_data_returns_what_loss_func_gives():
    case = Case("interleaved", p=1, v=2, m=3, forward_only=True)
    chunks = [Stage(s, 2, 0) for s in range(2)]
    data = [Batches(case) for _ in chunks]
    out = ps.forward_backward_pipelining_with_interleaving(
        forward_step_func=forward_step, data_iterator=data, model=chunks, num_microbatches=3,
        forward_only=True, collect_non_loss_data=True,
    )
    assert len(out) == 3 and all(set(d) == {"output_sum"} for d in out)


def test_observer_sees_every_action_and_exchange():
    events = []
    case = Case("interleaved", p=1, v=2, m=2)
    run("interleaved", case, {"observer": events.append})
    plan = ps.build_plan(p=1, r=0, v=2, m=2)
    assert [e.action for e in events if e.what == "action"] == list(plan.actions)
    assert all(e.end >= e.start for e in events)
    assert sum(e.what == "exchange" for e in events) == sum(bool(ex) for ex in plan.exchanges)


def test_config_falls_back_to_the_first_chunk_and_reads_foreign_objects():
    class MegatronLike:  # only some of the attribute names, as on another framework's config
        hidden_size = 4
        pipeline_dtype = torch.float64
        grad_scale_func = staticmethod(lambda loss: loss * 2.0)

    case = Case("1f1b", p=1, v=1, m=2)
    chunk = Stage(0, 1, 0)
    chunk.config = MegatronLike()
    _, plain = run("1f1b", case, {})
    ps.forward_backward_pipelining_without_interleaving(
        forward_step_func=forward_step, data_iterator=Batches(case), model=[chunk], num_microbatches=2,
    )
    assert torch.equal(chunk.weight.grad, plain[0].weight.grad * 2.0)


def test_get_forward_backward_func_without_a_process_group():
    assert ps.get_forward_backward_func() is ps.forward_backward_no_pipelining
    assert ps.get_forward_backward_func(virtual_pipeline_model_parallel_size=2) is ps.forward_backward_no_pipelining


def test_zero_bubble_syncs_each_chunk_right_after_its_last_weight_pass():
    # The weight's gradient hook fires in W (the autograd split): a chunk's gradients are complete
    # after its last W, and grad_sync_func of that chunk comes right then, inside no_sync for none.
    case = Case("zero-bubble", p=1, v=3, m=3)
    chunks = [Stage(s, 3, 0) for s in range(3)]
    rec = Recorder(chunks)
    synced = []

    def grad_sync(params):
        params = list(params)
        synced.append((next(c for c, ch in enumerate(chunks) if ch.weight is params[0]), len(rec.log)))

    run("zero-bubble", case, {"no_sync_func": [rec.no_sync(c) for c in range(3)], "grad_sync_func": grad_sync,
                              "weight_grad_split": "autograd"}, chunks)
    weights = [(i, c) for i, (kind, c, _) in enumerate(rec.log) if kind == "B"]
    assert len(weights) == 9 and sorted(c for c, _ in synced) == [0, 1, 2]
    for chunk, at in synced:
        last = max(i for i, c in weights if c == chunk)
        assert at == last + 1, (chunk, at, weights)  # nothing of the pipeline ran in between
    assert all(state == {0, 1, 2} for kind, _, state in rec.log)


def test_zero_bubble_without_grad_sync_leaves_no_sync_for_each_chunks_last_weight_pass():
    case = Case("zero-bubble", p=1, v=2, m=3)
    chunks = [Stage(s, 2, 0) for s in range(2)]
    rec = Recorder(chunks)
    run("zero-bubble", case, {"no_sync_func": rec.no_sync("all"), "weight_grad_split": "autograd"}, chunks)
    plan = ps.build_plan(p=1, r=0, v=2, m=3, schedule="zero-bubble")
    last = [a.microbatch == case.m - 1 for a in plan.actions if a.kind == "W"]
    assert [bool(state) for kind, _, state in rec.log if kind == "B"] == [not x for x in last]
    assert not rec.open
