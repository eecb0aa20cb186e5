"""Runs one rank's :class:`~pipeschedule.plan.RankPlan`: its actions and exchanges, in order.

The executor makes no scheduling decision of its own; the plan says what runs and which batch
carries which message. What it adds is the bookkeeping between them:

* ``inbox``: received tensors waiting for the action that consumes them (with the interleaved
  group size ``G > p`` some activations arrive a few steps early);
* ``outbox``: tensors produced by an action, waiting for the exchange that sends them;
* ``saved``: each forward's input and output, kept for its backward.

All three are empty again when a step ends; anything left over is a bug and raises.

When anything raises on this rank (the user's functions, a shape check, a neighbour's failure),
the runner tells each neighbour it still owes a message: an abort record takes that message's
place on the channel (:mod:`pipeschedule.wire`), so the neighbour raises at once, naming the
failed rank, and passes the news on. A rank that died is noticed by the backend or by the bounded
wait (``config.p2p_timeout``). Either way every rank raises, none hangs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from pipeschedule.config import PipelineConfig, ScheduleEvent
from pipeschedule.errors import RESTART, PeerFailedError, ShapeMismatchError
from pipeschedule.framed import Incoming, PendingSends, framed_exchange
from pipeschedule.p2p import Neighbours, TensorSpec, exchange, wait_bounded
from pipeschedule.plan import Action, Exchange, Message, RankPlan, build_plan
from pipeschedule.sync import GradSync
from pipeschedule.wire import RECORD_LEN, AbortRecord, Reason, dtype_code, encode_abort, plan_fingerprint, read_abort_marker, write_abort_into

logger = logging.getLogger(__name__)


def _set_input(chunk: torch.nn.Module, tensor: torch.Tensor | None) -> None:
    # Wrappers such as DistributedDataParallel keep the user's module in ``.module``.
    target = chunk
    while not hasattr(target, "set_input_tensor") and hasattr(target, "module"):
        target = target.module
    setter = getattr(target, "set_input_tensor", None)
    if setter is not None:
        setter(tensor)
    elif tensor is not None:
        raise TypeError(
            f"model chunk {type(chunk).__name__} has no set_input_tensor(tensor) method, so it cannot take the "
            f"activation received from the previous stage; add one that stores the tensor for forward()"
        )


class PlanRunner:
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
    ) -> None:
        self.plan = plan
        self.link = link
        self.forward_step_func = forward_step_func
        self.data_iterators = data_iterators
        self.chunks = chunks
        self.config = config
        self.spec = spec
        self.collect_non_loss_data = collect_non_loss_data
        self.sync = GradSync(config, chunks, plan.actions, sync_last_forward=sync_last_forward)
        self.inbox: dict[Message, torch.Tensor] = {}
        self.outbox: dict[Message, torch.Tensor] = {}
        self.saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.local: deque[torch.Tensor] = deque()  # messages to this same rank (p = 1, several chunks)
        self.store: list[Any] = []
        self.num_tokens: torch.Tensor | None = None
        self.loss_arity: int | None = None
        # ``spec`` is None with variable shapes; messages are then allocated from headers, here.
        self.device = spec.device if spec is not None else (device or torch.device("cpu"))
        self.framed = bool(config.variable_seq_lengths or config.check_p2p_shapes)
        self.fingerprint = plan_fingerprint(p=plan.p, v=plan.v, m=plan.m, group_size=plan.group_size, forward_only=plan.forward_only)
        self.pending = PendingSends()
        # What this rank is doing, for the abort record if it fails: a reason code and the action.
        self.doing: tuple[int, Action | None] = (Reason.OTHER, None)
        self.where = "started the step"
        self.next_exchange = 0  # index into plan.exchanges of the first exchange not yet posted
        self.bad_output: torch.Tensor | None = None
        self.received: set[Message] = set()
        self.closing_sent = False  # the token count message to the previous rank
        self.closing_received = False

    # -- the step ---------------------------------------------------------------------------

    def run(self) -> list[Any]:
        """Run every step; return the reduced loss dicts (last stage) or ``[]``."""
        try:
            self._exchange(self.plan.first)
            for step in self.plan.steps:
                for action in step.actions:
                    self._timed_action(action)
                self._exchange(step.exchange)
            self.where = "finished its last exchange"
            self.doing = (Reason.OTHER, None)
            self.pending.wait(link=self.link, timeout=self.config.p2p_timeout)
            self.sync.close()
            leftovers = {"inbox": self.inbox, "outbox": self.outbox, "saved": self.saved}
            if any(leftovers.values()):
                raise RuntimeError(f"the step ended with unconsumed tensors: { {k: list(v) for k, v in leftovers.items() if v} }")
            if not self.plan.forward_only:
                self._normalise_per_token()
                if self.config.finalize_model_grads_func is not None:
                    # Gradients are already normalised, so a Megatron finalize must not scale them again.
                    self.where = "ran finalize_model_grads_func"
                    self.config.finalize_model_grads_func(self.chunks, None)
        except BaseException as exc:
            self._abort(exc)
            raise
        finally:
            self.sync.close()
        return self.store if self._is_last(self.plan.v - 1) else []

    def _timed_action(self, action: Action) -> None:
        observer = self.config.observer
        start = time.perf_counter() if observer else 0.0
        self.where = f"ran {action.label(self.plan.v)}"
        self.doing = (Reason.FORWARD if action.kind == "F" else Reason.BACKWARD, action)
        self.sync.before(action)
        with torch.profiler.record_function(f"pipeschedule.{action.label(self.plan.v)}"):
            if action.kind == "F":
                self._forward(action)
            else:
                self._backward(action)
        self.sync.after(action)
        if observer:
            observer(ScheduleEvent(self.link.rank, "action", action, None, start, time.perf_counter()))

    def _is_last(self, chunk: int) -> bool:
        return self.plan.stage(chunk) == self.plan.num_stages - 1

    # -- forward and backward ----------------------------------------------------------------

    def _forward(self, action: Action) -> None:
        chunk = action.chunk
        msg = self.plan.input_message(action)
        input_tensor = None if msg is None else self.inbox.pop(msg)
        if input_tensor is not None and not self.plan.forward_only:
            input_tensor.requires_grad_(True)
        _set_input(self.chunks[chunk], input_tensor)
        with torch.no_grad() if self.plan.forward_only else torch.enable_grad():
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
                self.doing = (Reason.FORWARD, action)
        out_msg = self.plan.output_message(action)
        if out_msg is not None:
            self._check_activation(output, action)
            self.outbox[out_msg] = output.detach()
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
        if len(result) == 3:
            # Per-token loss: the total token count is known only after the last microbatch, so
            # gradients are divided by it once at the end of the step (see _normalise_per_token).
            loss, num_tokens, reduced = result
            tokens = torch.as_tensor(num_tokens, dtype=torch.float64).detach().reshape(())
            self.num_tokens = tokens if self.num_tokens is None else self.num_tokens + tokens
        else:
            loss, reduced = result
            loss = loss / self.plan.m
        self.store.append(reduced)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_func's loss must be a tensor with one element, got {_describe(loss)}")
        if self.config.grad_scale_func is not None and not self.plan.forward_only:
            loss = self.config.grad_scale_func(loss)
        return loss

    def _backward(self, action: Action) -> None:
        input_tensor, output = self.saved.pop((action.microbatch, action.chunk))
        msg = self.plan.input_message(action)
        output_grad = None if msg is None else self.inbox.pop(msg)
        torch.autograd.backward(output, grad_tensors=output_grad)
        out_msg = self.plan.output_message(action)
        if out_msg is not None:
            grad = input_tensor.grad
            # A chunk that ignores its input still owes the previous stage a gradient: zero.
            self.outbox[out_msg] = torch.zeros_like(input_tensor) if grad is None else grad

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

    def _exchange(self, ex: Exchange) -> None:
        self.next_exchange += 1
        if not ex:
            return
        observer = self.config.observer
        start = time.perf_counter() if observer else 0.0
        p = self.plan.p
        if p == 1:
            # Every neighbour is this rank: hand the tensors over directly, as copies, so a chunk
            # cannot alias the previous chunk's saved output.
            self.local.extend(self.outbox.pop(msg).clone() for msg in ex.sends)
            got = [self.local.popleft() for _ in ex.recvs]
        else:
            sends = [(self.outbox.pop(msg), msg.dst_stage % p) for msg in ex.sends]
            what = self.where if not ex.recvs else f"{self.where}, receiving {', '.join(m.label() for m in ex.recvs)}"
            if self.framed:
                expect = None if self.config.variable_seq_lengths else self.spec
                got = framed_exchange(
                    self.link, sends=sends, recvs=[Incoming(msg.src_stage % p, msg.label(), expect) for msg in ex.recvs],
                    device=self.device, fingerprint=self.fingerprint, max_numel=self.config.max_message_numel,
                    timeout=self.config.p2p_timeout, pending=self.pending, what=self.where, v=self.plan.v,
                )
            else:
                recvs = [(self.spec, msg.src_stage % p) for msg in ex.recvs]
                got = exchange(
                    self.link, sends=sends, recvs=recvs, timeout=self.config.p2p_timeout, what=what,
                    on_received=lambda tensors: [self._raise_if_abort(t, msg) for t, msg in zip(tensors, ex.recvs)],
                )
        self.inbox.update(zip(ex.recvs, got))
        self.received.update(ex.recvs)
        if observer:
            observer(ScheduleEvent(self.link.rank, "exchange", None, ex, start, time.perf_counter()))

    def _raise_if_abort(self, tensor: torch.Tensor, msg: Message | None, *, from_rank: int | None = None) -> None:
        """With fixed shapes an abort record arrives in place of the data; recognise it by its marker."""
        record = read_abort_marker(tensor)
        if record is not None:
            peer = self.link.name(msg.src_stage % self.plan.p if msg is not None else from_rank)
            waited = f", waiting for {msg.label()}" if msg is not None else ""
            expects = ""
            if record.reason == Reason.SENT_SHAPE and self.spec is not None:
                expects = f" (this rank expects shape {list(self.spec.shape)}, {self.spec.dtype})"
            raise PeerFailedError(
                f"{record.describe(self.plan.v)}; {self.link.name(self.link.rank)} learnt it from {peer} while it "
                f"{self.where}{waited}{expects}. Look at the failed rank's log for its error; {RESTART}",
                record=record,
            )

    # -- failure ---------------------------------------------------------------------------------

    def _abort(self, exc: BaseException) -> None:
        """Tell the neighbours that still expect a message from this rank that the step is lost.

        The record takes the place of the next message each neighbour expects from us, so it is
        matched by a receive the neighbour posts anyway. Then the messages still on their way to
        this rank are taken (:meth:`_drain`). Never raises: the original error is what the caller
        must see.
        """
        if self.plan.p == 1:
            return
        record = self._record_for(exc)
        p = self.plan.p
        owed = {msg.dst_stage % p for ex in self.plan.exchanges[self.next_exchange :] for msg in ex.sends}
        closing = not self.plan.forward_only and self.link.rank > 0 and not self.closing_sent
        targets = sorted((owed | ({self.link.rank - 1} if closing else set())) - {record.rank, record.reporter, self.link.rank})
        notice = dataclasses.replace(record, reporter=self.link.rank)
        sends = []
        for peer in targets:
            # The notice must be the size of the message the neighbour expects next from us: a
            # header or the token count (both RECORD_LEN values), or a fixed-shape tensor.
            if self.framed or self.spec is None or peer not in owed:
                sends.append((encode_abort(notice, device=self.device), peer))
            else:
                sends.append((write_abort_into(self.spec.empty(), notice), peer))
        desynced = {getattr(exc, "desynced_peer", -1)}  # its channel holds unread data: take nothing more
        neighbours = sorted({self.link.prev, self.link.next} - {record.rank, self.link.rank} - desynced)
        due = {peer: self._due_from(peer) for peer in neighbours}
        told: list[int] = []
        works: list[tuple[int, Any]] = []
        # Neighbours with nothing to drain first: a drain may wait on a rank that itself waits on
        # the notice we send here. With fixed shapes, a neighbour's pending sends to us are taken
        # before our notice to it is posted: it may have to finish them before it receives, and
        # gloo was seen to leave a send and a receive posted at once on one connection unmatched.
        for tensor, peer in sorted(sends, key=lambda item: bool(due.get(item[1], ([], False))[0]) and not self.framed):
            try:
                if not self.framed:
                    self._take(peer, *due.get(peer, ([], True)))
                works += [(peer, w) for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, group=self.link.group, group_peer=peer)])]
            except Exception as err:  # the neighbour may be gone too; our own error matters more
                logger.warning("could not tell %s that the step failed: %s", self.link.name(peer), err)
        for peer, work in works:
            try:
                wait_bounded(work, link=self.link, peer=peer, what="sent an abort notice", timeout=self.config.p2p_timeout)
                told.append(peer)
            except Exception as err:
                logger.warning("could not tell %s that the step failed: %s", self.link.name(peer), err)
        if told and hasattr(exc, "add_note"):
            exc.add_note(f"pipeschedule: told {', '.join(self.link.name(r) for r in told)} that the step failed")
        for peer in neighbours:
            if self.framed or peer not in targets:
                try:
                    self._take(peer, *due[peer])
                except Exception as err:
                    logger.warning("could not take the messages still on their way from %s: %s", self.link.name(peer), err)

    def _due_from(self, peer: int) -> tuple[list[Message], bool]:
        """What neighbour ``peer`` still sends us before it can learn of our failure, and whether it can.

        A neighbour blocked on a send to this rank (a fixed-shape exchange, the token count, or the
        end-of-step wait for its sends) would never reach the receive that brings our notice, or
        would time out and blame this rank; a neighbour we owe nothing more can then finish its
        own, correct, part of the step.
        """
        p, plan, me = self.plan.p, self.plan, self.link.rank
        owed = {msg for ex in plan.exchanges[self.next_exchange :] for msg in ex.sends}
        theirs = build_plan(p=p, r=peer, v=plan.v, m=plan.m, forward_only=plan.forward_only, group_size=plan.group_size)
        due: list[Message] = []
        hears = not plan.forward_only and me > 0 and not self.closing_sent and peer == me - 1
        for ex in theirs.exchanges:
            if any(msg in owed for msg in ex.recvs):
                return due, True  # here the neighbour receives our notice
            due.extend(msg for msg in ex.sends if msg.dst_stage % p == me and msg not in self.received)
        return due, hears

    def _take(self, peer: int, due: list[Message], hears_from_us: bool) -> None:
        """Receive and drop ``due`` from ``peer`` (each wait bounded), then its token count if it
        will never hear from us."""
        what = "took the messages still on their way after a failure"
        if due and self.framed:
            expect = None if self.config.variable_seq_lengths else self.spec
            framed_exchange(
                self.link, sends=[], recvs=[Incoming(peer, m.label(), expect) for m in due], device=self.device,
                fingerprint=self.fingerprint, max_numel=self.config.max_message_numel, timeout=self.config.p2p_timeout,
                pending=self.pending, what=what, v=self.plan.v,
            )
        elif due:
            ops = [dist.P2POp(dist.irecv, self.spec.empty(), group=self.link.group, group_peer=peer) for _ in due]
            for work in dist.batch_isend_irecv(ops):
                wait_bounded(work, link=self.link, peer=peer, what=what, timeout=self.config.p2p_timeout)
        if not hears_from_us and not self.plan.forward_only and peer == self.link.rank + 1 and not self.closing_received:
            # The token count comes last on this channel; take it so the neighbour can finish.
            buf = torch.empty(RECORD_LEN, dtype=torch.float64, device=self.device)
            dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, group=self.link.group, group_peer=peer)])

    def _record_for(self, exc: BaseException) -> AbortRecord:
        if isinstance(exc, PeerFailedError) and exc.record is not None:
            return exc.record
        reason, action = self.doing
        if isinstance(exc, ShapeMismatchError) and self.bad_output is not None:
            reason = Reason.SENT_SHAPE
        elif isinstance(exc, ShapeMismatchError):
            reason = Reason.RECEIVED_SHAPE
            if self.spec is not None:  # tell the sender what this rank expects
                return AbortRecord(
                    reason=reason, rank=self.link.rank, global_rank=self.link.global_rank(self.link.rank),
                    action=None, reporter=self.link.rank, shape=self.spec.shape, dtype=_safe_code(self.spec.dtype),
                )
        elif type(exc).__name__ == "CorruptHeaderError":
            reason = Reason.CORRUPT
        elif self.where.startswith(("finished", "joined", "started")) or action is None:
            reason = Reason.OTHER
        bad = self.bad_output
        return AbortRecord(
            reason=reason, rank=self.link.rank, global_rank=self.link.global_rank(self.link.rank),
            action=(action.kind, action.microbatch, action.chunk) if action is not None else None,
            reporter=self.link.rank, shape=tuple(bad.shape) if bad is not None else None,
            dtype=_safe_code(bad.dtype) if bad is not None else 0,
        )

    def _pass_token_count(self, total: torch.Tensor) -> torch.Tensor:
        """The last stage's token count, passed down the ranks ``p-1 -> ... -> 0`` (one small message each).

        A chain of point-to-point messages rather than a broadcast: each is a message a rank owes
        its previous neighbour, so a failure before it replaces it with an abort notice like any
        other message, and every rank below the failure learns who failed.
        """
        p, r = self.plan.p, self.link.rank
        if r < p - 1:
            self.where = "waited for the step's token count from the next rank"
            spec = TensorSpec((RECORD_LEN,), torch.float64, self.device)
            got = exchange(self.link, recvs=[(spec, r + 1)], timeout=self.config.p2p_timeout, what=self.where,
                           on_received=lambda t: self._raise_if_abort(t[0], None, from_rank=r + 1))
            total = got[0][0].cpu()
            self.closing_received = True
        if r > 0:
            self.where = "passed the step's token count to the previous rank"
            message = torch.zeros(RECORD_LEN, dtype=torch.float64, device=self.device)
            message[0] = total
            self.closing_sent = True
            exchange(self.link, sends=[(message, r - 1)], timeout=self.config.p2p_timeout, what=self.where)
        return total

    def _normalise_per_token(self) -> None:
        """With per-token losses, divide every gradient by the step's total token count.

        Only the last stage knows the count, so it is passed down the pipeline (every rank takes
        part, with 0 meaning "losses were already divided by m").
        """
        total = self.num_tokens if self.num_tokens is not None else torch.zeros((), dtype=torch.float64)
        if self.plan.p > 1:
            total = self._pass_token_count(total)
        if float(total) <= 0:
            return
        for chunk in self.chunks:
            for param in chunk.parameters():
                if param.grad is not None:
                    param.grad.div_(total.to(param.grad.dtype))


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


def _safe_code(dtype: torch.dtype) -> int:
    try:
        return dtype_code(dtype)
    except TypeError:
        return 0
