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

The zero-bubble mode (``--mode zb``) uses a chunk whose backward really splits (:class:`SplitSleepChunk`:
``SleepX(x) + SleepW(bias)``, input half ``tb``, weight half ``tw``) and runs, in one alternating
run per configuration, our zero-bubble schedule (v = 1, 2; batched and overlapped; the autograd and
the module split), torch's ``ScheduleInterleavedZeroBubble`` (1 and 2 stages a rank),
``ScheduleZBVZeroBubble`` and ``ScheduleDualPipeV``, our 1F1B and interleaved (whole backward
``tb + tw``) and the floors of both plans (zero bubble, and 1F1B/interleaved: their difference is
the zero-bubble gain this machine allows); a one-process self-test of the split's timing comes first.

    python scripts/bench.py                      # both modes, the default configurations
    python scripts/bench.py --mode zb            # zero bubble: p=4, m in {8, 16}, four cost settings
    python scripts/bench.py --png timeline.png --trace trace.json
    python scripts/bench.py --mode zero --reps 40
    python scripts/bench.py --mode zero --recv-window 2      # the overlapped mode with its smallest receive window
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
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
    """Per process: chunk-activations alive (forward done, backward not yet) and time in compute.

    With the split model, ``live`` lasts until the weight half of the backward (F-W) and
    ``awaiting`` until its input half (F-I); ``pending`` is the bytes pending weight passes hold.
    """

    live: int = 0
    peak: int = 0
    compute: float = 0.0
    awaiting: int = 0
    peak_awaiting: int = 0
    pending: int = 0
    peak_pending: int = 0

    def reset(self) -> None:
        self.live = self.peak = self.awaiting = self.peak_awaiting = self.pending = self.peak_pending = 0
        self.compute = 0.0

    def sleep(self, seconds: float) -> None:
        start = time.perf_counter()
        if seconds:
            time.sleep(seconds)
        self.compute += time.perf_counter() - start

    def hold(self, nbytes: int) -> None:
        self.pending += nbytes
        self.peak_pending = max(self.peak_pending, self.pending)


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


