"""The layout keeps its direction: the pure core (agent/core/) imports nothing that does I/O and nothing outside
itself, so every other part can build on it."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "agent" / "core"
OURS = ("dbagent",)
# The folders of the import package dbagent: agent/ is dbagent, worker/ is dbagent.worker.
FOLDERS = {"agent": "dbagent", "worker": "dbagent.worker"}
CORE_MODULES = sorted(f"dbagent.core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
# Libraries that talk to a server, a process or the network.
IO_LIBRARIES = ("redis", "psycopg", "sqlalchemy", "celery", "kombu", "alembic", "httpx", "fastapi", "starlette",
                "uvicorn", "sentry_sdk", "socketserver", "http.client", "urllib.request")


def test_the_core_has_its_modules():
    assert {"dbagent.core.commands", "dbagent.core.events", "dbagent.core.lifecycle", "dbagent.core.lockmodes"} <= set(CORE_MODULES)


@pytest.mark.parametrize("module", CORE_MODULES)
def test_a_core_module_loads_no_io_library(module):
    code = f"import sys, json; import {module}; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    found = [m for m in loaded if any(m == lib or m.startswith(lib + ".") for lib in IO_LIBRARIES)]
    assert not found, f"{module} loads {found}"


def _path_of(dotted: str) -> Path:
    parts = dotted.split(".")
    if parts[:2] == ["dbagent", "worker"]:
        return ROOT.joinpath("worker", *parts[2:])
    return ROOT.joinpath("agent", *parts[1:])


def _is_module(dotted: str) -> bool:
    path = _path_of(dotted)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _runtime_imports(path: Path, *, lazy: bool = True) -> list[str]:
    """The dbagent modules a file imports when it runs (not those under ``if TYPE_CHECKING:``).

    ``from dbagent.postgres import store`` counts as ``dbagent.postgres.store``; ``lazy=False`` leaves out the
    imports inside functions (those run only when the function does).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    if not lazy:
        skipped |= {id(n) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    for n in ast.walk(node)}
    names = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] in OURS:
            subs = [f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
            names += subs or [node.module]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] in OURS]
    return names


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_the_core_imports_only_the_core(path):
    outside = [m for m in _runtime_imports(path) if not (m == "dbagent.core" or m.startswith("dbagent.core."))]
    assert not outside, f"{path.name} imports {outside}"


BUS = ROOT / "agent" / "bus"
POSTGRES_AND_ALEMBIC = ("sqlalchemy", "psycopg", "alembic", "fastapi")


@pytest.mark.parametrize("module", sorted(f"dbagent.bus.{p.stem}" for p in BUS.glob("*.py") if p.stem != "__init__"))
def test_the_redis_side_loads_neither_postgresql_nor_alembic(module):
    # A producer (the CLI, a deploy system's hook) needs Redis alone; reading an outcome from PostgreSQL
    # when Redis has none imports the store only then.
    code = f"import sys, json; import {module}; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    found = sorted({m.split(".")[0] for m in loaded if m.split(".")[0] in POSTGRES_AND_ALEMBIC})
    assert not found, f"{module} loads {found}"


@pytest.mark.parametrize("path", sorted(BUS.glob("*.py")), ids=lambda p: p.name)
def test_the_redis_side_imports_only_the_core_the_configuration_and_itself(path):
    allowed = ("dbagent.core", "dbagent.bus", "dbagent.settings")
    outside = [m for m in _runtime_imports(path) if not any(m == a or m.startswith(a + ".") for a in allowed)]
    # Imports inside functions (the lazy fallbacks) count too: list them here when one is really needed.
    assert set(outside) <= {"dbagent.postgres.store", "dbagent.postgres.connections"}, f"{path.name} imports {outside}"


