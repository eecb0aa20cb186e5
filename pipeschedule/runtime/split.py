"""The backward of a microbatch through a chunk, split into its input half ``I`` and weight half ``W``.

Zero-bubble plans run ``I`` (the gradient the previous stage waits for) early and ``W`` (the
weights' gradients, which nobody waits for) later, where it fills a wait. Two ways to split
(``config.weight_grad_split``):

* ``"autograd"`` (:class:`AutogradSplit`), any chunk, no model change. ``I`` runs the chunk's
  graph from the output gradient to the stage input only: the engine computes just what the input
  needs, so the weight-side edges of each node are skipped. While it runs, the gradient flowing
  into each *intermediate* (a node on the input's path from which a weight is reached without
  passing the input's path again, e.g. a linear layer's matmul) is captured. ``W`` then runs,
  per group of weights sharing intermediates, the graph from those intermediates with the
  captured gradients to the weights, accumulating through the weights' own ``AccumulateGrad``
  nodes: the same additions in the same order as a whole backward, so gradients are bit for bit
  those of a whole backward, and gradient hooks (Megatron's ``main_grad``, DDP's) fire as usual.
  Cost: the graph, with every tensor it saved, lives until ``W`` (a pending ``W`` holds the whole
  activation plus the captured gradients), and ``W`` makes one engine call per weight group.
  A stage whose input needs no gradient (the first stage) has nothing to split: its ``I`` does
  nothing and its ``W`` is the whole backward.
* ``"module"`` (:class:`ModuleSplit`): the chunk defers its own weight gradients, the
  ``backward_dw()`` convention of TransformerEngine and Megatron's ``delay_wgrad_compute``. ``I``
  is an ordinary backward (the layers queue their weight-gradient work) and ``W`` calls
  ``chunk.backward_dw()``, once per microbatch, in microbatch order.

What the autograd split cannot do is refused before it could give a wrong gradient: a chunk
compiled with ``torch.compile`` (checked at entry, :func:`refuse_unsplittable`) and a graph
holding a reentrant checkpoint (checked at the first forward's output, before it is sent).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import GradientEdge

__all__ = ["AutogradSplit", "ModuleSplit", "PendingWeights", "choose_split", "refuse_unsplittable"]

_engine = torch.autograd.Variable._execution_engine
# The graph nodes of a reentrant checkpoint: their backward re-runs the forward and calls
# backward itself, which an input-only pass cannot stop at the weights.
_REENTRANT = ("CheckpointFunctionBackward",)


@dataclass
class _Group:
    """Weights that share intermediates, and the gradients captured at those intermediates."""

    intermediates: list[Any]
    weights: list[torch.Tensor]
    captured: list[tuple[torch.Tensor | None, ...] | None] = field(default_factory=list)


@dataclass
class PendingWeights:
    """What a pending ``W`` needs: the output and its gradient, or the captured groups."""

    output: torch.Tensor | None
    grad: torch.Tensor | None
    groups: list[_Group] | None  # None: W is the whole backward from ``output``

    def nbytes(self) -> int:
        """Bytes of the captured gradients (the graph's saved tensors are not counted here)."""
        total = 0
        for group in self.groups or ():
            for grads in group.captured:
                total += sum(g.numel() * g.element_size() for g in grads or () if g is not None)
        if self.groups is None and self.grad is not None:
            total += self.grad.numel() * self.grad.element_size()
        return total


def _node_of(tensor: torch.Tensor) -> Any:
    """The graph node that receives ``tensor``'s gradient: its ``grad_fn``, or a leaf's ``AccumulateGrad``."""
    if tensor.grad_fn is not None:
        return tensor.grad_fn
    # A leaf's AccumulateGrad node is made lazily; a view of the leaf reaches it.
    return tensor.view_as(tensor).grad_fn.next_functions[0][0]


def _graph(root: Any) -> tuple[dict[Any, list[Any]], list[Any]]:
    """Every node reachable from ``root``: its consumers (the reverse edges), and the nodes in visit order."""
    consumers: dict[Any, list[Any]] = {root: []}
    order = [root]
    todo = [root]
    while todo:
        node = todo.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child not in consumers:
                consumers[child] = []
                order.append(child)
                todo.append(child)
            consumers[child].append(node)
    return consumers, order


def _above(start: Any, consumers: dict[Any, list[Any]]) -> set[Any]:
    """``start`` and every node from which ``start`` is reached (everything that depends on it)."""
    seen = {start}
    todo = [start]
    while todo:
        for parent in consumers[todo.pop()]:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def _groups(root: Any, input_node: Any, chunk_name: str) -> list[_Group] | None:
    """The weight groups of the graph below ``root``; ``None`` if the output does not reach the input."""
    consumers, order = _graph(root)
    for node in order:
        if type(node).__name__ in _REENTRANT:
            raise RuntimeError(
                f"{chunk_name} uses a reentrant activation checkpoint (torch.utils.checkpoint with "
                f"use_reentrant=True), whose backward cannot stop at the stage input, so the zero-bubble "
                f"schedule cannot split it into input and weight passes; use use_reentrant=False, or "
                f"config.weight_grad_split='module' with a chunk that defers its weight gradients, or another schedule"
            )
    if input_node not in consumers:
        return None
    on_path = _above(input_node, consumers)  # the input's path: nodes whose gradient the input needs
    # Each weight's intermediates: the first nodes of the input's path met walking up from it.
    parent: dict[Any, Any] = {}

    def find(x: Any) -> Any:
        while parent.setdefault(x, x) is not x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    weight_of: dict[Any, list[Any]] = {}
    for node in order:
        variable = getattr(node, "variable", None)
        if node is input_node or variable is None or not variable.requires_grad:
            continue
        seen, todo, found = {node}, [node], []
        while todo:
            for up in consumers[todo.pop()]:
                if up in seen:
                    continue
                seen.add(up)
                (found if up in on_path else todo).append(up)
        weight_of[node] = found
        for other in found[1:]:
            parent[find(other)] = find(found[0])
    groups: dict[Any, _Group] = {}
    for node, found in weight_of.items():
        if not found:
            continue
        group = groups.setdefault(find(found[0]), _Group(intermediates=[], weights=[]))
        group.weights.append(node.variable)
        for inter in found:
            if inter not in group.intermediates:
                group.intermediates.append(inter)
    return list(groups.values())


class AutogradSplit:
    """The ``"autograd"`` split: see the module docstring."""

    name = "autograd"

    def __init__(self, chunk_names: list[str]) -> None:
        self.chunk_names = chunk_names

    def check_graph(self, output: torch.Tensor, chunk: int) -> None:
        """Refuse, right after a forward, a graph the split would get wrong (a reentrant checkpoint)."""
        if output.grad_fn is not None:
            _groups(output.grad_fn, None, self.chunk_names[chunk])

    def input_pass(self, input_tensor: torch.Tensor | None, output: torch.Tensor, grad: torch.Tensor | None, chunk: int) -> PendingWeights:
        """``I``: the stage input's gradient (into ``input_tensor.grad``); returns what ``W`` needs."""
        grad = _implied(output, grad)
        if input_tensor is None or not input_tensor.requires_grad or output.grad_fn is None:
            return PendingWeights(output, grad, None)  # nothing to split: W is the whole backward
        groups = _groups(output.grad_fn, _node_of(input_tensor), self.chunk_names[chunk])
        if groups is None:  # the output does not depend on the input: W is the whole backward
            return PendingWeights(output, grad, None)
        handles = []
        for group in groups:
            group.captured = [None] * len(group.intermediates)
            for i, node in enumerate(group.intermediates):
                def capture(grad_outputs: tuple, group: _Group = group, i: int = i) -> None:
                    group.captured[i] = tuple(grad_outputs)
                handles.append(node.register_prehook(capture))
        try:
            _engine.run_backward(
                (output,), (grad,), keep_graph=True, create_graph=False, inputs=(input_tensor,), allow_unreachable=True,
                accumulate_grad=True,
            )
        finally:
            for handle in handles:
                handle.remove()
        return PendingWeights(None, None, groups)

    def weight_pass(self, pending: PendingWeights, chunk: int) -> None:
        """``W``: the weights' gradients, accumulated through their ``AccumulateGrad`` nodes."""
        if pending.groups is None:
            _engine.run_backward(
                (pending.output,), (pending.grad,), keep_graph=False, create_graph=False, inputs=(),
                allow_unreachable=True, accumulate_grad=True,
            )
            return
        for group in pending.groups:
            roots, grads = [], []
            for node, captured in zip(group.intermediates, group.captured):
                for i, g in enumerate(captured or ()):
                    if g is not None:
                        roots.append(GradientEdge(node, i))
                        grads.append(g)
            if not roots:  # nothing reached these weights in this microbatch
                continue
            handles = []
            if len(group.intermediates) > 1:
                # An intermediate below another gets, besides its own captured gradient, what the
                # one above sends down: replace its incoming gradient by the captured one.
                for node, captured in zip(group.intermediates, group.captured):
                    if captured is not None:
                        handles.append(node.register_prehook(lambda grad_outputs, saved=captured: saved))
            try:
                _engine.run_backward(
                    tuple(roots), tuple(grads), keep_graph=True, create_graph=False, inputs=tuple(group.weights),
                    allow_unreachable=True, accumulate_grad=True,
                )
            finally:
                for handle in handles:
                    handle.remove()
        pending.groups = None  # the graph goes with the last reference to its nodes


class ModuleSplit:
    """The ``"module"`` split: ``I`` is a whole backward, ``W`` is ``chunk.backward_dw()``."""

    name = "module"

    def __init__(self, owners: list[Any]) -> None:
        self.owners = owners  # per chunk: the module that has backward_dw

    def check_graph(self, output: torch.Tensor, chunk: int) -> None:
        return None

    def input_pass(self, input_tensor: torch.Tensor | None, output: torch.Tensor, grad: torch.Tensor | None, chunk: int) -> PendingWeights:
        _engine.run_backward(
            (output,), (_implied(output, grad),), keep_graph=False, create_graph=False, inputs=(), allow_unreachable=True,
            accumulate_grad=True,
        )
        return PendingWeights(None, None, [])

    def weight_pass(self, pending: PendingWeights, chunk: int) -> None:
        self.owners[chunk].backward_dw()


def _implied(output: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    if grad is not None:
        return grad
    if output.numel() != 1:
        raise RuntimeError(f"a gradient can be implied only for a one-element output, got shape {tuple(output.shape)}")
    return torch.ones_like(output, memory_format=torch.preserve_format)


def _compiled(chunk: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "OptimizedModule" for m in chunk.modules()) or hasattr(chunk, "_orig_mod")


def refuse_unsplittable(chunks: list[torch.nn.Module], mode: str) -> None:
    """Before any communication: what the chosen split cannot do, with what to change."""
    if mode != "autograd":
        return
    for i, chunk in enumerate(chunks):
        if _compiled(chunk):
            raise ValueError(
                f"model chunk {i} is compiled with torch.compile; the zero-bubble schedule's autograd split "
                f"(config.weight_grad_split='autograd') walks the autograd graph, which a compiled region hides, "
                f"and could not split its backward correctly. Pass the uncompiled module, use "
                f"config.weight_grad_split='module' with a chunk whose layers defer their weight gradients "
                f"(backward_dw()), or use the 1F1B or interleaved schedule"
            )


def choose_split(requested: str, chunks: list[torch.nn.Module], owner: Callable[[torch.nn.Module], Any]) -> AutogradSplit | ModuleSplit:
    """The split for ``config.weight_grad_split``: ``"auto"`` is ``"module"`` when every chunk has ``backward_dw``."""
    owners = [owner(chunk) for chunk in chunks]
    has = [callable(getattr(o, "backward_dw", None)) for o in owners]
    mode = requested
    if requested == "auto":
        mode = "module" if all(has) else "autograd"
    elif requested == "module" and not all(has):
        missing = [i for i, h in enumerate(has) if not h]
        raise ValueError(
            f"config.weight_grad_split='module' needs a backward_dw() method on every model chunk (it runs the "
            f"weight gradients its layers deferred); chunks {missing} have none. Add it, or use 'autograd' (any "
            f"chunk) or 'auto'"
        )
    refuse_unsplittable(chunks, mode)
    names = [f"model chunk {i}" for i in range(len(chunks))]
    return ModuleSplit(owners) if mode == "module" else AutogradSplit(names)

