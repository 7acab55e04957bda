"""The layout keeps its direction: the pure core (agent/core/) imports nothing that does I/O and nothing outside
itself, so every other part can build on it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "agent" / "core"
CORE_MODULES = sorted(f"agent.core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
# Libraries that talk to a server, a process or the network.
IO_LIBRARIES = ("redis", "psycopg", "sqlalchemy", "celery", "kombu", "alembic", "httpx", "fastapi", "starlette",
                "uvicorn", "sentry_sdk", "socketserver", "http.client", "urllib.request")


def test_the_core_has_its_modules():
    assert {"agent.core.commands", "agent.core.events", "agent.core.lifecycle", "agent.core.lockmodes"} <= set(CORE_MODULES)


@pytest.mark.parametrize("module", CORE_MODULES)
def test_a_core_module_loads_no_io_library(module):
    code = f"import sys, json; import {module}; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    found = [m for m in loaded if any(m == lib or m.startswith(lib + ".") for lib in IO_LIBRARIES)]
    assert not found, f"{module} loads {found}"


def _runtime_imports(path: Path) -> list[str]:
    """The agent modules a file imports when it runs (not those under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    names = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "agent":  # from agent import store
            names += [f"agent.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "agent":
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "agent"]
    return names


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_the_core_imports_only_the_core(path):
    outside = [m for m in _runtime_imports(path) if not (m == "agent.core" or m.startswith("agent.core."))]
    assert not outside, f"{path.name} imports {outside}"


BUS = ROOT / "agent" / "bus"
POSTGRES_AND_ALEMBIC = ("sqlalchemy", "psycopg", "alembic", "fastapi")


@pytest.mark.parametrize("module", sorted(f"agent.bus.{p.stem}" for p in BUS.glob("*.py") if p.stem != "__init__"))
def test_the_redis_side_loads_neither_postgresql_nor_alembic(module):
    # A producer (the CLI, a deploy system's hook) needs Redis alone; reading an outcome from PostgreSQL
    # when Redis has none imports the store only then.
    code = f"import sys, json; import {module}; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    found = sorted({m.split(".")[0] for m in loaded if m.split(".")[0] in POSTGRES_AND_ALEMBIC})
    assert not found, f"{module} loads {found}"


@pytest.mark.parametrize("path", sorted(BUS.glob("*.py")), ids=lambda p: p.name)
def test_the_redis_side_imports_only_the_core_the_configuration_and_itself(path):
    allowed = ("agent.core", "agent.bus", "agent.settings")
    outside = [m for m in _runtime_imports(path) if not any(m == a or m.startswith(a + ".") for a in allowed)]
    # Imports inside functions (the lazy fallbacks) count too: list them here when one is really needed.
    assert set(outside) <= {"agent.store", "agent.connections"}, f"{path.name} imports {outside}"


@pytest.mark.parametrize("path", sorted(p for d in ("agent", "worker") for p in (ROOT / d).rglob("*.py")
                                        if "interfaces" not in p.parts), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_imports_the_interfaces(path):
    # The CLI, the HTTP API and Slack sit on top: what they call must work without them (a worker, the agent).
    found = [m for m in _runtime_imports(path) if m == "agent.interfaces" or m.startswith("agent.interfaces.")]
    assert not found, f"{path.relative_to(ROOT)} imports {found}"
