"""Jobs for the worker pool that run the contenders of ``scripts/bench.py`` (p = 4, the whole pool)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def bench_contenders(arg: tuple[int, int], rank: int, groups: dict) -> dict[str, Any]:
    """One zero-compute step of each contender we can compare exactly; per contender, this rank's
    bias gradients and the most chunk-activations it held at once."""
    import bench

    v, m = arg
    setup = bench.Setup(v=v, m=m, tf=0.0, tb=0.0)
    makers = {
        "batched": lambda chunks: bench._ours(setup, chunks, rank, None, overlap=False),
        "overlap": lambda chunks: bench._ours(setup, chunks, rank, None, overlap=True, recv_window=3),
        "floor": lambda chunks: bench._floor(setup, chunks, rank),
    }
    out = {}
    for name, make in makers.items():
        torch.manual_seed(0)  # every contender draws the same microbatches
        meter = bench.Meter()
        chunks = [bench.SleepChunk(meter=meter, tf=0.0, tb=0.0) for _ in range(v)]
        row = bench._measure(make(chunks), meter)
        out[name] = {"grads": [chunk.bias.grad.clone() for chunk in chunks], "peak": int(row[4])}
    return out


def bench_zb_contenders(m: int, rank: int, groups: dict) -> dict[str, Any]:
    """One zero-compute step of each of our contenders and the floors; per
    contender, whether this rank's bias gradients are bit-equal to one process's, and the most
    chunk-activations held until their W and until their I."""
    import bench

    data = bench._zb_data(m)
    reference = bench._reference_grads(data)
    setup = bench.ZbSetup(m=m, tf=0.0, tb=0.0, tw=0.0)
    out = {}
    for entry in bench._lineup():
        if entry.family not in ("zb", "floor", "1f1b", "floor-1f1b"):
            continue
        meter = bench.Meter()
        chunks = [bench.SplitSleepChunk(meter=meter, tf=0.0, tb=0.0, tw=0.0) for _ in range(entry.v)]
        row = bench._measure(bench._zb_contender(entry, setup, chunks, rank, data), meter)
        err, unequal = bench._grad_check(chunks, reference)
        out[entry.name] = {"unequal": int(unequal), "err": err, "fw": int(row[4]), "fi": int(row[6]), "queued": int(row[7])}
    return out
