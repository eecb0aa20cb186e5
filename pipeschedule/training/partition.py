"""Splitting a stack of layers into pipeline stages.

A model of ``L`` layers runs on ``p`` ranks with ``v`` chunks each, i.e. on ``S = p * v`` virtual
stages; chunk ``c`` of rank ``r`` is stage ``s = c * p + r``. A :class:`Partition` assigns every
stage a half-open, non-empty range of global layer indices.

Invariants of every partition returned here (tested with hypothesis):

* ``stage_ranges[0].start == 0``, ``stage_ranges[-1].stop == L`` and
  ``stage_ranges[s].stop == stage_ranges[s + 1].start``: the ranges are contiguous and cover
  ``0 .. L-1`` exactly once, in stage order;
* every range holds at least one layer, which is why ``S > L`` is refused.
"""

from __future__ import annotations

import bisect
import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["Partition", "partition_balanced", "partition_uniform"]


@dataclass(frozen=True)
class Partition:
    """Layer ranges of all ``p * v`` virtual stages; ``stage_ranges[s]`` belongs to stage ``s``."""

    p: int
    v: int
    stage_ranges: tuple[range, ...]

    @property
    def num_stages(self) -> int:
        return self.p * self.v

    @property
    def num_layers(self) -> int:
        return self.stage_ranges[-1].stop

    @property
    def sizes(self) -> tuple[int, ...]:
        """Layers per stage, in stage order."""
        return tuple(len(layers) for layers in self.stage_ranges)

    def stage(self, *, rank: int, chunk: int) -> int:
        """The virtual stage ``chunk * p + rank``."""
        if not (0 <= rank < self.p and 0 <= chunk < self.v):
            raise ValueError(
                f"(rank={rank}, chunk={chunk}) is outside the pipeline of p={self.p} ranks with "
                f"v={self.v} chunks each; use 0 <= rank < {self.p} and 0 <= chunk < {self.v}"
            )
        return chunk * self.p + rank

    def layers(self, *, rank: int, chunk: int) -> range:
        """The layer range of ``chunk`` on ``rank``."""
        return self.stage_ranges[self.stage(rank=rank, chunk=chunk)]

    def rank_ranges(self, *, rank: int) -> tuple[range, ...]:
        """The ``v`` layer ranges of ``rank``, in chunk order."""
        return tuple(self.layers(rank=rank, chunk=c) for c in range(self.v))


