"""Lock-timeout retries and non-transactional steps, on real PostgreSQL through a real worker.

A step that needs ACCESS EXCLUSIVE on ``users`` while a long transaction holds
ACCESS SHARE on it must wait without stalling the application: short
lock_timeouts, retries with backoff, ``lock.waiting`` naming the blocker, and
other sessions' reads measured to keep answering meanwhile.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import psycopg
import pytest

from tests.faults.test_faults import wait_for
from tests.servers import ADD_USERS_NICKNAME, ROOT, copy_migrations, script

pytestmark = pytest.mark.integration

UNIQUE_TAGS_CONCURRENTLY = '''"""A unique index on tags(v), built concurrently."""
from alembic import op

revision = "012"
down_revision = "011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("CREATE UNIQUE INDEX CONCURRENTLY tags_v_unique ON tags (v)")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS tags_v_unique")
'''


class Reader(threading.Thread):
    """The application: reads users in a loop on its own connection and times every query."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.latencies: list[tuple[float, float]] = []  # (started at, seconds)
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True, application_name="the application") as conn:
            while not self.stop.is_set():
                started = time.monotonic()
                conn.execute("SELECT count(*) FROM users").fetchone()
                self.latencies.append((started, time.monotonic() - started))
                time.sleep(0.02)

    def between(self, start: float, end: float) -> list[float]:
        return [s for t, s in self.latencies if start <= t <= end]


def table_lock_waits(env, redis_client) -> list[dict]:
    return [e for e in env.stream_events(redis_client) if e["type"] == "lock.waiting" and e["data"].get("guard") == "table_locks"]


def migrate_in_background(env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(env.config), "migrate", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.environ(), cwd=ROOT,
    )


def hold_users(env, application_name: str) -> psycopg.Connection:
    holder = psycopg.connect(env.url, application_name=application_name)
    holder.execute("SELECT count(*) FROM users")  # ACCESS SHARE on users, held by an open transaction
    return holder


def assert_blocker_named(data: dict, holder_pid: int, application_name: str) -> None:
    assert data["revision"] == "012" and data["tables"] == {"users": "AccessExclusiveLock"}
    blocker = data["blockers"][0]
    assert blocker["pid"] == holder_pid and blocker["application_name"] == application_name
    assert "count(*) FROM users" in blocker["query"] and blocker["state"] == "idle in transaction"
    assert blocker["xact_age_s"] > 0 and blocker["locks"][0]["mode"] == "AccessShareLock"


@dataclass
class HeldMigration:
    """A migrate run while a long transaction holds users, with the application reading throughout."""

    returncode: int
    stderr: str
    holder_pid: int
    reads: list[float]  # latencies of the reads made while the transaction held users
    held_s: float


def migrate_while_users_is_held(env, redis_client, *, waits: int, then_hold_s: float = 0.0) -> HeldMigration:
    """Hold users, migrate, release once the step has waited ``waits`` times (and ``then_hold_s`` more)."""
    env.migrations = copy_migrations(env.tmp, {"012_add_users_nickname.py": ADD_USERS_NICKNAME})
    env.start_worker()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    reader = Reader(env.url)
    reader.start()
    holder = hold_users(env, "long report")
    holder_pid = holder.info.backend_pid
    held_from = time.monotonic()
    run = migrate_in_background(env)
    try:
        wait_for(lambda: len(table_lock_waits(env, redis_client)) >= waits, 60, f"{waits} lock.waiting events")
        time.sleep(then_hold_s)
    finally:
        holder.rollback()
        holder.close()
    held_until = time.monotonic()
    _, err = run.communicate(timeout=60)
    reader.stop.set()
    reader.join(timeout=10)
    return HeldMigration(run.returncode, err, holder_pid, reader.between(held_from, held_until), held_until - held_from)


def test_a_step_behind_a_long_transaction_waits_it_out_and_the_application_never_queues(env, tmp_path, redis_client):
    env.extra_config = 'lock_retry_pause = "200ms"\nlock_retry_max_pause = "400ms"\nlock_retries = 60'
    # the long transaction goes on 2 s after the step started waiting; the application must not notice
    held = migrate_while_users_is_held(env, redis_client, waits=3, then_hold_s=2.0)

    assert held.returncode == 0, held.stderr
    assert env.revision() == "012"
    assert env.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'users' AND column_name = 'nickname'") == [(1,)]
    waits = table_lock_waits(env, redis_client)
    assert [e["data"]["attempt"] for e in waits] == list(range(1, len(waits) + 1))
    # The transaction had been open longer than lock_holder_grace: the step never asked for its lock,
    # so nothing queued behind it.
    assert all(e["data"]["tried"] is False for e in waits)
    for e in waits:
        assert_blocker_named(e["data"], held.holder_pid, "long report")
    assert env.sql("SELECT count(*) FROM dbagent.audit_log WHERE type = 'lock.waiting'")[0][0] >= len(waits)

    # Measured: the application's reads went on at full speed while the migration waited.
    during = held.reads
    assert held.held_s >= 3.0
    assert len(during) >= 50, f"only {len(during)} reads answered in {held.held_s:.1f}s"
    assert max(during) < 0.5, f"a read waited {max(during):.2f}s behind the migration"
    assert statistics.median(during) < 0.05


