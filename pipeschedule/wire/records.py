"""The small int64 records that travel next to the tensors: message headers and abort notices.

A *header* describes the tensor that follows it on the same channel, so the receiver can allocate
its buffer without knowing the shape in advance (``variable_seq_lengths``) or compare it with the
shape it expects (``check_p2p_shapes``). An *abort record* takes the place of a message a failed
rank still owed: it says which rank failed, doing what, and why. Both are :data:`RECORD_LEN` int64
values led by a magic number, so a receiver tells them apart and recognises garbage.

Nothing is pickled: a record is a plain tensor of integers, and decoding it checks every field
before it is trusted. A header that asks for more than ``max_numel`` elements, more than
:data:`MAX_NDIM` dimensions, a non-positive size or an unknown dtype raises
:class:`~pipeschedule.errors.CorruptHeaderError` before anything is allocated.

Layout (index: meaning)::

    header: 0 DATA_MAGIC, 1 ndim, 2..9 dims (zero-padded), 10 dtype code, 11 plan fingerprint
    abort:  0 ABORT_MAGIC, 1 reason, 2 failed group rank, 3 failed global rank, 4 action kind
            (0 none, 1 F, 2 B), 5 microbatch, 6 chunk, 7 reporting group rank, 8 ndim,
            9..16 dims, 17 dtype code; for reason PLAN instead: 8 the disagreeing group rank,
            9 its global rank, 10..18 up to three (field, value on the failed rank, value there)
    call:   0 CALL_MAGIC, 1 p, 2 v, 3 m, 4 G, 5 forward_only, 6 header mode (0 none,
            1 check_p2p_shapes, 2 variable_seq_lengths), 7 dtype code, 8 ndim (0: shapes vary),
            9..16 dims

A *call record* is the first message on each channel of every step (:mod:`pipeschedule.wire.handshake`):
the arguments the sending rank was called with, so two ranks called differently find out before
any activation is sent.
"""

from __future__ import annotations

import ctypes
import sys
import zlib
from dataclasses import dataclass

import torch

from pipeschedule.errors import CorruptHeaderError

__all__ = [
    "ABORT_MAGIC",
    "CALL_MAGIC",
    "DATA_MAGIC",
    "MAX_NDIM",
    "RECORD_LEN",
    "AbortRecord",
    "Reason",
    "call_differences",
    "decode",
    "describe_call",
    "describe_differences",
    "dtype_code",
    "encode_abort",
    "encode_call",
    "encode_header",
    "plan_fingerprint",
    "read_abort_marker",
    "write_abort_into",
]

RECORD_LEN = 20
MAX_NDIM = 8
# Arbitrary 63-bit constants: legitimate data starting with exactly these 8 bytes is not a concern.
DATA_MAGIC = 0x5053_4844_7A31_0001  # "PSHD"
ABORT_MAGIC = 0x5053_4142_7A31_0002  # "PSAB"
CALL_MAGIC = 0x5053_434C_7A31_0003  # "PSCL"
_ABORT_PREFIX = ABORT_MAGIC.to_bytes(8, sys.byteorder)  # how it lies in memory, as int64 on this host

# A fixed table, never derived from torch's internal enum, so both ends agree across versions.
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
)
_CODE = {dtype: code for code, dtype in enumerate(_DTYPES, start=1)}


class Reason:
    """Why a rank aborted; the code travels in the abort record."""

    FORWARD = 1
    LOSS = 2
    BACKWARD = 3
    SENT_SHAPE = 4
    RECEIVED_SHAPE = 5
    DIED = 6
    TIMEOUT = 7
    CORRUPT = 8
    OTHER = 9
    PLAN = 10

    TEXT = {
        FORWARD: "raised in forward_step_func",
        LOSS: "raised in loss_func",
        BACKWARD: "raised in backward",
        SENT_SHAPE: "produced an activation or gradient whose shape or dtype differs from the configured one",
        RECEIVED_SHAPE: "received a tensor whose shape or dtype differs from the one it expects",
        DIED: "died or closed its connection",
        TIMEOUT: "sent nothing within config.p2p_timeout",
        CORRUPT: "received a corrupt message header",
        OTHER: "raised an error",
        PLAN: "was called with different arguments than its neighbour",
    }


def dtype_code(dtype: torch.dtype) -> int:
    """The wire code of ``dtype``; raises ``TypeError`` for a dtype the table does not hold."""
    try:
        return _CODE[dtype]
    except KeyError:
        raise TypeError(
            f"tensors of dtype {dtype} cannot be sent between pipeline stages; use one of "
            f"{', '.join(str(d) for d in _DTYPES)}"
        ) from None


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code - 1]) if 1 <= code <= len(_DTYPES) else f"<dtype code {code}>"


