"""Configuration of the schedules, with Megatron-core's field names.

The schedules read the config through attribute names only, so a Megatron ``ModelParallelConfig``
(or any object with these attributes) works as well as :class:`PipelineConfig`; missing optional
attributes take the defaults below.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from pipeschedule.plan import Action, Exchange

__all__ = ["PipelineConfig", "ScheduleEvent"]


@dataclass(frozen=True)
class ScheduleEvent:
    """What an observer is told: one action or one exchange, after it ran.

    ``start`` and ``end`` are ``time.perf_counter()`` readings on this rank; for an exchange the
    span is the time spent posting and waiting on communication. An observer with a true attribute
    ``wants_held_bytes`` also gets, after each action, the bytes of the stage inputs and outputs
    this rank still holds (kept for backward, waiting to be sent or consumed), storages counted once,
    and in a zero-bubble step ``pending_weight_bytes``: what the pending weight passes hold. With
    the autograd split that is every tensor their graphs saved in forward plus the gradients
    captured for them (storages counted once); with the module split only what the schedule holds
    (nothing), since the layers keep their deferred operands themselves.
    """

    rank: int
    what: Literal["action", "exchange"]
    action: Action | None
    exchange: Exchange | None
    start: float
    end: float
    held_bytes: int | None = None  # after an action, when the observer asks for it (see below)
    pending_weight_bytes: int | None = None  # zero bubble, when the observer asks for held bytes


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of a training step.

    ``hidden_size`` and ``pipeline_dtype`` give the activation shape
    ``[seq_length, micro_batch_size, hidden_size]`` and dtype (unless the schedule is called with an
    explicit ``tensor_shape``). ``microbatch_group_size_per_vp_stage`` is the interleaved group size
    ``G`` (``None``: ``p``, or the smallest valid size when ``m % p != 0``).

    Losses, as Megatron-core 0.16.1 treats them (``loss_func`` returns ``(loss, dict)`` or
    ``(loss, num_tokens, dict)``): a two-item loss is divided in place by ``m``; a three-item loss
    by ``max(num_tokens, 1)`` and then by ``m`` unless ``calculate_per_token_loss``. With
    ``calculate_per_token_loss=True`` the loss is left whole and the step's total token count goes
    to ``finalize_model_grads_func``, which divides the gradients (without a finalize function the
    schedule divides them itself, in ``param.main_grad`` where that exists, else ``param.grad``).

    Hooks, called where Megatron-core calls them (:mod:`pipeschedule.runtime.sync`):

    * ``no_sync_func``: returns a context manager that suspends data-parallel gradient
      reduction; a list gives one per model chunk (entered and left together). Entered before the
      first backward; left around a chunk's last backward when there is no ``grad_sync_func``
      (1F1B: before the rank's last backward), otherwise only around the ``grad_sync_func`` calls and
      at the end.
    * ``grad_sync_func(params)``: starts a chunk's gradient reduction. Interleaved: after the
      backward that comes ``r`` backwards after the chunk's last one (rank ``r``), or at the end.
      1F1B: at the end, on every rank but the first (there, leaving ``no_sync`` before the last
      backward lets the data-parallel wrapper start it). A list gives one per chunk.
    * ``param_sync_func(params)``: interleaved only, for chunks 0 and 1 before the first forward,
      for chunk ``c >= 2`` ``r`` forwards before chunk ``c - 1`` starts. A list gives one per chunk.
    * ``finalize_model_grads_func(model_chunks, num_tokens, pg_collection=..., force_all_reduce=...)``:
      once, after all backwards; ``num_tokens`` is the step's token count with
      ``calculate_per_token_loss``, else ``None``. Only the keywords it accepts are passed.
    * ``grad_scale_func(loss)``: scales the loss on the last stage before its backward.
    * ``observer(event)``: told every action and exchange as it completes (:class:`ScheduleEvent`).

    Communication safety (see ``docs/ERRORS.md``):

    * ``variable_seq_lengths``: every message is preceded by a small int64 header with its shape
      and dtype, so microbatches may differ in shape; no fixed activation shape is needed.
    * ``check_p2p_shapes``: with fixed shapes, also send headers so the receiver compares them with
      the shape it expects (the sender always checks its own output before sending).
    * ``p2p_timeout``: seconds any single wait on a neighbour may last before the step raises an
      error naming that neighbour. Keep it well under the process group's own timeout.
    * ``max_message_numel``: the most elements a received header may announce; a larger (corrupt)
      header raises instead of allocating.
    * ``overlap_p2p_comm``: post receives early, wait on each just before its tensor is used, send
      as soon as a tensor exists and wait on a step's sends one step later
      (:mod:`pipeschedule.runtime.overlap`); proven on gloo.
    * ``overlap_recv_window``: with ``overlap_p2p_comm``, receives are posted up to this many
      steps ahead of need (at least 2), topped up half a window at a time. Each posted receive
      holds one message's buffer; a wider window costs that memory, and on gloo lets one wake-up
      of the sender serve several receives (``scripts/bench.py`` measures both).
    * ``weight_grad_split`` (zero-bubble schedule only): how a backward is split into its input
      and weight passes (:mod:`pipeschedule.runtime.split`). ``"autograd"`` splits any chunk
      through its autograd graph; ``"module"`` runs an ordinary backward and then the chunk's
      ``backward_dw()`` (layers that defer their weight gradients, as TransformerEngine's
      ``delay_wgrad_compute``); ``"auto"`` is ``"module"`` when every chunk has ``backward_dw``.
    * ``deallocate_pipeline_outputs``: once a stage's output is handed to the send, its data is
      released (:mod:`pipeschedule.runtime.memory`); the memory goes when the send is done, and backward
      still works from the output's autograd graph.
    """

    hidden_size: int | None = None
    pipeline_dtype: torch.dtype = torch.float32
    microbatch_group_size_per_vp_stage: int | None = None
    no_sync_func: Callable[[], contextlib.AbstractContextManager] | list | None = None
    grad_sync_func: Callable[[Any], None] | list | None = None
    param_sync_func: Callable[[Any], None] | list | None = None
    finalize_model_grads_func: Callable[..., None] | None = None
    grad_scale_func: Callable[[torch.Tensor], torch.Tensor] | None = None
    observer: Callable[[ScheduleEvent], None] | None = None
    variable_seq_lengths: bool = False
    check_p2p_shapes: bool = False
    p2p_timeout: float = 300.0
    max_message_numel: int = 1 << 31
    overlap_p2p_comm: bool = False
    overlap_recv_window: int = 8
    deallocate_pipeline_outputs: bool = False
    calculate_per_token_loss: bool = False
    weight_grad_split: Literal["auto", "autograd", "module"] = "auto"

    @property
    def sends_headers(self) -> bool:
        """Whether every message is preceded by a shape header (:mod:`pipeschedule.wire.framed`)."""
        return bool(self.variable_seq_lengths or self.check_p2p_shapes)


_DEFAULTS = {f.name: f.default for f in fields(PipelineConfig)}


def resolve_config(config: Any, model_chunks: list) -> PipelineConfig:
    """A :class:`PipelineConfig` read from ``config``, or from ``model_chunks[0].config`` when ``None``.

    Only our field names are read; everything else on a Megatron config is ignored.
    """
    if config is None:
        config = getattr(model_chunks[0], "config", None) if model_chunks else None
    if config is None:
        return PipelineConfig()
    if isinstance(config, PipelineConfig):
        return config
    return PipelineConfig(**{name: getattr(config, name, default) for name, default in _DEFAULTS.items()})
