"""Jobs for the worker pool that train the GPT of ``scripts/trainer.py`` with pipeline × data parallelism.

Every job runs on all four workers and builds its own ``p × dp`` process groups (``new_group`` is
collective over the world, so every worker creates every group, in the same order). Sizes are
small so that each job takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from trainer import RankTrainer, TrainSettings

from pipeschedule.layout import create_parallel_groups
from pipeschedule.mixed import agree_found_inf
from pipeschedule.tied import make_finalize_model_grads, tied_embedding_weights


def small_settings(*, p: int, v: int, dp: int, m: int = 4, steps: int = 3) -> TrainSettings:
    """A float64 GPT small enough for a test: 8 layers of width 16, sequences of 8 bytes."""
    return TrainSettings(
        p=p, v=v, m=m, dp=dp, steps=steps, seq_length=8, micro_batch_size=2, hidden_size=16, num_layers=8,
        num_heads=2, ffn_hidden_size=32, lr=1e-2, dtype=torch.float64, loss_scale=2.0**8, compare_steps=steps,
    )


def _trainer(settings: TrainSettings) -> RankTrainer:
    return RankTrainer.build(settings, create_parallel_groups(p=settings.p, dp=settings.dp))


def _coords(trainer: RankTrainer) -> dict[str, int]:
    return {"pp_rank": trainer.groups.pp_rank, "dp_rank": trainer.groups.dp_rank}


def train_job(settings: TrainSettings, rank: int, groups: dict) -> dict[str, Any]:
    """Train ``settings.steps`` steps; report the losses every rank saw and this rank's parameters."""
    trainer = _trainer(settings)
    losses, stepped = zip(*(trainer.step() for _ in range(settings.steps)))
    return {**_coords(trainer), "losses": list(losses), "stepped": list(stepped), "params": trainer.named_parameters()}


def tied_grads_job(settings: TrainSettings, rank: int, groups: dict) -> dict[str, Any]:
    """One schedule; the tied copies' gradients just before and just after the finalize hook."""
    trainer = _trainer(settings)
    finalize = make_finalize_model_grads(embedding_group=trainer.groups.embedding)
    before: list[torch.Tensor] = []

    def record(model_chunks: list, num_tokens: Any) -> None:
        before.extend(w.grad.clone() for w in tied_embedding_weights(model_chunks))
        finalize(model_chunks, num_tokens)

    trainer.config = dataclasses.replace(trainer.config, finalize_model_grads_func=record)
    trainer.forward_backward()
    after = [w.grad.clone() for w in tied_embedding_weights(trainer.chunks)]
    return {**_coords(trainer), "before": before, "after": after}


def ddp_count_job(settings: TrainSettings, rank: int, groups: dict) -> dict[str, Any]:
    """Count the all-reduces over the data-parallel group while the schedule runs ``steps`` times."""
    trainer = _trainer(settings)
    dp_group = trainer.groups.data_parallel
    counted = {"dp": 0, "other": 0}
    original = dist.all_reduce

    def counting_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        counted["dp" if kwargs.get("group") is dp_group else "other"] += 1
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        for _ in range(settings.steps):
            trainer.forward_backward()
    finally:
        dist.all_reduce = original
    assert trainer.data_parallel is not None
    return {
        **_coords(trainer), "counted": counted, "own_count": trainer.data_parallel.all_reduces,
        "ddp_reductions": trainer.data_parallel.ddp_reductions, "v": len(trainer.chunks),
    }


def ddp_misuse_job(settings: TrainSettings, rank: int, groups: dict) -> dict[str, Any]:
    """A training forward outside ``no_sync`` arms DDP's reducer; the next grad sync must refuse."""
    trainer = _trainer(settings)
    assert trainer.data_parallel is not None
    module, chunk = trainer.modules[0], trainer.chunks[0]
    s = settings
    tokens = torch.zeros(s.micro_batch_size, s.seq_length, dtype=torch.int64)
    if not chunk.first_stage:
        chunk.set_input_tensor(torch.randn(s.seq_length, s.micro_batch_size, s.hidden_size, dtype=s.dtype))
    module(tokens).sum().backward()
    try:
        trainer.data_parallel.grad_sync(module.parameters())
    except RuntimeError as exc:
        return {"raised": str(exc), "ddp_reductions": trainer.data_parallel.ddp_reductions}
    return {"raised": None, "ddp_reductions": trainer.data_parallel.ddp_reductions}


def found_inf_job(arg: tuple[TrainSettings, int | None], rank: int, groups: dict) -> dict[str, Any]:
    """One training step with an inf put into one parameter's gradient on global rank ``inject`` (or none).

    The inf enters during backward, before the data-parallel all-reduce, as a real overflow would.
    """
    settings, inject = arg
    trainer = _trainer(settings)
    if rank == inject:
        param = next(trainer.chunks[0].parameters())
        param.register_hook(lambda grad: grad.index_fill(0, torch.tensor([0]), math.inf))
    before = trainer.named_parameters()
    scale_before = trainer.scaler.scale
    loss, stepped = trainer.step()
    after = trainer.named_parameters()
    changed = any(not torch.equal(before[name], after[name]) for name in before)
    # The bare agreement helper too: only this rank's flag decides.
    agreed = agree_found_inf(found_inf=rank == inject, group=None)
    return {
        **_coords(trainer), "stepped": stepped, "changed": changed, "loss": loss,
        "scale": (scale_before, trainer.scaler.scale), "agreed": agreed,
    }
