"""The three schedules, Megatron-core compatible, as plain functions.

Each function validates its arguments (before any communication), asks :mod:`pipeschedule.plan`
for this rank's plan and has :class:`~pipeschedule.executor.PlanRunner` execute it. They return the
per-microbatch ``reduced_dict``s on the last pipeline stage and ``[]`` elsewhere.

Typical use in a training loop::

    forward_backward = get_forward_backward_func(virtual_pipeline_model_parallel_size=v, group=pp_group)
    losses = forward_backward(
        forward_step_func=forward_step, data_iterator=data, model=chunks,
        num_microbatches=m, seq_length=s, micro_batch_size=b,
        config=PipelineConfig(hidden_size=h, pipeline_dtype=torch.bfloat16), group=pp_group,
    )
    optimizer.step()
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from pipeschedule.config import PipelineConfig, resolve_config
from pipeschedule.executor import PlanRunner
from pipeschedule.overlap import OverlappedRunner
from pipeschedule.p2p import Neighbours, TensorSpec
from pipeschedule.plan import build_plan
from pipeschedule.wire import dtype_code

__all__ = [
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "get_forward_backward_func",
]

ForwardStepFunc = Callable[[Any, torch.nn.Module], tuple[torch.Tensor, Callable]]


def _as_lists(model: Any, data_iterator: Any, *, interleaved: bool) -> tuple[list, list]:
    """Model chunks and their data iterators as two lists of equal length."""
    if interleaved:
        if not isinstance(model, (list, tuple)):
            raise TypeError(
                f"the interleaved schedule takes model as a list with one module per chunk, got "
                f"{type(model).__name__}; pass [chunk_0, ..., chunk_v-1], or use "
                f"forward_backward_pipelining_without_interleaving for a single module"
            )
        if not isinstance(data_iterator, (list, tuple)):
            raise TypeError(
                f"the interleaved schedule takes data_iterator as a list with one entry per model chunk "
                f"(None where a chunk reads no data), got {type(data_iterator).__name__}"
            )
    model = list(model) if isinstance(model, (list, tuple)) else [model]
    iterators = list(data_iterator) if isinstance(data_iterator, (list, tuple)) else [data_iterator]
    if not model:
        raise ValueError("model is an empty list; pass one module per model chunk")
    if not interleaved and len(model) != 1:
        raise ValueError(
            f"this schedule runs one model chunk per rank, got a list of {len(model)}; use "
            f"forward_backward_pipelining_with_interleaving for several chunks"
        )
    if len(iterators) != len(model):
        raise ValueError(
            f"data_iterator has {len(iterators)} entries but model has {len(model)} chunks; give one iterator "
            f"per chunk (None for chunks that read no data)"
        )
    for i, chunk in enumerate(model):
        if not isinstance(chunk, torch.nn.Module):
            raise TypeError(f"model chunk {i} is {type(chunk).__name__}, not a torch.nn.Module")
    return model, iterators


def _activation_spec(
    *,
    tensor_shape: Sequence[int] | None,
    seq_length: int | None,
    micro_batch_size: int | None,
    config: PipelineConfig,
    chunks: list[torch.nn.Module],
) -> TensorSpec:
    if tensor_shape is None:
        missing = [
            name
            for name, value in (("seq_length", seq_length), ("micro_batch_size", micro_batch_size), ("config.hidden_size", config.hidden_size))
            if value is None
        ]
        if missing:
            raise ValueError(
                f"the activation shape [seq_length, micro_batch_size, hidden_size] is unknown: {', '.join(missing)} "
                f"not given; pass them, or pass tensor_shape explicitly"
            )
        tensor_shape = (seq_length, micro_batch_size, config.hidden_size)
    shape = tuple(tensor_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"the activation shape must be positive integers, got {shape}")
    return TensorSpec(shape=shape, dtype=config.pipeline_dtype, device=_device_of(chunks))


def _device_of(chunks: list[torch.nn.Module]) -> torch.device:
    # Buffers live where the model does: CPU for gloo, the current GPU for NCCL.
    param = next((p for chunk in chunks for p in chunk.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _check_config(config: PipelineConfig) -> None:
    """The communication settings, checked before anything is sent."""
    for name in ("variable_seq_lengths", "check_p2p_shapes", "overlap_p2p_comm", "deallocate_pipeline_outputs"):
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise TypeError(f"config.{name} must be True or False, got {value!r}")
    timeout = config.p2p_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(
            f"config.p2p_timeout must be a positive number of seconds, got {timeout!r}; use e.g. 300 (well under "
            f"the process group's own timeout)"
        )
    window = config.overlap_recv_window
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(
            f"config.overlap_recv_window must be an integer >= 2 (steps of receives posted ahead), got {window!r}; "
            f"the default is 8, and 2 holds the fewest buffers"
        )
    cap = config.max_message_numel
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"config.max_message_numel must be a positive integer, got {cap!r}")
    if not isinstance(config.pipeline_dtype, torch.dtype):
        raise TypeError(f"config.pipeline_dtype must be a torch.dtype, got {config.pipeline_dtype!r}")
    if config.sends_headers:
        dtype_code(config.pipeline_dtype)  # raises for a dtype the header table cannot name


def _run(
    *,
    forward_step_func: ForwardStepFunc,
    chunks: list[torch.nn.Module],
    iterators: list[Iterator | None],
    num_microbatches: int,
    seq_length: int | None,
    micro_batch_size: int | None,
    tensor_shape: Sequence[int] | None,
    forward_only: bool,
    collect_non_loss_data: bool,
    config: Any,
    link: Neighbours,
    no_pipelining: bool = False,
) -> list[Any]:
    if not callable(forward_step_func):
        raise TypeError(f"forward_step_func must be callable, got {type(forward_step_func).__name__}")
    if not isinstance(num_microbatches, int) or isinstance(num_microbatches, bool) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")
    if collect_non_loss_data and not forward_only:
        raise ValueError(
            "collect_non_loss_data=True stores loss_func(output, non_loss_data=True) instead of a loss, so "
            "there is nothing to run backward on; pass forward_only=True with it"
        )
    cfg = resolve_config(config, chunks)
    plan = build_plan(
        p=link.size, r=link.rank, v=len(chunks), m=num_microbatches, forward_only=forward_only,
        group_size=cfg.microbatch_group_size_per_vp_stage,
    )
    _check_config(cfg)
    spec = None
    # One rank communicates nothing, and variable shapes come in headers: neither needs a fixed shape.
    if link.size > 1 and not cfg.variable_seq_lengths:
        spec = _activation_spec(
            tensor_shape=tensor_shape, seq_length=seq_length, micro_batch_size=micro_batch_size, config=cfg, chunks=chunks
        )
    # Overlap needs fixed shapes; the framed exchange used with headers leaves its sends unwaited anyway.
    overlapped = cfg.overlap_p2p_comm and link.size > 1 and not cfg.sends_headers
    runner = (OverlappedRunner if overlapped else PlanRunner)(
        plan=plan, link=link, forward_step_func=forward_step_func, data_iterators=iterators, chunks=chunks,
        config=cfg, spec=spec, collect_non_loss_data=collect_non_loss_data, sync_last_forward=no_pipelining,
        device=_device_of(chunks),
    )
    return runner.run()


def forward_backward_no_pipelining(
    *,
    forward_step_func: ForwardStepFunc,
    data_iterator: Any,
    model: torch.nn.Module | list[torch.nn.Module],
    num_microbatches: int,
    seq_length: int | None = None,
    micro_batch_size: int | None = None,
    decoder_seq_length: int | None = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step: bool | None = None,
    config: Any = None,
    group: Any = None,
    tensor_shape: Sequence[int] | None = None,
) -> list[Any]:
    """Forward and backward of each microbatch in turn on this process, with no communication.

    Every microbatch but the last runs under ``config.no_sync_func()``, so data-parallel gradient
    reduction happens once. ``group`` is ignored (there is no pipeline); ``decoder_seq_length`` and
    ``first_val_step`` are accepted for Megatron compatibility and unused.
    """
    chunks, iterators = _as_lists(model, data_iterator, interleaved=False)
    return _run(
        forward_step_func=forward_step_func, chunks=chunks, iterators=iterators, num_microbatches=num_microbatches,
        seq_length=seq_length, micro_batch_size=micro_batch_size, tensor_shape=tensor_shape,
        forward_only=forward_only, collect_non_loss_data=collect_non_loss_data, config=config,
        link=Neighbours(group=None, rank=0, size=1), no_pipelining=True,
    )


def forward_backward_pipelining_without_interleaving(
    *,
    forward_step_func: ForwardStepFunc,
    data_iterator: Any,
    model: torch.nn.Module | list[torch.nn.Module],
    num_microbatches: int,
    seq_length: int | None = None,
    micro_batch_size: int | None = None,
    decoder_seq_length: int | None = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step: bool | None = None,
    config: Any = None,
    group: Any = None,
    tensor_shape: Sequence[int] | None = None,
) -> list[Any]:
    """1F1B: ``W = min(p - r - 1, m)`` warmup forwards, ``m - W`` forward+backward rounds, ``W`` cooldown backwards.

    At most ``min(p - r, m)`` microbatches' activations are alive on rank ``r`` at once. ``group`` is
    the pipeline process group (default: the default group); activations are
    ``[seq_length, micro_batch_size, config.hidden_size]`` of ``config.pipeline_dtype`` unless
    ``tensor_shape`` is given.
    """
    chunks, iterators = _as_lists(model, data_iterator, interleaved=False)
    return _run(
        forward_step_func=forward_step_func, chunks=chunks, iterators=iterators, num_microbatches=num_microbatches,
        seq_length=seq_length, micro_batch_size=micro_batch_size, tensor_shape=tensor_shape,
        forward_only=forward_only, collect_non_loss_data=collect_non_loss_data, config=config,
        link=Neighbours.of(group),
    )


def forward_backward_pipelining_with_interleaving(
    *,
    forward_step_func: ForwardStepFunc,
    data_iterator: list[Any],
    model: list[torch.nn.Module],
    num_microbatches: int,
    seq_length: int | None = None,
    micro_batch_size: int | None = None,
    decoder_seq_length: int | None = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step: bool | None = None,
    config: Any = None,
    group: Any = None,
    tensor_shape: Sequence[int] | None = None,
) -> list[Any]:
    """Interleaved 1F1B over ``v = len(model)`` chunks per rank; chunk ``c`` on rank ``r`` is stage ``c·p + r``.

    Needs ``num_microbatches >= p``. Microbatches go through each chunk in groups of
    ``G = config.microbatch_group_size_per_vp_stage`` (default ``p``; when ``m % p != 0``, the smallest
    ``G`` that divides ``m`` or leaves a last group of at least ``p``). Warmup is
    ``min(2 (p - r - 1) + (v - 1) G, m v)`` forwards. Exact at ``p = 2`` too.
    """
    chunks, iterators = _as_lists(model, data_iterator, interleaved=True)
    return _run(
        forward_step_func=forward_step_func, chunks=chunks, iterators=iterators, num_microbatches=num_microbatches,
        seq_length=seq_length, micro_batch_size=micro_batch_size, tensor_shape=tensor_shape,
        forward_only=forward_only, collect_non_loss_data=collect_non_loss_data, config=config,
        link=Neighbours.of(group),
    )


def get_forward_backward_func(
    virtual_pipeline_model_parallel_size: int | None = None, group: Any = None
) -> Callable[..., list[Any]]:
    """The schedule for this pipeline: none for one rank, interleaved when ``v > 1``, else 1F1B.

    With a ``group``, the returned function is bound to it.
    """
    size = Neighbours.of(group).size
    if size == 1:
        return forward_backward_no_pipelining
    if virtual_pipeline_model_parallel_size is not None and virtual_pipeline_model_parallel_size > 1:
        func = forward_backward_pipelining_with_interleaving
    else:
        func = forward_backward_pipelining_without_interleaving
    return func if group is None else functools.partial(func, group=group)
