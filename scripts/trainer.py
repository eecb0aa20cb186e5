"""Training a chunked GPT with pipeline × data parallelism: the parts ``train.py`` and the tests share.

One rank, Megatron style: build this rank's ``v`` chunks of a balanced partition, wrap them in
DDP over the data-parallel group, and give the schedule the hooks that make the step correct:

* ``no_sync_func`` / ``grad_sync_func``: one data-parallel all-reduce per chunk per step
  (:class:`pipeschedule.training.data_parallel.DataParallelChunks`);
* ``finalize_model_grads_func``: the tied embedding / LM-head gradients summed across the first
  and the last stage (:mod:`pipeschedule.training.tied`);
* ``grad_scale_func``: loss scaling, with every stage agreeing on overflow before the optimizer
  step (:mod:`pipeschedule.training.mixed`).

After the schedule, a step unscales, clips on the global norm over all stages (tied weights counted
once, :mod:`pipeschedule.training.clip`) and takes the optimizer step at the learning rate of
:func:`learning_rate` (linear warmup, cosine decay). :meth:`RankTrainer.evaluate` runs the same
schedule ``forward_only`` on the held-out split, :meth:`RankTrainer.sample` generates text through
it, and :meth:`RankTrainer.checkpoint_state` / :meth:`RankTrainer.load` are what a checkpoint holds.

:func:`reference_training` trains the same model on one process, microbatch by microbatch, for
the equality check: its losses and parameters equal the pipeline's to rounding (float64: 1e-13).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from pipeschedule import PipelineConfig
from pipeschedule.training.checkpoint import load_checkpoint
from pipeschedule.training.clip import clip_grad_norm, global_grad_norm, tied_copies_counted_elsewhere
from pipeschedule.training.data_parallel import DataParallelChunks
from pipeschedule.training.layout import ParallelGroups
from pipeschedule.training.loss_report import mean_loss_everywhere
from pipeschedule.training.mixed import DynamicLossScaler
from pipeschedule.training.models import (
    GPTChunk,
    GPTConfig,
    build_gpt_chunks,
    generate,
    load_corpus,
    make_forward_step,
    microbatches,
)
from pipeschedule.training.partition import Partition, partition_balanced
from pipeschedule.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    forward_backward_pipelining_zero_bubble,
)
from pipeschedule.training.tied import make_finalize_model_grads

logger = logging.getLogger(__name__)

LOSS_KEY = "lm_loss"


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a run; identical on every rank (and in the one-process reference)."""

    p: int = 4
    v: int = 2
    m: int = 8
    dp: int = 1
    steps: int = 200
    data: str | None = None
    seq_length: int = 64
    micro_batch_size: int = 4
    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4
    ffn_hidden_size: int = 512
    lr: float = 1e-3
    min_lr: float = 1e-4  # the cosine decay ends here, at iteration ``steps``
    lr_warmup: int = 10  # iterations of linear warmup from lr / lr_warmup to lr
    clip_grad: float = 1.0  # the global gradient norm is clipped to this (0: no clipping)
    weight_decay: float = 0.01
    seed: int = 1234
    dtype: torch.dtype = torch.float32
    loss_scale: float = 2.0**10
    compare_steps: int = 3
    overlap_p2p_comm: bool = True  # receives posted early, sends never waited on mid-step (exact either way)
    deallocate_pipeline_outputs: bool = True  # a stage output's data goes once sent (exact either way)
    eval_iters: int = 2  # forward-only passes of m microbatches per evaluation (0: no evaluation)
    zero_bubble: bool = False  # the zero-bubble schedule (ZB-H1 at v = 1, interleaved zero bubble at v > 1)

    @property
    def schedule(self) -> str:
        return "zero-bubble" if self.zero_bubble else "interleaved" if self.v > 1 else "1f1b"

    @property
    def tokens_per_step(self) -> int:
        return self.m * self.micro_batch_size * self.seq_length * self.dp

    def model_config(self) -> GPTConfig:
        from pipeschedule.training.models import BYTE_VOCAB_SIZE

        return GPTConfig(
            vocab_size=BYTE_VOCAB_SIZE, seq_length=self.seq_length, hidden_size=self.hidden_size,
            num_layers=self.num_layers, num_heads=self.num_heads, ffn_hidden_size=self.ffn_hidden_size,
            dtype=self.dtype, seed=self.seed,
        )