class _SleepX(torch.autograd.Function):
    """The input path of the split model: a copy of ``x``; forward sleeps ``tf``, backward ``tb``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, meter: Meter, tf: float, tb: float) -> torch.Tensor:
        ctx.meter, ctx.tb = meter, tb
        meter.sleep(tf)
        meter.live += 1
        meter.awaiting += 1
        meter.peak = max(meter.peak, meter.live)
        meter.peak_awaiting = max(meter.peak_awaiting, meter.awaiting)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        ctx.meter.sleep(ctx.tb)
        ctx.meter.awaiting -= 1
        return grad, None, None, None


class _SleepW(torch.autograd.Function):
    """The weight path: a copy of the bias; backward sleeps ``tw``, or queues that and the bias grad on the chunk."""

    @staticmethod
    def forward(ctx: Any, bias: torch.Tensor, chunk: SplitSleepChunk) -> torch.Tensor:
        ctx.chunk = chunk
        return bias.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        chunk = ctx.chunk
        if chunk.defer:  # the "module" split: backward_dw() does this later
            chunk.queue.append(grad)
            chunk.meter.hold(grad.numel() * grad.element_size())
            return None, None
        chunk.meter.sleep(chunk.tw)
        chunk.meter.live -= 1
        return grad, None


class SplitSleepChunk(torch.nn.Module):
    """A chunk whose backward splits: ``SleepX(x) + SleepW(bias)``, two graph nodes joined by an add.

    A whole backward sleeps ``tb + tw``; an autograd split's input pass runs only ``SleepX``'s
    backward (``tb``) and its weight pass only ``SleepW``'s (``tw``). With ``defer`` set,
    ``SleepW``'s backward queues its work and :meth:`backward_dw` runs the oldest (one FIFO per
    chunk), the convention of the ``"module"`` split. ``tf``, ``tb``, ``tw`` are this chunk's share.
    """

    def __init__(self, *, meter: Meter, tf: float, tb: float, tw: float) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(HIDDEN))
        self.meter, self.tf, self.tb, self.tw = meter, tf, tb, tw
        self.input_tensor: torch.Tensor | None = None
        self.defer = False
        self.queue: collections.deque[torch.Tensor] = collections.deque()

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        self.input_tensor = tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            # The first stage's input: without a gradient SleepX would have no backward, and the
            # first stage's backward would not sleep tb. A fresh leaf keeps the data untouched.
            x = x.detach().requires_grad_()
        return _SleepX.apply(x, self.meter, self.tf, self.tb) + _SleepW.apply(self.bias, self)

    def backward_dw(self) -> None:
        grad = self.queue.popleft()
        self.meter.sleep(self.tw)
        self.meter.live -= 1
        self.meter.pending -= grad.numel() * grad.element_size()
        with torch.no_grad():
            if self.bias.grad is None:
                self.bias.grad = grad.clone()
            else:
                self.bias.grad += grad


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean()


# -- one worker -------------------------------------------------------------------------------


@dataclass
class _Contender:
    name: str
    run: Any  # () -> None, one training step
    chunks: list[Any]  # SleepChunk or SplitSleepChunk
    recorder: Any = None
    defer: bool = False  # SplitSleepChunk: queue the weight halves for backward_dw()


NO_RECORD = "  no call record"  # the batched mode with the step's call records left out: what they cost


def _ours(setup: Setup, chunks: list[Any], rank: int, recorder: Any, *, overlap: bool, deallocate: bool = False,
          recv_window: int | None = None, call_record: bool = True, data: list[torch.Tensor] | None = None) -> _Contender:
    import pipeschedule as ps
    from pipeschedule.runtime.executor import PlanRunner

    data = data if data is not None else [torch.randn(BATCH, SEQ, HIDDEN) for _ in range(setup.m)]
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


def _floor(setup: Setup, chunks: list[Any], rank: int, *, schedule: str = "1f1b", data: list[torch.Tensor] | None = None,
           name: str | None = None) -> _Contender:
    """The least any schedule can do here: the plan's actions and messages, nothing else.

    Every receive of the step is posted before the first action (a buffer per message, which a
    real schedule cannot afford), each is waited on right before its consumer, sends are plain
    ``isend`` waited on at the end, and there are no checks, no failure handling, no observer. The
    chunks, their sleeps and autograd are the same as for the contenders, so what this row spends
    beyond the simulation is what this machine's gloo, sleeps and autograd cost.

    With ``schedule="zero-bubble"`` the plan's ``I`` and ``W`` run through
    :class:`pipeschedule.runtime.split.AutogradSplit`, the split our schedule uses by default.
    """
    import torch.distributed as dist

    from pipeschedule.plan import build_pipeline
    from pipeschedule.runtime.split import AutogradSplit

    plan = build_pipeline(p=P, v=setup.v, m=setup.m, schedule=schedule)[rank]
    actions = [(a, plan.input_message(a), plan.output_message(a)) for a in plan.actions]
    incoming = [(msg, msg.src_stage % P) for ex in plan.exchanges for msg in ex.recvs]
    split = AutogradSplit([f"chunk {c}" for c in range(setup.v)])
    data = data if data is not None else [torch.randn(BATCH, SEQ, HIDDEN) for _ in range(setup.m)]
    target = torch.zeros(BATCH, SEQ, HIDDEN)

    def run() -> None:
        buffers, works = {}, {}
        for msg, src in incoming:
            buffers[msg] = torch.empty(BATCH, SEQ, HIDDEN)
            works[msg] = dist.irecv(buffers[msg], src)
        sends, saved, weights = [], {}, {}
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
            elif action.kind == "W":
                split.weight_pass(weights.pop(key), action.chunk)
            elif action.kind == "I":
                x, out = saved.pop(key)
                # The first stage's data needs no gradient: its W is then the whole backward.
                weights[key] = split.input_pass(x, out, None if msg_in is None else buffers.pop(msg_in), action.chunk)
                if msg_out is not None:
                    sends.append(dist.isend(x.grad, msg_out.dst_stage % P))
            else:
                x, out = saved.pop(key)
                torch.autograd.backward(out, None if msg_in is None else buffers.pop(msg_in))
                if msg_out is not None:
                    sends.append(dist.isend(x.grad, msg_out.dst_stage % P))
        for work in sends:
            work.wait()

    return _Contender(name or FLOOR, run, chunks)


FLOOR = "floor (raw gloo)"


def _measure(contender: _Contender, meter: Meter) -> list[float]:
    """One step: [start, end, compute, comm wait, peak live, CPU seconds, peak awaiting I, peak pending-W bytes] of this rank."""
    import torch.distributed as dist

    for chunk in contender.chunks:
        chunk.zero_grad(set_to_none=True)
        if isinstance(chunk, SplitSleepChunk):
            chunk.defer = contender.defer
    meter.reset()
    if contender.recorder is not None:
        contender.recorder.clear()
    dist.barrier()
    cpu = time.process_time()  # every thread of this process: ours, gloo's, autograd's
    start = time.perf_counter()
    contender.run()
    end = time.perf_counter()
    cpu = time.process_time() - cpu
    wait = 0.0
    if contender.recorder is not None:
        wait = sum(e.duration for e in contender.recorder.local_events() if e.kind == "X")
    return [start, end, meter.compute, wait, float(meter.peak), cpu, float(meter.peak_awaiting), float(meter.peak_pending)]


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


# -- zero bubble (--mode zb) ------------------------------------------------------------------


@dataclass(frozen=True)
class ZbSetup:
    """One zero-bubble configuration: costs in seconds of a whole microbatch on one rank."""

    m: int
    tf: float
    tb: float  # the input half of the backward
    tw: float  # the weight half; a whole backward is tb + tw


@dataclass(frozen=True)
class _Entry:
    """One zero-bubble contender: ``family`` is zb (ours), 1f1b (ours, whole backward), torch, floor
    (the zero-bubble plan) or floor-1f1b (the 1F1B/interleaved plan)."""

    name: str
    family: str
    v: int
    overlap: bool = False
    split: str = "autograd"
    torch_class: str = ""


TORCH_ZB = {"ScheduleInterleavedZeroBubble": "looped", "ScheduleZBVZeroBubble": "v", "ScheduleDualPipeV": "v"}


def _lineup(only: list[str] | None = None) -> list[_Entry]:
    """Every contender of the zero-bubble mode, in one alternating run (``only``: those whose name
    contains one of these strings)."""
    out = []
    for v in (1, 2):
        for split in ("autograd", "module"):
            for overlap in (False, True):
                out.append(_Entry(f"ours ZB v{v} {split}{' +ov' if overlap else ''}", "zb", v, overlap, split))
    out += [_Entry("torch InterleavedZB v1", "torch", 1, torch_class="ScheduleInterleavedZeroBubble"),
            _Entry("torch InterleavedZB v2", "torch", 2, torch_class="ScheduleInterleavedZeroBubble"),
            _Entry("torch ZBVZeroBubble v2", "torch", 2, torch_class="ScheduleZBVZeroBubble"),
            _Entry("torch DualPipeV v2", "torch", 2, torch_class="ScheduleDualPipeV")]
    for v in (1, 2):
        for overlap in (False, True):
            out.append(_Entry(f"ours {'1F1B' if v == 1 else 'interleaved'} v{v}{' +ov' if overlap else ''}", "1f1b", v, overlap))
    out += [_Entry(f"floor ZB v{v} (raw gloo)", "floor", v) for v in (1, 2)]
    # The same floor for the plans without a split: what this machine allows our 1F1B and
    # interleaved rows, and so how much of the formula's zero-bubble gain it allows.
    out += [_Entry(f"floor {'1F1B' if v == 1 else 'interleaved'} v{v}", "floor-1f1b", v) for v in (1, 2)]
    return [e for e in out if not only or any(s in e.name for s in only)]


def _zb_data(m: int) -> list[torch.Tensor]:
    """The microbatches, the same on every rank and for every contender (so gradients compare)."""
    gen = torch.Generator().manual_seed(1000 + m)
    return [torch.randn(BATCH, SEQ, HIDDEN, generator=gen) for _ in range(m)]


def _forward_step_func(target: torch.Tensor) -> Any:
    def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
        x = model.input_tensor if model.input_tensor is not None else next(data_iterator)
        return model(x), lambda output: (_loss(output, target), {})

    return forward_step


def _ours_zb(entry: _Entry, m: int, chunks: list[SplitSleepChunk], rank: int, data: list[torch.Tensor],
             recv_window: int | None = None) -> _Contender:
    import pipeschedule as ps

    window = {} if recv_window is None else {"overlap_recv_window": recv_window}  # None: the config's default
    config = ps.PipelineConfig(pipeline_dtype=torch.float32, overlap_p2p_comm=entry.overlap, weight_grad_split=entry.split, **window)
    forward_step = _forward_step_func(torch.zeros(BATCH, SEQ, HIDDEN))

    def run() -> None:
        ps.forward_backward_pipelining_zero_bubble(
            forward_step_func=forward_step, data_iterator=[iter(data) if rank == 0 and c == 0 else None for c in range(entry.v)],
            model=chunks, num_microbatches=m, tensor_shape=(BATCH, SEQ, HIDDEN), config=config,
        )

    return _Contender(entry.name, run, chunks, defer=entry.split == "module")


def _torch_zb(entry: _Entry, m: int, chunks: list[SplitSleepChunk], rank: int, data: list[torch.Tensor]) -> _Contender:
    """torch's zero-bubble schedules as their docs build them: a PipelineStage per local stage, loss_fn."""
    from torch.distributed import pipelining

    n = len(chunks)
    # Looped: rank r holds stages r, p + r; V-shaped: r and 2p - 1 - r.
    indices = [rank] if n == 1 else [rank, 2 * P - 1 - rank] if TORCH_ZB[entry.torch_class] == "v" else [rank, P + rank]
    stages = [pipelining.PipelineStage(chunk, stage_index=i, num_stages=P * n, device=torch.device("cpu"))
              for chunk, i in zip(chunks, indices)]
    schedule = getattr(pipelining, entry.torch_class)(stages, n_microbatches=m, loss_fn=_loss)
    whole = torch.cat(data)  # split along dim 0 into the same m microbatches
    target = torch.zeros(BATCH * m, SEQ, HIDDEN)
    first, last = 0 in indices, P * n - 1 in indices

    def run() -> None:
        schedule.step(*([whole] if first else []), **({"target": target, "losses": []} if last else {}))

    return _Contender(entry.name, run, chunks)


