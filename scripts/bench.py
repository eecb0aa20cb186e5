"""Benchmark pipeschedule's 1F1B and interleaved 1F1B against torch.distributed.pipelining.

A sleep model: every chunk's forward sleeps ``tf / v`` and its backward ``tb / v`` inside a custom
autograd Function, so compute takes wall time but no CPU, and the measured step is the schedule
plus its communication and Python overhead. p = 4 gloo processes on this machine run, for each
configuration, our schedule and the peer's (``Schedule1F1B`` / ``ScheduleInterleaved1F1B``) on the
same chunk modules, alternating which goes first, after warmup steps. The table gives the median
step time (min-max), the simulated step time (:mod:`pipeschedule.plan.simulate`, zero latency), the
ratios, and the peak live chunk-activations measured inside the chunks next to the plan's.

The zero-compute mode (``tf = tb = 0``) measures overhead: ``per action`` is the step time divided
by the number of actions on the critical path (the simulated step when every action costs 1).

    python scripts/bench.py                      # both modes, the default configurations
    python scripts/bench.py --png timeline.png --trace trace.json
    python scripts/bench.py --mode zero --reps 40
    python scripts/bench.py --mode zero --recv-window 2      # the overlapped mode with its smallest receive window
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

P = 4
SEQ, BATCH, HIDDEN = 16, 1, 64  # a 4 KiB activation: communication is cheap, as on a fast link


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration."""

    v: int
    m: int
    tf: float  # seconds, a whole microbatch through one rank (all its chunks)
    tb: float


@dataclass
class Meter:
    """Per process: chunk-activations alive (forward done, backward not yet) and time in compute."""

    live: int = 0
    peak: int = 0
    compute: float = 0.0

    def reset(self) -> None:
        self.live = self.peak = 0
        self.compute = 0.0