@pytest.mark.parametrize("path", sorted(p for d in ("agent", "worker") for p in (ROOT / d).rglob("*.py")
                                        if "interfaces" not in p.parts), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_imports_the_interfaces(path):
    # The CLI, the HTTP API and Slack sit on top: what they call must work without them (a worker, the agent).
    found = [m for m in _runtime_imports(path) if m == "dbagent.interfaces" or m.startswith("dbagent.interfaces.")]
    assert not found, f"{path.relative_to(ROOT)} imports {found}"


# Who may import whom: each part and the parts it builds on. The arrows point one way, from the front ends
# and the worker down to the pure core, so each layer can be used (and tested) without those above it.
LAYERS = {
    "dbagent.core": (),
    "dbagent.settings": ("dbagent.core",),
    "dbagent.backfill": ("dbagent.core", "dbagent.postgres"),  # its SQL is the store's
    "dbagent.monitoring": ("dbagent.core", "dbagent.settings"),
    "dbagent.postgres": ("dbagent.core", "dbagent.settings"),
    "dbagent.bus": ("dbagent.core", "dbagent.settings"),
    "dbagent.checks": ("dbagent.core", "dbagent.settings", "dbagent.postgres"),
    "dbagent.demo": ("dbagent.core", "dbagent.postgres"),
    "dbagent.operations": ("dbagent.core", "dbagent.settings", "dbagent.monitoring", "dbagent.postgres", "dbagent.bus", "dbagent.checks"),
    "dbagent.reactor": ("dbagent.core", "dbagent.settings", "dbagent.monitoring", "dbagent.postgres", "dbagent.bus", "dbagent.operations"),
    "dbagent.worker": ("dbagent.core", "dbagent.settings", "dbagent.monitoring", "dbagent.postgres", "dbagent.bus", "dbagent.operations"),
    "dbagent.interfaces": ("dbagent.core", "dbagent.settings", "dbagent.monitoring", "dbagent.postgres", "dbagent.bus",
                         "dbagent.checks", "dbagent.operations", "dbagent.reactor", "dbagent.demo", "dbagent.worker"),
}
# The lazy exceptions, each for a reason: a producer reads an outcome Redis lost from the database's record.
LAZY_EXCEPTIONS = {("dbagent.bus", "dbagent.postgres.store"), ("dbagent.bus", "dbagent.postgres.connections")}
SOURCES = sorted(p for d in FOLDERS for p in (ROOT / d).rglob("*.py"))


def _module_of(path: Path) -> str:
    folder, *parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join([FOLDERS[folder], *parts])


def _part_of(module: str) -> str:
    return max((part for part in LAYERS if module == part or module.startswith(part + ".")), key=len, default=module)


def test_every_module_belongs_to_a_part():
    assert [m for m in map(_module_of, SOURCES) if _part_of(m) not in LAYERS and m not in ("dbagent", "dbagent._alias")] == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
    module = _module_of(path)
    if module in ("dbagent", "dbagent._alias"):
        return
    part = _part_of(module)
    allowed = (part, *LAYERS[part])
    wrong = [m for m in _runtime_imports(path)
             if m != "dbagent" and _part_of(m) not in allowed and (part, m) not in LAZY_EXCEPTIONS]
    assert not wrong, f"{module} ({part}) imports {wrong}; it may build on {', '.join(LAYERS[part]) or 'nothing'}"


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    circles = []
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt):], nxt])
            elif nxt in graph and not state.get(nxt):
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])
    return circles


def test_no_module_imports_itself_through_a_circle():
    # Lazy imports (inside functions) count: a circle through one is still a circle in the design.
    graph = {_module_of(p): {m for m in _runtime_imports(p) if m not in (_module_of(p), "dbagent")} for p in SOURCES}
    circles = _circles(graph)
    assert circles == [], " ; ".join(" -> ".join(c) for c in circles)


def test_a_circle_is_seen():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_the_layering_test_sees_a_wrong_import(tmp_path):
    # The checks above read the source: a core module importing the store would be caught.
    wrong = tmp_path / "bad.py"
    wrong.write_text("from dbagent.postgres import store\nfrom dbagent.core import events\n")
    assert _runtime_imports(wrong) == ["dbagent.postgres.store", "dbagent.core.events"]
    assert _part_of("dbagent.postgres.store") not in ("dbagent.core", *LAYERS["dbagent.core"])


SQL_ON_OUR_SCHEMA = re.compile(
    r"\b(FROM|INTO|UPDATE|JOIN|TABLE|EXISTS)\s+(dbagent|\{(store\.)?SCHEMA\})\.(audit_log|commands|changelog|backfills|fencing_token)\b"
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_store_alone_has_sql_on_the_dbagent_schema(path):
    if path == ROOT / "agent" / "postgres" / "store.py":
        assert SQL_ON_OUR_SCHEMA.search(path.read_text(encoding="utf-8"))  # the pattern sees the store's own SQL
        return
    found = [m.group(0) for m in SQL_ON_OUR_SCHEMA.finditer(path.read_text(encoding="utf-8"))]
    assert found == [], f"{path.relative_to(ROOT)}: {found}; SQL on the dbagent schema belongs in agent/postgres/store.py"
