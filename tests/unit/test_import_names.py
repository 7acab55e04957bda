"""dbagent installs one import package, ``dbagent``; ``agent`` is only an alias for migration scripts written
before the rename, the very same modules, and it steps aside for anyone else's ``agent``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_the_distribution_installs_dbagent_alone():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = project["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} == {"dbagent"}
    assert project["tool"]["setuptools"]["package-dir"] == {"dbagent": "agent", "dbagent.worker": "worker"}
    assert project["project"]["scripts"]["dbagent"].startswith("dbagent.")
    # every folder with code is a package the distribution ships
    folders = {".".join(["dbagent", *p.parent.relative_to(ROOT / "agent").parts]) for p in (ROOT / "agent").rglob("__init__.py")}
    assert folders | {"dbagent.worker"} == set(packages)


def test_the_old_name_is_the_same_modules_outside_a_checkout(tmp_path):
    done = python(
        "import dbagent\n"
        "from agent.backfill import backfill\n"
        "import agent.backfill, agent.core.events, dbagent.backfill, dbagent.core.events\n"
        "assert agent.backfill is dbagent.backfill and backfill is dbagent.backfill.backfill\n"
        "assert agent.core.events.Event is dbagent.core.events.Event\n"
        "print('ok')\n",
        tmp_path,
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_the_checkout_folder_imported_as_agent_is_dbagent_not_a_copy():
    # From the repository's root, agent/ is on the import path under its folder's name.
    done = python(
        "from agent.backfill import backfill\n"
        "import sys, agent, dbagent, dbagent.backfill\n"
        "assert agent is dbagent and sys.modules['agent.backfill'] is dbagent.backfill\n"
        "assert backfill is dbagent.backfill.backfill\n"
        "print('ok')\n",
        ROOT,
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_someone_elses_agent_package_is_left_alone(tmp_path):
    theirs = tmp_path / "agent"
    theirs.mkdir()
    (theirs / "__init__.py").write_text("MINE = True\n")
    done = python(
        "import dbagent, dbagent.backfill\n"
        "import agent\n"
        "assert agent.MINE and agent is not dbagent\n"
        "try:\n"
        "    import agent.backfill\n"
        "except ModuleNotFoundError:\n"
        "    print('ok')\n",
        tmp_path,
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_without_dbagent_imported_the_old_name_is_not_installed(tmp_path):
    # Nothing named agent is installed: plain Alembic running a script needs ``dbagent.backfill``.
    done = python(
        "import importlib.util\n"
        "print(importlib.util.find_spec('agent') is None, importlib.util.find_spec('dbagent') is not None)\n",
        tmp_path,
    )
    assert done.stdout.strip() == "True True", done.stderr
