"""Train a byte-level GPT with pipeline × data parallelism on CPU, with gloo: the main job.

    python scripts/train.py                                   # 4 ranks: p=4, v=2 (interleaved), m=8, dp=1
    python scripts/train.py --p 2 --dp 2 --schedule 1f1b      # two pipeline replicas of two stages
    python scripts/train.py --check                           # float64, 3 steps, equal to one process?
    torchrun --nproc-per-node 4 scripts/train.py --p 2 --dp 2

Without ``RANK``/``WORLD_SIZE`` in the environment the script starts the ``p * dp`` processes
itself (spawned, rendezvous through a temporary file) and waits for them with a time limit; under
torchrun it uses the environment. Global rank ``g`` is pipeline rank ``g // dp`` of replica
``g % dp`` (pipeline outermost, as in Megatron; see :mod:`pipeschedule.layout`).

Rank 0 prints one Megatron-style line per iteration. At the end, the first ``--compare-steps``
steps are replayed on one process and the differences of losses and parameters are printed; with
``--check`` (float64) they must be at most 1e-10, else the exit status is 1.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import pipeschedule  # noqa: F401  (installed with pip install -e .)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import (
    RankTrainer,
    TrainSettings,
    balanced_partition,
    layer_weights,
    max_differences,
    reference_training,
)

from pipeschedule.layout import create_parallel_groups
from pipeschedule.models import load_corpus, microbatches
from pipeschedule.plan import build_plan

CHECK_TOLERANCE = 1e-10


def parse_settings(argv: list[str] | None = None, *, world_size: int | None = None) -> tuple[TrainSettings, bool, float]:
    """Settings, ``--check`` and the time limit from the command line; validated before any process starts."""
    d = TrainSettings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--p", type=int, default=d.p, help="pipeline ranks")
    ap.add_argument("--v", type=int, default=None, help="model chunks per rank (default: 2 interleaved, 1 for 1f1b)")
    ap.add_argument("--m", type=int, default=d.m, help="microbatches per step")
    ap.add_argument("--dp", type=int, default=None, help="data-parallel replicas (default 1; under torchrun world/p)")
    ap.add_argument("--schedule", choices=["1f1b", "interleaved"], default="interleaved")
    ap.add_argument("--steps", type=int, default=None, help=f"iterations (default {d.steps}, 3 with --check)")
    ap.add_argument("--data", default=None, help="a UTF-8 text file (default: modules of the Python standard library)")
    ap.add_argument("--seq-length", type=int, default=d.seq_length)
    ap.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    ap.add_argument("--hidden-size", type=int, default=d.hidden_size)
    ap.add_argument("--num-layers", type=int, default=d.num_layers)
    ap.add_argument("--num-heads", type=int, default=d.num_heads)
    ap.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden size")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--compare-steps", type=int, default=d.compare_steps, help="steps replayed on one process at the end (0: none)")
    ap.add_argument("--check", action="store_true", help="float64; fail unless equal to one process within 1e-10")
    ap.add_argument("--overlap-p2p-comm", action=argparse.BooleanOptionalAction, default=d.overlap_p2p_comm,
                    help="post receives early and wait on them just before use")
    ap.add_argument("--deallocate-pipeline-outputs", action=argparse.BooleanOptionalAction, default=d.deallocate_pipeline_outputs,
                    help="release a stage output's data once it is sent")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before a launched run is stopped")
    args = ap.parse_args(argv)
    v = args.v if args.v is not None else (2 if args.schedule == "interleaved" else 1)
    if (args.schedule == "interleaved") != (v > 1):
        ap.error(f"--schedule {args.schedule} with --v {v}: 1f1b runs one chunk per rank (--v 1), interleaved needs --v >= 2")
    dp = args.dp
    if dp is None:
        dp = world_size // args.p if world_size is not None and world_size % args.p == 0 else 1
    if world_size is not None and world_size != args.p * dp:
        ap.error(f"{world_size} processes were started but --p {args.p} times --dp {dp} is {args.p * dp}; make them agree")
    steps = args.steps if args.steps is not None else (3 if args.check else d.steps)
    settings = TrainSettings(
        p=args.p, v=v, m=args.m, dp=dp, steps=steps, data=args.data, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_heads=args.num_heads, ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size, lr=args.lr,
        seed=args.seed, dtype=torch.float64 if args.check else torch.float32,
        compare_steps=steps if args.check else min(args.compare_steps, steps),
        overlap_p2p_comm=args.overlap_p2p_comm, deallocate_pipeline_outputs=args.deallocate_pipeline_outputs,
    )
    for name in ("p", "m", "dp", "steps"):
        if getattr(settings, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(settings, name)}")
    if args.data is not None and not Path(args.data).is_file():
        ap.error(f"--data {args.data}: no such file; give a UTF-8 text file")
    try:  # fail here, not in p*dp processes: the model, the partition and the schedule's plan
        settings.model_config()
        balanced_partition(settings)
        build_plan(p=settings.p, r=0, v=settings.v, m=settings.m)
        corpus = load_corpus(path=settings.data)
        next(microbatches(corpus=corpus, seed=settings.seed, micro_batch_size=settings.micro_batch_size,
                          seq_length=settings.seq_length, dp_size=settings.dp))
    except ValueError as exc:
        ap.error(str(exc))
    return settings, args.check, args.timeout


def _print0(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def run_rank(settings: TrainSettings, *, check: bool) -> int:
    """Train on this rank (the process group is initialised); return the exit status."""
    rank = dist.get_rank()
    groups = create_parallel_groups(p=settings.p, dp=settings.dp)
    trainer = RankTrainer.build(settings, groups)
    s = settings
    config = s.model_config()
    params = sum(layer_weights(config)) - config.vocab_size * config.hidden_size  # the tied head counts once
    _print0(rank, f"GPT: {s.num_layers} layers, hidden {s.hidden_size}, {s.num_heads} heads, seq {s.seq_length}, "
                  f"vocab 256 (bytes), {str(s.dtype).removeprefix('torch.')}")
    _print0(rank, f"parallel: p={s.p} x dp={s.dp} = {s.p * s.dp} gloo ranks, {s.schedule} schedule, v={s.v}, m={s.m}, "
                  f"micro batch {s.micro_batch_size}, {s.tokens_per_step:,} tokens/step"
                  + (", overlap_p2p_comm" if s.overlap_p2p_comm else "")
                  + (", deallocate_pipeline_outputs" if s.deallocate_pipeline_outputs else ""))
    _print0(rank, f"balanced partition, layers per stage: {list(balanced_partition(s).sizes)}; {params:,} parameters")
    losses, snapshot = [], trainer.named_parameters()
    start = time.perf_counter()
    for it in range(1, s.steps + 1):
        loss, stepped = trainer.step()
        losses.append(loss)
        if it == s.compare_steps:
            snapshot = trainer.named_parameters()
        took = trainer.step_seconds[-1]
        _print0(rank, f"iteration {it:5d}/{s.steps:5d} | lm loss {loss:.4f} | {s.tokens_per_step / took:,.0f} tokens/s | "
                      f"step {took:.2f} s | loss scale {trainer.scaler.scale:g}" + ("" if stepped else " | skipped (inf/nan)"))
    elapsed = time.perf_counter() - start
    last = losses[-10:]
    _print0(rank, f"trained {s.steps} steps in {elapsed:.1f} s ({s.steps * s.tokens_per_step / elapsed:,.0f} tokens/s): "
                  f"lm loss {losses[0]:.4f} at step 1 -> {sum(last) / len(last):.4f} (mean of the last {len(last)} steps)")
    if s.compare_steps < 1:
        return 0
    gathered: list = [None] * dist.get_world_size() if rank == 0 else []
    dist.gather_object(snapshot, gathered if rank == 0 else None, dst=0)
    if rank != 0:
        return 0
    # The other ranks are done; the replay may use every core.
    torch.set_num_threads(os.cpu_count() or 1)
    ref_losses, ref_params = reference_training(s, steps=s.compare_steps)
    loss_diff, param_diff = max_differences(losses=losses[: s.compare_steps], ref_losses=ref_losses, rank_params=gathered, ref_params=ref_params)
    print(f"same training on one process, first {s.compare_steps} steps: max |loss diff| {loss_diff:.3e}, "
          f"max |parameter diff| {param_diff:.3e} ({str(s.dtype).removeprefix('torch.')})", flush=True)
    if check:
        ok = loss_diff <= CHECK_TOLERANCE and param_diff <= CHECK_TOLERANCE
        print(f"check {'passed' if ok else 'FAILED'}: tolerance {CHECK_TOLERANCE:g}", flush=True)
        return 0 if ok else 1
    return 0


def _threads_per_rank(local_ranks: int) -> int:
    return max(1, (os.cpu_count() or 1) // local_ranks)


def _spawned_rank(rank: int, world: int, init_file: str, settings: TrainSettings, check: bool) -> None:
    torch.set_num_threads(_threads_per_rank(world))
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(minutes=5))
    try:
        status = run_rank(settings, check=check)
    finally:
        dist.destroy_process_group()
    sys.exit(status)


def launch(settings: TrainSettings, *, check: bool, timeout: float) -> int:
    """Start ``p * dp`` processes, wait at most ``timeout`` seconds; non-zero if any failed (the rest are stopped)."""
    world = settings.p * settings.dp
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="pipeschedule-train-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_spawned_rank, args=(r, world, init_file, settings, check)) for r in range(world)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        status = 0
        try:
            while any(proc.exitcode is None for proc in procs):
                failed = [r for r, proc in enumerate(procs) if proc.exitcode not in (None, 0)]
                if failed:
                    print(f"rank(s) {failed} failed (exit codes {[procs[r].exitcode for r in failed]}); stopping the others", file=sys.stderr)
                    status = 1
                    break
                if time.monotonic() > deadline:
                    print(f"the run did not finish within {timeout:.0f} s (--timeout); stopping it", file=sys.stderr)
                    status = 1
                    break
                mp.connection.wait([proc.sentinel for proc in procs if proc.exitcode is None], timeout=0.5)
        finally:
            for proc in procs:
                if proc.exitcode is None:
                    proc.terminate()
            for proc in procs:
                proc.join(timeout=10)
                if proc.exitcode is None:
                    proc.kill()
                    proc.join(timeout=10)
        codes = [proc.exitcode for proc in procs]
    return status or (0 if all(code == 0 for code in codes) else 1)


def main(argv: list[str] | None = None) -> int:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        world = int(os.environ["WORLD_SIZE"])
        settings, check, _ = parse_settings(argv, world_size=world)
        torch.set_num_threads(_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ['RANK']}] %(levelname)s %(name)s: %(message)s")
        dist.init_process_group("gloo", timeout=timedelta(minutes=5))
        try:
            return run_rank(settings, check=check)
        finally:
            dist.destroy_process_group()
    settings, check, timeout = parse_settings(argv)
    return launch(settings, check=check, timeout=timeout)


if __name__ == "__main__":
    sys.exit(main())
