"""Ordinary mistakes on real gloo groups: exact gradients or a clear error on every rank, never a
silent wrong result, a process abort or a timeout.

Every job runs with ``p2p_timeout = 30 s`` on a process group made for it, and the errors must come
within a few seconds, so no test can pass by timing out. Failed ranks stay alive.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch

import pipeschedule as ps
from cases import BATCH, HIDDEN, SEQ, Batches, Case, Stage, forward_step, loss_func_for, microbatches, run_case
from pool import GROUPS, JobError

TIMEOUT = 30.0
PROMPT = 8.0  # seconds within which every rank must have raised (scheduling noise on two loaded cores)

_GROUPS: list = []


class Cast(torch.nn.Module):
    """A stage computing in float64 that sends and receives ``dtype``."""

    def __init__(self, stage: Stage, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype, self.stage = stage, dtype, stage.stage

    def set_input_tensor(self, tensor):
        self.inner.set_input_tensor(None if tensor is None else tensor.double())

    def forward(self, x):
        out = self.inner(x)
        return out if self.stage == self.inner.num_stages - 1 else out.to(self.dtype)


class Identity(torch.nn.Module):
    """A stage with no layers: it returns the tensor it received."""

    def __init__(self, stage: int) -> None:
        super().__init__()
        self.stage, self.input_tensor = stage, None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, x):
        return self.input_tensor


class Unwired(Stage):
    """A middle stage whose forward reads the data instead of the tensor given to set_input_tensor."""

    def forward(self, x):
        return x + torch.tanh(x @ self.weight + self.bias)


def _stage(kind: str, s: int, num_stages: int, seed: int) -> torch.nn.Module:
    if kind == "identity":
        return Identity(s)
    if kind in ("unwired", "unwired-declared"):
        stage = Unwired(s, num_stages, seed)
        if kind == "unwired-declared":
            stage.ignores_input_tensor = True
        return stage
    return Stage(s, num_stages, seed)


def _model(case: Case, special: dict[int, str]) -> list[torch.nn.Module]:
    n = case.p * case.v
    return [_stage(special.get(s, ""), s, n, case.seed) for s in range(n)]


def reference(case: Case, special: dict[int, str]) -> dict[str, Any]:
    """The model with its special stages on one process: losses and gradients per stage."""
    stages = _model(case, special)
    losses = []
    for batch in microbatches(case):
        h = batch["x"]
        for stage in stages:
            stage.set_input_tensor(h)
            h = stage(batch["x"])  # as in forward_step: the chunk is called with the data
        loss, reduced = loss_func_for(case, batch)(h)
        losses.append(reduced["loss"].item())
        (loss / case.m).backward()
    grads = {s.stage: [np.zeros_like(p.detach().numpy()) if p.grad is None else p.grad.numpy().copy() for p in s.parameters()]
             for s in stages}
    return {"losses": losses, "grads": grads}


def called(arg: tuple, rank: int, groups: dict) -> dict[str, Any] | None:
    """Run one step of ``case`` on a fresh group; group rank ``odd`` is called with ``overrides``.

    ``special`` maps a stage to its kind (identity, unwired, ...); ``wrap`` is ``inference_mode``
    or ``None``. Reports the outcome instead of raising.
    """
    import torch.distributed as dist

    case, odd, overrides, special, wrap = arg
    ranks = GROUPS[case.group]
    _GROUPS[:] = [dist.new_group(ranks)]  # every worker joins the creation; kept until the next job
    if rank not in ranks:
        return None
    r = ranks.index(rank)
    mine = dict(overrides) if r == odd else {}
    v = mine.get("v", case.v)
    dtype = mine.get("dtype", overrides.get("all_dtype", torch.float64))
    n = case.p * v
    chunks = [_stage(special.get(c * case.p + r, ""), c * case.p + r, n, case.seed) for c in range(v)]
    if dtype != torch.float64:
        chunks = [Cast(chunk, dtype) for chunk in chunks]
    config = ps.PipelineConfig(
        hidden_size=HIDDEN, pipeline_dtype=dtype,
        microbatch_group_size_per_vp_stage=mine.get("group_size", case.group_size),
        variable_seq_lengths=mine.get("variable_seq_lengths", case.seq_lens is not None),
        check_p2p_shapes=mine.get("check_p2p_shapes", case.check_p2p_shapes), overlap_p2p_comm=case.overlap,
        deallocate_pipeline_outputs=case.deallocate, p2p_timeout=mine.get("p2p_timeout", case.p2p_timeout or TIMEOUT),
        calculate_per_token_loss=mine.get("per_token", False),
    )
    schedule = ps.forward_backward_pipelining_with_interleaving if v > 1 else ps.forward_backward_pipelining_without_interleaving
    if mine.get("zero_bubble"):
        schedule = ps.forward_backward_pipelining_zero_bubble
    m = mine.get("m", case.m)
    step = forward_step
    if "detach" in overrides and r == odd:
        detach = overrides["detach"]

        def step(it, model):  # noqa: F811 - the mistake under test
            out, loss_func = forward_step(it, model)
            if detach == "loss":
                return out, lambda o: (lambda res: (res[0].detach(), res[1]))(loss_func(o))
            return out.detach(), loss_func

    start = time.time()
    try:
        if mine.get("absent"):
            time.sleep(mine["absent"])
            return {"error": None, "start": start, "t": time.time(), "group_rank": r}
        with torch.inference_mode() if wrap == "inference_mode" else torch.enable_grad():
            out = schedule(
                forward_step_func=step, data_iterator=[Batches(case) for _ in chunks] if v > 1 else Batches(case),
                model=chunks if v > 1 else chunks[0], num_microbatches=m, seq_length=mine.get("seq_length", SEQ),
                micro_batch_size=BATCH, forward_only=mine.get("forward_only", case.forward_only), config=config,
            group=_GROUPS[0])
    except Exception as exc:  # the outcome under test
        return {"error": type(exc).__name__, "message": str(exc), "start": start, "t": time.time(),
                "failed_rank": getattr(exc, "failed_rank", None), "group_rank": r}
    params = {c.stage: [p.grad.numpy().copy() if p.grad is not None else None for p in c.parameters()] for c in chunks}
    return {"error": None, "start": start, "t": time.time(), "group_rank": r, "losses": [d["loss"].item() for d in out],
            "grads": params}


def _outcomes(pool, case: Case, odd: int = -1, overrides: dict | None = None, special: dict | None = None, wrap=None):
    results = pool.run(called, (case, odd, overrides or {}, special or {}, wrap), timeout=4 * TIMEOUT)
    outs = {results[g]["group_rank"]: results[g] for g in GROUPS[case.group]}
    for r, out in outs.items():
        assert not isinstance(out, JobError), (r, out)  # a process abort would show as WorkerDied
    return outs


def _assert_prompt(outs: dict) -> None:
    for r, out in outs.items():
        assert out["t"] - out["start"] < PROMPT, (r, out["t"] - out["start"], out.get("message"))


def _assert_exact(outs: dict, ref: dict) -> None:
    p = len(outs)
    for r, out in outs.items():
        assert out["error"] is None, (r, out)
        if r == p - 1:
            assert np.allclose(out["losses"], ref["losses"], rtol=0, atol=1e-12)
        for stage, grads in out["grads"].items():
            for got, want in zip(grads, ref["grads"][stage]):
                got = np.zeros_like(want) if got is None else got
                assert np.max(np.abs(got - want)) <= 1e-12, (stage, got, want)


# -- 13: ranks called with different arguments ------------------------------------------------------

MISMATCHES = [
    # id, case, the odd group rank, its arguments, words both sides' values must appear as
    ("num_microbatches", Case("interleaved", p=4, v=2, m=8), 2, {"m": 12}, ["num_microbatches=8", "num_microbatches=12"]),
    ("num_microbatches-overlap", Case("interleaved", p=4, v=2, m=8, overlap=True), 1, {"m": 4},
     ["num_microbatches=8", "num_microbatches=4"]),
    ("num_microbatches-variable", Case("1f1b", p=3, v=1, m=4, group="1-3", seq_lens=(3, 3, 3, 3)), 1, {"m": 3},
     ["num_microbatches=4", "num_microbatches=3"]),
    ("chunks", Case("interleaved", p=4, v=2, m=8), 1, {"v": 3}, ["v=2 model chunks", "v=3 model chunks"]),
    ("1f1b-and-interleaved", Case("interleaved", p=4, v=2, m=4), 0, {"v": 1}, ["v=2 model chunks", "v=1 model chunks"]),
    ("group-size", Case("interleaved", p=4, v=2, m=8, group_size=4), 3, {"group_size": 8},
     ["microbatch_group_size_per_vp_stage=4", "microbatch_group_size_per_vp_stage=8"]),
    ("forward-only", Case("1f1b", p=4, v=1, m=4), 1, {"forward_only": True}, ["forward_only=False", "forward_only=True"]),
    ("seq-length", Case("1f1b", p=4, v=1, m=4), 2, {"seq_length": 5}, ["activation dimension 0 = 3", "activation dimension 0 = 5"]),
    ("seq-length-interleaved", Case("interleaved", p=3, v=2, m=3, group="1-3"), 2, {"seq_length": 2},
     ["activation dimension 0 = 3", "activation dimension 0 = 2"]),
    ("dtype", Case("1f1b", p=4, v=1, m=4), 3, {"dtype": torch.float32}, ["pipeline_dtype=torch.float64", "pipeline_dtype=torch.float32"]),
    ("check-p2p-shapes", Case("1f1b", p=4, v=1, m=4), 2, {"check_p2p_shapes": True}, ["no headers", "check_p2p_shapes=True"]),
    ("variable-seq-lengths", Case("interleaved", p=2, v=2, m=4, group="2-3"), 1, {"variable_seq_lengths": True},
     ["no headers", "variable_seq_lengths=True"]),
    ("per-token-loss", Case("1f1b", p=4, v=1, m=4), 1, {"per_token": True},
     ["calculate_per_token_loss=False", "calculate_per_token_loss=True"]),
    ("zero-bubble-and-1f1b", Case("1f1b", p=4, v=1, m=4), 2, {"zero_bubble": True}, ["1F1B or interleaved 1F1B", "zero bubble"]),
    ("zero-bubble-and-interleaved", Case("interleaved", p=4, v=2, m=4), 0, {"zero_bubble": True},
     ["1F1B or interleaved 1F1B", "zero bubble"]),
]


@pytest.mark.parametrize(("case", "odd", "overrides", "words"), [m[1:] for m in MISMATCHES], ids=[m[0] for m in MISMATCHES])
def test_ranks_called_with_different_arguments_all_raise_naming_both(pool, case, odd, overrides, words):
    outs = _outcomes(pool, case, odd, overrides)
    p = case.p
    finders = {(odd - 1) % p, (odd + 1) % p, odd}
    # The ranks on a channel whose two ends disagree say so themselves, with both calls in full;
    # a rank may instead hear it first from a neighbour that found it (the notice names both values).
    assert "ArgumentMismatchError" in {out["error"] for out in outs.values()}, outs
    for r, out in outs.items():
        assert out["error"] in ("ArgumentMismatchError", "PeerFailedError"), (r, out)
        if out["error"] == "PeerFailedError":
            assert out["failed_rank"] in finders, (r, out)
        for word in words:
            assert word in out["message"], (r, word, out["message"])
        assert f"pipeline rank {odd} (global rank {GROUPS[case.group][odd]})" in out["message"] or r != odd
        assert "restart the job" in out["message"]
    _assert_prompt(outs)
    # Nothing was left half-read in a process: the pool's workers run a correct step right after.
    healthy = pool.run(run_case, Case("1f1b", p=4, v=1, m=3))
    assert all(not isinstance(out, JobError) for out in healthy.values()), healthy


# -- 2: bf16 on one rank, fp16 on its neighbour ------------------------------------------------------

def test_bf16_on_one_rank_and_fp16_on_its_neighbour_is_an_error_on_every_rank(pool):
    case = Case("1f1b", p=3, v=1, m=3, group="1-3")
    outs = _outcomes(pool, case, 1, {"dtype": torch.bfloat16, "all_dtype": torch.float16})
    for r, out in outs.items():
        assert out["error"] == "ArgumentMismatchError", (r, out)
        assert "pipeline_dtype=torch.bfloat16" in out["message"] and "pipeline_dtype=torch.float16" in out["message"]
    _assert_prompt(outs)
    # The same chunks with one dtype everywhere run (a control: the error is the dtype, nothing else).
    same = _outcomes(pool, case, 1, {"dtype": torch.float16, "all_dtype": torch.float16})
    assert all(out["error"] is None for out in same.values()), same


# -- 1: deallocate_pipeline_outputs with a stage that returns its input ------------------------------

@pytest.mark.parametrize(
    "case",
    [
        Case("1f1b", p=4, v=1, m=5, deallocate=True, seed=3),
        Case("1f1b", p=4, v=1, m=5, deallocate=True, overlap=True, seed=3),
        Case("interleaved", p=2, v=3, m=4, group="0-1", deallocate=True, seed=5),
        Case("1f1b", p=3, v=1, m=3, group="1-3", deallocate=True, seq_lens=(3, 2, 4), seed=1),
    ],
    ids=["1f1b", "overlap", "interleaved-p2", "variable"],
)
def test_an_identity_stage_with_deallocated_outputs_gives_exact_gradients(pool, case):
    special = {1: "identity", case.p * case.v - 2: "identity"}
    _assert_exact(_outcomes(pool, case, special=special), reference(case, special))


# -- 3: a chunk that ignores set_input_tensor ---------------------------------------------------------

@pytest.mark.parametrize("overlap", [False, True], ids=["batched", "overlap"])
def test_a_chunk_that_ignores_set_input_tensor_is_named(pool, overlap):
    case = Case("1f1b", p=4, v=1, m=4, overlap=overlap)
    outs = _outcomes(pool, case, special={2: "unwired"})
    bad = outs[2]
    assert bad["error"] == "ValueError", bad
    assert "stage 2 (model chunk 0 on pipeline rank 2 (global rank 2))" in bad["message"]
    assert "does not depend on the activation received from stage 1" in bad["message"]
    assert "set_input_tensor not wired" in bad["message"] and "ignores_input_tensor = True" in bad["message"]
    for r in (0, 1, 3):
        if outs[r]["error"] is not None:
            assert outs[r]["error"] == "PeerFailedError" and outs[r]["failed_rank"] == 2, outs[r]
    for r in (0, 1):  # they wait for its gradients
        assert outs[r]["error"] == "PeerFailedError", outs[r]
    _assert_prompt(outs)


def test_a_chunk_that_declares_it_ignores_its_input_runs_and_the_stages_before_get_zero_gradients(pool):
    case = Case("1f1b", p=4, v=1, m=4)
    special = {2: "unwired-declared"}
    outs = _outcomes(pool, case, special=special)
    _assert_exact(outs, reference(case, special))
    for r in (0, 1):
        assert all(np.all(g == 0) for g in outs[r]["grads"][r]), outs[r]["grads"]


# -- 12: detached loss, detached output, inference_mode ---------------------------------------------

@pytest.mark.parametrize(
    ("odd", "detach", "words"),
    [
        (3, "loss", "stage 3 (model chunk 0 on pipeline rank 3 (global rank 3)): the loss of microbatch 0 does not require grad"),
        (1, "output", "stage 1 (model chunk 0 on pipeline rank 1 (global rank 1)) returned an activation for microbatch 0 that does not require grad"),
    ],
    ids=["loss", "middle-output"],
)
def test_a_detached_loss_or_output_is_named(pool, odd, detach, words):
    outs = _outcomes(pool, Case("1f1b", p=4, v=1, m=4), odd, {"detach": detach})
    assert outs[odd]["error"] == "ValueError" and words in outs[odd]["message"], outs[odd]
    assert "forward_only=True" in outs[odd]["message"]
    for r, out in outs.items():
        if r != odd and out["error"] is not None:
            assert out["error"] == "PeerFailedError" and out["failed_rank"] == odd, out
    assert outs[odd - 1]["error"] == "PeerFailedError"  # it waits for a gradient from the failed rank
    _assert_prompt(outs)


def test_inference_mode_around_the_call_is_refused_on_every_rank_before_communicating(pool):
    case = Case("interleaved", p=3, v=2, m=3, group="1-3")
    outs = _outcomes(pool, case, wrap="inference_mode")
    for r, out in outs.items():
        assert out["error"] == "RuntimeError", out
        assert f"pipeline rank {r} (global rank {r + 1}): the schedule was called inside torch.inference_mode()" in out["message"]
        assert out["t"] - out["start"] < 2.0
    # Nothing was sent: the forward-only step under inference_mode runs on the pool's own group.
    fine = pool.run(called, (Case("interleaved", p=3, v=2, m=3, group="1-3", forward_only=True), -1, {}, {}, "inference_mode"))
    assert all(out is None or out["error"] is None for out in fine.values()), fine


# -- 6, 10: p2p_timeout outside what the backends honour ---------------------------------------------

@pytest.mark.parametrize("timeout", [0.0004, 0.0, 1e10, 1e14, float("nan")])
def test_a_p2p_timeout_outside_1ms_to_30_days_is_refused_at_entry(timeout):
    config = ps.PipelineConfig(hidden_size=HIDDEN, pipeline_dtype=torch.float64, p2p_timeout=timeout)
    with pytest.raises(ValueError, match=r"config.p2p_timeout must be a number of seconds from 0.001 \(1 ms\) to 2592000 \(30 days\)"):
        ps.forward_backward_pipelining_without_interleaving(
            forward_step_func=forward_step, data_iterator=Batches(Case("1f1b", p=1, v=1, m=2)), model=Stage(0, 1, 0),
            num_microbatches=2, seq_length=SEQ, micro_batch_size=BATCH, config=config)


def test_the_smallest_p2p_timeout_still_times_out(pool):
    # Group rank 1 never calls the schedule; rank 0 must give up after about 1 ms, not wait forever.
    outs = _outcomes(pool, Case("1f1b", p=2, v=1, m=2, group="0-1", p2p_timeout=0.001), 1, {"absent": 3.0})
    waiting = outs[0]
    assert waiting["error"] == "PeerFailedError" and "p2p_timeout=0.001s" in waiting["message"], waiting
    assert waiting["t"] - waiting["start"] < 2.0


def test_the_largest_p2p_timeout_runs_an_exact_step(pool):
    case = Case("1f1b", p=4, v=1, m=3)
    outs = _outcomes(pool, case, 0, {"p2p_timeout": 30 * 24 * 3600.0}, special={})
    _assert_exact(outs, reference(case, {}))