def _zb_contender(entry: _Entry, setup: ZbSetup, chunks: list[SplitSleepChunk], rank: int, data: list[torch.Tensor],
                  recv_window: int | None = None) -> _Contender:
    like = Setup(v=entry.v, m=setup.m, tf=setup.tf, tb=setup.tb + setup.tw)
    if entry.family == "zb":
        return _ours_zb(entry, setup.m, chunks, rank, data, recv_window)
    if entry.family == "torch":
        return _torch_zb(entry, setup.m, chunks, rank, data)
    if entry.family == "floor":
        return _floor(like, chunks, rank, schedule="zero-bubble", data=data, name=entry.name)
    if entry.family == "floor-1f1b":
        return _floor(like, chunks, rank, data=data, name=entry.name)
    contender = _ours(like, chunks, rank, None, overlap=entry.overlap, data=data, recv_window=recv_window if entry.overlap else None)
    contender.name = entry.name
    return contender


def _reference_grads(data: list[torch.Tensor]) -> dict[torch.dtype, torch.Tensor]:
    """Every bias's gradient computed on one process, microbatch after microbatch.

    Biases are zero and each chunk adds its own, so every stage's output is its input and the
    gradient reaching every bias is the same: one bias stands for all stages.
    """
    out = {}
    for dtype in (torch.float32, torch.float64):
        bias = torch.zeros(HIDDEN, dtype=dtype, requires_grad=True)
        target = torch.zeros(BATCH, SEQ, HIDDEN, dtype=dtype)
        for x in data:
            (_loss(x.to(dtype) + bias, target) / len(data)).backward()
        out[dtype] = bias.grad
    return out


