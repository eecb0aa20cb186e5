"""Properties of the layer partitions, checked with hypothesis against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeschedule.training.partition import Partition, partition_balanced, partition_uniform

_SETTINGS = settings(max_examples=150, deadline=None)


def _assert_covers(part: Partition, num_layers: int) -> None:
    assert len(part.stage_ranges) == part.p * part.v
    assert part.stage_ranges[0].start == 0
    assert part.stage_ranges[-1].stop == num_layers
    for left, right in zip(part.stage_ranges, part.stage_ranges[1:]):
        assert left.stop == right.start
    assert all(len(r) >= 1 for r in part.stage_ranges)
    assert all(r.step == 1 for r in part.stage_ranges)
    flat = [i for r in part.stage_ranges for i in r]
    assert flat == list(range(num_layers))


def _assert_rank_view(part: Partition) -> None:
    for rank in range(part.p):
        ranges = part.rank_ranges(rank=rank)
        assert len(ranges) == part.v
        for chunk, layers in enumerate(ranges):
            assert layers == part.stage_ranges[chunk * part.p + rank]
            stage = part.stage(rank=rank, chunk=chunk)
            assert stage == chunk * part.p + rank
            assert part.layers(rank=rank, chunk=chunk) is part.stage_ranges[stage]


@st.composite
def _shapes(draw: st.DrawFn, max_layers: int = 40) -> tuple[int, int, int]:
    p = draw(st.integers(1, 6))
    v = draw(st.integers(1, 4))
    num_layers = draw(st.integers(p * v, max(p * v, max_layers)))
    return num_layers, p, v


@_SETTINGS
@given(_shapes())
def test_uniform_covers_and_is_even(shape: tuple[int, int, int]) -> None:
    num_layers, p, v = shape
    part = partition_uniform(num_layers=num_layers, p=p, v=v)
    _assert_covers(part, num_layers)
    _assert_rank_view(part)
    assert part.num_layers == num_layers and part.num_stages == p * v
    assert max(part.sizes) - min(part.sizes) <= 1
    # The documented placement of the extra layers: stages 1 .. e, never stage 0.
    base, extra = divmod(num_layers, p * v)
    assert part.sizes[0] == base
    assert [s for s, size in enumerate(part.sizes) if size == base + 1] == (
        list(range(1, extra + 1)) if extra else []
    )


def _stage_weights(weights: list[int], sizes: tuple[int, ...]) -> list[int]:
    bounds = [0, *itertools.accumulate(sizes)]
    return [sum(weights[a:b]) for a, b in zip(bounds, bounds[1:])]


def _all_partitions(num_layers: int, num_stages: int) -> list[tuple[int, ...]]:
    """Every split of ``num_layers`` layers into ``num_stages`` non-empty contiguous parts, as sizes."""
    result = []
    for cuts in itertools.combinations(range(1, num_layers), num_stages - 1):
        bounds = (0, *cuts, num_layers)
        result.append(tuple(b - a for a, b in zip(bounds, bounds[1:])))
    return result


@st.composite
def _small_weighted(draw: st.DrawFn) -> tuple[list[int], int, int]:
    p = draw(st.integers(1, 3))
    v = draw(st.integers(1, 3))
    num_layers = draw(st.integers(p * v, max(p * v, 9)))
    # A narrow range of values makes ties between optimal partitions common.
    weights = draw(st.lists(st.integers(0, 6), min_size=num_layers, max_size=num_layers))
    return weights, p, v


@_SETTINGS
@given(_small_weighted())
def test_balanced_matches_brute_force(case: tuple[list[int], int, int]) -> None:
    weights, p, v = case
    part = partition_balanced(weights=weights, p=p, v=v)
    _assert_covers(part, len(weights))
    _assert_rank_view(part)
    candidates = _all_partitions(len(weights), p * v)
    best = min(max(_stage_weights(weights, sizes)) for sizes in candidates)
    assert max(_stage_weights(weights, part.sizes)) == best
    # Tie rule: of all optimal partitions, the later stages are as full as possible.
    optimal = [s for s in candidates if max(_stage_weights(weights, s)) == best]
    assert part.sizes == max(optimal, key=lambda sizes: sizes[::-1])


@_SETTINGS
@given(
    st.lists(st.floats(0, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=9),
    st.integers(1, 4),
)
def test_balanced_float_weights_match_brute_force(weights: list[float], p: int) -> None:
    if p > len(weights):
        p = len(weights)
    part = partition_balanced(weights=weights, p=p)
    _assert_covers(part, len(weights))

    def heaviest(sizes: tuple[int, ...]) -> float:
        bounds = [0, *itertools.accumulate(sizes)]
        return max(math.fsum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))

    best = min(heaviest(sizes) for sizes in _all_partitions(len(weights), p))
    assert heaviest(part.sizes) == best


def test_balanced_float_ties_are_exact() -> None:
    # 0.1 is not exact in binary, and naive prefix sums make equal-weight stages look unequal.
    assert partition_balanced(weights=[0.1] * 10, p=3).sizes == (2, 4, 4)


def test_balanced_equal_weights_fills_later_stages() -> None:
    # Only the bottleneck is minimised (3 here, as for the uniform split); the tie rule then
    # packs the later stages full, leaving stage 0 the remainder.
    part = partition_balanced(weights=[1] * 10, p=2, v=2)
    assert max(part.sizes) == max(partition_uniform(num_layers=10, p=2, v=2).sizes) == 3
    assert part.sizes == (1, 3, 3, 3)


def test_balanced_isolates_heavy_layer() -> None:
    assert partition_balanced(weights=[1, 1, 1, 1, 9, 1, 1, 1], p=3).sizes == (4, 1, 3)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_layers": 3, "p": 2, "v": 2}, "only 3 layers"),
        ({"num_layers": 0, "p": 1}, "num_layers must be an integer >= 1"),
        ({"num_layers": 4, "p": 0}, "p must be an integer >= 1"),
        ({"num_layers": 4, "p": 2, "v": -1}, "v must be an integer >= 1"),
        ({"num_layers": 4.0, "p": 2}, "num_layers must be an integer"),
        ({"num_layers": 4, "p": True}, "p must be an integer"),
    ],
)
def test_uniform_errors(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        partition_uniform(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("weights", "p", "fragment"),
    [
        ([1.0, float("nan"), 2.0], 1, r"weights\[1\] = nan"),
        ([1.0, -2.0], 1, r"weights\[1\] = -2.0.*finite and >= 0"),
        ([float("inf"), 1.0], 1, r"weights\[0\] = inf"),
        ([], 1, "weights is empty"),
        ([1, 2], 3, "only 2 layers"),
        ([1, "2"], 1, "not a real number"),
        ([1, 2], 0, "p must be an integer >= 1"),
    ],
)
def test_balanced_errors(weights: list[object], p: int, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        partition_balanced(weights=weights, p=p)  # type: ignore[arg-type]


def test_rank_chunk_lookup_errors() -> None:
    part = partition_uniform(num_layers=8, p=2, v=2)
    assert part.layers(rank=1, chunk=1) == range(6, 8)
    with pytest.raises(ValueError, match="outside the pipeline"):
        part.layers(rank=2, chunk=0)
    with pytest.raises(ValueError, match="outside the pipeline"):
        part.stage(rank=0, chunk=2)
