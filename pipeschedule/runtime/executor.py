"""Runs one rank's :class:`~pipeschedule.plan.build.RankPlan`: its actions and exchanges, in order.

The executor makes no scheduling decision of its own; the plan says what runs and which batch
carries which message. What it adds is the bookkeeping between them:

* ``inbox``: received tensors waiting for the action that consumes them (with the interleaved
  group size ``G > p`` some activations arrive a few steps early);
* ``outbox``: tensors produced by an action, waiting for the exchange that sends them;
* ``saved``: each forward's input and output, kept for its backward;
* ``weights``: in a zero-bubble plan, what each pending weight pass ``W`` needs
  (:mod:`pipeschedule.runtime.split`), from its ``I`` on.

All three are empty again when a step ends; anything left over is a bug and raises.

When anything raises, :mod:`pipeschedule.runtime.abort` tells the neighbours and names the failed rank,
so every rank raises and none hangs.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pipeschedule.runtime.abort import FailureHandling
from pipeschedule.config import PipelineConfig, ScheduleEvent
from pipeschedule.errors import ShapeMismatchError
from pipeschedule.wire.framed import Incoming, PendingSends, framed_exchange
from pipeschedule.wire.handshake import Handshake
from pipeschedule.runtime.memory import held_bytes, release_output
from pipeschedule.wire.notice import FailureBoard
from pipeschedule.wire.p2p import Neighbours, TensorSpec, exchange
from pipeschedule.plan import Action, Exchange, Message, RankPlan, Step
from pipeschedule.runtime.split import PendingWeights, choose_split
from pipeschedule.runtime.sync import GradSync
from pipeschedule.wire.records import Reason, encode_call, plan_fingerprint
from pipeschedule.runtime.wrapped import inner_module

_NOTHING = contextlib.nullcontext()


# Whether a torch profiler is recording: ``record_function`` costs a dispatcher call even when
# none is. Without this query (another torch version), every action is wrapped.
_profiler_enabled = getattr(torch._C._autograd, "_profiler_enabled", lambda: True)


def _input_setter(chunk: torch.nn.Module) -> Callable[[torch.Tensor | None], None]:
    setter = getattr(inner_module(chunk, having="set_input_tensor"), "set_input_tensor", None)
    if setter is not None:
        return setter

    def missing(tensor: torch.Tensor | None) -> None:
        if tensor is not None:
            raise TypeError(
                f"model chunk {type(chunk).__name__} has no set_input_tensor(tensor) method, so it cannot take the "
                f"activation received from the previous stage; add one that stores the tensor for forward()"
            )

    return missing


@contextlib.contextmanager
def _counting_saved(storages: dict[int, int]):
    """Within: note the storage (address, bytes) of every tensor autograd saves; the tensors are kept as they are."""

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def run_backward(output: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Backpropagate ``grad`` from ``output`` into the graph, accumulating into ``.grad`` as usual.

    Unlike ``torch.autograd.backward`` this skips the Python-side comparison of ``grad`` with
    ``output``'s current data, so it also works after :func:`pipeschedule.runtime.memory.release_output`
    has freed that data; autograd itself still checks ``grad`` against the shape recorded when
    ``output`` was made. ``grad=None`` is allowed for a one-element output (a loss).
    """
    if grad is None:
        if output.numel() != 1:
            raise RuntimeError(f"a gradient can be implied only for a one-element output, got shape {tuple(output.shape)}")
        grad = torch.ones_like(output, memory_format=torch.preserve_format)
    torch.autograd.Variable._execution_engine.run_backward(
        (output,), (grad,), keep_graph=False, create_graph=False, inputs=(), allow_unreachable=True, accumulate_grad=True
    )