def _grad_check(chunks: list[SplitSleepChunk], reference: dict[torch.dtype, torch.Tensor]) -> list[float]:
    """[largest error against float64 relative to its largest element, chunks not bit-equal to float32]."""
    exact, worst = reference[torch.float32], reference[torch.float64]
    err, unequal = 0.0, 0
    for chunk in chunks:
        grad = chunk.bias.grad
        if grad is None:
            return [float("inf"), float(len(chunks))]
        err = max(err, float((grad.double() - worst).abs().max() / worst.abs().max()))
        unequal += not torch.equal(grad, exact)
    return [err, float(unequal)]


@contextlib.contextmanager
def _counting_pending(meter: Meter) -> Any:
    """While inside: the autograd split's pending weight passes add their bytes to ``meter.pending``."""
    from pipeschedule.runtime.split import AutogradSplit

    input_pass, weight_pass = AutogradSplit.input_pass, AutogradSplit.weight_pass
    counted: dict[int, int] = {}

    def counting_input(self: Any, *args: Any) -> Any:
        pending = input_pass(self, *args)
        counted[id(pending)] = pending.nbytes()
        meter.hold(counted[id(pending)])
        return pending

    def counting_weight(self: Any, pending: Any, chunk: int) -> None:
        weight_pass(self, pending, chunk)
        meter.pending -= counted.pop(id(pending), 0)

    AutogradSplit.input_pass, AutogradSplit.weight_pass = counting_input, counting_weight
    try:
        yield
    finally:
        AutogradSplit.input_pass, AutogradSplit.weight_pass = input_pass, weight_pass