class _Sleep(torch.autograd.Function):
    """Identity whose forward and backward sleep; the sleep releases the GIL and burns no CPU."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor, meter: Meter, tf: float, tb: float) -> torch.Tensor:
        ctx.meter, ctx.tb = meter, tb
        start = time.perf_counter()
        if tf:
            time.sleep(tf)
        meter.compute += time.perf_counter() - start
        meter.live += 1
        meter.peak = max(meter.peak, meter.live)
        return x + bias

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        start = time.perf_counter()
        if ctx.tb:
            time.sleep(ctx.tb)
        ctx.meter.compute += time.perf_counter() - start
        ctx.meter.live -= 1
        return grad, grad.sum(dim=tuple(range(grad.dim() - 1))), None, None, None


class SleepChunk(torch.nn.Module):
    """One model chunk: a bias (so stage 0 has something to backward into) and the sleeps."""

    def __init__(self, *, meter: Meter, tf: float, tb: float) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(HIDDEN))
        self.meter, self.tf, self.tb = meter, tf, tb
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        self.input_tensor = tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x, self.bias, self.meter, self.tf, self.tb)


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean()


# -- one worker -------------------------------------------------------------------------------


@dataclass
class _Contender:
    name: str
    run: Any  # () -> None, one training step
    chunks: list[SleepChunk]
    recorder: Any = None


NO_RECORD = "  no call record"  # the batched mode with the step's call records left out: what they cost


def _ours(setup: Setup, chunks: list[SleepChunk], rank: int, recorder: Any, *, overlap: bool, deallocate: bool = False,
          recv_window: int | None = None, call_record: bool = True) -> _Contender:
    import pipeschedule as ps
    from pipeschedule.runtime.executor import PlanRunner

    data = [torch.randn(BATCH, SEQ, HIDDEN) for _ in range(setup.m)]
    target = torch.zeros(BATCH, SEQ, HIDDEN)

    def forward_step(data_iterator: Any, model: SleepChunk) -> tuple[torch.Tensor, Any]:
        x = model.input_tensor if model.input_tensor is not None else next(data_iterator)
        out = model(x)
        return out, lambda output: (_loss(output, target), {})

    window = {} if recv_window is None else {"overlap_recv_window": recv_window}  # None: the config's default
    config = ps.PipelineConfig(pipeline_dtype=torch.float32, observer=recorder, overlap_p2p_comm=overlap,
                               deallocate_pipeline_outputs=deallocate, **window)
    interleaved = setup.v > 1
    func: Any = ps.forward_backward_pipelining_with_interleaving if interleaved else ps.forward_backward_pipelining_without_interleaving

    def step() -> None:
        iterators = [iter(data) if rank == 0 and c == 0 else None for c in range(setup.v)]
        func(
            forward_step_func=forward_step, data_iterator=iterators if interleaved else iterators[0],
            model=chunks if interleaved else chunks[0], num_microbatches=setup.m,
            tensor_shape=(BATCH, SEQ, HIDDEN), config=config,
        )

    def run() -> None:
        if call_record:
            return step()
        with_record = PlanRunner._handshake
        PlanRunner._handshake = lambda self: None  # every rank alike: no rank sends or expects a record
        try:
            step()
        finally:
            PlanRunner._handshake = with_record

    name = "pipeschedule+overlap" if overlap else "pipeschedule" if call_record else NO_RECORD
    return _Contender(name, run, chunks, recorder)


def _peer(setup: Setup, chunks: list[SleepChunk], rank: int) -> _Contender:
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleInterleaved1F1B,
    )

    stages: list[Any] = [
        PipelineStage(chunk, stage_index=c * P + rank, num_stages=P * setup.v, device=torch.device("cpu"))
        for c, chunk in enumerate(chunks)
    ]
    if setup.v == 1:
        schedule: Any = Schedule1F1B(stages[0], n_microbatches=setup.m, loss_fn=_loss)
    else:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=setup.m, loss_fn=_loss)
    whole = torch.randn(BATCH * setup.m, SEQ, HIDDEN)  # split along dim 0 into m microbatches
    target = torch.zeros(BATCH * setup.m, SEQ, HIDDEN)
    last = rank == P - 1

    def run() -> None:
        if rank == 0:
            schedule.step(whole)
        elif last:
            schedule.step(target=target, losses=[])
        else:
            schedule.step()

    return _Contender("torch.pipelining", run, chunks)


def _floor(setup: Setup, chunks: list[SleepChunk], rank: int) -> _Contender:
    """The least any schedule can do here: the plan's actions and messages, nothing else.

    Every receive of the step is posted before the first action (a buffer per message, which a
    real schedule cannot afford), each is waited on right before its consumer, sends are plain
    ``isend`` waited on at the end, and there are no checks, no failure handling, no observer. The
    chunks, their sleeps and autograd are the same as for the contenders, so what this row spends
    beyond the simulation is what this machine's gloo, sleeps and autograd cost.
    """
    import torch.distributed as dist

    from pipeschedule.plan import build_pipeline

    plan = build_pipeline(p=P, v=setup.v, m=setup.m)[rank]
    actions = [(a, plan.input_message(a), plan.output_message(a)) for a in plan.actions]
    incoming = [(msg, msg.src_stage % P) for ex in plan.exchanges for msg in ex.recvs]
    data = [torch.randn(BATCH, SEQ, HIDDEN) for _ in range(setup.m)]
    target = torch.zeros(BATCH, SEQ, HIDDEN)

    def run() -> None:
        buffers, works = {}, {}
        for msg, src in incoming:
            buffers[msg] = torch.empty(BATCH, SEQ, HIDDEN)
            works[msg] = dist.irecv(buffers[msg], src)
        sends, saved = [], {}
        for action, msg_in, msg_out in actions:
            if msg_in is not None:
                works.pop(msg_in).wait()
            key = (action.microbatch, action.chunk)
            if action.kind == "F":
                x = data[action.microbatch] if msg_in is None else buffers.pop(msg_in).requires_grad_()
                out = chunks[action.chunk](x)
                if msg_out is None:
                    out = _loss(out, target) / setup.m
                else:
                    sends.append(dist.isend(out.detach(), msg_out.dst_stage % P))
                saved[key] = (x, out)
            else:
                x, out = saved.pop(key)
                torch.autograd.backward(out, None if msg_in is None else buffers.pop(msg_in))
                if msg_out is not None:
                    sends.append(dist.isend(x.grad, msg_out.dst_stage % P))
        for work in sends:
            work.wait()

    return _Contender(FLOOR, run, chunks)


FLOOR = "floor (raw gloo)"


def _measure(contender: _Contender, meter: Meter) -> list[float]:
    """One step: [start, end, compute, comm wait, peak live] of this rank."""
    import torch.distributed as dist

    for chunk in contender.chunks:
        chunk.zero_grad(set_to_none=True)
    meter.reset()
    if contender.recorder is not None:
        contender.recorder.clear()
    dist.barrier()
    start = time.perf_counter()
    contender.run()
    end = time.perf_counter()
    wait = 0.0
    if contender.recorder is not None:
        wait = sum(e.duration for e in contender.recorder.local_events() if e.kind == "X")
    return [start, end, meter.compute, wait, float(meter.peak)]


MEMORY_MODES = [(False, False), (False, True), (True, False), (True, True)]  # (overlap, deallocate)


def _memory(setup: Setup, chunks: list[SleepChunk], rank: int, meter: Meter, recv_window: int | None) -> list[list[int | None]] | None:
    """Per mode of MEMORY_MODES, the peak bytes of stage inputs and outputs held per rank, over one step."""
    from pipeschedule.tools.trace import TraceRecorder

    peaks = []
    for overlap, deallocate in MEMORY_MODES:
        recorder = TraceRecorder(held_bytes=True)
        _measure(_ours(setup, chunks, rank, recorder, overlap=overlap, deallocate=deallocate, recv_window=recv_window), meter)
        trace = recorder.gather()
        if trace is not None:
            peaks.append(trace.peak_held_bytes())
    return peaks if rank == 0 else None


def _worker(rank: int, init_file: str, args: argparse.Namespace, setups: list[Setup], results: Any) -> None:
    import torch.distributed as dist

    from pipeschedule.tools.trace import TraceRecorder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=P,
                            timeout=timedelta(seconds=args.p2p_timeout))
    try:
        for setup in setups:
            meter = Meter()
            chunks = [SleepChunk(meter=meter, tf=setup.tf / setup.v, tb=setup.tb / setup.v) for _ in range(setup.v)]
            # The pictures and traces show the overlapped mode, our fastest.
            recorder = TraceRecorder()
            contenders = [_ours(setup, chunks, rank, TraceRecorder(), overlap=False),
                          _ours(setup, chunks, rank, recorder, overlap=True, recv_window=args.recv_window),
                          _peer(setup, chunks, rank), _floor(setup, chunks, rank)]
            zero = setup.tf == 0 and setup.tb == 0
            if zero:
                contenders.append(_ours(setup, chunks, rank, TraceRecorder(), overlap=False, call_record=False))
            samples: dict[str, list[list[list[float]]]] = {c.name: [] for c in contenders}
            zero = setup.tf == 0 and setup.tb == 0
            reps = args.zero_reps if zero else args.reps
            for rep in range(args.warmup + reps):
                # Alternate who goes first, so a slow spell on the machine hits both alike.
                for contender in contenders[rep % len(contenders):] + contenders[: rep % len(contenders)]:
                    row = torch.tensor(_measure(contender, meter), dtype=torch.float64)
                    rows = [torch.empty_like(row) for _ in range(P)]
                    dist.all_gather(rows, row)
                    if rep >= args.warmup:
                        samples[contender.name].append([r.tolist() for r in rows])
            picture = args.png and not zero and setup.v == max(s.v for s in setups) and setup.m == max(s.m for s in setups)
            path = None
            if not zero:
                # The recorder still holds our last measured step (overlapped).
                trace = recorder.gather()
                if rank == 0 and trace is not None:
                    path = _path_row(setup, trace.critical_path())
                    if picture:
                        trace.save_timeline_png(args.png)
                    if args.trace and setup == setups[0]:
                        trace.write_chrome_trace(args.trace)
            memory = None if zero else _memory(setup, chunks, rank, meter, args.recv_window)
            if rank == 0:
                results.put(("setup", setup, (samples, memory, path)))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        results.put(("done", None, None))


def _path_row(setup: Setup, path: Any) -> list[float]:
    """[actions, nominal compute, measured compute, message gaps, hops, local gaps, lead + tail] in seconds."""
    nominal = sum((setup.tf if e.kind == "F" else setup.tb) / setup.v for e in path.actions)
    return [len(path.actions), nominal, path.compute, path.message_gaps, path.hops, path.local_gaps, path.lead + path.tail]


# -- the table ----------------------------------------------------------------------------------


def _simulated(setup: Setup) -> tuple[float, list[int], float]:
    """(step time, the plan's peak live activations per rank, critical-path actions)."""
    from pipeschedule.plan.check import peak_live_activations
    from pipeschedule.plan import build_pipeline
    from pipeschedule.plan.simulate import CostModel, simulate

    plans = build_pipeline(p=P, v=setup.v, m=setup.m)
    sim = simulate(plans, cost=CostModel(tf=setup.tf, tb=setup.tb))
    unit = simulate(plans, cost=CostModel(tf=float(setup.v), tb=float(setup.v)))  # every action costs 1
    return float(sim.step_time), [peak_live_activations(plan) for plan in plans], float(unit.step_time)


@dataclass
class _Row:
    setup: Setup
    name: str
    steps: list[float] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)  # per step, mean over ranks
    wait: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)


