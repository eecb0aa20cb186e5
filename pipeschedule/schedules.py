"""The three schedules, Megatron-core compatible, as plain functions.

Each function validates its arguments (before any communication), asks :mod:`pipeschedule.plan.build`
for this rank's plan and has :class:`~pipeschedule.runtime.executor.PlanRunner` execute it. They return the
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
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from pipeschedule.config import PipelineConfig, resolve_config
from pipeschedule.runtime.executor import PlanRunner
from pipeschedule.runtime.overlap import OverlappedRunner
from pipeschedule.wire.p2p import MAX_P2P_TIMEOUT, MIN_P2P_TIMEOUT, Neighbours, TensorSpec
from pipeschedule.plan import build_plan
from pipeschedule.wire.records import dtype_code

__all__ = [
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_zero_bubble",
    "get_forward_backward_func",
]

ForwardStepFunc = Callable[[Any, torch.nn.Module], tuple[torch.Tensor, Callable]]


def _as_lists(model: Any, data_iterator: Any, *, interleaved: bool | None) -> tuple[list, list]:
    """Model chunks and their data iterators as two lists of equal length (``interleaved=None``: either form)."""
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
    if interleaved is False and len(model) != 1:
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
    for name in ("variable_seq_lengths", "check_p2p_shapes", "overlap_p2p_comm", "deallocate_pipeline_outputs", "calculate_per_token_loss"):
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise TypeError(f"config.{name} must be True or False, got {value!r}")
    if config.weight_grad_split not in ("auto", "autograd", "module"):
        raise ValueError(
            f"config.weight_grad_split must be 'auto', 'autograd' or 'module', got {config.weight_grad_split!r}"
        )
    timeout = config.p2p_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not MIN_P2P_TIMEOUT <= timeout <= MAX_P2P_TIMEOUT:
        # Outside this range the backends do not wait as asked: below a millisecond the wait
        # rounds to 0, which means "no timeout"; beyond weeks the conversion overflows.
        raise ValueError(
            f"config.p2p_timeout must be a number of seconds from {MIN_P2P_TIMEOUT} (1 ms) to {MAX_P2P_TIMEOUT:.0f} "
            f"(30 days), got {timeout!r}; use e.g. 300 (well under the process group's own timeout)"
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
    finalize_extras: dict[str, Any] | None = None,
    schedule: str = "1f1b",
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
        group_size=cfg.microbatch_group_size_per_vp_stage, schedule=schedule,
    )
    _check_config(cfg)
    if torch.is_inference_mode_enabled() and not forward_only:
        # Checked before anything is sent: inside inference_mode no graph is recorded, and every
        # rank would fail at its first backward with a message naming nothing.
        raise RuntimeError(
            f"{link.name(link.rank)}: the schedule was called inside torch.inference_mode(), where autograd records "
            f"nothing, so backward cannot run; call it outside inference_mode to train, or pass forward_only=True "
            f"to evaluate"
        )
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
        device=_device_of(chunks), finalize_extras=finalize_extras or {},
    )
    return runner.run()


def _megatron_extras(
    *, adjust_tensor_shapes_fn: Any, p2p_communicator: Any, pg_collection: Any, group: Any
) -> Any:
    """Megatron-core's plumbing keywords: refuse what cannot be honoured, return the pipeline group.

    ``pg_collection`` is read only for its pipeline group (``.pp``); an explicit ``group`` wins and
    must agree with it.
    """
    if adjust_tensor_shapes_fn is not None:
        raise ValueError(
            "adjust_tensor_shapes_fn is not supported: activations are [seq_length, micro_batch_size, hidden_size] "
            "(or tensor_shape), or announced per message with config.variable_seq_lengths=True; pass None"
        )
    if p2p_communicator is not None:
        raise ValueError(
            f"p2p_communicator ({type(p2p_communicator).__name__}) is not supported: pipeschedule sends through its "
            f"own batched primitive on the pipeline process group; pass None, and the group as group= (or in "
            f"pg_collection.pp)"
        )
    pp = getattr(pg_collection, "pp", None) if pg_collection is not None else None
    if pp is not None and group is not None and pp is not group:
        raise ValueError(
            "group and pg_collection.pp name different process groups; pass one of them (they are both the pipeline group)"
        )
    if group is None:
        group = pp if pp is not None else _megatron_state()["group"]
    return group


def _megatron_state() -> dict[str, Any]:
    """Megatron's ``parallel_state`` when the caller has imported and initialised it, else nothing.

    It is looked up in ``sys.modules`` only: pipeschedule never imports megatron.
    """
    state = sys.modules.get("megatron.core.parallel_state")
    initialised = getattr(state, "model_parallel_is_initialized", None)
    if state is None or initialised is None or not initialised():
        return {"group": None, "size": None, "virtual_size": None}
    return {
        "group": state.get_pipeline_model_parallel_group(),
        "size": state.get_pipeline_model_parallel_world_size(),
        "virtual_size": state.get_virtual_pipeline_model_parallel_world_size(),
    }


def _schedule(
    name: str, *, interleaved: bool | None, no_pipelining: bool = False, schedule_kind: str = "1f1b"
) -> Callable[..., list[Any]]:
    """One of the public schedule functions; they differ in how they take ``model`` and the group, and in the plan."""

    def schedule(
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
        adjust_tensor_shapes_fn: Callable | None = None,
        p2p_communicator: Any = None,
        pg_collection: Any = None,
        force_all_reduce: bool | None = False,
        config: Any = None,
        group: Any = None,
        tensor_shape: Sequence[int] | None = None,
    ) -> list[Any]:
        group = _megatron_extras(
            adjust_tensor_shapes_fn=adjust_tensor_shapes_fn, p2p_communicator=p2p_communicator,
            pg_collection=pg_collection, group=group,
        )
        chunks, iterators = _as_lists(model, data_iterator, interleaved=interleaved)
        return _run(
            forward_step_func=forward_step_func, chunks=chunks, iterators=iterators, num_microbatches=num_microbatches,
            seq_length=seq_length, micro_batch_size=micro_batch_size, tensor_shape=tensor_shape,
            forward_only=forward_only, collect_non_loss_data=collect_non_loss_data, config=config,
            link=Neighbours(group=None, rank=0, size=1) if no_pipelining else Neighbours.of(group),
            no_pipelining=no_pipelining, finalize_extras={"pg_collection": pg_collection, "force_all_reduce": force_all_reduce},
            schedule=schedule_kind,
        )

    schedule.__name__ = schedule.__qualname__ = name
    return schedule


forward_backward_no_pipelining = _schedule("forward_backward_no_pipelining", interleaved=False, no_pipelining=True)
forward_backward_no_pipelining.__doc__ = """Forward and backward of each microbatch in turn on this process, with no communication.

    Every microbatch but the last runs under ``config.no_sync_func()``, so data-parallel gradient
    reduction happens once in the last backward (``grad_sync_func`` and ``param_sync_func`` are not
    called, as in Megatron-core). ``group`` is ignored (there is no pipeline). Takes every keyword of
    Megatron-core 0.16.1's function; ``decoder_seq_length`` and ``first_val_step`` are unused, and
    ``pg_collection`` and ``force_all_reduce`` are handed to ``config.finalize_model_grads_func``.
    """

forward_backward_pipelining_without_interleaving = _schedule("forward_backward_pipelining_without_interleaving", interleaved=False)
forward_backward_pipelining_without_interleaving.__doc__ = """1F1B: ``W = min(p - r - 1, m)`` warmup forwards, ``m - W`` forward+backward rounds, ``W`` cooldown backwards.

    At most ``min(p - r, m)`` microbatches' activations are alive on rank ``r`` at once. ``group`` is
    the pipeline process group (default: ``pg_collection.pp``, else Megatron's initialised
    ``parallel_state``, else the default group); activations are
    ``[seq_length, micro_batch_size, config.hidden_size]`` of ``config.pipeline_dtype`` unless
    ``tensor_shape`` is given. Takes every keyword of Megatron-core 0.16.1's function;
    ``adjust_tensor_shapes_fn`` and ``p2p_communicator`` must be ``None``.
    """

forward_backward_pipelining_with_interleaving = _schedule("forward_backward_pipelining_with_interleaving", interleaved=True)
forward_backward_pipelining_with_interleaving.__doc__ = """Interleaved 1F1B over ``v = len(model)`` chunks per rank; chunk ``c`` on rank ``r`` is stage ``c·p + r``.

    Needs ``num_microbatches >= p``. Microbatches go through each chunk in groups of
    ``G = config.microbatch_group_size_per_vp_stage`` (default ``p``; when ``m % p != 0``, the smallest
    ``G`` that divides ``m`` or leaves a last group of at least ``p``). Warmup is
    ``min(2 (p - r - 1) + (v - 1) G, m v)`` forwards. Exact at ``p = 2`` too. The group and the
    Megatron keywords are taken as by :func:`forward_backward_pipelining_without_interleaving`.
    """


forward_backward_pipelining_zero_bubble = _schedule(
    "forward_backward_pipelining_zero_bubble", interleaved=None, schedule_kind="zero-bubble"
)
forward_backward_pipelining_zero_bubble.__doc__ = """Zero bubble: each backward split into its input pass ``I`` and weight pass ``W``; ``v = len(model)``.

    ``v = 1`` is ZB-H1 (Qi et al., ICLR 2024), ``v > 1`` interleaved zero bubble on the interleaved
    order table (``num_microbatches >= p``, the group size as for interleaving). Warmup
    ``min(p - r - 1, m)`` forwards at ``v = 1``, ``min((v - 1) G + p - r - 1, m v)`` when interleaving;
    the weight pass of backward ``j`` runs right after backward ``j + r`` (or at the end), while that
    step's messages travel, so rank ``r`` holds at most ``r`` pending weight passes. ``model`` and
    ``data_iterator`` are a module and an iterator, or lists of them. How the backward is split is
    ``config.weight_grad_split``; ``grad_sync_func`` of a chunk runs after its last weight pass.
    ``forward_only`` runs the forward-only plan. The group and the Megatron keywords are taken as by
    :func:`forward_backward_pipelining_without_interleaving`. With ``overlap_p2p_comm`` the step
    reaches ``m (tf + tb + tw) + (p - 1) max(tf, tb, tf + tb - tw) / v`` (simulated, ideal network);
    the batched mode is slower when interleaving (``python -m pipeschedule.tools.show``).
    """


def get_forward_backward_func(
    pp_size: int | None = None,
    vp_size: int | None = None,
    *,
    virtual_pipeline_model_parallel_size: int | None = None,
    group: Any = None,
    zero_bubble: bool = False,
) -> Callable[..., list[Any]]:
    """The schedule for this pipeline: none for one rank, interleaved when ``v > 1``, else 1F1B.

    ``zero_bubble=True`` gives :func:`forward_backward_pipelining_zero_bubble` instead of 1F1B or
    interleaving (for any pipeline size; one rank runs it too).

    Megatron-core's call works unchanged: ``pp_size`` and ``vp_size`` (or our
    ``virtual_pipeline_model_parallel_size``) give the sizes. With no argument at all, Megatron's
    ``parallel_state`` is read when the caller has initialised it (pipeline size, virtual size and
    group); otherwise the pipeline is ``group`` (default: the default group). The returned function
    is bound to the pipeline group when one is known, so it can be called without ``group=``.
    """
    if vp_size is not None and virtual_pipeline_model_parallel_size is not None and vp_size != virtual_pipeline_model_parallel_size:
        raise ValueError(
            f"vp_size={vp_size} and virtual_pipeline_model_parallel_size={virtual_pipeline_model_parallel_size} "
            f"disagree; they are the same setting, pass one"
        )
    v = vp_size if vp_size is not None else virtual_pipeline_model_parallel_size
    for name, value in (("pp_size", pp_size), ("vp_size", v)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(
                f"{name} must be a positive integer or None, got {value!r}; the positional order is Megatron-core's "
                f"(pp_size, vp_size), and the process group goes in group="
            )
    megatron = _megatron_state()
    if pp_size is None and v is None and group is None and megatron["group"] is not None:
        pp_size, v, group = megatron["size"], megatron["virtual_size"], megatron["group"]
    elif group is None and megatron["group"] is not None:
        group = megatron["group"]
    size = Neighbours.of(group).size
    if pp_size is not None and pp_size != size:
        raise ValueError(
            f"pp_size={pp_size} but the pipeline process group has {size} ranks; pass the pipeline group as group= "
            f"(or initialise Megatron's parallel_state), or pp_size={size}"
        )
    if not isinstance(zero_bubble, bool):
        raise TypeError(f"zero_bubble must be True or False, got {zero_bubble!r}")
    if zero_bubble:
        func = forward_backward_pipelining_zero_bubble
        return func if group is None else functools.partial(func, group=group)
    if size == 1:
        return forward_backward_no_pipelining
    func = forward_backward_pipelining_with_interleaving if v is not None and v > 1 else forward_backward_pipelining_without_interleaving
    return func if group is None else functools.partial(func, group=group)
