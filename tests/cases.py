"""A small float64 model cut into pipeline stages, its data, and the one-process reference.

Each virtual stage is a module of its own whose parameters depend only on (seed, stage), so the
pipeline and the reference build identical weights without talking to each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

HIDDEN, SEQ, BATCH = 4, 3, 2


@dataclass(frozen=True)
class Case:
    """One configuration to run on the pool (and in the reference)."""

    schedule: str  # "none" | "1f1b" | "interleaved"
    p: int
    v: int
    m: int
    group: str = "all"
    forward_only: bool = False
    loss_arity: int = 2  # 2: (loss, dict); 3: (loss, num_tokens, dict)
    group_size: int | None = None
    seed: int = 0
    # Fault to provoke, for error tests: name -> detail.
    mistake: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from pool import GROUPS

        if self.p > 1 and len(GROUPS[self.group]) != self.p:
            raise ValueError(f"group {self.group!r} has {len(GROUPS[self.group])} ranks, the case needs p={self.p}")


class Stage(torch.nn.Module):
    """Virtual stage ``stage`` of ``num_stages``: first reads data, last emits the model output."""

    def __init__(self, stage: int, num_stages: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed * 1000 + stage)
        self.stage, self.num_stages = stage, num_stages
        self.weight = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=gen, dtype=torch.float64) / HIDDEN**0.5)
        self.bias = torch.nn.Parameter(torch.randn(HIDDEN, generator=gen, dtype=torch.float64) * 0.1)
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        self.input_tensor = tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.stage == 0 else self.input_tensor
        return h + torch.tanh(h @ self.weight + self.bias)


def microbatches(case: Case) -> list[dict[str, torch.Tensor]]:
    """Inputs ``[s, b, h]``, targets and a token mask (so per-token counts differ by microbatch)."""
    gen = torch.Generator().manual_seed(10_000 + case.seed)
    out = []
    for i in range(case.m):
        mask = torch.ones(SEQ, BATCH, dtype=torch.float64)
        mask[: i % SEQ, 0] = 0.0
        out.append(
            {
                "x": torch.randn(SEQ, BATCH, HIDDEN, generator=gen, dtype=torch.float64),
                "y": torch.randn(SEQ, BATCH, HIDDEN, generator=gen, dtype=torch.float64),
                "mask": mask,
            }
        )
    return out


def loss_func_for(case: Case, batch: dict[str, torch.Tensor]):
    def loss_func(output: torch.Tensor, non_loss_data: bool = False):
        if non_loss_data:
            return {"output_sum": output.detach().sum().item()}
        err = ((output - batch["y"]) ** 2).sum(-1) * batch["mask"]
        if case.loss_arity == 3:
            tokens = batch["mask"].sum()
            return err.sum(), tokens, {"loss": (err.sum() / tokens).detach()}
        loss = err.sum() / batch["mask"].sum()
        return loss, {"loss": loss.detach()}

    return loss_func


def forward_step(data_iterator, model: Stage):
    batch = next(data_iterator)
    return model(batch["x"]), loss_func_for(data_iterator.case, batch)


class Batches:
    """An iterator over the case's microbatches that also carries the case (for the loss form)."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self._it = iter(microbatches(case))

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)


def reference(case: Case) -> dict[str, Any]:
    """The whole model on one process, microbatch by microbatch: losses and per-stage gradients."""
    stages = [Stage(s, case.p * case.v, case.seed) for s in range(case.p * case.v)]
    losses, tokens = [], torch.zeros((), dtype=torch.float64)
    for batch in microbatches(case):
        h = batch["x"]
        for stage in stages:
            stage.set_input_tensor(h)
            h = stage(h)
        result = loss_func_for(case, batch)(h)
        losses.append(result[-1]["loss"].item())
        if case.forward_only:
            continue
        if case.loss_arity == 3:
            result[0].backward()
            tokens = tokens + result[1]
        else:
            (result[0] / case.m).backward()
    grads = {}
    if not case.forward_only:
        for stage in stages:
            if case.loss_arity == 3:
                for param in stage.parameters():
                    param.grad.div_(tokens)
            grads[stage.stage] = [param.grad.numpy().copy() for param in stage.parameters()]
    return {"losses": losses, "grads": grads}


def _schedule(name: str):
    import pipeschedule as ps

    return {
        "none": ps.forward_backward_no_pipelining,
        "1f1b": ps.forward_backward_pipelining_without_interleaving,
        "interleaved": ps.forward_backward_pipelining_with_interleaving,
    }[name]


def run_case(case: Case, rank: int, groups: dict) -> dict[str, Any] | None:
    """Run ``case`` on this worker if its rank is in the case's group; report what happened."""
    import pipeschedule as ps
    from pool import GROUPS

    ranks = GROUPS[case.group] if case.p > 1 else [0]
    if rank not in ranks:
        return None
    group = groups[case.group] if case.p > 1 else None
    r = ranks.index(rank)
    chunks = [Stage(c * case.p + r, case.p * case.v, case.seed) for c in range(case.v)]
    events: list = []
    config = ps.PipelineConfig(
        hidden_size=None if "no_hidden_size" in case.mistake else HIDDEN,
        pipeline_dtype=torch.float64,
        microbatch_group_size_per_vp_stage=case.group_size,
        observer=events.append,
    )
    model: Any = chunks if case.schedule == "interleaved" else chunks[0]
    iterators: Any = [Batches(case) for _ in chunks] if case.schedule == "interleaved" else Batches(case)
    step = forward_step
    if "model_chunks" in case.mistake:
        model = chunks[: case.mistake["model_chunks"]] if case.mistake["model_chunks"] >= 0 else chunks[0]
    if "iterators" in case.mistake:
        iterators = [Batches(case) for _ in range(case.mistake["iterators"])]
    if "bad_return" in case.mistake:
        step = lambda it, model: forward_step(it, model)[0]  # noqa: E731 - the mistake under test
    out = _schedule(case.schedule)(
        forward_step_func=step,
        data_iterator=iterators,
        model=model,
        num_microbatches=case.mistake.get("num_microbatches", case.m),
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=case.forward_only,
        config=config,
        group=group,
    )
    return {
        "group_rank": r,
        "losses": [d["loss"].item() for d in out],
        "grads": {} if case.forward_only else {c.stage: [p.grad.numpy().copy() for p in c.parameters()] for c in chunks},
        "actions": [(e.action.kind, e.action.microbatch, e.action.chunk, e.action.phase) for e in events if e.what == "action"],
    }


def chosen_schedules(_arg: Any, rank: int, groups: dict) -> dict[str, list[str]]:
    """Which function get_forward_backward_func picks on each group this rank belongs to."""
    import pipeschedule as ps
    from pool import GROUPS

    def name(func) -> str:
        return getattr(func, "func", func).__name__  # bound to a group: a functools.partial

    return {
        group: [name(ps.get_forward_backward_func(vp, groups[group])) for vp in (None, 1, 2)]
        for group, ranks in GROUPS.items()
        if rank in ranks
    }
