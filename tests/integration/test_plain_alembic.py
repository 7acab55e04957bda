"""No lock-in: the shipped migrations run with plain Alembic, online and offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import ROOT

pytestmark = pytest.mark.integration

ALEMBIC = [str(Path(sys.executable).parent / "alembic"), "-c", str(ROOT / "migrations" / "alembic.ini")]


def test_plain_alembic_upgrades_downgrades_and_renders_sql(env):
    environ = {**os.environ, "DATABASE_URL": env.url}
    up = subprocess.run([*ALEMBIC, "upgrade", "head"], capture_output=True, text=True, env=environ, cwd=ROOT)
    assert up.returncode == 0, up.stderr
    assert env.revision() == "011"
    assert env.sql("SELECT count(*) FROM pg_namespace WHERE nspname = 'dbagent'")[0][0] == 0  # dbagent not needed
    down = subprocess.run([*ALEMBIC, "downgrade", "base"], capture_output=True, text=True, env=environ, cwd=ROOT)
    assert down.returncode == 0 and env.revision() is None
    offline = subprocess.run([*ALEMBIC, "upgrade", "head", "--sql"], capture_output=True, text=True, env=environ, cwd=ROOT)
    assert offline.returncode == 0
    assert offline.stdout.count("BEGIN;") >= 11 and "CREATE TABLE roles" in offline.stdout  # one transaction per migration
    assert "CREATE INDEX CONCURRENTLY ix_user_sessions_user_id" in offline.stdout
    assert env.revision() is None  # --sql touched nothing