def _zb_worker(rank: int, init_file: str, args: argparse.Namespace, setups: list[ZbSetup], results: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=P,
                            timeout=timedelta(seconds=args.p2p_timeout))
    try:
        lineup = _lineup(args.only)
        for setup in setups:
            meter = Meter()
            chunks = {v: [SplitSleepChunk(meter=meter, tf=setup.tf / v, tb=setup.tb / v, tw=setup.tw / v) for _ in range(v)]
                      for v in (1, 2)}
            data = _zb_data(setup.m)
            reference = _reference_grads(data)
            contenders = [_zb_contender(e, setup, chunks[e.v], rank, data, args.recv_window) for e in lineup]
            samples: dict[str, list[list[list[float]]]] = {c.name: [] for c in contenders}
            zero = not (setup.tf or setup.tb or setup.tw)
            reps = args.zero_reps if zero else args.reps
            for rep in range(args.warmup + reps):
                # Alternate who goes first, so a slow spell on the machine hits all alike.
                for contender in contenders[rep % len(contenders):] + contenders[: rep % len(contenders)]:
                    row = _measure(contender, meter) + _grad_check(contender.chunks, reference)
                    rows = [torch.empty(len(row), dtype=torch.float64) for _ in range(P)]
                    dist.all_gather(rows, torch.tensor(row, dtype=torch.float64))
                    if rep >= args.warmup:
                        samples[contender.name].append([r.tolist() for r in rows])
            # Bytes pending weight passes hold: one more step of each of ours, counted (untimed).
            pending = {}
            for entry, contender in zip(lineup, contenders):
                if entry.family in ("zb", "floor"):
                    with _counting_pending(meter):
                        row = torch.tensor(_measure(contender, meter)[7:8], dtype=torch.float64)
                    rows = [torch.empty_like(row) for _ in range(P)]
                    dist.all_gather(rows, row)
                    pending[entry.name] = [int(r.item()) for r in rows]
            if rank == 0:
                results.put(("setup", setup, (samples, pending)))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        results.put(("done", None, None))


def _self_test(setups: list[ZbSetup], tolerance: float = 0.3) -> bool:
    """One process: one microbatch's I and W through the library's splits take tb/v and tw/v."""
    from pipeschedule.runtime.split import AutogradSplit, ModuleSplit

    print("self-test, one process: one microbatch's input pass I and weight pass W (median of 3), ms")
    ok = True
    for tf, tb, tw in sorted({(s.tf, s.tb, s.tw) for s in setups if s.tf or s.tb or s.tw}):
        for v in (1, 2):
            chunk = SplitSleepChunk(meter=Meter(), tf=tf / v, tb=tb / v, tw=tw / v)
            for split in (AutogradSplit(["chunk 0"]), ModuleSplit([chunk])):
                chunk.defer = split.name == "module"
                times = []
                for _ in range(3):
                    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)  # a later stage's input
                    out = chunk(x)
                    start = time.perf_counter()
                    pending = split.input_pass(x, out, torch.randn_like(out), 0)
                    middle = time.perf_counter()
                    split.weight_pass(pending, 0)
                    times.append((middle - start, time.perf_counter() - middle))
                got_i = statistics.median(t[0] for t in times)
                got_w = statistics.median(t[1] for t in times)
                # Sleeps overshoot by a fraction of a millisecond: that much is allowed on top.
                good = all(abs(got - want) <= tolerance * want + 0.5e-3 for got, want in ((got_i, tb / v), (got_w, tw / v)))
                ok &= good
                print(f"  tf={tf * 1e3:g} tb={tb * 1e3:g} tw={tw * 1e3:g} v={v} {split.name:8}  I {got_i * 1e3:6.2f} "
                      f"(want {tb / v * 1e3:5.2f})  W {got_w * 1e3:6.2f} (want {tw / v * 1e3:5.2f})  {'ok' if good else 'OFF'}")
    return ok


def _formula(entry: _Entry, setup: ZbSetup) -> float:
    """The ideal step: SCHEDULES.md's closed forms, equal to pipeschedule.plan.simulate's (zero latency)."""
    total = setup.tf + setup.tb + setup.tw
    if entry.family in ("zb", "torch", "floor"):
        return setup.m * total + (P - 1) * max(setup.tf, setup.tb, setup.tf + setup.tb - setup.tw) / entry.v
    return (setup.m + (P - 1) / entry.v) * total


_WHOLE_BACKWARD = ("1f1b", "floor-1f1b")  # the families whose plans have no split


