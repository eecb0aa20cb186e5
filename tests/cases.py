"""A small float64 model cut into pipeline stages, its data, and the one-process reference.

Each virtual stage is a module of its own whose parameters depend only on (seed, stage), so the
pipeline and the reference build identical weights without talking to each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

HIDDEN, SEQ, BATCH = 4, 3, 2


@dataclass(frozen=True)
class Case:
    """One configuration to run on the pool (and in the reference)."""

    schedule: str  # "none" | "1f1b" | "interleaved" | "zero-bubble"
    p: int
    v: int
    m: int
    group: str = "all"
    forward_only: bool = False
    loss_arity: int = 2  # 2: (loss, dict); 3: (loss, num_tokens, dict)
    per_token: bool = False  # config.calculate_per_token_loss (with loss_arity 3)
    group_size: int | None = None
    seed: int = 0
    # Fault to provoke, for error tests: name -> detail.
    mistake: dict = field(default_factory=dict)
    # Per-microbatch sequence lengths (None: SEQ for all); with them, config.variable_seq_lengths.
    seq_lens: tuple[int, ...] | None = None
    check_p2p_shapes: bool = False
    p2p_timeout: float | None = None
    # Run on a process group made for this job, so a fault cannot leave the pool's groups unusable.
    fresh_group: bool = False
    overlap: bool = False  # config.overlap_p2p_comm
    recv_window: int = 8  # config.overlap_recv_window
    deallocate: bool = False  # config.deallocate_pipeline_outputs
    split: str = "auto"  # config.weight_grad_split (zero bubble)
    # How each stage computes the same function: "" plain, "view" (returns a view), "checkpoint"
    # (a non-reentrant checkpointed block), "module" (defers its weight gradient to backward_dw()).
    variant: str = ""

    def __post_init__(self) -> None:
        from pool import GROUPS

        if self.p > 1 and len(GROUPS[self.group]) != self.p:
            raise ValueError(f"group {self.group!r} has {len(GROUPS[self.group])} ranks, the case needs p={self.p}")


class Stage(torch.nn.Module):
    """Virtual stage ``stage`` of ``num_stages``: first reads data, last emits the model output.

    ``variant`` (see :class:`Case`) changes how the same function is computed, never its value.
    """

    def __init__(self, stage: int, num_stages: int, seed: int, variant: str = "") -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed * 1000 + stage)
        self.stage, self.num_stages = stage, num_stages
        self.weight = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=gen, dtype=torch.float64) / HIDDEN**0.5)
        self.bias = torch.nn.Parameter(torch.randn(HIDDEN, generator=gen, dtype=torch.float64) * 0.1)
        self.input_tensor: torch.Tensor | None = None
        self.variant = variant
        self.deferred: list[tuple[torch.Tensor, torch.Tensor]] = []  # "module": (input, output grad) per backward
        if variant == "module":  # only then does the stage have backward_dw (what "auto" looks for)
            self.backward_dw = self._backward_dw

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        self.input_tensor = tensor

    def _block(self, h: torch.Tensor) -> torch.Tensor:
        z = _DeferredMatmul.apply(h, self.weight, self) if self.variant == "module" else h @ self.weight
        return torch.tanh(z + self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.stage == 0 else self.input_tensor
        if self.variant == "checkpoint":
            from torch.utils.checkpoint import checkpoint

            out = h + checkpoint(self._block, h, use_reentrant=False)
        else:
            out = h + self._block(h)
        return out.view(out.shape) if self.variant == "view" else out

    def _backward_dw(self) -> None:
        """The weight gradient of the oldest backward whose weight pass is pending (``"module"``)."""
        h, grad = self.deferred.pop(0)
        dw = h.reshape(-1, HIDDEN).t().mm(grad.reshape(-1, HIDDEN))  # what matmul's backward computes
        if self.weight.grad is None:
            self.weight.grad = dw
        else:
            self.weight.grad += dw


class _DeferredMatmul(torch.autograd.Function):
    """``h @ weight`` whose backward returns the input gradient and queues the weight's for ``backward_dw``."""

    @staticmethod
    def forward(ctx, h, weight, owner):
        ctx.save_for_backward(h, weight)
        ctx.owner = owner
        return h @ weight

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        ctx.owner.deferred.append((h.detach(), grad))
        return grad.reshape(-1, HIDDEN).mm(weight.t()).reshape(grad.shape), None, None


