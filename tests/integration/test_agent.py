"""The agent: automatic rollbacks on failure events, and the durable audit trail (real worker and agent)."""

from __future__ import annotations

import gzip
import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.faults.test_faults import wait_for
from tests.servers import copy_migrations

pytestmark = pytest.mark.integration

FAILING_012 = '''"""A migration that fails half-way."""
from alembic import op
revision = "012"
down_revision = "011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE doomed (id int)")
    op.execute("SELECT 1 / 0")


def downgrade() -> None:
    op.execute("DROP TABLE doomed")
'''

BROKEN_DOWNGRADE_012 = '''"""Applies fine; its downgrade fails."""
from alembic import op
revision = "012"
down_revision = "011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE sticky (id int)")


def downgrade() -> None:
    op.execute("DROP TABLE table_that_is_not_there")
'''

FAILING_013 = FAILING_012.replace('revision = "012"', 'revision = "013"').replace('down_revision = "011"', 'down_revision = "012"').replace("doomed", "doomed13")


def types_of(env, redis_client, command_id=None):
    return [e["type"] for e in env.stream_events(redis_client, command_id)]


def rollback_events(env, redis_client, kind):
    return [e for e in env.stream_events(redis_client) if e["type"] == kind]


def test_a_failing_migration_is_rolled_back_to_the_revision_before_the_run(env, tmp_path, redis_client):
    env.migrations = copy_migrations(tmp_path, {"012_failing.py": FAILING_012})
    env.start_worker()
    env.start_agent()
    assert env.cli("migrate", "--to", "009", "--json").code == 0
    run = env.cli("migrate", "--json")
    assert run.code == 1 and run.json()["revision_after"] == "011"
    wait_for(lambda: rollback_events(env, redis_client, "rollback.completed"), 60, "the agent's rollback")
    assert env.revision() == "009"
    assert env.sql("SELECT to_regclass('public.doomed'), to_regclass('public.settings'), to_regclass('public.notifications')") == [(None, None, "notifications")]
    order = [t for t in types_of(env, redis_client) if t in ("migration.failed", "rollback.started", "rollback.completed")]
    assert order == ["migration.failed", "rollback.started", "rollback.completed"]
    started = rollback_events(env, redis_client, "rollback.started")[0]
    assert started["actor"] == "agent" and started["data"]["cause"]["run_command_id"] == run.json()["command_id"]
    assert started["data"]["cause"]["event_type"] == "migration.failed"


def test_startup_failed_after_a_successful_run_rolls_back_to_the_pre_run_revision(env, redis_client):
    env.start_worker()
    env.start_agent()
    assert env.cli("migrate", "--to", "008", "--json").code == 0
    assert env.cli("migrate", "--json").code == 0 and env.revision() == "011"
    notify = env.cli("notify", "startup-failed", "--detail", "pods crash-looping", "--json")
    assert notify.code == 0
    wait_for(lambda: rollback_events(env, redis_client, "rollback.completed"), 60, "the agent's rollback")
    assert env.revision() == "008"
    # a second report of the same failed deploy does not roll back again
    assert env.cli("notify", "startup-failed", "--json").code == 0
    time.sleep(3)
    assert len(rollback_events(env, redis_client, "rollback.started")) == 1 and env.revision() == "008"
    assert env.sql("SELECT count(*) FROM dbagent.audit_log WHERE type = 'app.startup_failed'")[0][0] == 2


class _Sentry(BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        type(self).received.append(body)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


def test_a_failed_rollback_alerts_and_never_triggers_another(env, tmp_path, redis_client):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sentry)
    _Sentry.received = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dsn = f"http://public@127.0.0.1:{server.server_address[1]}/1"
    try:
        env.migrations = copy_migrations(tmp_path, {"012_sticky.py": BROKEN_DOWNGRADE_012, "013_failing.py": FAILING_013})
        env.start_worker()
        env.start_agent(SENTRY_DSN=dsn)
        assert env.cli("migrate", "--to", "011", "--json").code == 0
        assert env.cli("migrate", "--json").code == 1 and env.revision() == "012"
        failed = wait_for(lambda: rollback_events(env, redis_client, "rollback.failed"), 60, "the failed rollback")
        assert "restore" in failed[0]["data"]["next_step"]
        wait_for(lambda: any(b"rollback of test failed" in body for body in _Sentry.received), 30, "the Sentry alert")
        time.sleep(3)
        assert len(rollback_events(env, redis_client, "rollback.started")) == 1
        assert env.revision() == "012"
        alert = next(body for body in _Sentry.received if b"rollback of test failed" in body)
        assert b'"db":"test"' in alert.replace(b" ", b"") or b'"db": "test"' in alert
    finally:
        server.shutdown()


def test_an_agent_started_after_the_failure_still_rolls_back(env, tmp_path, redis_client):
    env.migrations = copy_migrations(tmp_path, {"012_failing.py": FAILING_012})
    env.start_worker()
    assert env.cli("migrate", "--to", "010", "--json").code == 0
    assert env.cli("migrate", "--json").code == 1 and env.revision() == "011"
    env.start_agent()
    wait_for(lambda: rollback_events(env, redis_client, "rollback.completed"), 60, "the late agent's rollback")
    assert env.revision() == "010"


