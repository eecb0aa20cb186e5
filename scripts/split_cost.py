"""What the ``"autograd"`` weight-gradient split costs on one middle GPT chunk, one process.

A zero-bubble schedule runs each backward as ``I`` (the stage input's gradient) and later ``W``
(the weights' gradients). With ``config.weight_grad_split="autograd"`` both halves walk the
chunk's own autograd graph (:mod:`pipeschedule.runtime.split`). This prints, per chunk size:

* time: the whole backward, ``I``, ``W`` and ``I + W`` (medians; each repetition runs the whole
  backward and the split one after the other on fresh forwards), the split's ratio to the whole
  backward, and a gradient of the input alone (``torch.autograd.grad``), the least an input pass
  could cost here;
* calls: the engine calls ``W`` makes (one per group of weights sharing intermediates);
* memory, between ``I`` and ``W``: the bytes of the tensors the chunk's graph saved (a pending
  ``W`` keeps all of them) and of the gradients ``I`` captured for ``W``.

Every repetition checks that the split's gradients equal the whole backward's, bit for bit.

    python scripts/split_cost.py
    python scripts/split_cost.py --sizes 128x4 256x8 --reps 50 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeschedule.runtime import split as split_module
from pipeschedule.runtime.executor import _counting_saved
from pipeschedule.training.models import GPTChunk, GPTConfig

DEFAULT_SIZES = ["128x4", "128x8", "256x8"]


def _parse_size(text: str) -> tuple[int, int]:
    try:
        hidden, layers = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is HIDDENxLAYERS, e.g. 128x4; got {text!r}") from None
    if hidden < 4 or hidden % 4 or layers < 1:
        raise argparse.ArgumentTypeError(f"HIDDEN must be a multiple of 4 (4 heads) and LAYERS >= 1; got {text!r}")
    return hidden, layers


class _Chunk:
    """A middle chunk (neither embedding nor head) of ``layers`` layers, and one microbatch's input and output gradient."""

    def __init__(self, hidden: int, layers: int, *, seq: int, batch: int, dtype: torch.dtype) -> None:
        config = GPTConfig(vocab_size=256, seq_length=seq, hidden_size=hidden, num_layers=layers, num_heads=4,
                           ffn_hidden_size=4 * hidden, dtype=dtype)
        self.module = GPTChunk(config, layers=range(layers), first_stage=False, last_stage=False)
        gen = torch.Generator().manual_seed(hidden * 1000 + layers)
        self.input = torch.randn(seq, batch, hidden, generator=gen, dtype=dtype)
        self.grad = torch.randn(seq, batch, hidden, generator=gen, dtype=dtype)
        self.split = split_module.AutogradSplit(["chunk"])

    def forward(self, storages: dict[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.input.clone().requires_grad_()
        self.module.set_input_tensor(x)
        if storages is None:
            return x, self.module()
        with _counting_saved(storages):
            return x, self.module()

    def grads(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = [x.grad] + [p.grad for p in self.module.parameters()]
        self.module.zero_grad(set_to_none=True)
        return out

    def whole(self) -> tuple[float, list[torch.Tensor]]:
        x, out = self.forward()
        start = time.perf_counter()
        out.backward(self.grad)
        return time.perf_counter() - start, self.grads(x)

    def split_backward(self) -> tuple[float, float, int, list[torch.Tensor], int, int]:
        """(I seconds, W seconds, W's engine calls, gradients, captured bytes)."""
        x, out = self.forward()
        start = time.perf_counter()
        pending = self.split.input_pass(x, out, self.grad, 0)
        t_input = time.perf_counter() - start
        groups = pending.groups or []
        captured = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes()
                    for group in groups for grads in group.captured for g in grads or () if g is not None}
        calls = sum(1 for group in groups if any(c is not None and any(g is not None for g in c) for c in group.captured))
        start = time.perf_counter()
        self.split.weight_pass(pending, 0)
        t_weight = time.perf_counter() - start
        return t_input, t_weight, calls, self.grads(x), sum(captured.values())

    def saved_bytes(self) -> int:
        """The bytes of the tensors one forward's graph saves (counted apart: the hook slows the backward)."""
        storages: dict[int, int] = {}
        x, out = self.forward(storages)
        out.backward(self.grad)
        self.grads(x)
        return sum(storages.values())

    def input_only(self) -> float:
        x, out = self.forward()
        start = time.perf_counter()
        torch.autograd.grad(out, x, self.grad)
        return time.perf_counter() - start


def measure(hidden: int, layers: int, *, seq: int, batch: int, dtype: torch.dtype, reps: int, warmup: int) -> dict[str, float]:
    chunk = _Chunk(hidden, layers, seq=seq, batch=batch, dtype=dtype)
    whole, inp, weight, total, input_only = [], [], [], [], []
    calls = captured = 0
    saved = chunk.saved_bytes()
    for rep in range(warmup + reps):
        t_whole, reference = chunk.whole()
        t_i, t_w, calls, grads, captured = chunk.split_backward()
        t_input = chunk.input_only()
        for a, b in zip(reference, grads):
            if not torch.equal(a, b):
                raise AssertionError(f"size {hidden}x{layers}: the split's gradients differ from the whole backward's")
        if rep >= warmup:
            whole.append(t_whole)
            inp.append(t_i)
            weight.append(t_w)
            total.append(t_i + t_w)
            input_only.append(t_input)
    ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    return {"whole": ms(whole), "I": ms(inp), "W": ms(weight), "I+W": ms(total), "input only": ms(input_only),
            "calls": calls, "saved": saved, "captured": captured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=_parse_size, default=[_parse_size(s) for s in DEFAULT_SIZES],
                        metavar="HIDDENxLAYERS", help=f"chunk sizes (default {' '.join(DEFAULT_SIZES)})")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="microbatch size")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"one middle GPT chunk, {args.dtype}, seq {args.seq}, microbatch {args.batch}, {args.threads} thread(s), "
          f"medians of {args.reps}; every split's gradients bit-equal to the whole backward's")
    print(f"{'size':>8} {'whole ms':>9} {'I ms':>7} {'W ms':>7} {'I+W ms':>8} {'I+W/whole':>9} {'input-only ms':>13} "
          f"{'W calls':>7} {'saved MiB':>9} {'captured MiB':>12}")
    for hidden, layers in args.sizes:
        r = measure(hidden, layers, seq=args.seq, batch=args.batch, dtype=dtype, reps=args.reps, warmup=args.warmup)
        print(f"{f'{hidden}x{layers}':>8} {r['whole']:9.3f} {r['I']:7.3f} {r['W']:7.3f} {r['I+W']:8.3f} "
              f"{r['I+W'] / r['whole']:9.3f} {r['input only']:13.3f} {r['calls']:7d} {r['saved'] / 2**20:9.2f} "
              f"{r['captured'] / 2**20:12.2f}")


if __name__ == "__main__":
    main()
