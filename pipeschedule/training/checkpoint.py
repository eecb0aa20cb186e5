"""Atomic checkpoints of a pipeline-parallel job, written with ``torch.distributed.checkpoint`` (DCP).

A checkpoint directory holds one subdirectory per saved iteration and a pointer to the newest::

    DIR/latest               the name of the newest complete checkpoint, e.g. "iter_0000300"
    DIR/iter_0000300/        a DCP checkpoint (one shard file per rank, and .metadata)
    DIR/iter_0000300/manifest.json   what the job was (layout, model shape, iteration), readable without torch

Every rank passes its own state dict: keys that differ between ranks (this stage's parameters)
end in that rank's shard, and a key that several ranks hold with equal values (a data-parallel
replica's copy) is written once, which is DCP's deduplication.

Atomicity. A save is written to ``iter_N.partial``; only when every rank has written its shard and
DCP's coordinator has written ``.metadata`` does the first rank of the group add the manifest,
rename the directory to ``iter_N`` (one ``rename``, atomic on a POSIX file system) and then replace
``latest`` (written to a temporary file and ``os.replace``-d). A job killed at any moment therefore
leaves ``latest`` naming a complete checkpoint: the previous one if the kill came before the
rename, or either if it came between the rename and the pointer update. A left-over ``.partial``
directory is removed by the next save of that iteration and never read.

The directory must be on a file system that every rank of the group sees (one host, or a shared
mount).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

__all__ = ["CheckpointError", "checkpoint_name", "find_latest", "load_checkpoint", "save_checkpoint"]

LATEST = "latest"
MANIFEST = "manifest.json"
_PARTIAL = ".partial"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, foreign, incomplete or unwritable."""


def checkpoint_name(iteration: int) -> str:
    """``iter_0000300`` for iteration 300 (Megatron's naming)."""
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise ValueError(f"iteration must be an integer >= 0, got {iteration!r}")
    return f"iter_{iteration:07d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_coordinator(group: Any) -> bool:
    return not dist.is_initialized() or dist.get_rank(group) == 0


def _barrier(group: Any) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def save_checkpoint(
    *, directory: str | os.PathLike[str], iteration: int, state_dict: dict[str, Any], manifest: dict[str, Any], group: Any = None
) -> Path:
    """Write ``state_dict`` (this rank's) as checkpoint ``iteration`` of ``directory``; return its path.

    A collective over ``group`` (default: the world): every rank calls with its own state dict and
    the same ``manifest`` (JSON-serialisable; ``iteration`` is added). Returns once the checkpoint
    is complete and ``latest`` names it on every rank.
    """
    root = Path(directory)
    name = checkpoint_name(iteration)
    final, partial = root / name, root / (name + _PARTIAL)
    if _is_coordinator(group):
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # from a save that was killed
        partial.mkdir()
    _barrier(group)
    import torch.distributed.checkpoint as dcp  # here: importing it takes seconds, and find_latest needs none of it

    dcp.save(state_dict, checkpoint_id=partial, process_group=group, no_dist=not dist.is_initialized())
    if _is_coordinator(group):
        _write_file_atomically(partial / MANIFEST, json.dumps({**manifest, "iteration": iteration}, indent=1))
        _fsync_dir(partial)
        if final.exists():  # saved again at the same iteration: the new one replaces it
            old = root / (name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(partial, final)
        _fsync_dir(root)
        _write_file_atomically(root / LATEST, name + "\n")
        _fsync_dir(root)
    _barrier(group)
    return final


def find_latest(directory: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The newest complete checkpoint of ``directory`` and its manifest; raises :class:`CheckpointError`.

    Needs no process group, so a launcher can check a checkpoint before starting any process.
    """
    root = Path(directory)
    if not root.exists():
        raise CheckpointError(f"checkpoint directory {root} does not exist; give the directory an earlier run saved to")
    if not root.is_dir():
        raise CheckpointError(f"{root} is a file, not a checkpoint directory; give the directory an earlier run saved to")
    pointer = root / LATEST
    if not pointer.is_file():
        found = sorted(p.name for p in root.iterdir())[:5]
        raise CheckpointError(
            f"{root} holds no checkpoint: there is no '{LATEST}' file, which every complete save writes "
            f"(found {found or 'nothing'}); give the directory an earlier run saved to"
        )
    name = pointer.read_text(encoding="utf-8").strip()
    path = root / name
    manifest_path = path / MANIFEST
    if not manifest_path.is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{root}/{LATEST} names {name!r}, but {path} is not a complete checkpoint (no {MANIFEST} or .metadata); "
            f"the directory was changed by hand or by another program"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({exc}); the checkpoint is damaged") from exc
    return path, manifest


def load_checkpoint(*, path: str | os.PathLike[str], state_dict: dict[str, Any], group: Any = None) -> None:
    """Load checkpoint ``path`` into ``state_dict`` in place (tensors are copied into; other values replaced).

    A collective over ``group``: every rank passes the state dict of what it holds, with the keys
    and shapes it was saved with.
    """
    import torch.distributed.checkpoint as dcp

    dcp.load(state_dict, checkpoint_id=Path(path), process_group=group, no_dist=not dist.is_initialized())
