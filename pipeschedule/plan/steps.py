"""The vocabulary of plans: actions, messages, exchanges, steps, and where stages live.

A plan is made of four kinds of action on ``(microbatch, chunk)``:

* ``"F"``: the forward;
* ``"B"``: the whole backward (1F1B and interleaved 1F1B);
* ``"I"``: the input-gradient half of a backward, which the previous stage waits for;
* ``"W"``: the weight-gradient half, which nobody waits for (zero-bubble schedules).

``F`` consumes an activation and produces one; ``B`` and ``I`` consume a gradient and produce one;
``W`` neither consumes nor produces a message. A *step* is one or two actions followed by one
*exchange* (a batch of sends and receives posted and waited on together), plus the ``W``s that run
while that exchange is in flight (``fill``).

Where stages live is one function, :func:`stage_of` and its inverse :func:`rank_of`: the looped
placement puts chunk ``c`` of rank ``r`` at virtual stage ``c * p + r``. Nothing else in the
package computes a stage or a rank from the other.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Action",
    "Exchange",
    "Message",
    "PhaseCounts",
    "RankPlan",
    "Step",
    "rank_of",
    "stage_of",
]

Phase = Literal["warmup", "steady", "cooldown"]
Kind = Literal["F", "B", "I", "W"]
KINDS = ("F", "B", "I", "W")
# The actions that consume a gradient and send one on: a whole backward or its input half.
BACKWARDS = ("B", "I")
# The actions after which a (microbatch, chunk) holds no activation any more.
RELEASES = ("B", "W")


def stage_of(p: int, r: int, chunk: int) -> int:
    """The virtual stage of ``chunk`` on rank ``r`` (looped placement: ``chunk * p + r``)."""
    return chunk * p + r


def rank_of(p: int, stage: int) -> int:
    """The rank that holds virtual ``stage`` (looped placement: ``stage % p``)."""
    return stage % p


@dataclass(frozen=True)
class Action:
    """One ``kind`` of work (``F``, ``B``, ``I`` or ``W``) on ``microbatch`` through this rank's ``chunk``."""

    kind: Kind
    microbatch: int
    chunk: int
    phase: Phase

    def label(self, v: int = 1) -> str:
        """``F3`` for plain 1F1B, ``F3.1`` (microbatch 3, chunk 1) when there are several chunks."""
        return f"{self.kind}{self.microbatch}" if v == 1 else f"{self.kind}{self.microbatch}.{self.chunk}"


@dataclass(frozen=True)
class Message:
    """A tensor crossing from virtual stage ``src_stage`` to ``dst_stage``.

    ``"act"`` messages flow forward (``dst = src + 1``), ``"grad"`` messages backward
    (``dst = src - 1``). :meth:`RankPlan.rank_of` says which rank holds a stage.
    """

    kind: Literal["act", "grad"]
    microbatch: int
    src_stage: int
    dst_stage: int

    def label(self) -> str:
        return f"{self.kind}{self.microbatch}:{self.src_stage}>{self.dst_stage}"


@dataclass(frozen=True)
class Exchange:
    """One batch of point-to-point operations, posted together and waited on together.

    Activations are always sent to the next rank and received from the previous one; gradients
    are sent to the previous rank and received from the next one. Within a batch activation
    traffic comes before gradient traffic, on the sending and the receiving side alike: with
    ``p = 2`` both neighbours are one rank, messages on one channel are matched in posting order,
    and this fixed order is what makes each tensor land in the buffer meant for it.
    """

    sends: tuple[Message, ...] = ()
    recvs: tuple[Message, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.sends or self.recvs)


@dataclass(frozen=True)
class Step:
    """One or two actions (a steady forward and backward) followed by one exchange.

    The exchange sends what the actions produced and receives what the next step consumes.
    ``fill`` holds weight-gradient actions (``W``) that run after the exchange is posted and before
    it is waited on: they carry no message, so they fill the wait instead of delaying a send.
    """

    actions: tuple[Action, ...]
    exchange: Exchange
    fill: tuple[Action, ...] = ()


@dataclass(frozen=True)
class PhaseCounts:
    """How many actions fall in each phase. ``total`` is the number of forwards (``m * v``).

    ``tail`` counts the weight-gradient actions after the last input-gradient action (zero-bubble
    plans; 0 otherwise).
    """

    warmup: int
    steady: int
    cooldown: int
    total: int
    tail: int = 0


