"""An offline byte-level language-modelling dataset.

Tokens are bytes (vocabulary 256), so any text works and nothing needs downloading or a tokenizer.

The default corpus is the concatenation, in the order of :data:`STDLIB_FILES`, of a few pure-Python
modules of the running interpreter's standard library (found next to ``os.py``), about 200 KB on
CPython 3.11. Their bytes are the same on every machine with the same Python version; a missing
file is an error rather than a silent change of corpus. A file path can be given instead.

Sampling: the token stream is cut into ``num_windows`` non-overlapping windows of ``seq_length``
tokens (plus the one following token, which supplies the last label). Each epoch visits the
windows in a permutation drawn from ``(seed, epoch)``. With ``dp_size`` data-parallel replicas,
each step of an epoch takes ``dp_size * micro_batch_size`` consecutive windows of that permutation
and replica ``dp_rank`` gets the ``dp_rank``-th block of ``micro_batch_size``, so within an epoch
the replicas never share a window. The tail of the permutation that does not fill a whole step is
skipped, so every replica sees the same number of microbatches per epoch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

__all__ = ["BYTE_VOCAB_SIZE", "STDLIB_FILES", "load_corpus", "microbatches", "window_order"]

logger = logging.getLogger(__name__)

BYTE_VOCAB_SIZE = 256
STDLIB_FILES: tuple[str, ...] = (
    "textwrap.py",
    "string.py",
    "heapq.py",
    "bisect.py",
    "fractions.py",
    "functools.py",
    "difflib.py",
)
# The last twentieth of the corpus is held out for validation.
_VALID_FRACTION = 0.05


def load_corpus(*, path: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """The corpus as a 1-D ``uint8`` tensor: the file at ``path``, or the standard-library default."""
    if path is not None:
        data = Path(path).read_bytes()
        source = str(path)
    else:
        stdlib = Path(os.path.dirname(os.__file__))
        missing = [name for name in STDLIB_FILES if not (stdlib / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"the default corpus needs {missing} in {stdlib}, which this Python installation "
                f"lacks; pass path= to a text file instead"
            )
        data = b"".join((stdlib / name).read_bytes() for name in STDLIB_FILES)
        source = f"{len(STDLIB_FILES)} standard-library modules in {stdlib}"
    if not data:
        raise ValueError(f"the corpus from {source} is empty; give a non-empty text file")
    logger.info("corpus: %s, %d bytes, sha256 %s", source, len(data), hashlib.sha256(data).hexdigest()[:16])
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def window_order(
    *, num_windows: int, seed: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, start: int = 0
) -> Iterator[list[int]]:
    """Endless window indices, one list of ``micro_batch_size`` per microbatch of replica ``dp_rank``.

    Each epoch covers ``num_windows // (dp_size * micro_batch_size)`` microbatches per replica; the
    lists of different replicas within one epoch are disjoint, and the sequence depends only on
    the arguments. ``start`` skips that many microbatches (a resumed run's data position): the
    result equals the sequence from 0 with its first ``start`` items dropped, at no cost per item.
    """
    _check_positive(num_windows=num_windows, micro_batch_size=micro_batch_size, dp_size=dp_size)
    if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank!r} is outside 0..{dp_size - 1} (dp_size={dp_size})")
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"start must be an integer >= 0 (microbatches already drawn), got {start!r}")
    per_step = dp_size * micro_batch_size
    steps = num_windows // per_step
    if steps == 0:
        raise ValueError(
            f"{num_windows} windows cannot fill one step of dp_size * micro_batch_size = "
            f"{dp_size} * {micro_batch_size}; use a larger corpus, a shorter seq_length or fewer "
            f"replicas or samples"
        )
    epoch, skip = divmod(start, steps)
    while True:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(num_windows, generator=gen).tolist()
        for step in range(skip, steps):
            first = step * per_step + dp_rank * micro_batch_size
            yield order[first : first + micro_batch_size]
        epoch, skip = epoch + 1, 0


def microbatches(
    *,
    corpus: torch.Tensor,
    seed: int,
    micro_batch_size: int,
    seq_length: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    split: Literal["train", "valid"] = "train",
    start: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless microbatches ``{'tokens': [b, s], 'labels': [b, s]}`` (int64) from ``corpus``.

    ``labels[i, j] == tokens[i, j + 1]`` inside a row, and the last label is the byte after the
    window. ``split='train'`` uses the first 95 % of the corpus, ``'valid'`` the rest; the two never
    share a byte. The sequence depends only on the arguments (see :func:`window_order`); ``start``
    skips that many microbatches, so a resumed run continues where the saved one stopped.
    """
    _check_positive(seq_length=seq_length)
    if corpus.dim() != 1:
        raise ValueError(f"corpus must be a 1-D tensor of tokens, got shape {tuple(corpus.shape)}")
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    cut = int(len(corpus) * (1.0 - _VALID_FRACTION))
    stream = (corpus[:cut] if split == "train" else corpus[cut:]).to(torch.int64)
    # Windows share only their boundary byte: window i is stream[i*s : i*s + s + 1].
    num_windows = (len(stream) - 1) // seq_length
    if num_windows < 1:
        raise ValueError(
            f"the {split} split has {len(stream)} tokens, too few for one window of "
            f"seq_length={seq_length} plus one; use a shorter seq_length or a larger corpus"
        )
    offsets = torch.arange(seq_length + 1)
    order = window_order(
        num_windows=num_windows,
        seed=seed,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        start=start,
    )
    for indices in order:
        rows = stream[torch.tensor(indices).unsqueeze(1) * seq_length + offsets]  # [b, s + 1]
        yield {"tokens": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}
