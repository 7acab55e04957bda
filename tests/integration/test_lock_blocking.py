"""lock.blocking: sessions stuck behind a migration step, or the step stuck behind a session, are named live."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest

from tests.faults.test_faults import wait_for
from tests.servers import ROOT, copy_migrations

pytestmark = pytest.mark.integration

HOLDS_USERS = '''"""Holds an exclusive lock on users for a few seconds."""
from alembic import op
revision = "012"
down_revision = "011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    op.execute("SELECT pg_sleep(4)")


def downgrade() -> None:
    pass
'''


def lock_blocking(env, redis_client):
    return [e for e in env.stream_events(redis_client) if e["type"] == "lock.blocking"]


def test_a_session_stuck_behind_a_step_is_named(env, tmp_path, redis_client):
    env.extra_config = 'lock_blocking_threshold = "1s"'
    env.migrations = copy_migrations(tmp_path, {"012_holds_users.py": HOLDS_USERS})
    env.start_worker()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    run = subprocess.Popen([sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(env.config), "migrate", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.environ(), cwd=ROOT)
    wait_for(lambda: env.sql("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(4)%%'"), 60, "the step")
    with psycopg.connect(env.url, autocommit=True, application_name="the application") as app:
        app.execute("SELECT count(*) FROM users")  # waits behind the step's lock
    run.communicate(timeout=60)
    events = lock_blocking(env, redis_client)
    assert events, "no lock.blocking event"
    data = events[0]["data"]
    assert data["direction"] == "blocking" and data["sessions"][0]["application_name"] == "the application"
    assert data["sessions"][0]["waited_s"] >= 1.0 and "count(*) FROM users" in data["sessions"][0]["query"]
    assert env.sql("SELECT count(*) FROM dbagent.audit_log WHERE type = 'lock.blocking'")[0][0] == len(events)


def test_a_step_stuck_behind_a_session_is_named(env, tmp_path, redis_client):
    # No grace: the step asks for its lock at once, and waits on the session (lock_timeout 5s).
    env.extra_config = 'lock_blocking_threshold = "1s"\nlock_holder_grace = "1h"'
    env.migrations = copy_migrations(tmp_path, {"012_holds_users.py": HOLDS_USERS.replace('op.execute("SELECT pg_sleep(4)")', "pass")})
    env.start_worker()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    holder = psycopg.connect(env.url, application_name="long report")
    holder.execute("SELECT count(*) FROM users")  # ACCESS SHARE held by an open transaction
    release = threading.Timer(3.0, holder.rollback)
    release.start()
    try:
        result = env.cli("migrate", "--json")
    finally:
        release.join()
        holder.close()
    assert result.code == 0, result.stderr  # waited politely (lock_timeout 5s) and went through
    events = [e for e in lock_blocking(env, redis_client) if e["data"]["direction"] == "waiting"]
    assert events and events[0]["data"]["sessions"][0]["application_name"] == "long report"


@pytest.mark.parametrize(
    ("grace", "tail"),
    [
        # Waited out before asking (the holder is older than the grace): lock.waiting names it.
        ("0s", "' VALID UNTIL 'infinity'"),
        # Asked at once and waited on it: lock.blocking names it; the literal is longer than the
        # 200 characters read of the query, so what is read of it never closes.
        ("1h", "-" + "x" * 300 + "'"),
    ],
    ids=["lock.waiting", "lock.blocking, cut literal"],
)
def test_a_password_in_a_blocking_session_query_reaches_no_event(env, tmp_path, redis_client, grace, tail):
    env.extra_config = f'lock_blocking_threshold = "1s"\nlock_holder_grace = "{grace}"'
    env.migrations = copy_migrations(tmp_path, {"012_holds_users.py": HOLDS_USERS.replace('op.execute("SELECT pg_sleep(4)")', "pass")})
    role = f"dbagent_leak_{uuid.uuid4().hex[:8]}"
    secret = f"S3cret{uuid.uuid4().hex}"
    env.sql(f"CREATE ROLE {role} LOGIN")
    try:
        env.start_worker()
        assert env.cli("migrate", "--to", "011", "--json").code == 0
        holder = psycopg.connect(env.url, application_name="password change")
        holder.execute("SELECT count(*) FROM users")  # ACCESS SHARE held by an open transaction
        holder.execute(f"ALTER ROLE {role} PASSWORD '{secret}{tail}")
        time.sleep(0.5)  # older than a grace of 0s for sure
        release = threading.Timer(4.0, holder.rollback)
        release.start()
        try:
            result = env.cli("migrate")
        finally:
            release.join()
            holder.close()
        assert result.code == 0, result.stderr
        events = env.stream_events(redis_client)
        audit = [row[0] for row in env.sql("SELECT data::text FROM dbagent.audit_log")]
    finally:
        env.sql(f"DROP ROLE IF EXISTS {role}")
    named = [
        session
        for e in events if e["type"] in ("lock.waiting", "lock.blocking")
        for session in e["data"].get("blockers", []) + e["data"].get("sessions", [])
        if session.get("application_name") == "password change"
    ]
    assert named, "no event named the blocking session"
    assert all(f"ALTER ROLE {role} PASSWORD ***" in s["query"] for s in named), named
    if grace == "0s":
        assert all(s["query"].endswith("*** VALID UNTIL 'infinity'") for s in named), named
        assert "blocked by pid" in result.stderr  # the CLI rendered the lock.waiting event
    everything = [result.stdout, result.stderr, *audit, *(str(e) for e in events), env.log_of(env.workers[0])]
    assert not [text for text in everything if secret[:12] in text]
