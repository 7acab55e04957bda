"""``agent`` as an alias of ``dbagent``, for migration scripts written before the rename.

dbagent's import package is ``dbagent`` (its code lives in the repository's ``agent/`` folder). Migration
scripts import the batched backfill as ``from dbagent.backfill import backfill``; those written as
``from agent.backfill import backfill`` keep working wherever dbagent has been imported (the worker, the
CLI): ``install`` puts a finder first on ``sys.meta_path`` that hands out ``dbagent``'s modules under the
old name, the same module objects (one ``backfill``, one set of hooks), never a second copy.

The alias steps aside for anyone else's ``agent``: when the import path holds another package of that name,
``import agent`` finds that one, as if dbagent were not installed.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from types import ModuleType

OLD = "agent"
NEW = "dbagent"


def _ours(spec: importlib.machinery.ModuleSpec | None) -> bool:
    """Is what the import path calls ``agent`` missing, or this very folder (a checkout's ``agent/``)?"""
    if spec is None:
        return True
    new = sys.modules.get(NEW)
    origin = getattr(new, "__file__", None)
    return bool(spec.origin and origin) and os.path.realpath(spec.origin) == os.path.realpath(origin)


class OldName:
    """Finds ``agent`` and ``agent.*`` as ``dbagent`` and ``dbagent.*``, unless ``agent`` is someone else's.

    A meta path finder and its own loader (the protocols, without importlib.abc, which costs an import of
    its own at every start of the CLI)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != OLD and not fullname.startswith(OLD + "."):
            return None
        if fullname == OLD:
            if not _ours(importlib.machinery.PathFinder.find_spec(OLD)):
                return None
        elif sys.modules.get(OLD) is not sys.modules.get(NEW):
            return None  # ``agent`` is another package: its submodules are its own
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(NEW + spec.name[len(OLD):])

    def exec_module(self, module: ModuleType) -> None:
        """The module is dbagent's, already executed."""


def install() -> None:
    if not any(isinstance(finder, OldName) for finder in sys.meta_path):
        sys.meta_path.insert(0, OldName())
