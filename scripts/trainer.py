"""Training a chunked GPT with pipeline × data parallelism: the parts ``train.py`` and the tests share.

One rank, Megatron style: build this rank's ``v`` chunks of a balanced partition, wrap them in
DDP over the data-parallel group, and give the schedule the hooks that make the step correct:

* ``no_sync_func`` / ``grad_sync_func``: one data-parallel all-reduce per chunk per step
  (:class:`pipeschedule.data_parallel.DataParallelChunks`);
* ``finalize_model_grads_func``: the tied embedding / LM-head gradients summed across the first
  and the last stage (:mod:`pipeschedule.tied`);
* ``grad_scale_func``: loss scaling, with every stage agreeing on overflow before the optimizer
  step (:mod:`pipeschedule.mixed`).

:func:`reference_training` trains the same model on one process, microbatch by microbatch, for
the equality check: its losses and parameters equal the pipeline's to rounding (float64: 1e-13).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeschedule import PipelineConfig
from pipeschedule.data_parallel import DataParallelChunks
from pipeschedule.layout import ParallelGroups
from pipeschedule.loss_report import mean_loss_everywhere
from pipeschedule.mixed import DynamicLossScaler
from pipeschedule.models import (
    GPTChunk,
    GPTConfig,
    build_gpt_chunks,
    load_corpus,
    make_forward_step,
    microbatches,
)
from pipeschedule.partition import Partition, partition_balanced
from pipeschedule.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
)
from pipeschedule.tied import make_finalize_model_grads

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
    weight_decay: float = 0.01
    seed: int = 1234
    dtype: torch.dtype = torch.float32
    loss_scale: float = 2.0**10
    compare_steps: int = 3
    overlap_p2p_comm: bool = True  # receives posted early, sends never waited on mid-step (exact either way)
    deallocate_pipeline_outputs: bool = True  # a stage output's data goes once sent (exact either way)

    @property
    def schedule(self) -> str:
        return "interleaved" if self.v > 1 else "1f1b"

    @property
    def tokens_per_step(self) -> int:
        return self.m * self.micro_batch_size * self.seq_length * self.dp

    def model_config(self) -> GPTConfig:
        from pipeschedule.models import BYTE_VOCAB_SIZE

        return GPTConfig(
            vocab_size=BYTE_VOCAB_SIZE, seq_length=self.seq_length, hidden_size=self.hidden_size,
            num_layers=self.num_layers, num_heads=self.num_heads, ffn_hidden_size=self.ffn_hidden_size,
            dtype=self.dtype, seed=self.seed,
        )


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
    """Stages balanced by parameter count (:func:`pipeschedule.partition.partition_balanced`)."""
    return partition_balanced(weights=layer_weights(settings.model_config()), p=settings.p, v=settings.v)


def make_optimizer(settings: TrainSettings, params: Iterator[nn.Parameter] | list[nn.Parameter]) -> torch.optim.Optimizer:
    # The plain for-loop implementation on every rank and in the reference: same arithmetic everywhere.
    return torch.optim.AdamW(list(params), lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay, foreach=False)


def _schedule_func(settings: TrainSettings) -> Callable[..., list[Any]]:
    if settings.v > 1:
        return forward_backward_pipelining_with_interleaving
    if settings.p == 1:
        return forward_backward_no_pipelining
    return forward_backward_pipelining_without_interleaving


@dataclass
class RankTrainer:
    """One rank's model, hooks, optimizer and data; :meth:`step` runs one training iteration."""

    settings: TrainSettings
    groups: ParallelGroups
    chunks: list[GPTChunk]
    modules: list[nn.Module]
    data_parallel: DataParallelChunks | None
    config: PipelineConfig
    optimizer: torch.optim.Optimizer
    scaler: DynamicLossScaler
    data_iterators: list[Iterator[dict[str, torch.Tensor]] | None]
    step_seconds: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, settings: TrainSettings, groups: ParallelGroups, *, corpus: torch.Tensor | None = None) -> RankTrainer:
        corpus = load_corpus(path=settings.data) if corpus is None else corpus
        p, v, rank = settings.p, settings.v, groups.pp_rank
        chunks = build_gpt_chunks(settings.model_config(), p=p, v=v, rank=rank, layer_ranges=balanced_partition(settings))
        data_parallel = DataParallelChunks(chunks=chunks, group=groups.data_parallel) if settings.dp > 1 else None
        modules: list[nn.Module] = list(data_parallel.modules) if data_parallel is not None else list(chunks)
        scaler = DynamicLossScaler(initial_scale=settings.loss_scale)
        config = PipelineConfig(
            hidden_size=settings.hidden_size,
            pipeline_dtype=settings.dtype,
            finalize_model_grads_func=make_finalize_model_grads(embedding_group=groups.embedding),
            grad_scale_func=scaler.scale_loss,
            overlap_p2p_comm=settings.overlap_p2p_comm,
            deallocate_pipeline_outputs=settings.deallocate_pipeline_outputs,
            **(data_parallel.config_hooks() if data_parallel is not None else {}),
        )
        # Only the first stage (tokens) and the last stage (labels) read data, each from its own
        # iterator over this replica's microbatches.
        last = p * v - 1
        iterators = [
            microbatches(corpus=corpus, seed=settings.seed, micro_batch_size=settings.micro_batch_size,
                         seq_length=settings.seq_length, dp_rank=groups.dp_rank, dp_size=settings.dp)
            if c * p + rank in (0, last) else None
            for c in range(v)
        ]
        optimizer = make_optimizer(settings, (q for chunk in chunks for q in chunk.parameters()))
        return cls(settings, groups, chunks, modules, data_parallel, config, optimizer, scaler, iterators)

    @property
    def is_last_stage(self) -> bool:
        return self.groups.is_last_pipeline_rank

    def forward_backward(self) -> list[dict[str, torch.Tensor]]:
        """Zero the gradients and run the schedule once (data-parallel and tied sync included)."""
        s = self.settings
        self.optimizer.zero_grad(set_to_none=True)
        return _schedule_func(s)(
            forward_step_func=make_forward_step(), data_iterator=self.data_iterators, model=self.modules,
            num_microbatches=s.m, seq_length=s.seq_length, micro_batch_size=s.micro_batch_size,
            config=self.config, group=self.groups.pipeline,
        )

    def step(self) -> tuple[float, bool]:
        """One iteration: schedule (with the hooks), unscale, agreed step or skip, loss on every rank.

        Returns ``(loss, stepped)``; ``stepped`` is False when some stage found an inf or NaN.
        """
        start = time.perf_counter()
        reduced = self.forward_backward()
        stepped = self.scaler.step(self.optimizer, group=self.groups.pipeline)
        loss = mean_loss_everywhere(
            reduced_dicts=reduced, key=LOSS_KEY, is_last_stage=self.is_last_stage,
            pipeline_group=self.groups.pipeline, data_parallel_group=self.groups.data_parallel,
        )
        self.step_seconds.append(time.perf_counter() - start)
        return loss, stepped

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


def reference_training(settings: TrainSettings, *, steps: int, corpus: torch.Tensor | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same training on one process (:class:`OneProcessModel`): per-step losses and final parameters by name."""
    reference = OneProcessModel(settings, corpus=corpus)
    losses = []
    for _ in range(steps):
        losses.append(reference.forward_backward())
        reference.optimizer.step()
    return losses, reference.named_parameters()


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