def test_a_late_agent_does_not_undo_runs_that_came_after_the_failure(env, tmp_path, redis_client):
    env.migrations = copy_migrations(tmp_path, {"012_failing.py": FAILING_012})
    env.start_worker()
    assert env.cli("migrate", "--to", "010", "--json").code == 0
    assert env.cli("migrate", "--json").code == 1 and env.revision() == "011"
    # an operator fixes things by hand before any agent ran
    assert env.cli("rollback", "--to", "009", "--json").code == 0
    env.start_agent()
    rejected = wait_for(lambda: [e for e in rollback_events(env, redis_client, "command.rejected") if e["actor"] == "agent"], 60, "the agent's rollback to be refused")
    assert "moved on" in rejected[0]["data"]["reason"]
    assert env.revision() == "009"


def test_kill_9_an_agent_before_it_acts_and_another_takes_over_once(env, tmp_path, redis_client):
    env.extra_config = ""
    env.migrations = copy_migrations(tmp_path, {"012_failing.py": FAILING_012})
    config = env.config.read_text() + '\n[agent]\nclaim_idle = "2s"\n'
    env.config.write_text(config)
    env.start_worker()
    first = env.start_agent(log_name="paused-agent", DBAGENT_PAUSE_AT="agent.before_act")
    assert env.cli("migrate", "--to", "010", "--json").code == 0
    assert env.cli("migrate", "--json").code == 1
    wait_for(lambda: "pausing at agent.before_act" in env.log_of(first), 30, "the first agent to read the failure")
    env.kill_worker(first, signal.SIGKILL)
    env.start_agent(log_name="second-agent")
    wait_for(lambda: rollback_events(env, redis_client, "rollback.completed"), 60, "the second agent's rollback")
    time.sleep(2)
    assert env.revision() == "010"
    assert len(rollback_events(env, redis_client, "rollback.started")) == 1


def test_events_survive_redis_losing_the_stream(env, redis_client):
    env.start_worker()
    env.start_agent()
    assert env.cli("migrate", "--json").code == 0
    assert env.cli("notify", "startup-failed", "--detail", "only in the stream", "--json").code == 0
    wait_for(lambda: env.sql("SELECT 1 FROM dbagent.audit_log WHERE type = 'rollback.completed'"), 60, "the rollback")
    time.sleep(2)  # the sink catches up with the last events
    before = env.stream_events(redis_client)
    for key in redis_client.scan_iter(match=f"{env.prefix}:events*"):
        redis_client.delete(key)  # Redis restarted without its data
    after = env.cli("events", "--json", "--limit", "10000")
    assert after.code == 0
    shown = [json.loads(line) for line in after.stdout.splitlines()]
    assert {e["id"] for e in shown} == {e["id"] for e in before}
    assert "app.startup_failed" in {e["type"] for e in shown}


def test_a_health_check_failing_at_011_is_rolled_back_to_009_once(env, redis_client):
    env.extra_config = 'health_checks = ["select not exists (select 1 from permissions where name = \'*\')"]'
    env.start_worker()
    env.start_agent()
    assert env.cli("migrate", "--to", "009", "--json").code == 0
    run = env.cli("migrate", "--json")
    assert run.code == 1 and run.json()["revision_after"] == "011"
    failed = [e for e in env.stream_events(redis_client, run.json()["command_id"]) if e["type"] == "verify.failed"]
    assert failed and {c["name"]: c["ok"] for c in failed[0]["data"]["checks"]}["health_checks"] is False
    wait_for(lambda: rollback_events(env, redis_client, "rollback.completed"), 60, "the agent's rollback")
    time.sleep(2)
    assert env.revision() == "009"
    assert env.sql("SELECT count(*) FROM permissions WHERE name = '*'")[0][0] == 0
    assert env.sql("SELECT to_regclass('public.settings')")[0][0] is None  # 010 really downgraded
    assert len(rollback_events(env, redis_client, "rollback.started")) == 1
    steps = [e["data"]["revision"] for e in env.stream_events(redis_client) if e["type"] == "migration.step" and e["data"]["direction"] == "down"]
    assert steps == ["011", "010"]


def test_auto_restore_escalates_a_failed_rollback_to_the_pre_migration_backup(env, tmp_path, redis_client):
    env.extra_config = "pre_migration_backup = true\nauto_restore = true"
    env.migrations = copy_migrations(tmp_path, {"012_sticky.py": BROKEN_DOWNGRADE_012, "013_failing.py": FAILING_013})
    env.start_worker()
    env.start_agent()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    env.sql("INSERT INTO roles (name) VALUES ('before-the-deploy')")
    run = env.cli("migrate", "--json")
    assert run.code == 1 and env.revision() == "012"
    backup = run.json()["backup"]["path"]
    env.sql("DELETE FROM roles WHERE name = 'before-the-deploy'")  # damage done after the backup
    restored = wait_for(lambda: [e for e in env.stream_events(redis_client) if e["type"] == "restore.completed"], 90, "the restore")
    assert restored[0]["actor"] == "agent" and restored[0]["data"]["path"] == backup
    assert env.revision() == "011"
    assert env.sql("SELECT count(*) FROM roles WHERE name = 'before-the-deploy'")[0][0] == 1
    assert len(rollback_events(env, redis_client, "rollback.started")) == 1