@dataclass(frozen=True)
class RankPlan:
    """Everything rank ``r`` does in one step of training.

    ``first`` is posted before anything else (the receive of the first input); then each step runs
    its actions, posts its exchange, runs its fill and waits for the exchange. ``schedule`` names
    the schedule family: ``"1f1b"`` (plain or interleaved) or ``"zero-bubble"``.
    """

    p: int
    r: int
    v: int
    m: int
    forward_only: bool
    group_size: int
    counts: PhaseCounts
    first: Exchange
    steps: tuple[Step, ...]
    schedule: Literal["1f1b", "zero-bubble"] = "1f1b"

    # Derived views are computed once per plan (plans are cached and reused every training step).

    @property
    def zero_bubble(self) -> bool:
        return self.schedule == "zero-bubble"

    @functools.cached_property
    def actions(self) -> tuple[Action, ...]:
        """Every action in the order it runs, fills included."""
        return tuple(a for step in self.steps for a in step.actions + step.fill)

    @functools.cached_property
    def exchanges(self) -> tuple[Exchange, ...]:
        """All exchanges in posting order: ``first``, then one per step."""
        return (self.first,) + tuple(step.exchange for step in self.steps)

    @functools.cached_property
    def _messages(self) -> dict[Action, tuple[Message | None, Message | None]]:
        return {a: (self._input(a), self._output(a)) for a in self.actions}

    @property
    def num_stages(self) -> int:
        return self.p * self.v

    def stage(self, chunk: int) -> int:
        """The virtual stage of ``chunk`` on this rank."""
        return stage_of(self.p, self.r, chunk)

    def rank_of(self, stage: int) -> int:
        """The rank that holds virtual ``stage``."""
        return rank_of(self.p, stage)

    def input_message(self, action: Action) -> Message | None:
        """What ``action`` consumes from a neighbour: an activation for F, a gradient for B or I."""
        known = self._messages.get(action)
        return known[0] if known is not None else self._input(action)

    def output_message(self, action: Action) -> Message | None:
        """What ``action`` hands to a neighbour (``None`` at the ends of the pipeline, and for W)."""
        known = self._messages.get(action)
        return known[1] if known is not None else self._output(action)

    def _input(self, action: Action) -> Message | None:
        msg = input_tuple((action.kind, action.microbatch, action.chunk), self.p, self.r, self.num_stages)
        return None if msg is None else Message(*msg)

    def _output(self, action: Action) -> Message | None:
        msg = output_tuple((action.kind, action.microbatch, action.chunk), self.p, self.r, self.num_stages)
        return None if msg is None else Message(*msg)


# Planning works on plain tuples, ``(kind, microbatch, chunk, phase)`` for an action and
# ``(kind, microbatch, src_stage, dst_stage)`` for a message: a large pipeline makes tens of
# thousands of them, and tuples cost a fraction of the frozen dataclasses a plan hands out.


def input_tuple(action: tuple, p: int, r: int, num_stages: int) -> tuple | None:
    """The message (tuple) that ``action`` (tuple) consumes, or ``None``."""
    kind, mb, chunk = action[:3]
    stage = stage_of(p, r, chunk)
    if kind == "F":
        return None if stage == 0 else ("act", mb, stage - 1, stage)
    if kind == "W":
        return None
    return None if stage == num_stages - 1 else ("grad", mb, stage + 1, stage)


def output_tuple(action: tuple, p: int, r: int, num_stages: int) -> tuple | None:
    """The message (tuple) that ``action`` (tuple) produces, or ``None``."""
    kind, mb, chunk = action[:3]
    stage = stage_of(p, r, chunk)
    if kind == "F":
        return None if stage == num_stages - 1 else ("act", mb, stage, stage + 1)
    if kind == "W":
        return None
    return None if stage == 0 else ("grad", mb, stage, stage - 1)


def message_table(p: int, r: int, v: int) -> tuple[dict[str, list[tuple | None]], dict[str, list[tuple | None]]]:
    """Rank ``r``'s (inputs, outputs), indexed ``[kind][chunk]``: ``(message kind, src_stage,
    dst_stage)`` or ``None`` (the same as :func:`input_tuple` and :func:`output_tuple`, looked up
    instead of computed: planning asks tens of thousands of times)."""
    n = p * v

    def drop_microbatch(msg: tuple | None) -> tuple | None:
        return None if msg is None else (msg[0], msg[2], msg[3])

    inputs = {kind: [drop_microbatch(input_tuple((kind, 0, chunk), p, r, n)) for chunk in range(v)] for kind in KINDS}
    outputs = {kind: [drop_microbatch(output_tuple((kind, 0, chunk), p, r, n)) for chunk in range(v)] for kind in KINDS}
    return inputs, outputs


def new_action(kind: str, microbatch: int, chunk: int, phase: str, _new=object.__new__) -> Action:
    """``Action(kind, microbatch, chunk, phase)``, built without the frozen dataclass's per-field
    ``__setattr__`` (a third of the cost; planning builds one per action)."""
    action = _new(Action)
    fields = action.__dict__
    fields["kind"], fields["microbatch"], fields["chunk"], fields["phase"] = kind, microbatch, chunk, phase
    return action


def new_message(kind: str, microbatch: int, src_stage: int, dst_stage: int, _new=object.__new__) -> Message:
    """``Message(...)``, built as :func:`new_action` builds actions."""
    message = _new(Message)
    fields = message.__dict__
    fields["kind"], fields["microbatch"], fields["src_stage"], fields["dst_stage"] = kind, microbatch, src_stage, dst_stage
    return message


def new_exchange(sends: tuple[Message, ...], recvs: tuple[Message, ...], _new=object.__new__) -> Exchange:
    """``Exchange(sends, recvs)``, built as :func:`new_action` builds actions."""
    exchange = _new(Exchange)
    exchange.__dict__["sends"], exchange.__dict__["recvs"] = sends, recvs
    return exchange


def new_step(actions: tuple[Action, ...], exchange: Exchange, fill: tuple[Action, ...], _new=object.__new__) -> Step:
    """``Step(actions, exchange, fill)``, built as :func:`new_action` builds actions."""
    step = _new(Step)
    fields = step.__dict__
    fields["actions"], fields["exchange"], fields["fill"] = actions, exchange, fill
    return step