def plan_fingerprint(*, p: int, v: int, m: int, group_size: int, forward_only: bool) -> int:
    """An int64 that differs whenever two ranks would run mismatched plans."""
    return (((m * 4096 + group_size) * 256 + v) * 256 + p) * 2 + int(forward_only)


def describe_fingerprint(value: int) -> str:
    fo, value = value % 2, value // 2
    p, value = value % 256, value // 256
    v, value = value % 256, value // 256
    g, m = value % 4096, value // 4096
    return f"p={p}, v={v}, m={m}, G={g}, forward_only={bool(fo)}"


@dataclass(frozen=True)
class AbortRecord:
    """Rank ``rank`` (group rank; ``global_rank`` in the default group) failed for ``reason``.

    ``action`` is ``(kind, microbatch, chunk)`` of what it was doing, when known; ``shape`` and
    ``dtype`` describe the offending tensor for shape errors; ``reporter`` is the group rank that
    sent this record (the failed rank itself, or a neighbour that saw it die and passed it on).
    """

    reason: int
    rank: int
    global_rank: int
    action: tuple[str, int, int] | None = None
    reporter: int = -1
    shape: tuple[int, ...] | None = None
    dtype: int = 0
    # Reason PLAN: (disagreeing group rank, its global rank, then (field, value here, value there) triples).
    mismatch: tuple[int, ...] = ()

    def describe(self, v: int = 1) -> str:
        if self.reason == Reason.PLAN and len(self.mismatch) >= 2:
            other, other_global = self.mismatch[:2]
            triples = [self.mismatch[i : i + 3] for i in range(2, len(self.mismatch) - 2, 3)]
            diffs = describe_differences(triples, f"pipeline rank {self.rank}", f"pipeline rank {other}")
            return (
                f"pipeline rank {self.rank} (global rank {self.global_rank}) and pipeline rank {other} (global rank "
                f"{other_global}) were called with different arguments ({diffs or 'details lost'}); call the "
                f"schedule with the same arguments and config on every rank"
            )
        doing = ""
        if self.action is not None:
            kind, mb, chunk = self.action
            doing = f" at {kind}{mb}" + ("" if v == 1 else f".{chunk}")
        what = Reason.TEXT.get(self.reason, f"failed (reason code {self.reason})")
        text = f"pipeline rank {self.rank} (global rank {self.global_rank}) {what}{doing}"
        if self.shape is not None:
            whose = "it expects" if self.reason == Reason.RECEIVED_SHAPE else "its tensor"
            text += f" ({whose}: shape {list(self.shape)}, {_dtype_name(self.dtype)})"
        return text


def encode_header(tensor: torch.Tensor, *, fingerprint: int) -> torch.Tensor:
    """The header announcing ``tensor``, on ``tensor``'s device."""
    if tensor.dim() == 0 or tensor.dim() > MAX_NDIM:
        raise ValueError(
            f"a pipeline message must have 1 to {MAX_NDIM} dimensions, got shape {list(tensor.shape)}; "
            f"reshape the output of the stage"
        )
    values = [0] * RECORD_LEN
    values[0], values[1] = DATA_MAGIC, tensor.dim()
    values[2 : 2 + tensor.dim()] = list(tensor.shape)
    values[10], values[11] = dtype_code(tensor.dtype), fingerprint
    return torch.tensor(values, dtype=torch.int64, device=tensor.device)


# The action kinds an abort record can name: forward, whole backward, input and weight halves.
_KIND_CODES = {"F": 1, "B": 2, "I": 3, "W": 4}


def encode_abort(record: AbortRecord, *, device: torch.device) -> torch.Tensor:
    values = [0] * RECORD_LEN
    kind, mb, chunk = record.action if record.action is not None else ("", -1, -1)
    values[:8] = [ABORT_MAGIC, record.reason, record.rank, record.global_rank, _KIND_CODES.get(kind, 0), mb, chunk, record.reporter]
    shape = tuple(record.shape or ())[:MAX_NDIM]
    values[8] = len(shape)
    values[9 : 9 + len(shape)] = list(shape)
    values[17] = record.dtype
    if record.reason == Reason.PLAN:
        values[8:19] = (list(record.mismatch[:11]) + [0] * 11)[:11]
    return torch.tensor(values, dtype=torch.int64, device=device)