def _rows(setup: Setup, samples: dict[str, list[list[list[float]]]]) -> list[_Row]:
    out = []
    for name, steps in samples.items():
        row = _Row(setup, name)
        for ranks in steps:
            # perf_counter is one monotonic clock for all processes on this host.
            row.steps.append(max(r[1] for r in ranks) - min(r[0] for r in ranks))
            row.compute.append(statistics.mean(r[2] for r in ranks))
            row.wait.append(statistics.mean(r[3] for r in ranks))
        row.peaks = [int(max(step[r][4] for step in steps)) for r in range(P)]
        out.append(row)
    return out


def _medians(rows: list[_Row], name: str) -> dict[tuple[int, int], float]:
    return {(r.setup.v, r.setup.m): statistics.median(r.steps) for r in rows if r.name == name}


def _print_table(rows: list[_Row]) -> None:
    print(f"{'schedule':17} {'v':>2} {'m':>3} {'median ms (min-max)':>24} {'sim ms':>7} {'/sim':>6} {'/sim*':>6} {'/peer':>6} {'/floor':>6}"
          f"  {'peak live per rank (plan)':28} {'compute':>8} {'comm wait':>9}")
    peers, floors = _medians(rows, "torch.pipelining"), _medians(rows, FLOOR)
    for row in rows:
        sim, plan_peaks, _ = _simulated(row.setup)
        med = statistics.median(row.steps)
        key = (row.setup.v, row.setup.m)
        peaks = "/".join(map(str, row.peaks)) + ("  (" + "/".join(map(str, plan_peaks)) + ")" if row.name != "torch.pipelining" else "")
        spread = f"{med * 1e3:7.1f} ({min(row.steps) * 1e3:.1f}-{max(row.steps) * 1e3:.1f})"
        recorded = row.name.startswith("pipeschedule")  # the others run without an observer
        wait = f"{statistics.median(row.wait) * 1e3:7.1f}" if recorded else "      -"
        # sim*: the simulation with the compute each rank really took (sleeps overshoot a little),
        # so that /sim* is the schedule's own overhead. The simulated time is linear in tf and tb.
        sim_measured = sim * statistics.median(row.compute) / (row.setup.m * (row.setup.tf + row.setup.tb))
        print(f"{row.name:17} {row.setup.v:>2} {row.setup.m:>3} {spread:>24} {sim * 1e3:7.1f} {med / sim:6.3f} "
              f"{med / sim_measured:6.3f} {med / peers[key]:6.3f} {med / floors[key]:6.3f}  {peaks:28} "
              f"{statistics.median(row.compute) * 1e3:8.1f} {wait:>9}")