def _floor_of(entry: _Entry) -> str | None:
    """The family of the floor row an entry is measured against (of the same v), if any."""
    if entry.family == "torch":
        return None
    return "floor-1f1b" if entry.family in _WHOLE_BACKWARD else "floor"


def _plan_peaks(entry: _Entry, m: int) -> tuple[list[int], list[int]] | None:
    """Our plan's F-W and F-I peaks per rank (the same figure for a whole backward)."""
    from pipeschedule.plan import build_pipeline
    from pipeschedule.plan.check import peak_awaiting_backward, peak_live_activations

    if entry.family == "torch":
        return None
    plans = build_pipeline(p=P, v=entry.v, m=m, schedule="1f1b" if entry.family in _WHOLE_BACKWARD else "zero-bubble")
    return [peak_live_activations(p) for p in plans], [peak_awaiting_backward(p) for p in plans]


@dataclass
class _ZbRow:
    setup: ZbSetup
    entry: _Entry
    steps: list[float]
    cpu: float  # ms per step, summed over ranks, median
    fw: list[int]
    fi: list[int]
    pending: list[int] | None
    err: float
    unequal: int


def _zb_rows(setup: ZbSetup, samples: dict[str, list[list[list[float]]]], pending: dict[str, list[int]]) -> list[_ZbRow]:
    out = []
    for entry in _lineup():
        if entry.name not in samples:  # left out by --only
            continue
        steps = samples[entry.name]
        out.append(_ZbRow(
            setup, entry,
            steps=[max(r[1] for r in ranks) - min(r[0] for r in ranks) for ranks in steps],
            cpu=statistics.median(sum(r[5] for r in ranks) for ranks in steps) * 1e3,
            fw=[int(max(s[r][4] for s in steps)) for r in range(P)],
            fi=[int(max(s[r][6] for s in steps)) for r in range(P)],
            pending=pending.get(entry.name),
            err=max(r[8] for ranks in steps for r in ranks),
            unequal=int(max(sum(r[9] for r in ranks) for ranks in steps)),
        ))
    return out


def _best(rows: list[_ZbRow], pick: Any) -> float:
    """The fastest median of the rows ``pick`` takes (NaN if --only left none)."""
    return min((statistics.median(r.steps) for r in rows if pick(r.entry)), default=math.nan)


def _print_zb_table(rows: list[_ZbRow]) -> None:
    print(f"{'contender':27} {'m':>3} {'median ms (min-max)':>22} {'formula':>7} {'/form':>6} {'/tZB':>6} {'/floor':>6} "
          f"{'CPU ms':>7}  {'F-W peak (plan)':19} {'F-I peak (plan)':19} {'pending-W B':>17} {'grad':>7}")
    for row in rows:
        setup, entry = row.setup, row.entry
        same = [r for r in rows if r.setup == setup]
        med = statistics.median(row.steps)
        torch_best = _best(same, lambda e: e.family == "torch")
        floor = [r for r in same if r.entry.family == _floor_of(entry) and r.entry.v == entry.v]
        vs_floor = f"{med / statistics.median(floor[0].steps):6.3f}" if floor else "     -"
        plan = _plan_peaks(entry, setup.m)
        fw = "/".join(map(str, row.fw)) + (f" ({'/'.join(map(str, plan[0]))})" if plan else "")
        fi = "/".join(map(str, row.fi)) + (f" ({'/'.join(map(str, plan[1]))})" if plan else "")
        pend = "/".join(map(str, row.pending)) if row.pending is not None else "-"
        grad = "exact" if row.unequal == 0 else f"{row.err:.0e}"
        formula = _formula(entry, setup)
        ratio = f"{med / formula:6.3f}" if formula else "     -"
        spread = f"{med * 1e3:6.1f} ({min(row.steps) * 1e3:.1f}-{max(row.steps) * 1e3:.1f})"
        print(f"{entry.name:27} {setup.m:>3} {spread:>22} {formula * 1e3:7.1f} {ratio} {med / torch_best:6.3f} {vs_floor} "
              f"{row.cpu:7.1f}  {fw:19} {fi:19} {pend:>17} {grad:>7}")