class PlanRunner(FailureHandling):
    """Executes ``plan`` once. One instance per call of a schedule function; nothing is shared."""

    def __init__(
        self,
        *,
        plan: RankPlan,
        link: Neighbours,
        forward_step_func: Callable,
        data_iterators: list[Iterator | None],
        chunks: list[torch.nn.Module],
        config: PipelineConfig,
        spec: TensorSpec | None,
        collect_non_loss_data: bool,
        sync_last_forward: bool = False,
        device: torch.device | None = None,
        finalize_extras: dict[str, Any] | None = None,
    ) -> None:
        self.plan = plan
        self.link = link
        self.forward_step_func = forward_step_func
        self.data_iterators = data_iterators
        self.chunks = chunks
        self.config = config
        self.spec = spec
        self.collect_non_loss_data = collect_non_loss_data
        mode = "none" if sync_last_forward else "zero-bubble" if plan.zero_bubble else "interleaved" if plan.v > 1 else "1f1b"
        self.sync = GradSync(config, chunks, plan.actions, mode=mode, rank=link.rank, m=plan.m)
        self.finalize_extras = finalize_extras or {}
        self.inbox: dict[Message, torch.Tensor] = {}
        self.outbox: dict[Message, torch.Tensor] = {}
        self.saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.weights: dict[tuple[int, int], PendingWeights] = {}
        self.split = (
            choose_split(config.weight_grad_split, chunks, lambda chunk: inner_module(chunk, having="backward_dw"))
            if plan.zero_bubble else None
        )
        self.graph_checked: set[int] = set()  # chunks whose graph the split has looked at this step
        # Zero bubble, for an observer that wants held bytes: the storages each forward's graph saved.
        self.graph_storages: dict[tuple[int, int], dict[int, int]] = {}
        self.local: deque[torch.Tensor] = deque()  # messages to this same rank (p = 1, several chunks)
        self.store: list[Any] = []
        self.num_tokens: torch.Tensor | None = None
        self.loss_arity: int | None = None
        # ``spec`` is None with variable shapes; messages are then allocated from headers, here.
        self.device = spec.device if spec is not None else (device or torch.device("cpu"))
        self.framed = config.sends_headers
        self.fingerprint = plan_fingerprint(p=plan.p, v=plan.v, m=plan.m, group_size=plan.group_size, forward_only=plan.forward_only)
        self.pending = PendingSends()
        # What this rank is doing, for the abort record if it fails: a reason code and the action.
        self.doing: tuple[int, Action | None] = (Reason.OTHER, None)
        self.where = "started the step"
        self.next_exchange = 0  # index into plan.exchanges of the first exchange not yet posted
        self.bad_output: torch.Tensor | None = None
        self.received: set[Message] = set()
        # With per-token losses the step ends by passing the token count down the ranks (_finalize).
        self.passes_token_count = config.calculate_per_token_loss and not plan.forward_only and plan.p > 1
        self.closing_sent = False  # the token count message to the previous rank
        self.closing_received = False
        self.input_setters = [_input_setter(chunk) for chunk in chunks]
        # A chunk may declare that its output does not depend on its input (see _backward).
        self.ignores_input = [
            getattr(inner_module(chunk, having="ignores_input_tensor"), "ignores_input_tensor", False) is True
            for chunk in chunks
        ]
        self.release_outputs = config.deallocate_pipeline_outputs
        self.report_held_bytes = bool(getattr(config.observer, "wants_held_bytes", False))
        self.board: FailureBoard | None = None  # the job's failure notices, while the step runs
        self.handshake = self._handshake() if plan.p > 1 else None

    def _handshake(self) -> Handshake:
        """The call record this rank opens the step with (:mod:`pipeschedule.wire.handshake`)."""
        plan, config, spec = self.plan, self.config, self.spec
        record = encode_call(
            p=plan.p, v=plan.v, m=plan.m, group_size=plan.group_size, forward_only=plan.forward_only,
            headers=2 if config.variable_seq_lengths else 1 if config.check_p2p_shapes else 0,
            dtype=spec.dtype if spec is not None else config.pipeline_dtype,
            shape=spec.shape if spec is not None else None, device=self.device,
            per_token=bool(config.calculate_per_token_loss), schedule=1 if getattr(plan, "zero_bubble", False) else 0,
        )
        return Handshake(self.link, record, timeout=config.p2p_timeout, v=plan.v)

    def _check_call(self, peers: Any) -> None:
        """Before the first exchange with each of ``peers``: its call record must equal ours."""
        unchecked = self.handshake.unchecked
        for peer in peers:
            if peer in unchecked:
                self.where = f"{self.where}, checking the call record of {self.link.name(peer)}"
                self.handshake.check(peer)

    # -- the step ---------------------------------------------------------------------------

    def run(self) -> list[Any]:
        """Run every step; return the reduced loss dicts (last stage) or ``[]``."""
        self._open_board()
        try:
            if self.handshake is not None:
                self.handshake.post()
            self._start()
            for step in self.plan.steps:
                for action in step.actions:
                    self._timed_action(action)
                self._finish_step(step)
            self.where = "finished its last exchange"
            self.doing = (Reason.OTHER, None)
            self.pending.wait(link=self.link, timeout=self.config.p2p_timeout)
            if self.handshake is not None:
                self.handshake.finish()
            self.where = "started the data-parallel gradient reductions (no_sync_func, grad_sync_func)"
            self.sync.finish()
            leftovers = {"inbox": self.inbox, "outbox": self.outbox, "saved": self.saved, "weights": self.weights}
            if any(leftovers.values()):
                raise RuntimeError(f"the step ended with unconsumed tensors: { {k: list(v) for k, v in leftovers.items() if v} }")
            if not self.plan.forward_only:
                self._finalize()
        except BaseException as exc:
            error = self._explained(exc)
            self._abort(error)
            if error is not exc:
                raise error from exc
            raise
        finally:
            self.sync.close()
            self._close_board()
        return self.store if self._is_last(self.plan.v - 1) else []

    def _start(self) -> None:
        """Before the first action: receive its input."""
        self._exchange(self.plan.first)

    def _finish_step(self, step: Step) -> None:
        """After a step's actions: send what they produced, receive what the next step needs.

        The step's fill (weight passes) runs while the exchange is in flight: after it is posted,
        before it is waited on.
        """
        self._exchange(step.exchange, fill=step.fill)

    def _run_fill(self, fill: tuple[Action, ...]) -> None:
        for action in fill:
            self._timed_action(action)

    def _timed_action(self, action: Action) -> None:
        observer = self.config.observer
        start = time.perf_counter() if observer is not None else 0.0
        self.where = f"ran {action.label(self.plan.v)}"
        self.doing = (Reason.FORWARD if action.kind == "F" else Reason.BACKWARD, action)
        try:
            self.sync.before(action)
        except BaseException:
            self._hook_failed(f"ran the hooks before {action.label(self.plan.v)} (no_sync_func, param_sync_func)", action)
            raise
        # Everything between two actions is on the critical path of a pipeline; the profiler
        # range is opened only when a profiler records it.
        profiled = torch.profiler.record_function(f"pipeschedule.{action.label(self.plan.v)}") if _profiler_enabled() else _NOTHING
        with profiled:
            if action.kind == "F":
                self._forward(action)
            elif action.kind == "B":
                self._backward(action)
            elif action.kind == "I":
                self._input_backward(action)
            else:
                self._weight_backward(action)
        try:
            self.sync.after(action)
        except BaseException:
            self._hook_failed(f"ran the hooks after {action.label(self.plan.v)} (grad_sync_func, no_sync_func)", action)
            raise
        if observer is not None:
            end = time.perf_counter()
            held = held_bytes(self._held_tensors()) if self.report_held_bytes else None
            pending = self._pending_weight_bytes() if self.report_held_bytes and self.split is not None else None
            observer(ScheduleEvent(self.link.rank, "action", action, None, start, end, held, pending))

    def _pending_weight_bytes(self) -> int:
        """What the pending weight passes hold: their graphs' saved storages and captured gradients."""
        storages: dict[int, int] = {}
        for key, pending in self.weights.items():
            storages.update(self.graph_storages.get(key, {}))
            for group in pending.groups or ():
                for grads in group.captured:
                    for g in grads or ():
                        if g is not None:
                            storages[g.untyped_storage().data_ptr()] = g.untyped_storage().nbytes()
        return sum(storages.values())

    def _held_tensors(self) -> list[torch.Tensor | None]:
        """Every stage input and output this rank holds right now."""
        held = [t for pair in self.saved.values() for t in pair]
        for pending in self.weights.values():
            held += [pending.output, pending.grad]
            held += [g for group in pending.groups or () for grads in group.captured for g in grads or ()]
        held += [*self.inbox.values(), *self.outbox.values(), *self.local]
        return held + [tensor for _, _, tensor, _ in self.pending.works]

    def _is_last(self, chunk: int) -> bool:
        return self.plan.stage(chunk) == self.plan.num_stages - 1

    # -- forward and backward ----------------------------------------------------------------

    def _forward(self, action: Action) -> None:
        chunk = action.chunk
        msg = self.plan.input_message(action)
        input_tensor = None if msg is None else self.inbox.pop(msg)
        if input_tensor is not None and not self.plan.forward_only:
            input_tensor.requires_grad_(True)
        self.input_setters[chunk](input_tensor)
        grad_mode = torch.no_grad() if self.plan.forward_only else _NOTHING if torch.is_grad_enabled() else torch.enable_grad()
        counting = self.split is not None and self.split.name == "autograd" and self.report_held_bytes and not self.plan.forward_only
        saved_by_graph = self.graph_storages.setdefault((action.microbatch, chunk), {}) if counting else None
        with grad_mode, (_counting_saved(saved_by_graph) if counting else _NOTHING):
            try:
                result = self.forward_step_func(self.data_iterators[chunk], self.chunks[chunk])
            except StopIteration as exc:
                # A StopIteration escaping here would be swallowed by any loop around the schedule.
                raise ValueError(
                    f"the data iterator of model chunk {chunk} ran out at microbatch {action.microbatch} "
                    f"(num_microbatches={self.plan.m}); give it at least num_microbatches items per step, or "
                    f"lower num_microbatches"
                ) from exc
            output, loss_func = _check_forward_result(result, self.plan.stage(chunk))
            if self._is_last(chunk):
                self.doing = (Reason.LOSS, action)
                output = self._loss(output, loss_func)
                if not self.plan.forward_only and not self.collect_non_loss_data and not output.requires_grad:
                    raise ValueError(
                        f"{self._stage_name(chunk)}: the loss of microbatch {action.microbatch} does not require grad, so "
                        f"backward cannot run: loss_func returned a loss that was detached (.detach(), .item(), "
                        f"torch.no_grad()); compute the loss from output_tensor without detaching it, or pass "
                        f"forward_only=True to evaluate"
                    )
                self.doing = (Reason.FORWARD, action)
        if self.split is not None and chunk not in self.graph_checked and not self.plan.forward_only:
            self.graph_checked.add(chunk)
            self.split.check_graph(output, chunk)  # before the output leaves: refuse what cannot be split
        out_msg = self.plan.output_message(action)
        if out_msg is not None:
            self._check_activation(output, action)
            if not self.plan.forward_only and not output.requires_grad:
                raise ValueError(
                    f"{self._stage_name(chunk)} returned an activation for microbatch {action.microbatch} that does not "
                    f"require grad, so no gradient can flow back through it: it was detached (.detach(), .data, "
                    f"torch.no_grad() inside forward); return the output of the chunk's layers as it is, or pass "
                    f"forward_only=True to evaluate"
                )
            # A detached alias is sent: it keeps the data alive until the send is done, even
            # when the output's own data is released below.
            self._emit(out_msg, output.detach())
            if self.release_outputs and not self.plan.forward_only:
                release_output(output, keep=input_tensor)
        if not self.plan.forward_only:
            self.saved[(action.microbatch, chunk)] = (input_tensor, output)

    def _loss(self, output: torch.Tensor, loss_func: Callable) -> torch.Tensor:
        if self.collect_non_loss_data:
            self.store.append(loss_func(output, non_loss_data=True))
            return output
        result = loss_func(output)
        if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
            raise TypeError(
                f"loss_func must return (loss, reduced_dict) or (loss, num_tokens, reduced_dict), got "
                f"{type(result).__name__}{f' of length {len(result)}' if isinstance(result, (tuple, list)) else ''}"
            )
        if self.loss_arity not in (None, len(result)):
            raise ValueError(
                f"loss_func returned {self.loss_arity} items for an earlier microbatch and {len(result)} now; "
                f"return the same form for every microbatch of a step"
            )
        self.loss_arity = len(result)
        loss, reduced = result[0], result[-1]
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_func's loss must be a tensor with one element, got {_describe(loss)}")
        # Megatron-core's rules, in place as there (a reduced dict holding the same tensor sees the
        # division); see PipelineConfig.
        if len(result) == 3:
            tokens = torch.as_tensor(result[1]).detach().reshape(()).to(self.device)
            if self.config.calculate_per_token_loss:
                # The step's token count is known after the last microbatch; the gradients are
                # divided by it at the end of the step (see _finalize).
                if self.num_tokens is None:
                    self.num_tokens = torch.zeros((), dtype=torch.int, device=self.device)
                if tokens.is_floating_point() and not self.num_tokens.is_floating_point():
                    self.num_tokens = self.num_tokens.double()
                self.num_tokens += tokens
            else:
                loss = _divide_in_place(loss, torch.clamp(tokens, min=1))
                loss = _divide_in_place(loss, self.plan.m)
        else:
            loss = _divide_in_place(loss, self.plan.m)
        self.store.append(reduced)
        if self.config.grad_scale_func is not None and not self.plan.forward_only:
            loss = self.config.grad_scale_func(loss)
        return loss

    def _backward_operands(self, action: Action) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """What a backward (``B`` or ``I``) takes: the stage input and output its forward kept, and
        the output's gradient from the next stage (``None`` on the last stage: the loss)."""
        input_tensor, output = self.saved.pop((action.microbatch, action.chunk))
        msg = self.plan.input_message(action)
        return input_tensor, output, None if msg is None else self.inbox.pop(msg)

    def _backward(self, action: Action) -> None:
        input_tensor, output, output_grad = self._backward_operands(action)
        run_backward(output, output_grad)
        self._send_input_grad(action, input_tensor)

    def _input_backward(self, action: Action) -> None:
        """``I``: the input's gradient, sent on; what the weight pass needs is kept."""
        input_tensor, output, output_grad = self._backward_operands(action)
        self.weights[(action.microbatch, action.chunk)] = self.split.input_pass(input_tensor, output, output_grad, action.chunk)
        self._send_input_grad(action, input_tensor)

    def _weight_backward(self, action: Action) -> None:
        """``W``: the weights' gradients of one microbatch through one chunk."""
        key = (action.microbatch, action.chunk)
        self.split.weight_pass(self.weights.pop(key), action.chunk)
        self.graph_storages.pop(key, None)

    def _send_input_grad(self, action: Action, input_tensor: torch.Tensor | None) -> None:
        out_msg = self.plan.output_message(action)
        if out_msg is not None:
            grad = input_tensor.grad
            if grad is None:
                if not self.ignores_input[action.chunk]:
                    raise ValueError(
                        f"{self._stage_name(action.chunk)}: its output for microbatch {action.microbatch} does not depend "
                        f"on the activation received from stage {self.plan.stage(action.chunk) - 1}, which would get no "
                        f"gradient: the chunk does not use the tensor given to set_input_tensor (set_input_tensor not "
                        f"wired). Make forward() compute from the tensor set_input_tensor stores; if the chunk really "
                        f"ignores its input, set the attribute ignores_input_tensor = True on it (the previous stage then "
                        f"gets a zero gradient)"
                    )
                # A chunk that says it ignores its input still owes the previous stage a gradient: zero.
                grad = torch.zeros_like(input_tensor)
            self._emit(out_msg, grad)

    def _stage_name(self, chunk: int) -> str:
        return f"stage {self.plan.stage(chunk)} (model chunk {chunk} on {self.link.name(self.link.rank)})"

    def _emit(self, msg: Message, tensor: torch.Tensor) -> None:
        """``tensor`` is ``msg``'s data; the step's exchange sends it."""
        self.outbox[msg] = tensor

    def _check_activation(self, output: torch.Tensor, action: Action) -> None:
        if self.plan.p == 1:  # nothing crosses a process boundary
            return
        dtype = self.spec.dtype if self.spec is not None else self.config.pipeline_dtype
        if output.dtype != dtype and self.spec is None:
            self.bad_output = output
            raise ShapeMismatchError(
                f"stage {self.plan.stage(action.chunk)} produced an activation of dtype {output.dtype} for microbatch "
                f"{action.microbatch}, but the pipeline sends {dtype}; cast the output, or set config.pipeline_dtype"
            )
        if self.spec is not None and (tuple(output.shape) != self.spec.shape or output.dtype != self.spec.dtype):
            self.bad_output = output
            raise ShapeMismatchError(
                f"stage {self.plan.stage(action.chunk)} produced an activation of shape {tuple(output.shape)} and "
                f"dtype {output.dtype} for microbatch {action.microbatch}, but the pipeline sends "
                f"{self.spec.shape} of {self.spec.dtype}; make the chunk return that shape, or pass the right "
                f"seq_length/micro_batch_size/hidden_size, tensor_shape or pipeline_dtype"
            )
        if not output.is_contiguous():
            raise ValueError(
                f"stage {self.plan.stage(action.chunk)} returned a non-contiguous activation for microbatch "
                f"{action.microbatch}; return output.contiguous()"
            )

    # -- communication -------------------------------------------------------------------------

    def _exchange(self, ex: Exchange, fill: tuple[Action, ...] = ()) -> None:
        if self.handshake is not None and self.handshake.unchecked and ex:
            # Before anything is posted: a failure here still owes this exchange's messages.
            rank_of = self.plan.rank_of
            self._check_call([rank_of(msg.dst_stage) for msg in ex.sends] + [rank_of(msg.src_stage) for msg in ex.recvs])
        self.next_exchange += 1
        if not ex:
            self._run_fill(fill)
            return
        observer = self.config.observer
        start = time.perf_counter() if observer is not None else 0.0
        rank_of = self.plan.rank_of
        if self.plan.p == 1:
            # Every neighbour is this rank: hand the tensors over directly, as copies, so a chunk
            # cannot alias the previous chunk's saved output.
            self.local.extend(self.outbox.pop(msg).clone() for msg in ex.sends)
            got = [self.local.popleft() for _ in ex.recvs]
            self._run_fill(fill)
        else:
            sends = [(self.outbox.pop(msg), rank_of(msg.dst_stage)) for msg in ex.sends]
            what = self.where if not ex.recvs else f"{self.where}, receiving {', '.join(m.label() for m in ex.recvs)}"
            if self.framed:
                # The header protocol posts and waits inside framed_exchange: the fill runs first.
                self._run_fill(fill)
                expect = None if self.config.variable_seq_lengths else self.spec
                got = framed_exchange(
                    self.link, sends=sends, recvs=[Incoming(rank_of(msg.src_stage), msg.label(), expect) for msg in ex.recvs],
                    device=self.device, fingerprint=self.fingerprint, max_numel=self.config.max_message_numel,
                    timeout=self.config.p2p_timeout, pending=self.pending, what=self.where, v=self.plan.v,
                    received=lambda i: self.received.add(ex.recvs[i]),
                )
            else:
                recvs = [(self.spec, rank_of(msg.src_stage)) for msg in ex.recvs]
                failed: list[BaseException] = []

                def between() -> None:
                    # An error in a weight pass is raised once the exchange is complete, so the
                    # failure handling finds every posted operation finished.
                    try:
                        self._run_fill(fill)
                    except BaseException as exc:  # noqa: BLE001 - re-raised below
                        failed.append(exc)

                got = exchange(
                    self.link, sends=sends, recvs=recvs, timeout=self.config.p2p_timeout, what=what,
                    on_received=lambda tensors: self._check_received(ex.recvs, tensors), between=between if fill else None,
                )
                if failed:
                    raise failed[0]
        self.inbox.update(zip(ex.recvs, got))
        self.received.update(ex.recvs)
        if observer is not None:
            observer(ScheduleEvent(self.link.rank, "exchange", None, ex, start, time.perf_counter()))

    def _check_received(self, msgs: tuple[Message, ...], tensors: list[torch.Tensor]) -> None:
        """All of ``msgs`` are off the channel: note that first (a failure's clean-up must not wait
        for them again), then raise if one of them is an abort notice."""
        self.received.update(msgs)
        for tensor, msg in zip(tensors, msgs):
            self._raise_if_abort(tensor, msg)

    def _finalize(self) -> None:
        """After every backward: the step's token count, then ``finalize_model_grads_func`` or our own division.

        With ``calculate_per_token_loss`` only the last stage knows the count, so it is passed down
        the pipeline first (every rank takes part) and every rank hands the same count on.
        Megatron's finalize divides the gradients by it; without a finalize the schedule does, so
        gradients are those of the per-token mean either way.
        """
        total = None
        if self.config.calculate_per_token_loss:
            total = self.num_tokens if self.num_tokens is not None else torch.zeros((), dtype=torch.int, device=self.device)
            if self.passes_token_count:
                value = float(self._pass_token_count(total.to(torch.float64)))
                dtype = torch.int if value.is_integer() else torch.float64
                total = torch.tensor(value, dtype=dtype, device=self.device)
        finalize = self.config.finalize_model_grads_func
        if finalize is None:
            if total is not None and float(total) > 0:
                _divide_gradients(self.chunks, total)
            return
        self.where = "ran finalize_model_grads_func"
        finalize(self.chunks, total, **_accepted_keywords(finalize, self.finalize_extras))