def _decode_abort(values: list[int]) -> AbortRecord:
    kind = {code: k for k, code in _KIND_CODES.items()}.get(values[4])
    if values[1] == Reason.PLAN:
        return AbortRecord(
            reason=values[1], rank=values[2], global_rank=values[3], action=None, reporter=values[7],
            mismatch=tuple(values[8:19]),
        )
    ndim = values[8]
    shape = tuple(values[9 : 9 + ndim]) if 0 < ndim <= MAX_NDIM else None
    return AbortRecord(
        reason=values[1], rank=values[2], global_rank=values[3],
        action=(kind, values[5], values[6]) if kind else None, reporter=values[7], shape=shape, dtype=values[17],
    )


def decode(record: torch.Tensor, *, max_numel: int, peer: str) -> tuple[tuple[int, ...], torch.dtype, int] | AbortRecord:
    """``(shape, dtype, fingerprint)`` from a header, or the :class:`AbortRecord` it carries.

    Every field is checked before use; ``peer`` names the sender in the error.
    """
    values = record.tolist()
    if len(values) != RECORD_LEN:
        raise CorruptHeaderError(f"a message header from {peer} has {len(values)} values, expected {RECORD_LEN}")
    if values[0] == ABORT_MAGIC:
        return _decode_abort(values)
    if values[0] != DATA_MAGIC:
        raise CorruptHeaderError(
            f"the message header from {peer} does not start with the header marker (got {values[0]:#x}); the "
            f"ranks disagree on message order or framing: check that every rank sets the same "
            f"variable_seq_lengths and check_p2p_shapes"
        )
    ndim = values[1]
    if not 1 <= ndim <= MAX_NDIM:
        raise CorruptHeaderError(f"the message header from {peer} announces ndim={ndim}; allowed are 1..{MAX_NDIM}")
    dims = values[2 : 2 + ndim]
    if any(d <= 0 for d in dims) or any(values[2 + ndim : 10]):
        raise CorruptHeaderError(f"the message header from {peer} announces dims {values[2:10]} for ndim={ndim}; "
                                 f"the first ndim must be positive and the rest zero")
    numel = 1
    for d in dims:
        numel *= d
        if numel > max_numel:  # checked while multiplying, so huge products never form
            raise CorruptHeaderError(
                f"the message header from {peer} announces a tensor of shape {dims}, more than "
                f"config.max_message_numel={max_numel} elements; raise the cap if that is intended"
            )
    code = values[10]
    if not 1 <= code <= len(_DTYPES):
        raise CorruptHeaderError(f"the message header from {peer} has an unknown dtype code {code}")
    return tuple(dims), _DTYPES[code - 1], values[11]


def write_abort_into(buffer: torch.Tensor, record: AbortRecord) -> torch.Tensor:
    """``buffer`` (a fresh tensor shaped like the message it replaces) carrying ``record`` in its first bytes.

    Used with fixed shapes, where the receiver posted a buffer of the data's size: the record
    goes in its leading bytes, truncated if the message is smaller than the record.
    """
    raw = buffer.reshape(-1).view(torch.uint8)
    blob = encode_abort(record, device=buffer.device).view(torch.uint8)
    n = min(raw.numel(), blob.numel())
    raw[:n] = blob[:n]
    return buffer