def microbatches(case: Case) -> list[dict[str, torch.Tensor]]:
    """Inputs ``[s, b, h]``, targets and a token mask (so per-token counts differ by microbatch)."""
    gen = torch.Generator().manual_seed(10_000 + case.seed)
    out = []
    for i in range(case.m):
        seq = case.seq_lens[i] if case.seq_lens is not None else SEQ
        mask = torch.ones(seq, BATCH, dtype=torch.float64)
        mask[: i % seq, 0] = 0.0
        out.append(
            {
                "x": torch.randn(seq, BATCH, HIDDEN, generator=gen, dtype=torch.float64),
                "y": torch.randn(seq, BATCH, HIDDEN, generator=gen, dtype=torch.float64),
                "mask": mask,
            }
        )
    return out


def loss_func_for(case: Case, batch: dict[str, torch.Tensor]):
    def loss_func(output: torch.Tensor, non_loss_data: bool = False):
        if non_loss_data:
            return {"output_sum": output.detach().sum().item()}
        err = ((output - batch["y"]) ** 2).sum(-1) * batch["mask"]
        # The reported loss is a copy: the schedule divides the loss it is given in place.
        if case.loss_arity == 3:
            tokens = batch["mask"].sum()
            return err.sum(), tokens, {"loss": (err.sum() / tokens).detach()}
        loss = err.sum() / batch["mask"].sum()
        return loss, {"loss": loss.detach().clone()}

    return loss_func


def forward_step(data_iterator, model: Stage):
    batch = next(data_iterator)
    return model(batch["x"]), loss_func_for(data_iterator.case, batch)


class Batches:
    """An iterator over the case's microbatches that also carries the case (for the loss form)."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.taken = 0
        self._it = iter(microbatches(case))

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._it)
        self.taken += 1
        return item


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
        if case.loss_arity == 3 and case.per_token:
            result[0].backward()
            tokens = tokens + result[1]
        elif case.loss_arity == 3:
            (result[0] / result[1].clamp(min=1) / case.m).backward()
        else:
            (result[0] / case.m).backward()
    grads = {}
    if not case.forward_only:
        for stage in stages:
            if case.loss_arity == 3 and case.per_token:
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
        "zero-bubble": ps.forward_backward_pipelining_zero_bubble,
    }[name]


_FRESH_GROUPS: list = []


class Events(list):
    """An observer that keeps every event and asks for the bytes held after each action."""

    wants_held_bytes = True

    def __call__(self, event: Any) -> None:
        self.append(event)


def run_case(case: Case, rank: int, groups: dict) -> dict[str, Any] | None:
    """Run ``case`` on this worker if its rank is in the case's group; report what happened."""
    import pipeschedule as ps
    from pool import GROUPS

    ranks = GROUPS[case.group] if case.p > 1 else [0]
    group = groups[case.group] if case.p > 1 else None
    if case.fresh_group and case.p > 1:
        import torch.distributed as dist

        group = dist.new_group(ranks)  # every worker joins the creation, members or not
        # Kept until the next fault job: destroying it as soon as this rank returns would close its
        # connections while the neighbours may still be reading what it sent.
        _FRESH_GROUPS[:] = [group]
    if rank not in ranks:
        return None
    r = ranks.index(rank)
    chunks = [Stage(c * case.p + r, case.p * case.v, case.seed, case.variant) for c in range(case.v)]
    events = Events()
    config = ps.PipelineConfig(
        hidden_size=None if "no_hidden_size" in case.mistake else HIDDEN,
        pipeline_dtype=torch.float64,
        microbatch_group_size_per_vp_stage=case.group_size,
        observer=events,
        variable_seq_lengths=case.seq_lens is not None,
        check_p2p_shapes=case.check_p2p_shapes,
        overlap_p2p_comm=case.overlap,
        overlap_recv_window=case.recv_window,
        deallocate_pipeline_outputs=case.deallocate,
        calculate_per_token_loss=case.per_token,
        weight_grad_split=case.split,
        **({} if case.p2p_timeout is None else {"p2p_timeout": case.p2p_timeout}),
    )
    listed = case.schedule == "interleaved" or (case.schedule == "zero-bubble" and case.v > 1)
    model: Any = chunks if listed else chunks[0]
    iterators: Any = [Batches(case) for _ in chunks] if listed else Batches(case)
    step = forward_step
    if "model_chunks" in case.mistake:
        model = chunks[: case.mistake["model_chunks"]] if case.mistake["model_chunks"] >= 0 else chunks[0]
    if "iterators" in case.mistake:
        iterators = [Batches(case) for _ in range(case.mistake["iterators"])]
    if "bad_return" in case.mistake:
        step = lambda it, model: forward_step(it, model)[0]  # noqa: E731 - the mistake under test
    if {"raise_at", "kill_at", "grow_stage"} & set(case.mistake):
        step = _faulty_step(case, r)
    seq_length = SEQ
    if "seq_length_on" in case.mistake and case.mistake["seq_length_on"][0] == r:
        seq_length = case.mistake["seq_length_on"][1]
    out = _schedule(case.schedule)(
        forward_step_func=step,
        data_iterator=iterators,
        model=model,
        num_microbatches=case.mistake.get("num_microbatches", case.m),
        seq_length=seq_length,
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
        "peak_held_bytes": max((e.held_bytes for e in events if e.what == "action"), default=0),
        "pending_weight_bytes": [e.pending_weight_bytes for e in events if e.what == "action"],
    }