def _print_overhead(rows: list[_Row]) -> None:
    print(f"{'schedule':17} {'v':>2} {'m':>3} {'median ms (min-max)':>24} {'path':>5} {'per action us':>14} {'/peer':>6} {'/floor':>6}")
    peers, floors = _medians(rows, "torch.pipelining"), _medians(rows, FLOOR)
    for row in rows:
        _, _, path = _simulated(row.setup)
        med = statistics.median(row.steps)
        key = (row.setup.v, row.setup.m)
        spread = f"{med * 1e3:7.2f} ({min(row.steps) * 1e3:.2f}-{max(row.steps) * 1e3:.2f})"
        print(f"{row.name:17} {row.setup.v:>2} {row.setup.m:>3} {spread:>24} {path:5.0f} {med / path * 1e6:14.0f} "
              f"{med / peers[key]:6.3f} {med / floors[key]:6.3f}")


def _print_paths(paths: list[tuple[Setup, list[float]]]) -> None:
    print(f"{'v':>2} {'m':>3} {'actions':>7} {'nominal':>8} {'in actions':>10} {'messages':>13} {'local':>7} {'ends':>6}")
    for setup, (n, nominal, compute, messages, hops, local, ends) in paths:
        print(f"{setup.v:>2} {setup.m:>3} {n:7.0f} {nominal * 1e3:8.1f} {compute * 1e3:10.1f} "
              f"{messages * 1e3:6.1f} ({hops:3.0f}) {local * 1e3:7.1f} {ends * 1e3:6.1f}")