def read_abort_marker(tensor: torch.Tensor) -> AbortRecord | None:
    """The abort record in the leading bytes of a fixed-shape message, or ``None`` for ordinary data."""
    if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.nbytes >= 8:
        # Every received message passes here, right before its consumer runs: compare the first
        # eight bytes in place, with no tensor operation, and decode only a real marker.
        if ctypes.string_at(tensor.data_ptr(), 8) != _ABORT_PREFIX:
            return None
    raw = tensor.reshape(-1).view(torch.uint8)
    if raw.numel() < 8:
        return None
    marker = torch.tensor([ABORT_MAGIC], dtype=torch.int64).view(torch.uint8)
    if not torch.equal(raw[:8].cpu(), marker):
        return None
    blob = torch.zeros(RECORD_LEN * 8, dtype=torch.uint8)
    n = min(raw.numel(), blob.numel())
    blob[:n] = raw[:n].cpu()
    values = blob.view(torch.int64).tolist()
    if n < blob.numel():  # a message too small for the whole record: unknown fields read as -1
        values[n // 8 :] = [-1] * (RECORD_LEN - n // 8)
        values[8] = 0
    return _decode_abort(values)


# -- call records ---------------------------------------------------------------------------------

_HEADER_MODES = ("no headers", "check_p2p_shapes=True", "variable_seq_lengths=True")
# Fields of a call record, by index: what each means to the caller.
_FIELDS = {
    1: "p={}", 2: "v={} model chunks per rank", 3: "num_microbatches={}", 4: "microbatch_group_size_per_vp_stage={}",
    5: "forward_only={}", 6: "{}", 7: "pipeline_dtype={}", 8: "an activation of {} dimensions",
}


# After the shape's MAX_NDIM dimensions (fields 9 .. 16): the loss rule and the schedule family.
_PER_TOKEN = 9 + MAX_NDIM
_SCHEDULE = _PER_TOKEN + 1
SCHEDULE_NAMES = ("1F1B or interleaved 1F1B", "zero bubble")


def _any_dtype_code(dtype: torch.dtype) -> int:
    """The wire code of any dtype: the table's, or one derived from its name (stable across processes)."""
    return _CODE.get(dtype) or 1000 + zlib.crc32(str(dtype).encode()) % 1_000_000


def _any_dtype_name(code: int) -> str:
    if 1 <= code <= len(_DTYPES):
        return str(_DTYPES[code - 1])
    for name in dir(torch):
        candidate = getattr(torch, name, None)
        if isinstance(candidate, torch.dtype) and _any_dtype_code(candidate) == code:
            return str(candidate)
    return f"<dtype code {code}>"


def _field_text(field: int, value: int) -> str:
    if field == _PER_TOKEN:
        return f"calculate_per_token_loss={bool(value)}"
    if field == _SCHEDULE:
        return SCHEDULE_NAMES[value] if 0 <= value < len(SCHEDULE_NAMES) else f"<schedule {value}>"
    if field == 5:
        return f"forward_only={bool(value)}"
    if field == 6:
        return _HEADER_MODES[value] if 0 <= value < len(_HEADER_MODES) else f"<header mode {value}>"
    if field == 7:
        return f"pipeline_dtype={_any_dtype_name(value)}"
    if field == 8:
        return "activation shapes that vary (variable_seq_lengths)" if value == 0 else f"an activation of {value} dimensions"
    if 9 <= field < _PER_TOKEN:
        return f"activation dimension {field - 9} = {value}"
    return _FIELDS.get(field, "field {}={{}}".format(field)).format(value)


def encode_call(
    *, p: int, v: int, m: int, group_size: int, forward_only: bool, headers: int, dtype: torch.dtype,
    shape: tuple[int, ...] | None, device: torch.device, per_token: bool = False, schedule: int = 0,
) -> torch.Tensor:
    """The call record of a rank: equal, value for value, on two ranks called with the same arguments.

    ``schedule`` is the schedule family (:data:`SCHEDULE_NAMES`), ``per_token`` the loss rule
    (``config.calculate_per_token_loss``): ranks that disagree on it would divide differently.
    """
    dims = tuple(shape or ())[:MAX_NDIM]
    values = [0] * RECORD_LEN
    values[:9] = [CALL_MAGIC, p, v, m, group_size, int(forward_only), headers, _any_dtype_code(dtype), len(dims)]
    values[9 : 9 + len(dims)] = list(dims)
    values[_PER_TOKEN], values[_SCHEDULE] = int(per_token), schedule
    return torch.tensor(values, dtype=torch.int64, device=device)


def call_differences(mine: list[int], theirs: list[int]) -> list[tuple[int, int, int]]:
    """``(field, mine, theirs)`` for every field in which two call records differ."""
    return [(i, a, b) for i, (a, b) in enumerate(zip(mine, theirs)) if i >= 1 and a != b]


def describe_differences(differences: list[tuple[int, int, int]], mine: str, theirs: str) -> str:
    """``differences`` from :func:`call_differences` in words: each value and the rank that has it."""
    return "; ".join(f"{_field_text(f, a)} on {mine}, {_field_text(f, b)} on {theirs}" for f, a, b in differences if f > 0)


def describe_call(values: list[int]) -> str:
    """The arguments a call record stands for, in the caller's words."""
    ndim = values[8]
    shape = f"activation shape {values[9 : 9 + ndim]}" if ndim else "variable activation shapes"
    if values[_SCHEDULE] == 1:
        schedule = f"{'ZB-H1' if values[2] == 1 else 'interleaved zero bubble'}, v={values[2]} model chunks"
    else:
        schedule = f"{'plain 1F1B' if values[2] == 1 else 'interleaved'}, v={values[2]} model chunks"
    return (
        f"p={values[1]}, {schedule}, num_microbatches={values[3]}, microbatch_group_size_per_vp_stage={values[4]}, "
        f"forward_only={bool(values[5])}, {_field_text(6, values[6])}, {_field_text(7, values[7])}, {shape}, "
        f"{_field_text(_PER_TOKEN, values[_PER_TOKEN])}"
    )
