"""Train a byte-level GPT with pipeline × data parallelism on CPU, with gloo: the main job.

    python scripts/train.py                                   # 4 ranks: p=4, v=2 (interleaved), m=8, dp=1
    python scripts/train.py --p 2 --dp 2 --schedule 1f1b      # two pipeline replicas of two stages
    python scripts/train.py --schedule zero-bubble --v 2       # interleaved zero bubble
    python scripts/train.py --check                           # float64, 3 steps, equal to one process?
    python scripts/train.py --save ckpt --save-interval 50    # checkpoints; resume with --load ckpt
    torchrun --nproc-per-node 4 scripts/train.py --p 2 --dp 2

Without ``RANK``/``WORLD_SIZE`` in the environment the script starts the ``p * dp`` processes
itself (spawned, rendezvous through a temporary file) and waits for them with a time limit; under
torchrun it uses the environment. Global rank ``g`` is pipeline rank ``g // dp`` of replica
``g % dp`` (pipeline outermost, as in Megatron; see :mod:`pipeschedule.training.layout`).

Rank 0 prints one Megatron-style line per iteration, with the validation loss every
``--eval-interval`` iterations (forward-only through the pipeline on the held-out split) and at
the end. Then it prints a text sample generated through the pipeline. ``--steps`` is the total: a
run loaded from iteration ``k`` trains iterations ``k+1 .. --steps``. Last, the first
``--compare-steps`` steps are replayed on one process and the differences of losses, gradient
norms and parameters are printed; with ``--check`` (float64) they must be at most 1e-10, else the
exit status is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

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
    layout_manifest,
    max_differences,
    reference_training,
)

from pipeschedule.training.checkpoint import CheckpointError, find_latest, save_checkpoint
from pipeschedule.training.layout import create_parallel_groups
from pipeschedule.training.models import load_corpus, microbatches
from pipeschedule.plan import build_plan
from pipeschedule.tools.trace import TraceRecorder

CHECK_TOLERANCE = 1e-10


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What a run does around training; nothing here changes the trained parameters."""

    check: bool = False
    timeout: float = 1800.0
    eval_interval: int = 50
    save: str | None = None
    save_interval: int | None = None
    load: str | None = None  # the checkpoint directory (its newest checkpoint is loaded)
    plot: str | None = None
    trace: str | None = None
    prompt: str = "def "
    sample_length: int = 200
    temperature: float = 0.8


def _check_writable_dir(ap: argparse.ArgumentParser, flag: str, path: str) -> None:
    target = Path(path)
    if target.exists() and not target.is_dir():
        ap.error(f"{flag} {path}: that is a file, not a directory; give a directory (it is created if missing)")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write-test-"):
            pass
    except OSError as exc:
        ap.error(f"{flag} {path}: cannot write there ({exc.strerror or exc}); give a directory this user can write to")


def _check_output_file(ap: argparse.ArgumentParser, flag: str, path: str, suffix: str) -> None:
    target = Path(path)
    if target.suffix.lower() != suffix:
        ap.error(f"{flag} {path}: the file name must end in {suffix}, e.g. {flag} out{suffix}")
    if not target.parent.is_dir():
        ap.error(f"{flag} {path}: the directory {target.parent} does not exist; create it or give another path")
    _check_writable_dir(ap, flag, str(target.parent))