def _print_memory(memories: list[tuple[Setup, list[list[int | None]]]]) -> None:
    names = [("overlap" if o else "batched") + ("+dealloc" if d else "") for o, d in MEMORY_MODES]
    print(f"{'v':>2} {'m':>3}  " + "  ".join(f"{n:>20}" for n in names))
    for setup, peaks in memories:
        cells = ["/".join("-" if b is None else f"{b / 1024:.0f}" for b in per_rank) for per_rank in peaks]
        print(f"{setup.v:>2} {setup.m:>3}  " + "  ".join(f"{c:>20}" for c in cells))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["sleep", "zero", "both"], default="both")
    parser.add_argument("--tf", type=float, default=5.0, help="forward ms of a microbatch on one rank")
    parser.add_argument("--tb", type=float, default=10.0, help="backward ms of a microbatch on one rank")
    parser.add_argument("--v", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--m", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--reps", type=int, default=15, help="measured steps per schedule and configuration")
    parser.add_argument("--zero-reps", type=int, default=40, help="measured steps in the zero-compute mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--png", default=None, help="timeline of one measured step (largest v and m)")
    parser.add_argument("--trace", default=None, help="Chrome trace JSON of one measured step")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the run is abandoned")
    parser.add_argument("--p2p-timeout", type=float, default=60.0)
    parser.add_argument("--recv-window", type=int, default=None,
                        help="config.overlap_recv_window of the overlapped contender (default: the config's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setups = []
    for mode in (["sleep", "zero"] if args.mode == "both" else [args.mode]):
        tf, tb = (args.tf / 1e3, args.tb / 1e3) if mode == "sleep" else (0.0, 0.0)
        setups += [Setup(v=v, m=m, tf=tf, tb=tb) for v in args.v for m in args.m]
    load_before = os.getloadavg()[0]  # other work on the machine is the main source of noise
    ctx = mp.get_context("spawn")
    fd, init_file = tempfile.mkstemp(prefix="pipeschedule-bench-")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, init_file, args, setups, results), daemon=True) for r in range(P)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + args.timeout
    collected: list[_Row] = []
    memories: list[tuple[Setup, list[list[int | None]]]] = []
    paths: list[tuple[Setup, list[float]]] = []
    try:
        while True:
            try:
                kind, setup, payload = results.get(timeout=max(1.0, min(5.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [r for r, proc in enumerate(procs) if proc.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    print(f"error: benchmark stopped (dead workers {dead}, or over {args.timeout:.0f}s)", file=sys.stderr)
                    return 1
                continue
            if kind == "done":
                break
            samples, memory, path = payload
            collected += _rows(setup, samples)
            if path is not None:
                paths.append((setup, path))
            if memory is not None:
                memories.append((setup, memory))
            print(f"  measured v={setup.v} m={setup.m} tf={setup.tf * 1e3:g} ms tb={setup.tb * 1e3:g} ms", file=sys.stderr)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        if os.path.exists(init_file):
            os.unlink(init_file)
    sleep = [r for r in collected if r.setup.tf or r.setup.tb]
    zero = [r for r in collected if not (r.setup.tf or r.setup.tb)]
    print(f"p={P}, activation {BATCH}x{SEQ}x{HIDDEN} float32, gloo, {os.cpu_count()} cores "
          f"(load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end); "
          f"{args.warmup} warmup + {args.reps} measured steps each, alternating")
    if sleep:
        print(f"\nsleep model tf={args.tf:g} ms tb={args.tb:g} ms (per microbatch on one rank); "
              "compute and comm wait: ms per rank, medians")
        _print_table(sleep)
    if paths:
        print("\ncritical path of the last measured pipeschedule+overlap step (PipelineTrace.critical_path), ms: "
              "nominal compute, time in its actions, gaps waiting for messages (how many), gaps between "
              "one rank's actions, before the first and after the last action")
        _print_paths(paths)
    if memories:
        print("\nstage inputs and outputs held (KiB per rank, peak over one step, from TraceRecorder(held_bytes=True))")
        _print_memory(memories)
    if zero:
        print(f"\nzero compute ({args.zero_reps} measured steps each): overhead per action on the critical path")
        _print_overhead(zero)
        mine, bare = _medians(zero, "pipeschedule"), _medians(zero, NO_RECORD)
        print("call records, batched mode: " + ", ".join(
            f"{(mine[key] / bare[key] - 1) * 100:+.1f} % (v{key[0]} m{key[1]})" for key in sorted(bare)))
    if args.png:
        print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
