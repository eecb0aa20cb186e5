"""Fault jobs on a pipeline × data-parallel grid (p = 2, dp = 2 on the pool's four workers).

Each job builds its own groups with :func:`pipeschedule.training.layout.create_parallel_groups` (global
rank ``g`` is pipeline rank ``g // 2`` of replica ``g % 2``), wraps the chunks in
:class:`pipeschedule.training.data_parallel.DataParallelChunks` and sums a tied weight over the embedding
group with :func:`pipeschedule.training.tied.make_finalize_model_grads`, as a training loop would. One
global rank fails (it raises and stays alive, or is interrupted with SIGINT); every rank reports
what it raised and when.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from cases import BATCH, HIDDEN, SEQ, Batches, Stage, forward_step

P, DP = 2, 2


@dataclass(frozen=True)
class GridCase:
    """One step on the p × dp grid, with a fault on global rank ``failed``.

    ``kind``: ``F`` / ``B`` raise in that forward / backward (``microbatch``, ``chunk``), ``L`` in
    loss_func, ``hook`` in the data-parallel ``grad_sync_func``, ``sigint`` sends SIGINT to the
    rank ``sigint_after`` seconds into the step (while it waits on ``slow``, which sleeps
    ``slow_s`` in its first forward), ``none`` nothing. ``raw_hook``: the data-parallel average is
    a plain, unbounded ``dist.all_reduce`` in the user's own ``grad_sync_func``, over groups whose
    backend timeout is ``group_timeout``.
    """

    schedule: str = "1f1b"
    v: int = 1
    m: int = 4
    failed: int = 0
    kind: str = "F"
    microbatch: int = 0
    chunk: int = 0
    mode: str = "fixed"  # fixed | check | variable | overlap
    p2p_timeout: float = 30.0
    seed: int = 0
    slow: int = -1  # global rank whose first forward sleeps slow_s
    slow_s: float = 0.0
    sigint_after: float = 1.0
    raw_hook: bool = False
    group_timeout: float | None = None


class TiedStage(Stage):
    """A stage whose first and last virtual stages share one weight (adds a tied bias), like an embedding and its head."""

    def __init__(self, stage: int, num_stages: int, seed: int) -> None:
        super().__init__(stage, num_stages, seed)
        gen = torch.Generator().manual_seed(seed * 1000 + 999)
        tied = stage in (0, num_stages - 1)
        self.tied = torch.nn.Parameter(torch.randn(HIDDEN, generator=gen, dtype=torch.float64) * 0.1) if tied else None

    def shared_embedding_weight(self) -> torch.nn.Parameter | None:
        return self.tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + self.tied if self.tied is not None else out


class Fault(RuntimeError):
    """The error the failing rank raises."""


def grid_job(case: GridCase, rank: int, groups: dict) -> dict[str, Any]:
    """Run one step of ``case`` on this worker; report the error (or none), when it came and when the fault was."""
    import torch.distributed as dist

    import pipeschedule as ps
    from pipeschedule.training.data_parallel import DataParallelChunks
    from pipeschedule.training.layout import create_parallel_groups
    from pipeschedule.training.tied import make_finalize_model_grads

    timeout = timedelta(seconds=case.group_timeout) if case.group_timeout is not None else None
    grid = create_parallel_groups(p=P, dp=DP, timeout=timeout)
    r, p = grid.pp_rank, P
    chunks = [TiedStage(c * p + r, p * case.v, case.seed) for c in range(case.v)]
    data_parallel = DataParallelChunks(chunks=chunks, group=grid.data_parallel)
    finalize = make_finalize_model_grads(embedding_group=grid.embedding)
    hooks = data_parallel.config_hooks(finalize_model_grads_func=finalize)
    fault: dict[str, float] = {}
    mine = rank == case.failed
    if case.raw_hook:
        def raw_average(params, group=grid.data_parallel) -> None:  # a user's own, unbounded collective
            for param in params:
                if param.grad is not None:
                    dist.all_reduce(param.grad, group=group)
                    param.grad.div_(DP)
        hooks = {"grad_sync_func": raw_average, "finalize_model_grads_func": lambda chunks, tokens: None}
    if mine and case.kind == "hook":
        inner = hooks["grad_sync_func"]

        def failing_sync(params, c=0) -> None:
            fault["t"] = time.time()
            raise Fault("injected fault in grad_sync_func")

        hooks = {**hooks, "grad_sync_func": [failing_sync] * case.v if isinstance(inner, list) else failing_sync}
    config = ps.PipelineConfig(
        hidden_size=HIDDEN, pipeline_dtype=torch.float64, p2p_timeout=case.p2p_timeout,
        check_p2p_shapes=case.mode == "check", variable_seq_lengths=case.mode == "variable",
        overlap_p2p_comm=case.mode == "overlap", **hooks,
    )
    step = _faulty_step(case, rank, r, fault)
    listed = case.v > 1
    model: Any = data_parallel.modules if listed else data_parallel.modules[0]
    iterators: Any = [_GridBatches(case) for _ in chunks] if listed else _GridBatches(case)
    func = {
        "interleaved": ps.forward_backward_pipelining_with_interleaving,
        "1f1b": ps.forward_backward_pipelining_without_interleaving,
        "zero-bubble": ps.forward_backward_pipelining_zero_bubble,
    }[case.schedule]
    timer = None
    if mine and case.kind == "sigint":
        def interrupt() -> None:
            fault["t"] = time.time()
            os.kill(os.getpid(), signal.SIGINT)

        timer = threading.Timer(case.sigint_after, interrupt)
        timer.start()
    out: dict[str, Any] = {"pp_rank": r, "dp_rank": grid.dp_rank, "error": None, "message": "", "failed_global_rank": None}
    try:
        func(forward_step_func=step, data_iterator=iterators, model=model, num_microbatches=case.m,
             seq_length=SEQ, micro_batch_size=BATCH, config=config, group=grid.pipeline)
    except BaseException as exc:  # KeyboardInterrupt too: the outcome under test
        out.update(error=type(exc).__name__, message=str(exc), failed_global_rank=getattr(exc, "failed_global_rank", None),
                   failed_rank=getattr(exc, "failed_rank", None))
    out["t_error"] = time.time()
    if timer is not None:
        timer.cancel()
    out["t_fault"] = fault.get("t")
    # Kept until the next job: destroying the groups now would close connections the others may still read.
    _KEEP[:] = [grid]
    return out


_KEEP: list = []


class _GridBatches(Batches):
    def __init__(self, case: GridCase) -> None:
        from cases import Case

        seq = (3, 2, 4, 3, 1, 5, 2, 3)[: case.m] if case.mode == "variable" else None
        super().__init__(Case("1f1b", p=1, v=1, m=case.m, seed=case.seed, seq_lens=seq))


def _faulty_step(case: GridCase, rank: int, r: int, fault: dict[str, float]):
    def step(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)
        stage = getattr(model, "module", model).stage
        chunk, mb = stage // P, data_iterator.taken - 1
        if rank == case.slow and mb == 0 and chunk == 0:
            time.sleep(case.slow_s)
        if rank != case.failed or (mb, chunk) != (case.microbatch, case.chunk):
            return output, loss_func
        if case.kind == "F":
            fault["t"] = time.time()
            raise Fault(f"injected fault in F{mb}.{chunk}")
        if case.kind == "L":
            def failing_loss(out, non_loss_data=False):
                fault["t"] = time.time()
                raise Fault(f"injected fault in loss_func of microbatch {mb}")

            return output, failing_loss
        if case.kind == "B":
            def failing_hook(grad):
                fault["t"] = time.time()
                raise Fault(f"injected fault in B{mb}.{chunk}")

            output.register_hook(failing_hook)
        return output, loss_func

    return step