def _checkpoint_mismatch(saved: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """A message naming what differs between a checkpoint's layout and model and this run's, or None."""
    differs = [
        f"{key}={saved.get(part, {}).get(key)!r} (this run: {value!r})"
        for part in ("layout", "model") for key, value in wanted[part].items()
        if saved.get(part, {}).get(key) != value
    ]
    if not differs:
        return None
    layout = ", ".join(f"{k}={v}" for k, v in saved.get("layout", {}).items())
    model = ", ".join(f"{k}={v}" for k, v in saved.get("model", {}).items())
    return (
        f"holds {layout} and a model with {model}; different here: {', '.join(differs)}. Loading into another "
        f"layout or model is not supported: run with the checkpoint's --p/--v/--dp and model flags (and --check "
        f"exactly when it is float64)"
    )


def parse_settings(argv: list[str] | None = None, *, world_size: int | None = None) -> tuple[TrainSettings, RunOptions]:
    """Settings and run options from the command line; validated before any process starts."""
    d, o = TrainSettings(), RunOptions()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--p", type=int, default=d.p, help="pipeline ranks")
    ap.add_argument("--v", type=int, default=None, help="model chunks per rank (default: 2 interleaved and zero-bubble, 1 for 1f1b)")
    ap.add_argument("--m", type=int, default=d.m, help="microbatches per step")
    ap.add_argument("--dp", type=int, default=None, help="data-parallel replicas (default 1; under torchrun world/p)")
    ap.add_argument("--schedule", choices=["1f1b", "interleaved", "zero-bubble"], default="interleaved",
                    help="zero-bubble: each backward split into input and weight passes (ZB-H1 at --v 1)")
    ap.add_argument("--steps", type=int, default=None, help=f"total iterations, counting those of a loaded checkpoint (default {d.steps}, 3 with --check)")
    ap.add_argument("--data", default=None, help="a UTF-8 text file (default: modules of the Python standard library)")
    ap.add_argument("--seq-length", type=int, default=d.seq_length)
    ap.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    ap.add_argument("--hidden-size", type=int, default=d.hidden_size)
    ap.add_argument("--num-layers", type=int, default=d.num_layers)
    ap.add_argument("--num-heads", type=int, default=d.num_heads)
    ap.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden size")
    ap.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    ap.add_argument("--min-lr", type=float, default=None, help="learning rate at the last iteration (default lr / 10)")
    ap.add_argument("--lr-warmup", type=int, default=d.lr_warmup, help="iterations of linear warmup, then cosine decay")
    ap.add_argument("--clip-grad", type=float, default=d.clip_grad, help="clip the global gradient norm to this (0: off)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--eval-interval", type=int, default=o.eval_interval, help="iterations between validation losses")
    ap.add_argument("--eval-iters", type=int, default=d.eval_iters, help="forward-only steps of m microbatches per validation (0: none)")
    ap.add_argument("--save", default=None, metavar="DIR", help="save checkpoints here (at the end, and every --save-interval)")
    ap.add_argument("--save-interval", type=int, default=None, metavar="N", help="iterations between checkpoints (needs --save)")
    ap.add_argument("--load", default=None, metavar="DIR", help="resume from the newest checkpoint in DIR")
    ap.add_argument("--plot", default=None, metavar="FILE.png", help="write the train and validation loss curves")
    ap.add_argument("--trace", default=None, metavar="FILE.json", help="Chrome trace of the last step, and FILE.png, its timeline")
    ap.add_argument("--prompt", default=o.prompt, help="the sample's first bytes")
    ap.add_argument("--sample-length", type=int, default=o.sample_length, help="bytes generated at the end (0: no sample)")
    ap.add_argument("--temperature", type=float, default=o.temperature, help="sampling temperature (0: greedy)")
    ap.add_argument("--compare-steps", type=int, default=d.compare_steps, help="steps replayed on one process at the end (0: none)")
    ap.add_argument("--check", action="store_true", help="float64; fail unless equal to one process within 1e-10")
    ap.add_argument("--overlap-p2p-comm", action=argparse.BooleanOptionalAction, default=d.overlap_p2p_comm,
                    help="post receives early and wait on them just before use")
    ap.add_argument("--deallocate-pipeline-outputs", action=argparse.BooleanOptionalAction, default=d.deallocate_pipeline_outputs,
                    help="release a stage output's data once it is sent")
    ap.add_argument("--timeout", type=float, default=o.timeout, help="seconds before a launched run is stopped")
    args = ap.parse_args(argv)
    v = args.v if args.v is not None else (1 if args.schedule == "1f1b" else 2)
    if v < 1:
        ap.error(f"--v {v}: give at least one model chunk per rank")
    if args.schedule != "zero-bubble" and (args.schedule == "interleaved") != (v > 1):
        ap.error(f"--schedule {args.schedule} with --v {v}: 1f1b runs one chunk per rank (--v 1), interleaved needs --v >= 2")
    dp = args.dp
    if dp is None:
        dp = world_size // args.p if world_size is not None and world_size % args.p == 0 else 1
    if world_size is not None and world_size != args.p * dp:
        ap.error(f"{world_size} processes were started but --p {args.p} times --dp {dp} is {args.p * dp}; make them agree")
    steps = args.steps if args.steps is not None else (3 if args.check else d.steps)
    for name in ("p", "m", "dp", "steps", "eval_interval"):
        value = {"dp": dp, "steps": steps}.get(name, getattr(args, name, None))
        if value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("eval_iters", "lr_warmup", "sample_length"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if not (args.lr > 0 and 0 <= min_lr <= args.lr):
        ap.error(f"--lr {args.lr} and --min-lr {min_lr}: need lr > 0 and 0 <= min-lr <= lr")
    if not (args.clip_grad >= 0 and math.isfinite(args.clip_grad)):
        ap.error(f"--clip-grad must be a finite number >= 0 (0: no clipping), got {args.clip_grad}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        ap.error(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.sample_length and not args.prompt:
        ap.error("--prompt is empty; give at least one byte to start the sample from, or --sample-length 0")
    if args.save_interval is not None:
        if args.save is None:
            ap.error(f"--save-interval {args.save_interval} needs --save DIR, the directory to write checkpoints to")
        if args.save_interval < 1:
            ap.error(f"--save-interval must be >= 1 (iterations between checkpoints), got {args.save_interval}")
    if args.save is not None:
        _check_writable_dir(ap, "--save", args.save)
    if args.plot is not None:
        _check_output_file(ap, "--plot", args.plot, ".png")
    if args.trace is not None:
        _check_output_file(ap, "--trace", args.trace, ".json")
    if args.data is not None and not Path(args.data).is_file():
        ap.error(f"--data {args.data}: no such file; give a UTF-8 text file")
    settings = TrainSettings(
        p=args.p, v=v, m=args.m, dp=dp, steps=steps, data=args.data, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_heads=args.num_heads, ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size, lr=args.lr,
        min_lr=min_lr, lr_warmup=args.lr_warmup, clip_grad=args.clip_grad, eval_iters=args.eval_iters,
        seed=args.seed, dtype=torch.float64 if args.check else torch.float32,
        compare_steps=steps if args.check else min(args.compare_steps, steps),
        overlap_p2p_comm=args.overlap_p2p_comm, deallocate_pipeline_outputs=args.deallocate_pipeline_outputs,
        zero_bubble=args.schedule == "zero-bubble",
    )
    try:  # fail here, not in p*dp processes: the model, the partition, the schedule's plan, the data
        settings.model_config()
        balanced_partition(settings)
        build_plan(p=settings.p, r=0, v=settings.v, m=settings.m, schedule="zero-bubble" if settings.zero_bubble else "1f1b")
        corpus = load_corpus(path=settings.data)
        for split in ("train", "valid") if settings.eval_iters else ("train",):
            next(microbatches(corpus=corpus, seed=settings.seed, micro_batch_size=settings.micro_batch_size,
                              seq_length=settings.seq_length, dp_size=settings.dp, split=split))
    except ValueError as exc:
        ap.error(str(exc))
    if args.load is not None:
        try:
            path, manifest = find_latest(args.load)
        except CheckpointError as exc:
            ap.error(f"--load {args.load}: {exc}")
        mismatch = _checkpoint_mismatch(manifest, layout_manifest(settings))
        if mismatch is not None:
            ap.error(f"--load {args.load}: the checkpoint {path.name} {mismatch}")
    options = RunOptions(
        check=args.check, timeout=args.timeout, eval_interval=args.eval_interval, save=args.save,
        save_interval=args.save_interval, load=args.load, plot=args.plot, trace=args.trace, prompt=args.prompt,
        sample_length=args.sample_length, temperature=args.temperature,
    )
    return settings, options


def _print0(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def _write_plot(path: str, *, train: list[tuple[int, float]], valid: list[tuple[int, float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), lw=1.0, label="train (per iteration)")
    if valid:
        ax.plot(*zip(*valid), "o-", lw=1.5, ms=4, label="validation (held-out split)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss (nats per byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class _Run:
    """One rank's training run: the loop, evaluation, checkpoints, pictures, sample and replay."""

    def __init__(self, settings: TrainSettings, options: RunOptions) -> None:
        self.s, self.o = settings, options
        self.rank = dist.get_rank()
        self.trainer = RankTrainer.build(settings, create_parallel_groups(p=settings.p, dp=settings.dp))
        self.train_history: list[tuple[int, float]] = []
        self.valid_history: list[tuple[int, float]] = []
        self.grad_norms: list[float] = []  # of this run's iterations
        self.start = 0
        self.snapshot: dict[str, torch.Tensor] = {}

    def load(self) -> None:
        assert self.o.load is not None
        path, manifest = find_latest(self.o.load)
        self.trainer.load(str(path))
        self.start = self.trainer.iteration
        history = manifest.get("history", {})
        self.train_history = [tuple(x) for x in history.get("train", [])]  # type: ignore[misc]
        self.valid_history = [tuple(x) for x in history.get("valid", [])]  # type: ignore[misc]
        _print0(self.rank, f"loaded {path} (iteration {self.start}); training iterations {self.start + 1}..{self.s.steps}")

    def _save(self) -> None:
        assert self.o.save is not None
        started = time.perf_counter()
        manifest = {
            **layout_manifest(self.s),
            "settings": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in dataclasses.asdict(self.s).items()},
            "history": {"train": self.train_history, "valid": self.valid_history},
        }
        path = save_checkpoint(directory=self.o.save, iteration=self.trainer.iteration,
                               state_dict=self.trainer.checkpoint_state(), manifest=manifest)
        _print0(self.rank, f"saved checkpoint {path} in {time.perf_counter() - started:.2f} s")

    def _evaluate(self) -> float:
        loss = self.trainer.evaluate()
        self.valid_history.append((self.trainer.iteration, loss))
        return loss

    def _traced_step(self) -> Any:
        recorder = TraceRecorder()
        replica0 = self.trainer.groups.dp_rank == 0
        untraced = self.trainer.config
        if replica0:
            self.trainer.config = dataclasses.replace(untraced, observer=recorder)
        try:
            result = self.trainer.step()
        finally:
            self.trainer.config = untraced
        if replica0:
            trace = recorder.gather(group=self.trainer.groups.pipeline)
            if trace is not None and self.o.trace is not None:
                trace.write_chrome_trace(self.o.trace)
                png = str(Path(self.o.trace).with_suffix(".png"))
                trace.save_timeline_png(png)
                busy = sum(trace.busy()) / (len(trace.ranks) * trace.span())
                print(f"trace of iteration {self.trainer.iteration}: {self.o.trace} (open in Perfetto), timeline {png}; "
                      f"{trace.span() * 1e3:.0f} ms, ranks busy {busy:.0%} of it", flush=True)
        return result

    def train(self) -> list[float]:
        s, o = self.s, self.o
        losses = []
        trace_at = s.steps if o.trace is not None else None
        started = time.perf_counter()
        for it in range(self.start + 1, s.steps + 1):
            result = self._traced_step() if it == trace_at else self.trainer.step()
            losses.append(result.loss)
            self.grad_norms.append(result.grad_norm)
            self.train_history.append((it, result.loss))
            if it == s.compare_steps:
                self.snapshot = self.trainer.named_parameters()
            line = (f"iteration {it:5d}/{s.steps:5d} | lm loss {result.loss:.4f} | grad norm {result.grad_norm:.3f} | "
                    f"lr {result.lr:.3e} | {s.tokens_per_step / result.seconds:,.0f} tokens/s | step {result.seconds:.2f} s | "
                    f"loss scale {self.trainer.scaler.scale:g}" + ("" if result.stepped else " | skipped (inf/nan)"))
            if s.eval_iters and it % o.eval_interval == 0 and it != s.steps:
                line += f" | validation lm loss {self._evaluate():.4f}"
            _print0(self.rank, line)
            if o.save is not None and o.save_interval is not None and it % o.save_interval == 0:
                self._save()
        trained = s.steps - self.start
        if trained > 0:
            elapsed = time.perf_counter() - started
            last = losses[-10:]
            _print0(self.rank, f"trained {trained} steps in {elapsed:.1f} s ({trained * s.tokens_per_step / elapsed:,.0f} tokens/s): "
                               f"lm loss {losses[0]:.4f} at step {self.start + 1} -> {sum(last) / len(last):.4f} "
                               f"(mean of the last {len(last)} steps)")
        else:
            _print0(self.rank, f"the checkpoint is at iteration {self.start}, which reaches --steps {s.steps}: nothing to train")
        if o.save is not None and trained > 0 and not (o.save_interval and s.steps % o.save_interval == 0):
            self._save()
        return losses

    def finish(self) -> None:
        """Final validation, loss curves, sample: after training, before the replay."""
        s, o = self.s, self.o
        if s.eval_iters:
            windows = s.eval_iters * s.m * s.micro_batch_size * s.dp
            loss = self._evaluate()
            _print0(self.rank, f"validation at iteration {self.trainer.iteration}: lm loss {loss:.4f} "
                               f"({s.eval_iters} forward-only steps, {windows} held-out windows of {s.seq_length} bytes)")
        if o.plot is not None and self.rank == 0:
            _write_plot(o.plot, train=self.train_history, valid=self.valid_history,
                        title=f"GPT {s.num_layers}x{s.hidden_size}, p={s.p} v={s.v} dp={s.dp}, {s.schedule}")
            print(f"loss curves: {o.plot}", flush=True)
        if o.sample_length:
            started = time.perf_counter()
            text = self.trainer.sample(prompt=o.prompt.encode(), length=o.sample_length, temperature=o.temperature)
            if self.rank == 0 and text is not None:
                how = "greedy" if o.temperature == 0 else f"temperature {o.temperature:g}"
                print(f"sample ({how}, {o.sample_length} bytes after the prompt {o.prompt!r}, generated through the pipeline "
                      f"in {time.perf_counter() - started:.1f} s):", flush=True)
                print("-" * 72 + "\n" + text.decode("utf-8", errors="replace") + "\n" + "-" * 72, flush=True)


def run_rank(settings: TrainSettings, options: RunOptions) -> int:
    """Train on this rank (the process group is initialised); return the exit status."""
    run = _Run(settings, options)
    rank, s = run.rank, settings
    config = s.model_config()
    params = sum(layer_weights(config)) - config.vocab_size * config.hidden_size  # the tied head counts once
    _print0(rank, f"GPT: {s.num_layers} layers, hidden {s.hidden_size}, {s.num_heads} heads, seq {s.seq_length}, "
                  f"vocab 256 (bytes), {str(s.dtype).removeprefix('torch.')}")
    _print0(rank, f"parallel: p={s.p} x dp={s.dp} = {s.p * s.dp} gloo ranks, {s.schedule} schedule, v={s.v}, m={s.m}, "
                  f"micro batch {s.micro_batch_size}, {s.tokens_per_step:,} tokens/step"
                  + (", overlap_p2p_comm" if s.overlap_p2p_comm else "")
                  + (", deallocate_pipeline_outputs" if s.deallocate_pipeline_outputs else ""))
    _print0(rank, f"balanced partition, layers per stage: {list(balanced_partition(s).sizes)}; {params:,} parameters")
    _print0(rank, f"optimizer: AdamW, lr {s.lr:g} (warmup {s.lr_warmup}, cosine to {s.min_lr:g} at {s.steps}), "
                  f"clip grad norm {s.clip_grad:g}" + (" (off)" if s.clip_grad == 0 else ""))
    if options.load is not None:
        run.load()
    run.snapshot = run.trainer.named_parameters()
    losses = run.train()
    run.finish()
    first = run.start + 1
    last = s.compare_steps
    if last < first:
        if 0 < s.compare_steps < first <= s.steps:
            _print0(rank, f"no one-process replay: iterations 1..{s.compare_steps} ran before the checkpoint (use --check to replay the whole run)")
        return 0
    gathered: list = [None] * dist.get_world_size() if rank == 0 else []
    dist.gather_object(run.snapshot, gathered if rank == 0 else None, dst=0)
    if rank != 0:
        return 0
    # The other ranks are done; the replay may use every core.
    torch.set_num_threads(os.cpu_count() or 1)
    ref = reference_training(s, steps=last)
    count = last - first + 1
    loss_diff, param_diff = max_differences(losses=losses[:count], ref_losses=ref.losses[first - 1 : last],
                                            rank_params=gathered, ref_params=ref.params)
    norm_diff = max(abs(a - b) for a, b in zip(run.grad_norms[:count], ref.grad_norms[first - 1 : last], strict=True))
    print(f"same training on one process, steps {first}..{last}: max |loss diff| {loss_diff:.3e}, "
          f"max |grad norm diff| {norm_diff:.3e}, max |parameter diff| {param_diff:.3e} "
          f"({str(s.dtype).removeprefix('torch.')})", flush=True)
    if options.check:
        ok = max(loss_diff, norm_diff, param_diff) <= CHECK_TOLERANCE
        print(f"check {'passed' if ok else 'FAILED'}: tolerance {CHECK_TOLERANCE:g}", flush=True)
        return 0 if ok else 1
    return 0


def _threads_per_rank(local_ranks: int) -> int:
    return max(1, (os.cpu_count() or 1) // local_ranks)


def _spawned_rank(rank: int, world: int, init_file: str, settings: TrainSettings, options: RunOptions) -> None:
    torch.set_num_threads(_threads_per_rank(world))
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(minutes=5))
    try:
        status = run_rank(settings, options)
    finally:
        dist.destroy_process_group()
    sys.exit(status)


def launch(settings: TrainSettings, options: RunOptions) -> int:
    """Start ``p * dp`` processes, wait at most ``timeout`` seconds; non-zero if any failed (the rest are stopped)."""
    world = settings.p * settings.dp
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="pipeschedule-train-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_spawned_rank, args=(r, world, init_file, settings, options)) for r in range(world)]
        for proc in procs:
            proc.start()
        timeout = options.timeout
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
        settings, options = parse_settings(argv, world_size=world)
        torch.set_num_threads(_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ['RANK']}] %(levelname)s %(name)s: %(message)s")
        dist.init_process_group("gloo", timeout=timedelta(minutes=5))
        try:
            return run_rank(settings, options)
        finally:
            dist.destroy_process_group()
    settings, options = parse_settings(argv)
    return launch(settings, options)


if __name__ == "__main__":
    sys.exit(main())
