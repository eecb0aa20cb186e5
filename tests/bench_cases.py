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