class InjectedFault(RuntimeError):
    """The error a fault test makes one rank raise."""


def _faulty_step(case: Case, r: int):
    """``forward_step`` with the case's fault injected on group rank ``r``.

    ``raise_at = (rank, kind, mb, chunk)``: raise in the forward step (``F``), in loss_func (``L``,
    last stage only) or in the backward (``B``) of that microbatch and chunk. ``kill_at = (rank, mb)``:
    SIGKILL this process in the forward of that microbatch. ``grow_stage = s``: stage ``s`` returns
    ``[s + 1, b, h]``. The failing rank writes the wall-clock time of the fault to the store.
    """
    import os
    import signal
    import time

    def step(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)
        chunk = model.stage // case.p
        mb = data_iterator.taken - 1
        raise_at, kill_at = case.mistake.get("raise_at"), case.mistake.get("kill_at")
        if kill_at is not None and kill_at == (r, mb) and chunk == 0:
            FAULT_TIME["t"] = time.time()
            _record_fault_time(case)
            os.kill(os.getpid(), signal.SIGKILL)
        if "grow_stage" in case.mistake and model.stage == case.mistake["grow_stage"]:
            output = torch.cat([output, output[:1]])
        if raise_at is not None and raise_at[0] == r and raise_at[2:] == (mb, chunk):
            if raise_at[1] == "F":
                FAULT_TIME["t"] = time.time()
                raise InjectedFault(f"injected fault in F{mb}.{chunk}")
            if raise_at[1] == "L":
                def failing_loss(out, non_loss_data=False):
                    FAULT_TIME["t"] = time.time()
                    raise InjectedFault(f"injected fault in loss_func of microbatch {mb}")
                return output, failing_loss
            if raise_at[1] == "B":
                def failing_hook(grad):
                    FAULT_TIME["t"] = time.time()
                    raise InjectedFault(f"injected fault in B{mb}.{chunk}")
                output.register_hook(failing_hook)
        return output, loss_func

    return step


FAULT_TIME: dict[str, float] = {}


def _record_fault_time(case: Case) -> None:
    # A killed process cannot report; it leaves the time in a file named after the case.
    with open(fault_time_file(case.seed, os.getppid()), "w") as f:
        f.write(repr(FAULT_TIME["t"]))


def fault_time_file(seed: int, test_pid: int) -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"pipeschedule-fault-{seed}-{test_pid}.txt")


def run_fault_case(case: Case, rank: int, groups: dict) -> dict[str, Any] | None:
    """``run_case``, reporting instead of raising: the error, and when it was raised or injected."""
    import time

    FAULT_TIME.clear()
    try:
        out = run_case(case, rank, groups)
    except Exception as exc:  # the outcome under test
        return {"error": type(exc).__name__, "message": str(exc), "t_error": time.time(), "t_fault": FAULT_TIME.get("t"),
                "failed_rank": getattr(exc, "failed_rank", None)}
    return None if out is None else {"error": None, "t_error": time.time(), "t_fault": None, "group_rank": out["group_rank"]}


def chosen_schedules(_arg: Any, rank: int, groups: dict) -> dict[str, list[str]]:
    """Which function get_forward_backward_func picks on each group this rank belongs to."""
    import pipeschedule as ps
    from pool import GROUPS

    def name(func) -> str:
        return getattr(func, "func", func).__name__  # bound to a group: a functools.partial

    return {
        group: [name(ps.get_forward_backward_func(virtual_pipeline_model_parallel_size=vp, group=groups[group])) for vp in (None, 1, 2)]
        for group, ranks in GROUPS.items()
        if rank in ranks
    }