def test_a_step_that_times_out_on_its_lock_is_retried_with_growing_timeouts_and_succeeds(env, tmp_path, redis_client):
    # No grace: every attempt asks for the lock and times out while the transaction lasts.
    env.lock_timeout = "500ms"
    env.extra_config = ('lock_holder_grace = "1h"\nlock_timeout_max = "1s"\nlock_retry_pause = "200ms"\n'
                        'lock_retry_max_pause = "300ms"\nlock_retries = 60')
    held = migrate_while_users_is_held(env, redis_client, waits=3)

    assert held.returncode == 0, held.stderr
    assert env.revision() == "012"
    waits = [e["data"] for e in table_lock_waits(env, redis_client)]
    assert all(d["tried"] for d in waits)
    assert [d["lock_timeout_ms"] for d in waits[:3]] == [500, 750, 1000]  # growing, capped at lock_timeout_max
    assert all(0 < d["retry_in_ms"] <= 300 for d in waits)
    assert_blocker_named(waits[0], held.holder_pid, "long report")
    step = env.sql("SELECT outcome FROM dbagent.changelog WHERE revision = '012'")
    assert step == [("applied",)]  # the timed-out attempts rolled back; one step applied

    # Measured: a read queues behind an attempt for at most that attempt's lock_timeout, then goes on.
    during = held.reads
    assert during and max(during) < 1.5, f"a read waited {max(during):.2f}s behind the migration"
    assert sum(during) < held.held_s  # not one long stall: plain Alembic would hold every read


def test_a_step_that_never_gets_its_locks_fails_at_the_previous_revision_naming_the_blocker(env, tmp_path, redis_client):
    env.lock_timeout = "200ms"
    env.extra_config = 'lock_timeout_max = "300ms"\nlock_retry_pause = "100ms"\nlock_retry_max_pause = "200ms"\nlock_retries = 4'
    env.migrations = copy_migrations(tmp_path, {"012_add_users_nickname.py": ADD_USERS_NICKNAME})
    env.start_worker()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    with psycopg.connect(env.url, application_name="forgotten session") as holder:
        holder.execute("SELECT count(*) FROM users")
        holder_pid = holder.info.backend_pid
        result = env.cli("migrate", "--json")
        holder.rollback()
    assert result.code == 1
    body = result.json()
    assert body["status"] == "failed" and body["revision_after"] == "011"
    assert "could not get the locks it needs in 4 attempt(s)" in body["error"]
    assert f"pid {holder_pid} (forgotten session, idle in transaction" in body["error"]
    assert env.revision() == "011"
    waits = table_lock_waits(env, redis_client)
    assert [e["data"]["attempt"] for e in waits] == [1, 2, 3]
    failed = [e for e in env.stream_events(redis_client) if e["type"] == "migration.failed"]
    assert failed and "forgotten session" in failed[0]["data"]["error"]
    assert env.sql("SELECT outcome FROM dbagent.changelog WHERE revision = '012'") == [("failed",)]