def _zb_targets(rows: list[_ZbRow]) -> list[tuple[str, bool]]:
    """The targets at the largest m, per cost setting with a weight half; (what, met)."""
    out = []
    m = max(r.setup.m for r in rows)
    for setup in sorted({r.setup for r in rows if r.setup.m == m and r.setup.tw}, key=lambda s: (s.tb, s.tw)):
        same = [r for r in rows if r.setup == setup]
        ours = _best(same, lambda e: e.family == "zb")
        torch_best = _best(same, lambda e: e.family == "torch")
        ours2 = _best(same, lambda e: e.family == "zb" and e.v == 2)
        torch2 = _best(same, lambda e: e.name == "torch InterleavedZB v2")
        torch2_any = _best(same, lambda e: e.family == "torch" and e.v == 2)
        where = f"m={m} tf={setup.tf * 1e3:g} tb={setup.tb * 1e3:g} tw={setup.tw * 1e3:g}"
        out.append((f"{where}: best ours ZB / best torch ZB = {ours / torch_best:.3f} (target <= 0.95)", ours <= 0.95 * torch_best))
        out.append((f"{where}: best ours ZB v2 / torch InterleavedZB v2 = {ours2 / torch2:.3f} (target <= 0.90; "
                     f"/ best torch v2 schedule {ours2 / torch2_any:.3f})", ours2 <= 0.90 * torch2))
        for v, base in ((1, "1F1B"), (2, "interleaved")):
            zb = next(r.entry for r in same if r.entry.family == "zb" and r.entry.v == v)
            whole = next(r.entry for r in same if r.entry.family == "1f1b" and r.entry.v == v)
            predicted = _formula(whole, setup) - _formula(zb, setup)
            gain = _best(same, lambda e, v=v: e.family == "1f1b" and e.v == v) - _best(same, lambda e, v=v: e.family == "zb" and e.v == v)
            allowed = _best(same, lambda e, v=v: e.family == "floor-1f1b" and e.v == v) - _best(
                same, lambda e, v=v: e.family == "floor" and e.v == v)
            out.append((f"{where}: best ours ZB v{v} gains {gain * 1e3:.1f} ms on best ours {base} (formula {predicted * 1e3:.1f}, "
                        f"target >= {predicted / 2 * 1e3:.1f}; the floors: {allowed * 1e3:.1f})", gain >= predicted / 2))
    return out


def _zb_main(args: argparse.Namespace) -> int:
    costs = [(5.0, 5.0, 5.0), (5.0, 6.0, 4.0), (5.0, 10.0, 0.0), (0.0, 0.0, 0.0)] if args.zb_costs is None else [
        tuple(float(x) for x in c.split(",")) for c in args.zb_costs]
    setups = [ZbSetup(m=m, tf=tf / 1e3, tb=tb / 1e3, tw=tw / 1e3) for tf, tb, tw in costs for m in args.m]
    if not _self_test(setups):
        print("error: the sleep model's split is off by more than 30 %; the timings would mean nothing", file=sys.stderr)
        return 1
    load_before = os.getloadavg()[0]
    collected: list[_ZbRow] = []

    def take(setup: ZbSetup, payload: Any) -> None:
        collected.extend(_zb_rows(setup, *payload))
        print(f"  measured m={setup.m} tf={setup.tf * 1e3:g} tb={setup.tb * 1e3:g} tw={setup.tw * 1e3:g} ms", file=sys.stderr)

    if not _run_workers(_zb_worker, args, setups, take):
        return 1
    print(f"\np={P}, activation {BATCH}x{SEQ}x{HIDDEN} float32, gloo, {os.cpu_count()} cores "
          f"(load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end); "
          f"{args.warmup} warmup + {args.reps} measured steps each ({args.zero_reps} at zero compute), all contenders alternating")
    print("median step ms; formula m(tf+tb+tw) + (p-1)max(tf,tb,tf+tb-tw)/v for zero bubble, (m+(p-1)/v)(tf+tb+tw) for "
          "1F1B/interleaved; /tZB: against the best torch zero-bubble row; /floor: the floor of the same v and plan (zero "
          "bubble, or 1F1B/interleaved); CPU ms: per step, "
          "all 4 ranks; F-W, F-I: most chunk-activations held until their W / I per rank (our plan's); pending-W B: most "
          "bytes pending weight passes hold per rank (captured gradients, or the queued ones); grad: bias gradients bit-equal "
          "to one process in float32 ('exact'), else the largest error against float64, relative")
    for cost in sorted({(r.setup.tf, r.setup.tb, r.setup.tw) for r in collected}, key=lambda c: (-c[0], c[1], -c[2])):
        tf, tb, tw = cost
        print(f"\ntf={tf * 1e3:g} tb={tb * 1e3:g} tw={tw * 1e3:g} ms" + ("  (zero compute)" if not any(cost) else
                                                                         "  (control: no weight half)" if not tw else ""))
        _print_zb_table([r for r in collected if (r.setup.tf, r.setup.tb, r.setup.tw) == cost])
    control = [r for r in collected if r.setup.tw == 0 and (r.setup.tf or r.setup.tb)]
    if control:
        print("\ncontrol (tw=0), best ours ZB / best ours 1F1B-interleaved of the same v: " + ", ".join(
            f"v{v} m{m} {_best([r for r in control if r.setup.m == m], lambda e, v=v: e.family == 'zb' and e.v == v) / _best([r for r in control if r.setup.m == m], lambda e, v=v: e.family == '1f1b' and e.v == v):.3f}"
            for m in sorted({r.setup.m for r in control}) for v in (1, 2)))
    targets = _zb_targets(collected) if not args.only else []  # the targets need the whole line-up
    if targets:
        print("\ntargets")
        for what, met in targets:
            print(f"  {'met    ' if met else 'NOT met'}  {what}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["sleep", "zero", "both", "zb"], default="both",
                        help="zb: the zero-bubble comparison (its own costs, --zb-costs; v is 1 and 2)")
    parser.add_argument("--zb-costs", nargs="+", default=None, metavar="TF,TB,TW",
                        help="zero-bubble mode: ms per microbatch on one rank (default 5,5,5 5,6,4 5,10,0 0,0,0)")
    parser.add_argument("--tf", type=float, default=5.0, help="forward ms of a microbatch on one rank")
    parser.add_argument("--tb", type=float, default=10.0, help="backward ms of a microbatch on one rank")
    parser.add_argument("--v", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--m", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--reps", type=int, default=15, help="measured steps per schedule and configuration")
    parser.add_argument("--zero-reps", type=int, default=None,
                        help="measured steps in the zero-compute mode (default 40; in the zb mode, --reps)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--png", default=None, help="timeline of one measured step (largest v and m)")
    parser.add_argument("--trace", default=None, help="Chrome trace JSON of one measured step")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before the run is abandoned (default 600; in the zb mode, 1800)")
    parser.add_argument("--p2p-timeout", type=float, default=60.0)
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="zb mode: only the contenders whose name contains one of these (no targets then)")
    parser.add_argument("--recv-window", type=int, default=None,
                        help="config.overlap_recv_window of our overlapped contenders (default: the config's)")
    return parser