def learning_rate(settings: TrainSettings, iteration: int) -> float:
    """The learning rate of iteration ``iteration`` (1-based): linear warmup, then cosine decay to ``min_lr``.

    Iterations ``1 .. lr_warmup`` rise linearly to ``lr``; from there the rate follows half a cosine
    down to ``min_lr`` at iteration ``steps``. A pure function of the iteration, so a resumed run
    needs nothing but the iteration to continue the schedule.
    """
    s = settings
    if iteration <= s.lr_warmup:
        return s.lr * iteration / s.lr_warmup
    decay = s.steps - s.lr_warmup
    if decay <= 0:
        return s.lr
    progress = min((iteration - s.lr_warmup) / decay, 1.0)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + math.cos(math.pi * progress))


def layout_manifest(settings: TrainSettings) -> dict[str, Any]:
    """What a checkpoint must match to be loaded: the parallel layout and the model's shape."""
    s = settings
    return {
        "layout": {"p": s.p, "v": s.v, "dp": s.dp},
        "model": {
            "num_layers": s.num_layers, "hidden_size": s.hidden_size, "num_heads": s.num_heads,
            "ffn_hidden_size": s.ffn_hidden_size, "seq_length": s.seq_length, "vocab_size": s.model_config().vocab_size,
            "dtype": str(s.dtype).removeprefix("torch."),
        },
    }


def layer_weights(config: GPTConfig) -> list[int]:
    """Parameters per transformer layer, with the embeddings counted on the first layer and the head on the last.

    The tied head is a full ``[vocab, h]`` copy on the last stage, so it weighs as much as the
    token embedding does on the first.
    """
    h, f = config.hidden_size, config.ffn_hidden_size
    block = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    weights = [block] * config.num_layers
    weights[0] += config.vocab_size * h + config.seq_length * h
    weights[-1] += config.vocab_size * h + 2 * h
    return weights


def balanced_partition(settings: TrainSettings) -> Partition:
    """Stages balanced by parameter count (:func:`pipeschedule.training.partition.partition_balanced`)."""
    return partition_balanced(weights=layer_weights(settings.model_config()), p=settings.p, v=settings.v)


def make_optimizer(settings: TrainSettings, params: Iterator[nn.Parameter] | list[nn.Parameter]) -> torch.optim.Optimizer:
    # The plain for-loop implementation on every rank and in the reference: same arithmetic everywhere.
    return torch.optim.AdamW(list(params), lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay, foreach=False)


def _schedule_func(settings: TrainSettings) -> Callable[..., list[Any]]:
    if settings.zero_bubble:
        return forward_backward_pipelining_zero_bubble
    if settings.v > 1:
        return forward_backward_pipelining_with_interleaving
    if settings.p == 1:
        return forward_backward_no_pipelining
    return forward_backward_pipelining_without_interleaving


@dataclass(frozen=True)
class StepResult:
    """What one iteration reports (the same on every rank)."""

    loss: float
    stepped: bool  # False when some stage found an inf or NaN and the step was skipped
    grad_norm: float  # the global norm before clipping (nan on a skipped step)
    lr: float
    seconds: float


def _fresh_adamw_state(param: nn.Parameter) -> dict[str, torch.Tensor]:
    # What AdamW creates at its first step (torch's scalar dtype for ``step``): the template a
    # checkpoint is loaded into before the optimizer has stepped.
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return {
        "step": torch.zeros((), dtype=step_dtype),
        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }


@dataclass
class RankTrainer:
    """One rank's model, hooks, optimizer and data; :meth:`step` runs one training iteration.

    ``iteration`` counts the iterations done (also those of a loaded checkpoint) and
    ``consumed_microbatches`` the microbatches each data iterator has drawn: the data position.
    """

    settings: TrainSettings
    groups: ParallelGroups
    chunks: list[GPTChunk]
    modules: list[nn.Module]
    data_parallel: DataParallelChunks | None
    config: PipelineConfig
    optimizer: torch.optim.Optimizer
    scaler: DynamicLossScaler
    corpus: torch.Tensor
    data_iterators: list[Iterator[dict[str, torch.Tensor]] | None] = field(default_factory=list)
    iteration: int = 0
    consumed_microbatches: int = 0
    step_seconds: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, settings: TrainSettings, groups: ParallelGroups, *, corpus: torch.Tensor | None = None) -> RankTrainer:
        corpus = load_corpus(path=settings.data) if corpus is None else corpus
        p, v, rank = settings.p, settings.v, groups.pp_rank
        chunks = build_gpt_chunks(settings.model_config(), p=p, v=v, rank=rank, layer_ranges=balanced_partition(settings))
        data_parallel = DataParallelChunks(chunks=chunks, group=groups.data_parallel) if settings.dp > 1 else None
        modules: list[nn.Module] = list(data_parallel.modules) if data_parallel is not None else list(chunks)
        scaler = DynamicLossScaler(initial_scale=settings.loss_scale)
        tied = make_finalize_model_grads(embedding_group=groups.embedding)
        config = PipelineConfig(
            hidden_size=settings.hidden_size,
            pipeline_dtype=settings.dtype,
            grad_scale_func=scaler.scale_loss,
            overlap_p2p_comm=settings.overlap_p2p_comm,
            deallocate_pipeline_outputs=settings.deallocate_pipeline_outputs,
            **(data_parallel.config_hooks(tied) if data_parallel is not None else {"finalize_model_grads_func": tied}),
        )
        optimizer = make_optimizer(settings, (q for chunk in chunks for q in chunk.parameters()))
        trainer = cls(settings, groups, chunks, modules, data_parallel, config, optimizer, scaler, corpus)
        trainer.data_iterators = trainer._iterators(split="train", start=0)
        return trainer

    def _iterators(self, *, split: str, start: int) -> list[Iterator[dict[str, torch.Tensor]] | None]:
        # Only the first stage (tokens) and the last stage (labels) read data, each from its own
        # iterator over this replica's microbatches.
        s, p, rank = self.settings, self.settings.p, self.groups.pp_rank
        return [
            microbatches(corpus=self.corpus, seed=s.seed, micro_batch_size=s.micro_batch_size, seq_length=s.seq_length,
                         dp_rank=self.groups.dp_rank, dp_size=s.dp, split=split, start=start)  # type: ignore[arg-type]
            if c * p + rank in (0, p * s.v - 1) else None
            for c in range(s.v)
        ]

    @property
    def is_last_stage(self) -> bool:
        return self.groups.is_last_pipeline_rank

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [q for group in self.optimizer.param_groups for q in group["params"]]

    def forward_backward(self) -> list[dict[str, torch.Tensor]]:
        """Zero the gradients and run the schedule once (data-parallel and tied sync included)."""
        s = self.settings
        self.optimizer.zero_grad(set_to_none=True)
        return _schedule_func(s)(
            forward_step_func=make_forward_step(), data_iterator=self.data_iterators, model=self.modules,
            num_microbatches=s.m, seq_length=s.seq_length, micro_batch_size=s.micro_batch_size,
            config=self.config, group=self.groups.pipeline,
        )

    def step(self) -> StepResult:
        """One iteration: schedule (with the hooks), unscale, agreed overflow check, clip, step or skip.

        The gradient norm is over every stage of this replica's pipeline, after the data-parallel
        average (so equal on every replica) and with the tied weight counted once.
        """
        s = self.settings
        start = time.perf_counter()
        lr = learning_rate(s, self.iteration + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        reduced = self.forward_backward()
        params = self.parameters
        found_inf = self.scaler.unscale_and_check(parameters=params, group=self.groups.pipeline)
        grad_norm = math.nan
        if found_inf:
            logger.warning("inf or NaN in the gradients on some stage: step skipped, loss scale %g", self.scaler.scale)
        else:
            norm_args = {
                "parameters": params, "group": self.groups.pipeline,
                "skip": tied_copies_counted_elsewhere(self.chunks, is_first_pipeline_rank=self.groups.is_first_pipeline_rank),
            }
            grad_norm = clip_grad_norm(**norm_args, max_norm=s.clip_grad) if s.clip_grad > 0 else global_grad_norm(**norm_args)
            self.optimizer.step()
        self.scaler.update(found_inf=found_inf)
        loss = mean_loss_everywhere(
            reduced_dicts=reduced, key=LOSS_KEY, is_last_stage=self.is_last_stage,
            pipeline_group=self.groups.pipeline, data_parallel_group=self.groups.data_parallel,
        )
        self.iteration += 1
        self.consumed_microbatches += s.m
        seconds = time.perf_counter() - start
        self.step_seconds.append(seconds)
        return StepResult(loss=loss, stepped=not found_inf, grad_norm=grad_norm, lr=lr, seconds=seconds)

    def _forward_only_config(self) -> PipelineConfig:
        s = self.settings
        return PipelineConfig(
            hidden_size=s.hidden_size, pipeline_dtype=s.dtype, overlap_p2p_comm=s.overlap_p2p_comm,
            deallocate_pipeline_outputs=s.deallocate_pipeline_outputs,
        )

    def evaluate(self) -> float:
        """Mean loss over ``eval_iters`` forward-only runs of the schedule on the held-out split.

        Every evaluation reads the same held-out microbatches (from the start of the split), so
        evaluations are comparable. No gradient is made (the schedule runs ``forward_only`` under
        ``no_grad``, on the bare chunks without the data-parallel wrappers) and the training
        iterators are not touched. A collective over the pipeline and data-parallel groups.
        """
        s = self.settings
        iterators = self._iterators(split="valid", start=0)
        reduced: list[dict[str, torch.Tensor]] = []
        for chunk in self.chunks:
            chunk.eval()
        try:
            for _ in range(s.eval_iters):
                reduced += _schedule_func(s)(
                    forward_step_func=make_forward_step(), data_iterator=iterators, model=list(self.chunks),
                    num_microbatches=s.m, seq_length=s.seq_length, micro_batch_size=s.micro_batch_size,
                    forward_only=True, config=self._forward_only_config(), group=self.groups.pipeline,
                )
        finally:
            for chunk in self.chunks:
                chunk.train()
        return mean_loss_everywhere(
            reduced_dicts=reduced, key=LOSS_KEY, is_last_stage=self.is_last_stage,
            pipeline_group=self.groups.pipeline, data_parallel_group=self.groups.data_parallel,
        )

    def sample(self, *, prompt: bytes, length: int, temperature: float = 0.0) -> bytes | None:
        """``prompt`` and ``length`` generated bytes, through replica 0's pipeline; ``None`` on other replicas.

        A collective over replica 0's pipeline group; other replicas return at once.
        """
        if self.groups.dp_rank != 0:
            return None
        s = self.settings
        return generate(
            schedule=_schedule_func(s), chunks=list(self.chunks), prompt=prompt, length=length,
            config=self._forward_only_config(), group=self.groups.pipeline,
            num_microbatches=s.p if s.v > 1 else 1, temperature=temperature, seed=s.seed,
        )

    # -- checkpoints ---------------------------------------------------------------------------

    def _named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        # Chunk parameter names carry global layer indices, so they are unique across stages; a
        # data-parallel replica holds the same names with equal values (saved once).
        return [(name, param) for chunk in self.chunks for name, param in chunk.named_parameters()]

    def checkpoint_state(self) -> dict[str, Any]:
        """This rank's part of a checkpoint: a state dict for ``torch.distributed.checkpoint``.

        Model chunks and AdamW state by parameter name, the loss scaler, the data position and
        iteration (the learning rate follows from it), and this rank's RNG state under a key of
        its own. Tensors share storage with the live ones, so loading into it loads in place.
        """
        named = self._named_parameters()
        optimizer = {name: self.optimizer.state[param] or _fresh_adamw_state(param) for name, param in named}
        return {
            "model": {name: param.detach() for name, param in named},
            "optimizer": optimizer,
            "scaler": {"scale": self.scaler.scale, "clean_steps": self.scaler.clean_steps, "skipped_steps": self.scaler.skipped_steps},
            "progress": {"iteration": self.iteration, "consumed_microbatches": self.consumed_microbatches},
            f"rng_state_rank{self.groups.rank}": torch.get_rng_state(),
        }

    def load(self, path: str) -> None:
        """Load checkpoint ``path`` (a collective over the world): everything :meth:`checkpoint_state` holds."""
        state = self.checkpoint_state()
        load_checkpoint(path=path, state_dict=state)
        named = self._named_parameters()
        index = {id(q): i for i, q in enumerate(self.parameters)}
        self.optimizer.load_state_dict({
            "state": {index[id(param)]: state["optimizer"][name] for name, param in named},
            "param_groups": self.optimizer.state_dict()["param_groups"],
        })
        self.scaler.scale = float(state["scaler"]["scale"])
        self.scaler.clean_steps = int(state["scaler"]["clean_steps"])
        self.scaler.skipped_steps = int(state["scaler"]["skipped_steps"])
        torch.set_rng_state(state[f"rng_state_rank{self.groups.rank}"])
        self.iteration = int(state["progress"]["iteration"])
        self.consumed_microbatches = int(state["progress"]["consumed_microbatches"])
        self.data_iterators = self._iterators(split="train", start=self.consumed_microbatches)

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """This rank's parameters by whole-model name (the tied head copy is named after the embedding)."""
        return {
            ("token_embedding.weight" if name == "head_weight" else name): param.detach().clone()
            for chunk in self.chunks
            for name, param in chunk.named_parameters()
        }


class OneProcessModel:
    """The whole model on one process, fed the microbatches of all ``dp`` replicas in turn.

    Replica ``d``'s microbatches come first for ``d = 0``, then ``d = 1``, ...; each loss is divided by
    ``m * dp`` before its backward, which is what averaging over microbatches and then over replicas
    computes.
    """

    def __init__(self, settings: TrainSettings, *, corpus: torch.Tensor | None = None) -> None:
        corpus = load_corpus(path=settings.data) if corpus is None else corpus
        config = settings.model_config()
        self.settings = settings
        self.model = build_gpt_chunks(config, p=1, v=1, rank=0, layer_ranges=[range(config.num_layers)])[0]
        self.optimizer = make_optimizer(settings, self.model.parameters())
        self.replicas = [
            microbatches(corpus=corpus, seed=settings.seed, micro_batch_size=settings.micro_batch_size,
                         seq_length=settings.seq_length, dp_rank=d, dp_size=settings.dp)
            for d in range(settings.dp)
        ]

    def forward_backward(self) -> float:
        """Zero the gradients, accumulate one step's; return the step's mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        forward_step = make_forward_step()
        count = self.settings.m * self.settings.dp
        losses = []
        for data in self.replicas:
            for _ in range(self.settings.m):
                self.model.set_input_tensor(None)
                output, loss_func = forward_step(data, self.model)
                loss, reduced = loss_func(output)
                (loss / count).backward()
                losses.append(reduced[LOSS_KEY])
        return float(torch.stack(losses).to(torch.float64).mean())

    def named_parameters(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().clone() for name, param in self.model.named_parameters()}


class ReferenceRun(NamedTuple):
    """One process's training: per-step losses and gradient norms (before clipping), final parameters."""

    losses: list[float]
    grad_norms: list[float]
    params: dict[str, torch.Tensor]


def reference_training(settings: TrainSettings, *, steps: int, corpus: torch.Tensor | None = None) -> ReferenceRun:
    """The same training on one process (:class:`OneProcessModel`), clipped by ``torch.nn.utils.clip_grad_norm_``."""
    reference = OneProcessModel(settings, corpus=corpus)
    params = list(reference.model.parameters())
    losses, norms = [], []
    for iteration in range(1, steps + 1):
        for group in reference.optimizer.param_groups:
            group["lr"] = learning_rate(settings, iteration)
        losses.append(reference.forward_backward())
        if settings.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, settings.clip_grad, foreach=False)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(q.grad) for q in params]))
        norms.append(float(norm))
        reference.optimizer.step()
    return ReferenceRun(losses, norms, reference.named_parameters())


def max_differences(
    *, losses: list[float], ref_losses: list[float], rank_params: list[dict[str, torch.Tensor]], ref_params: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """``(max |loss - ref|, max |param - ref|)`` over steps and over every rank's parameters.

    Raises if the ranks together do not hold every parameter of the reference, or hold one it lacks.
    """
    loss_diff = max((abs(a - b) for a, b in zip(losses, ref_losses, strict=True)), default=0.0)
    seen: set[str] = set()
    param_diff = 0.0
    for params in rank_params:
        for name, value in params.items():
            if name not in ref_params:
                raise KeyError(f"parameter {name!r} of the pipeline has no counterpart in the one-process model")
            seen.add(name)
            param_diff = max(param_diff, float((value.to(torch.float64) - ref_params[name].to(torch.float64)).abs().max()))
    if seen != set(ref_params):
        raise KeyError(f"the pipeline ranks hold no copy of {sorted(set(ref_params) - seen)}")
    return loss_diff, param_diff
