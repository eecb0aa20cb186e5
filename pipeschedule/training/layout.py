"""Where each global rank sits in a pipeline × data-parallel grid, and the process groups of that grid.

Layout (Megatron's order, pipeline outermost): with ``p`` pipeline ranks and ``dp`` replicas,
global rank ``g`` is pipeline rank ``g // dp`` of replica ``g % dp``::

    g = pp_rank * dp + dp_rank

So the ``dp`` replicas of one pipeline stage are consecutive ranks (the data-parallel group, whose
all-reduce carries the most bytes, stays on nearby ranks), and pipeline ``d`` is the ranks
``d, d + dp, d + 2 dp, ...``. The *embedding group* of replica ``d`` is the first and the last rank
of its pipeline: the two ranks holding the tied token embedding and LM head (one rank when ``p = 1``).

``torch.distributed.new_group`` is collective over the whole world: every rank must create every
group, in the same order, even groups it is not a member of. :func:`create_parallel_groups` does
exactly that, in a fixed order (all pipeline groups, then all data-parallel groups, then all
embedding groups), and keeps only this rank's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

__all__ = ["ParallelGroups", "RankLayout", "create_parallel_groups"]


@dataclass(frozen=True)
class RankLayout:
    """The pure rank arithmetic of a ``p × dp`` grid (no ``torch.distributed`` needed)."""

    p: int
    dp: int

    def __post_init__(self) -> None:
        for name in ("p", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.p * self.dp

    def coords(self, *, rank: int) -> tuple[int, int]:
        """``(pp_rank, dp_rank)`` of global ``rank``."""
        if not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(
                f"rank={rank!r} is outside the world of p*dp = {self.p}*{self.dp} = {self.world_size} "
                f"ranks; use 0 <= rank < {self.world_size}"
            )
        return divmod(rank, self.dp)

    def global_rank(self, *, pp_rank: int, dp_rank: int) -> int:
        return pp_rank * self.dp + dp_rank

    def pipeline_ranks(self, *, dp_rank: int) -> list[int]:
        """Global ranks of replica ``dp_rank``'s pipeline, in pipeline order."""
        return [self.global_rank(pp_rank=r, dp_rank=dp_rank) for r in range(self.p)]

    def data_parallel_ranks(self, *, pp_rank: int) -> list[int]:
        """Global ranks holding pipeline rank ``pp_rank`` in every replica, in replica order."""
        return [self.global_rank(pp_rank=pp_rank, dp_rank=d) for d in range(self.dp)]

    def embedding_ranks(self, *, dp_rank: int) -> list[int]:
        """The first and the last rank of replica ``dp_rank``'s pipeline (one rank when ``p = 1``)."""
        ranks = self.pipeline_ranks(dp_rank=dp_rank)
        return sorted({ranks[0], ranks[-1]})


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's coordinates and process groups.

    ``embedding`` is ``None`` on ranks that hold neither the first nor the last pipeline stage.
    """

    layout: RankLayout
    rank: int
    pp_rank: int
    dp_rank: int
    pipeline: dist.ProcessGroup
    data_parallel: dist.ProcessGroup
    embedding: dist.ProcessGroup | None

    @property
    def is_first_pipeline_rank(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pipeline_rank(self) -> bool:
        return self.pp_rank == self.layout.p - 1


def create_parallel_groups(*, p: int, dp: int, timeout: timedelta | None = None) -> ParallelGroups:
    """Create every pipeline, data-parallel and embedding group of the ``p × dp`` grid; return this rank's.

    Collective: every rank of the default group must call it with the same ``p`` and ``dp``, and
    the world size must be ``p * dp``.
    """
    layout = RankLayout(p=p, dp=dp)
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call dist.init_process_group first")
    world = dist.get_world_size()
    if world != layout.world_size:
        raise ValueError(
            f"the world has {world} ranks but p*dp = {p}*{dp} = {layout.world_size}; start p*dp processes "
            f"or change --p/--dp so that their product is {world}"
        )
    rank = dist.get_rank()
    pp_rank, dp_rank = layout.coords(rank=rank)
    # Same calls in the same order on every rank: new_group is collective even for non-members.
    pipelines = [dist.new_group(layout.pipeline_ranks(dp_rank=d), timeout=timeout) for d in range(dp)]
    replicas = [dist.new_group(layout.data_parallel_ranks(pp_rank=r), timeout=timeout) for r in range(p)]
    embeddings = [dist.new_group(layout.embedding_ranks(dp_rank=d), timeout=timeout) for d in range(dp)]
    holds_embedding = rank in layout.embedding_ranks(dp_rank=dp_rank)
    return ParallelGroups(
        layout=layout,
        rank=rank,
        pp_rank=pp_rank,
        dp_rank=dp_rank,
        pipeline=pipelines[dp_rank],
        data_parallel=replicas[pp_rank],
        embedding=embeddings[dp_rank] if holds_embedding else None,
    )