def _divide_in_place(loss: torch.Tensor, divisor: torch.Tensor | int) -> torch.Tensor:
    """``loss /= divisor`` as Megatron does it; a tensor autograd will not let change in place is divided out of place."""
    try:
        loss /= divisor
    except RuntimeError:  # a leaf that requires grad, or a view autograd protects
        loss = loss / divisor
    return loss


def _divide_gradients(chunks: list[torch.nn.Module], total: torch.Tensor) -> None:
    """Divide each parameter's gradient by ``total``: ``main_grad`` (Megatron's DDP buffers) and ``.grad``.

    A parameter shared by two chunks is divided once, and a ``.grad`` that is the ``main_grad``
    buffer itself is not divided twice.
    """
    seen: set[int] = set()
    for chunk in chunks:
        for param in chunk.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            main = getattr(param, "main_grad", None)
            grads = [main] if isinstance(main, torch.Tensor) else []
            if param.grad is not None and not (grads and param.grad.data_ptr() == main.data_ptr()):
                grads.append(param.grad)
            for grad in grads:
                grad.div_(total.to(grad.dtype))


def _accepted_keywords(func: Callable, keywords: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``keywords`` that ``func`` accepts (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): pass what Megatron passes
        return keywords
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return keywords
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in keywords.items() if k in names}


def _check_forward_result(result: Any, stage: int) -> tuple[torch.Tensor, Callable]:
    if (
        not isinstance(result, (tuple, list))
        or len(result) != 2
        or not isinstance(result[0], torch.Tensor)
        or not callable(result[1])
    ):
        raise TypeError(
            f"forward_step_func must return (output_tensor, loss_func) with a tensor and a callable, but on "
            f"stage {stage} it returned {_describe(result)}"
        )
    return result[0], result[1]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of ({', '.join(type(x).__name__ for x in value)})"
    return f"{type(value).__name__} {value!r}"[:200]
