"""Jobs that exercise the direction-named p2p helpers on the worker pool."""

from __future__ import annotations

from typing import Any

import torch


def _value(kind: str, rank: int, size: int) -> torch.Tensor:
    # Distinct per kind and sender, so a tensor in the wrong buffer shows.
    base = {"act": 100.0, "grad": 200.0}[kind] + rank
    return torch.full((2, 3), base, dtype=torch.float64)


def helper_round_trips(group_name: str, rank: int, groups: dict) -> dict[str, Any] | None:
    """Every helper once on the ring of ``group_name``; returns what each received (first element)."""
    from pool import GROUPS

    from pipeschedule.wire import p2p

    if rank not in GROUPS[group_name]:
        return None
    link = p2p.Neighbours.of(groups[group_name])
    r, size = link.rank, link.size
    spec = p2p.TensorSpec((2, 3), torch.float64, torch.device("cpu"))
    act, grad = _value("act", r, size), _value("grad", r, size)
    got: dict[str, Any] = {"rank": r, "size": size}
    got["send_forward_recv_forward"] = p2p.send_forward_recv_forward(link, act, spec)[0, 0].item()
    got["send_backward_recv_backward"] = p2p.send_backward_recv_backward(link, grad, spec)[0, 0].item()
    got["both"] = [
        t[0, 0].item()
        for t in p2p.send_forward_backward_recv_forward_backward(link, act, grad, recv_prev=spec, recv_next=spec)
    ]
    # One-way helpers: even ranks talk to the next rank, odd ranks answer (needs an even ring).
    if size % 2 == 0:
        if r % 2 == 0:
            p2p.send_forward(link, act)
            got["recv_backward"] = p2p.recv_backward(link, spec)[0, 0].item()
            got["send_forward_recv_backward"] = p2p.send_forward_recv_backward(link, act, spec)[0, 0].item()
        else:
            got["recv_forward"] = p2p.recv_forward(link, spec)[0, 0].item()
            p2p.send_backward(link, grad)
            got["send_backward_recv_forward"] = p2p.send_backward_recv_forward(link, grad, spec)[0, 0].item()
    return got


def early_wait_outlasting_timeout(delay: float, rank: int, groups: dict) -> dict[str, Any] | None:
    """Rank 0 of group 0-1 begins waiting for a tensor at once and needs it ``delay`` seconds
    later, when rank 1 sends it; each bounds its waits by ``p2p_timeout = delay / 2``."""
    import time

    import torch.distributed as dist

    from pipeschedule.wire import p2p
    from pipeschedule.wire.notice import FailureBoard

    if rank not in (0, 1):
        return None
    group = groups["0-1"]
    link = p2p.Neighbours.of(group)
    board = FailureBoard.open([group], me=f"rank {link.rank}", timeout=delay / 2)
    board.enter()
    try:
        if link.rank == 1:
            time.sleep(delay)
            work = p2p.post_send(link, torch.ones(3), 0, what=lambda: "sent", timeout=delay / 2)
            p2p.wait_bounded(work, link=link, peer=0, what="sent", timeout=delay / 2)
            return {"rank": 1}
        buffer = torch.zeros(3)
        work = p2p.post_recv(link, buffer, 1, what=lambda: "received", timeout=delay / 2)
        begun = p2p.begin_wait(work)
        time.sleep(delay)  # busy: the tensor arrives while this rank computes
        start = time.monotonic()
        p2p.wait_bounded(work, link=link, peer=1, what="received", timeout=delay / 2, begun=begun)
        return {"rank": 0, "waited": time.monotonic() - start, "got": buffer.tolist()}
    finally:
        board.leave()
        dist.barrier(group=group)
