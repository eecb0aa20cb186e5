"""The module paths of earlier releases, kept importable.

The package was once flat (``pipeschedule.show``, ``pipeschedule.p2p``, ``pipeschedule.tied``, ...).
Each old path now names the module in its layer folder: ``import pipeschedule.show`` gives the very
module object ``pipeschedule.tools.show`` (one module, so classes and module state are shared), and
``python -m pipeschedule.show`` runs it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

# old name (under pipeschedule.) -> where it lives now
MOVED = {
    "check": "plan.check",
    "simulate": "plan.simulate",
    "p2p": "wire.p2p",
    "framed": "wire.framed",
    "handshake": "wire.handshake",
    "notice": "wire.notice",
    "executor": "runtime.executor",
    "overlap": "runtime.overlap",
    "abort": "runtime.abort",
    "memory": "runtime.memory",
    "sync": "runtime.sync",
    "wrapped": "runtime.wrapped",
    "show": "tools.show",
    "trace": "tools.trace",
    "layout": "training.layout",
    "tied": "training.tied",
    "data_parallel": "training.data_parallel",
    "mixed": "training.mixed",
    "loss_report": "training.loss_report",
    "partition": "training.partition",
    "clip": "training.clip",
    "checkpoint": "training.checkpoint",
    "models": "training.models",
}


def new_name(fullname: str) -> str | None:
    """Where the module once called ``fullname`` lives now, or ``None`` if it did not move."""
    head, _, rest = fullname.partition(".")
    if head != "pipeschedule" or not rest:
        return None
    first, _, tail = rest.partition(".")
    if first not in MOVED:
        return None
    return "pipeschedule." + MOVED[first] + ("." + tail if tail else "")


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str, spec: importlib.machinery.ModuleSpec) -> None:
        self.target = target
        self.spec = spec

    def create_module(self, spec):  # the default module; replaced in exec_module
        return None

    def exec_module(self, module: ModuleType) -> None:
        # The import system returns whatever sys.modules holds under the name after this call.
        sys.modules[module.__name__] = importlib.import_module(self.target)

    def get_code(self, fullname: str):  # what ``python -m <old name>`` runs
        return self.spec.loader.get_code(self.target)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        moved = new_name(fullname)
        if moved is None:
            return None
        spec = importlib.util.find_spec(moved)
        if spec is None:
            return None
        return importlib.util.spec_from_loader(
            fullname, _Alias(moved, spec), is_package=spec.submodule_search_locations is not None
        )


def install() -> None:
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        # First: the path finder would otherwise load a moved package's submodules a second time under the old name.
        sys.meta_path.insert(0, _Finder())
