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

from trainer import RankTrainer, TrainSettings, layout_manifest

from pipeschedule.training.checkpoint import save_checkpoint
from pipeschedule.training.layout import create_parallel_groups
from pipeschedule.training.mixed import agree_found_inf
from pipeschedule.training.tied import make_finalize_model_grads, tied_embedding_weights


def small_settings(
    *, p: int, v: int, dp: int, m: int = 4, steps: int = 3, clip_grad: float = 1.0, zero_bubble: bool = False
) -> TrainSettings:
    """A float64 GPT small enough for a test: 8 layers of width 16, sequences of 8 bytes.

    Warmup and cosine decay both happen within ``steps``, and a clip of 1.0 clips most steps.
    """
    return TrainSettings(
        p=p, v=v, m=m, dp=dp, steps=steps, seq_length=8, micro_batch_size=2, hidden_size=16, num_layers=8,
        num_heads=2, ffn_hidden_size=32, lr=1e-2, min_lr=1e-3, lr_warmup=1, clip_grad=clip_grad, dtype=torch.float64,
        loss_scale=2.0**8, compare_steps=steps, zero_bubble=zero_bubble,
    )


def _trainer(settings: TrainSettings) -> RankTrainer:
    return RankTrainer.build(settings, create_parallel_groups(p=settings.p, dp=settings.dp))


def _coords(trainer: RankTrainer) -> dict[str, int]:
    return {"pp_rank": trainer.groups.pp_rank, "dp_rank": trainer.groups.dp_rank}


def train_job(settings: TrainSettings, rank: int, groups: dict) -> dict[str, Any]:
    """Train ``settings.steps`` steps; report the losses and grad norms every rank saw and this rank's parameters."""
    trainer = _trainer(settings)
    results = [trainer.step() for _ in range(settings.steps)]
    return {
        **_coords(trainer), "losses": [r.loss for r in results], "stepped": [r.stepped for r in results],
        "grad_norms": [r.grad_norm for r in results], "params": trainer.named_parameters(),
    }


def resume_job(arg: tuple[TrainSettings, str], rank: int, groups: dict) -> dict[str, Any]:
    """``steps`` iterations straight, against half of them, a checkpoint, new groups and trainer, a load and the rest.

    The trainer that loads has its parameters overwritten with a constant first, so everything it
    ends with came from the checkpoint or from training after it.
    """
    settings, directory = arg
    half = settings.steps // 2
    straight = _trainer(settings)
    straight_losses = [straight.step().loss for _ in range(settings.steps)]
    first = _trainer(settings)
    losses = [first.step().loss for _ in range(half)]
    path = save_checkpoint(directory=directory, iteration=first.iteration, state_dict=first.checkpoint_state(),
                           manifest=layout_manifest(settings))
    resumed = _trainer(settings)  # new pipeline, data-parallel and embedding groups too
    for q in resumed.parameters:
        q.detach().fill_(0.5)
    resumed.load(str(path))
    start = resumed.iteration
    losses += [resumed.step().loss for _ in range(settings.steps - half)]
    return {
        **_coords(resumed), "straight_losses": straight_losses, "losses": losses, "start": start,
        "straight_params": straight.named_parameters(), "params": resumed.named_parameters(),
        "straight_state": _optimizer_state(straight), "state": _optimizer_state(resumed),
        "scale": (straight.scaler.scale, resumed.scaler.scale),
    }


def _optimizer_state(trainer: RankTrainer) -> dict[str, torch.Tensor]:
    named = {id(q): name for chunk in trainer.chunks for name, q in chunk.named_parameters()}
    return {f"{named[id(q)]}.{key}": value.clone() for q, state in trainer.optimizer.state.items() for key, value in state.items()}


def eval_job(settings: TrainSettings, rank: int, groups: dict) -> dict[str, Any]:
    """Evaluation at the start and between steps; the same steps without it; a sample through the pipeline."""
    with_eval = _trainer(settings)
    initial = with_eval.evaluate()
    with_eval.step()
    grads = {name: q.grad.clone() for name, q in with_eval._named_parameters() if q.grad is not None}
    consumed = with_eval.consumed_microbatches
    middle = with_eval.evaluate()
    grads_kept = all(torch.equal(q.grad, grads[name]) for name, q in with_eval._named_parameters() if q.grad is not None)
    same_position = with_eval.consumed_microbatches == consumed
    with_eval.optimizer.zero_grad(set_to_none=True)
    with_eval.evaluate()
    no_grads = all(q.grad is None for q in with_eval.parameters)
    losses = [with_eval.step().loss for _ in range(settings.steps - 1)]
    without = _trainer(settings)
    plain_losses = [without.step().loss for _ in range(settings.steps)]
    fresh = _trainer(settings)
    sample = fresh.sample(prompt=b"def ", length=12)
    return {
        **_coords(with_eval), "initial": initial, "middle": middle, "grads_kept": grads_kept, "same_position": same_position,
        "no_grads": no_grads, "losses": [plain_losses[0], *losses], "plain_losses": plain_losses,
        "params": with_eval.named_parameters(), "plain_params": without.named_parameters(), "sample": sample,
    }


def tied_grads_job(settings: TrainSettings, rank: int, groups: dict) -> dict[str, Any]:
    """One schedule; the tied copies' gradients just before and just after the finalize hook."""
    trainer = _trainer(settings)
    finalize = make_finalize_model_grads(embedding_group=trainer.groups.embedding)
    before: list[torch.Tensor] = []

    def record(model_chunks: list, num_tokens: Any) -> None:
        if trainer.data_parallel is not None:  # the data-parallel average first, as the trainer's finalize does
            trainer.data_parallel.finish_grad_sync()
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


def ddp_misuse_job(arg: tuple[TrainSettings, bool], rank: int, groups: dict) -> dict[str, Any]:
    """A training forward outside the schedule (outside ``no_sync``), then a grad sync.

    With ``misuse`` the DDP module's ``require_backward_grad_sync`` is set again first, so DDP
    arms its reducer and the grad sync must refuse; without, nothing arms it.
    """
    settings, misuse = arg
    trainer = _trainer(settings)
    assert trainer.data_parallel is not None
    module, chunk = trainer.modules[0], trainer.chunks[0]
    module.require_backward_grad_sync = misuse
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
    result = trainer.step()
    loss, stepped = result.loss, result.stepped
    after = trainer.named_parameters()
    changed = any(not torch.equal(before[name], after[name]) for name in before)
    # The bare agreement helper too: only this rank's flag decides.
    agreed = agree_found_inf(found_inf=rank == inject, group=None)
    return {
        **_coords(trainer), "stepped": stepped, "changed": changed, "loss": loss,
        "scale": (scale_before, trainer.scaler.scale), "agreed": agreed,
    }