def _run_workers(target: Any, args: argparse.Namespace, setups: list[Any], take: Any) -> bool:
    """Spawn the P gloo processes running ``target``; ``take(setup, payload)`` per configuration done.

    False (after an error on stderr) if a worker died or the run took over ``args.timeout``.
    """
    ctx = mp.get_context("spawn")
    fd, init_file = tempfile.mkstemp(prefix="pipeschedule-bench-")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, init_file, args, setups, results), daemon=True) for r in range(P)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + args.timeout
    try:
        while True:
            try:
                kind, setup, payload = results.get(timeout=max(1.0, min(5.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [r for r, proc in enumerate(procs) if proc.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    print(f"error: benchmark stopped (dead workers {dead}, or over {args.timeout:.0f}s)", file=sys.stderr)
                    return False
                continue
            if kind == "done":
                return True
            take(setup, payload)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        if os.path.exists(init_file):
            os.unlink(init_file)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    zb = args.mode == "zb"
    if args.zero_reps is None:
        args.zero_reps = args.reps if zb else 40
    if args.timeout is None:
        args.timeout = 1800.0 if zb else 600.0
    if zb:
        return _zb_main(args)
    setups = []
    for mode in (["sleep", "zero"] if args.mode == "both" else [args.mode]):
        tf, tb = (args.tf / 1e3, args.tb / 1e3) if mode == "sleep" else (0.0, 0.0)
        setups += [Setup(v=v, m=m, tf=tf, tb=tb) for v in args.v for m in args.m]
    load_before = os.getloadavg()[0]  # other work on the machine is the main source of noise
    collected: list[_Row] = []
    memories: list[tuple[Setup, list[list[int | None]]]] = []
    paths: list[tuple[Setup, list[float]]] = []

    def take(setup: Setup, payload: Any) -> None:
        samples, memory, path = payload
        collected.extend(_rows(setup, samples))
        if path is not None:
            paths.append((setup, path))
        if memory is not None:
            memories.append((setup, memory))
        print(f"  measured v={setup.v} m={setup.m} tf={setup.tf * 1e3:g} ms tb={setup.tb * 1e3:g} ms", file=sys.stderr)

    if not _run_workers(_worker, args, setups, take):
        return 1
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
