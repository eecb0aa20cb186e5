"""The errors a pipeline step raises when something goes wrong between ranks.

Every one of them means the same for the caller: this step is lost, and the pipeline process
group may hold unmatched messages, so it cannot be trusted for another step. The text says which
rank failed (group rank and global rank), what it was doing and what this rank was doing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ArgumentMismatchError", "CorruptHeaderError", "PeerFailedError", "PipelineError", "ShapeMismatchError"]

RESTART = "the pipeline group is no longer usable; restart the job"


class PipelineError(RuntimeError):
    """A failure of the pipeline as a whole, seen from this rank."""


class PeerFailedError(PipelineError):
    """Another rank failed, died or went silent; ``failed_rank`` is its group rank (-1 if unknown)."""

    def __init__(self, message: str, *, record: Any = None) -> None:
        super().__init__(message)
        # The pipeschedule.wire.records.AbortRecord this rank passes on to its other neighbours.
        self.record = record
        self.failed_rank: int = getattr(record, "rank", -1)
        self.failed_global_rank: int = getattr(record, "global_rank", -1)


class ShapeMismatchError(PipelineError, ValueError):
    """A tensor's shape or dtype differs from what the other end of its channel expects."""


class CorruptHeaderError(PipelineError, ValueError):
    """A message header that fails its bounds checks; nothing was allocated for it."""


class ArgumentMismatchError(PipelineError, ValueError):
    """Two neighbouring ranks were called with different arguments (plan, shape, dtype or header mode).

    ``record`` is the abort record this rank sends its other neighbours; ``mismatched_peers`` are
    the group ranks it disagrees with, which are told and asked nothing more.
    """

    def __init__(self, message: str, *, record: Any = None, mismatched_peers: frozenset[int] = frozenset()) -> None:
        super().__init__(message)
        self.record = record
        self.mismatched_peers = mismatched_peers