def test_a_failed_create_index_concurrently_leaves_no_invalid_index(env, tmp_path, redis_client):
    env.migrations = copy_migrations(tmp_path, {"012_unique_tags.py": UNIQUE_TAGS_CONCURRENTLY})
    env.start_worker()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    env.sql("CREATE TABLE tags (v int)")
    env.sql("INSERT INTO tags VALUES (1), (2), (2)")  # a unique index cannot be built

    result = env.cli("migrate", "--json")

    assert result.code == 1
    body = result.json()
    assert "could not create unique index" in body["error"] and body["revision_after"] == "011"
    assert body["dropped_invalid_indexes"] == ["public.tags_v_unique"]
    assert env.sql("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == [(0,)]
    assert env.sql("SELECT count(*) FROM pg_class WHERE relname = 'tags_v_unique'") == [(0,)]
    failed = [e for e in env.stream_events(redis_client) if e["type"] == "migration.failed"]
    assert failed[0]["data"]["dropped_invalid_indexes"] == ["public.tags_v_unique"]
    # The same migration goes through once the data is fixed: nothing was left in its way.
    env.sql("DELETE FROM tags WHERE ctid = (SELECT max(ctid) FROM tags WHERE v = 2)")
    assert env.cli("migrate", "--json").code == 0
    assert env.sql("SELECT indisvalid FROM pg_index WHERE indexrelid = 'tags_v_unique'::regclass") == [(True,)]


COMMITS_HALF_WAY = '''"""Creates a table, commits, then alters users: the first half is committed before the lock wait."""
from alembic import op

revision = "012"
down_revision = "011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE half_done (id int)")
    op.execute("COMMIT")  # dbagent: allow transaction-control -- this test is about what follows such a script
    op.execute("ALTER TABLE users ADD COLUMN nickname text")


def downgrade() -> None:
    op.execute("ALTER TABLE users DROP COLUMN nickname")
    op.execute("DROP TABLE half_done")
'''


def test_a_step_that_committed_part_of_its_work_is_not_retried_after_a_lock_timeout(env, tmp_path, redis_client):
    env.lock_timeout = "200ms"
    env.extra_config = 'lock_holder_grace = "1h"\nlock_retry_pause = "100ms"\nlock_retries = 5'
    env.migrations = copy_migrations(tmp_path, {"012_commits_half_way.py": COMMITS_HALF_WAY})
    env.start_worker()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    with psycopg.connect(env.url, application_name="report") as holder:
        holder.execute("SELECT count(*) FROM users")
        result = env.cli("migrate", "--json")
        holder.rollback()
    assert result.code == 1, result.stdout + result.stderr
    assert "part of it may have committed, so it is not retried" in result.json()["error"]
    assert "COMMIT at line" in result.json()["error"]
    assert table_lock_waits(env, redis_client) == []  # not one retry
    # What the script committed before the wait is there; it was not applied a second time.
    assert env.sql("SELECT count(*) FROM pg_tables WHERE tablename = 'half_done'") == [(1,)]


# A plan of three steps whose middle one needs users: the steps around it have nothing in anyone's way.
AROUND_USERS = {
    "012_add_notes.py": script("012", "011", "Add notes.", ["CREATE TABLE notes (id bigint PRIMARY KEY)"], ["DROP TABLE notes"]),
    "013_add_users_nickname.py": script(
        "013", "012", "Add users.nickname.", ["ALTER TABLE users ADD COLUMN nickname text"], ["ALTER TABLE users DROP COLUMN nickname"]
    ),
    "014_add_labels.py": script("014", "013", "Add labels.", ["CREATE TABLE labels (id bigint PRIMARY KEY)"], ["DROP TABLE labels"]),
}


@pytest.mark.parametrize("how", ["waited out", "timed out"])
def test_a_step_in_the_middle_of_a_plan_waits_with_the_steps_before_it_committed(env, tmp_path, redis_client, how):
    """The plan runs in one Alembic run until a step has a session in its way: what came before stays
    committed and recorded while it waits (or while its timed-out attempts are retried), and the plan goes
    on from that step once the session is gone, each step applied exactly once."""
    if how == "waited out":  # the pre-check sees the long transaction: no attempt asks for the lock
        env.extra_config = 'lock_retry_pause = "200ms"\nlock_retry_max_pause = "300ms"\nlock_retries = 60'
    else:  # no grace: each attempt asks for the lock and times out
        env.lock_timeout = "300ms"
        env.extra_config = ('lock_holder_grace = "1h"\nlock_timeout_max = "500ms"\nlock_retry_pause = "200ms"\n'
                            'lock_retry_max_pause = "300ms"\nlock_retries = 60')
    env.migrations = copy_migrations(tmp_path, AROUND_USERS)
    env.start_worker()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    holder = hold_users(env, "long report")
    run = migrate_in_background(env)
    try:
        wait_for(lambda: len(table_lock_waits(env, redis_client)) >= 2, 60, "2 lock.waiting events")
        # Waiting on 013: 012 is committed, recorded and announced, not held back in an open transaction.
        assert env.revision() == "012"
        assert env.sql("SELECT revision, outcome FROM dbagent.changelog WHERE revision > '011'") == [("012", "applied")]
        steps = [e["data"] for e in env.stream_events(redis_client) if e["type"] == "migration.step"]
        assert [(s["revision"], s["number"], s["of"]) for s in steps][-1:] == [("012", 1, 3)]
    finally:
        holder.rollback()
        holder.close()
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, out + err

    assert env.revision() == "014"
    waits = [e["data"] for e in table_lock_waits(env, redis_client)]
    assert {d["revision"] for d in waits} == {"013"}, waits
    assert [d["attempt"] for d in waits] == list(range(1, len(waits) + 1))
    assert all(d["tried"] is (how == "timed out") for d in waits)
    assert env.sql("SELECT revision, outcome FROM dbagent.changelog WHERE revision > '011' ORDER BY id") == [
        ("012", "applied"), ("013", "applied"), ("014", "applied")
    ]
    steps = [e["data"] for e in env.stream_events(redis_client) if e["type"] == "migration.step"]
    assert [(s["revision"], s["number"]) for s in steps][-3:] == [("012", 1), ("013", 2), ("014", 3)]