def _check_stages(p: int, v: int) -> int:
    for name, value in (("p", p), ("v", v)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return p * v


def _check_enough_layers(num_layers: int, p: int, v: int) -> None:
    if num_layers < p * v:
        raise ValueError(
            f"cannot give each of the p*v = {p}*{v} = {p * v} stages at least one layer when there "
            f"are only {num_layers} layers; use fewer ranks or chunks (p*v <= {num_layers}) or a "
            f"deeper model"
        )


def _from_sizes(p: int, v: int, sizes: Sequence[int]) -> Partition:
    bounds = [0, *itertools.accumulate(sizes)]
    return Partition(p=p, v=v, stage_ranges=tuple(range(a, b) for a, b in zip(bounds, bounds[1:])))


def partition_uniform(*, num_layers: int, p: int, v: int = 1) -> Partition:
    """Split ``num_layers`` layers into ``p * v`` stages whose sizes differ by at most one.

    With ``q, e = divmod(num_layers, p * v)`` every stage gets ``q`` layers and stages ``1 .. e``
    get one more. Stage 0 never takes an extra layer: it also holds the embeddings and, in 1F1B,
    its rank keeps the most microbatches in flight. The last stage (which holds the head and the
    loss) takes one only when every stage but stage 0 does (``e == p * v - 1``).
    """
    num_stages = _check_stages(p, v)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    _check_enough_layers(num_layers, p, v)
    base, extra = divmod(num_layers, num_stages)
    return _from_sizes(p, v, [base + (1 if 1 <= s <= extra else 0) for s in range(num_stages)])


def _check_weights(weights: Sequence[float]) -> list[float]:
    checked = list(weights)
    if not checked:
        raise ValueError("weights is empty; give one non-negative cost per layer")
    for i, w in enumerate(checked):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise ValueError(f"weights[{i}] = {w!r} is not a real number; give one number per layer")
        if not math.isfinite(w) or w < 0:
            raise ValueError(
                f"weights[{i}] = {w!r}, but layer weights must be finite and >= 0; replace "
                f"NaN, infinite or negative costs (e.g. by parameter counts)"
            )
    return checked


def _exact_integers(weights: Sequence[float]) -> list[int]:
    """``weights`` times their common power-of-two denominator: the same ratios, exact sums."""
    fractions = [Fraction(w) for w in weights]
    scale = max(f.denominator for f in fractions)
    return [int(f * scale) for f in fractions]


def _pack(prefix: Sequence[int], num_stages: int, cap: int) -> list[int] | None:
    """Cut points of ``num_stages`` non-empty parts of weight ``<= cap``, front parts as long as possible.

    ``prefix[j]`` is the weight of layers ``0 .. j-1``; a part ``[a, b)`` weighs
    ``prefix[b] - prefix[a]``. Each part greedily extends as far as the cap allows while leaving
    one layer for every part after it. Returns the ``num_stages + 1`` cut points, or ``None`` when
    no partition with bottleneck ``<= cap`` exists. Greedy packing is exact here: by induction its
    ``k``-th cut is never left of the ``k``-th cut of any feasible partition, so if one exists the
    greedy last part is no heavier than that partition's last part.
    """
    num_layers = len(prefix) - 1
    cuts = [0]
    for k in range(1, num_stages):
        start = cuts[-1]
        # Furthest end that leaves one layer for each of the num_stages - k later parts.
        latest = num_layers - (num_stages - k)
        end = min(bisect.bisect_right(prefix, prefix[start] + cap, lo=start) - 1, latest)
        if end == start:
            return None
        cuts.append(end)
    if prefix[num_layers] - prefix[cuts[-1]] > cap:
        return None
    cuts.append(num_layers)
    return cuts


def partition_balanced(*, weights: Sequence[float], p: int, v: int = 1) -> Partition:
    """Contiguous, non-empty stages that minimise the heaviest stage's total weight.

    ``weights[i]`` is the cost of layer ``i`` (for instance its parameter count). The optimum is
    exact: the smallest bottleneck is one of the ``O(L^2)`` contiguous-range weights, and a binary
    search over their sorted values with the greedy test of :func:`_pack` finds the smallest feasible
    one (``O(L^2 log L)`` time, fine for the few hundred layers of real models).

    Ties: among all partitions with the optimal bottleneck, the *later* stages take as many layers
    as they can (packing runs from the last stage backwards), for the reason stated in
    :func:`partition_uniform`: the early ranks hold the embeddings and the most in-flight
    activations. The result is a deterministic function of ``weights``, ``p`` and ``v``.
    Weights are compared exactly: every finite float is an integer times a power of two, so all
    weights are scaled to integers on a common power-of-two denominator before any sum is taken,
    and no rounding can break a tie.
    """
    num_stages = _check_stages(p, v)
    checked = _check_weights(weights)
    _check_enough_layers(len(checked), p, v)
    # Pack the reversed sequence front-first, which is the original packed back-first.
    backwards = _exact_integers(checked)[::-1]
    prefix = [0, *itertools.accumulate(backwards)]
    num_layers = len(backwards)
    candidates = sorted(
        {prefix[b] - prefix[a] for a in range(num_layers) for b in range(a + 1, num_layers + 1)}
    )
    low, high = 0, len(candidates) - 1  # the whole-model weight (the largest) is always feasible
    while low < high:
        mid = (low + high) // 2
        if _pack(prefix, num_stages, candidates[mid]) is None:
            low = mid + 1
        else:
            high = mid
    cuts = _pack(prefix, num_stages, candidates[low])
    assert cuts is not None
    sizes = [b - a for a, b in zip(cuts, cuts[1:])]
    return _from_sizes(p, v, sizes[::-1])
