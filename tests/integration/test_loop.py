"""The whole loop through a real worker subprocess on real PostgreSQL and Redis."""

from __future__ import annotations

import json

import pytest

from tests.servers import copy_migrations

pytestmark = pytest.mark.integration

TABLES_AT_HEAD = {
    "roles", "permissions", "role_permissions", "users", "user_roles", "user_sessions",
    "user_preferences", "navigation_items", "user_settings", "notifications", "audit_logs", "settings",
}


def public_tables(env) -> set[str]:
    return {r[0] for r in env.sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")} - {"alembic_version"}


def test_status_dry_run_migrate_verify_rollback_history(env, redis_client):
    env.start_worker()

    status = env.cli("status", "--json")
    assert status.code == 0, status.stderr
    body = status.json()
    assert body["status"] == "succeeded" and body["current"] is None and body["head"] == "011"
    assert [p["revision"] for p in body["pending"]] == [f"{n:03d}" for n in range(1, 12)]
    assert body["lock"] is None

    dry = env.cli("migrate", "--dry-run", "--to", "002", "--json")
    assert dry.code == 0, dry.stderr
    plan = dry.json()
    assert plan["dry_run"] is True and [s["revision"] for s in plan["steps"]] == ["001", "002"]
    assert "CREATE TABLE roles" in plan["steps"][0]["sql"] and "CREATE TABLE users" in plan["steps"][1]["sql"]
    assert public_tables(env) == set() and env.revision() is None  # nothing touched

    run = env.cli("migrate", "--json", "--actor", "deploy-bot", "--ticket", "CHG-42")
    assert run.code == 0, run.stderr
    result = run.json()
    assert result["status"] == "succeeded" and result["error"] is None
    assert result["revision_before"] is None and result["revision_after"] == "011"
    assert {c["name"]: c["ok"] for c in result["verify"]["checks"]} == {
        "revision": True, "invalid_indexes": True, "not_valid_constraints": True,
        "fk_orphans": True, "health_checks": True, "critical_tables": True,
    }
    assert env.revision() == "011" and public_tables(env) == TABLES_AT_HEAD
    assert env.sql("SELECT count(*) FROM role_permissions rp JOIN permissions p ON p.id = rp.permission_id WHERE p.name = '*'")[0][0] == 1
    # dbagent's own tables never land in public
    assert {r[0] for r in env.sql("SELECT tablename FROM pg_tables WHERE schemaname = 'dbagent'")} == {"commands", "audit_log", "changelog"}

    # progress events streamed to the CLI as they happened, one step event per revision
    lines = run.event_lines()
    steps = [e for e in lines if e["type"] == "migration.step"]
    assert [e["data"]["revision"] for e in steps] == [f"{n:03d}" for n in range(1, 12)]
    assert all(isinstance(e["data"]["duration_ms"], int) and e["data"]["description"] for e in steps)
    types = [e["type"] for e in lines]
    for expected in ("command.accepted", "lock.acquired", "migration.started", "migration.completed", "verify.completed", "lock.released"):
        assert expected in types
    assert types.index("migration.started") < types.index("migration.step") < types.index("migration.completed") < types.index("verify.completed")

    # the stream and the durable audit log hold the same entries, in DESIGN's shape
    stream = env.stream_events(redis_client, result["command_id"])
    assert set(stream[0]) == {"id", "ts", "type", "db", "command_id", "actor", "ticket", "host", "data"}
    assert all(e["actor"] == "deploy-bot" and e["ticket"] == "CHG-42" and e["db"] == "test" for e in stream)
    audit = env.sql("SELECT id, type FROM dbagent.audit_log WHERE command_id = %s ORDER BY seq", result["command_id"])
    assert [(e["id"], e["type"]) for e in stream] == [(r[0], r[1]) for r in audit]

    verify = env.cli("verify", "--json")
    assert verify.code == 0 and verify.json()["verify"]["revision"] == "011"

    back = env.cli("rollback", "1", "--json")
    assert back.code == 0, back.stderr
    assert back.json()["revision_before"] == "011" and back.json()["revision_after"] == "010"
    assert env.revision() == "010"
    assert env.sql("SELECT count(*) FROM permissions WHERE name = '*'")[0][0] == 0

    to = env.cli("rollback", "--to", "008", "--json")
    assert to.code == 0 and to.json()["revision_after"] == "008" and env.revision() == "008"
    assert "settings" not in public_tables(env) and "user_settings" in public_tables(env)

    history = env.cli("history", "--json", "--limit", "100")
    assert history.code == 0
    entries = history.json()["entries"]
    assert [(e["revision"], e["direction"], e["outcome"]) for e in entries] == (
        [(f"{n:03d}", "up", "applied") for n in range(1, 12)]
        + [("011", "down", "reverted"), ("010", "down", "reverted"), ("009", "down", "reverted")]
    )
    first = entries[0]
    assert first["actor"] == "deploy-bot" and first["ticket"] == "CHG-42" and first["duration_ms"] >= 0
    assert first["started_at"] <= first["finished_at"] and first["description"].startswith("Create the roles")

    human = env.cli("status")
    assert human.code == 0 and "revision  008 (head 011)" in human.stdout and "pending   3" in human.stdout

    events = env.cli("events", "--json", "--limit", "500")
    lines = [json.loads(line) for line in events.stdout.splitlines()]
    assert events.code == 0 and len(lines) == len(env.stream_events(redis_client))
    assert {"command.accepted", "rollback.started", "rollback.completed"} <= {e["type"] for e in lines}


def test_full_round_trip_head_base_head(env):
    env.start_worker()
    up = env.cli("migrate", "--json")
    assert up.code == 0 and env.revision() == "011"
    dump_at_head = env.sql(
        "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
        " WHERE table_schema = 'public' ORDER BY 1, 2"
    )
    down = env.cli("rollback", "--to", "base", "--json")
    assert down.code == 0, down.stderr
    assert down.json()["revision_after"] is None and len(down.json()["steps"]) == 11
    assert public_tables(env) == set() and env.revision() is None
    again = env.cli("migrate", "--json")
    assert again.code == 0 and env.revision() == "011"
    assert env.sql(
        "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
        " WHERE table_schema = 'public' ORDER BY 1, 2"
    ) == dump_at_head


def test_migrate_to_a_revision_then_rest(env):
    env.start_worker()
    first = env.cli("migrate", "--to", "004", "--json")
    assert first.code == 0 and first.json()["revision_after"] == "004" and env.revision() == "004"
    assert first.json()["verify"]["expected"] == "004"
    rest = env.cli("migrate", "--json")
    assert rest.code == 0 and [s["revision"] for s in rest.json()["steps"]] == [f"{n:03d}" for n in range(5, 12)]
    noop = env.cli("migrate", "--json")
    assert noop.code == 0 and noop.json()["steps"] == [] and noop.json()["revision_after"] == "011"


def test_every_statement_runs_under_the_configured_timeouts(env, tmp_path):
    probe = '''"""Record the session's timeouts."""
from alembic import op
revision = "002"
down_revision = "001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE timeout_probe AS SELECT current_setting('lock_timeout') AS lt,"
               " current_setting('statement_timeout') AS st")


def downgrade() -> None:
    op.execute("DROP TABLE timeout_probe")
'''
    env.migrations = copy_migrations(tmp_path, {"002_timeout_probe.py": probe}, upto=1)
    env.start_worker()
    result = env.cli("migrate", "--json")
    assert result.code == 0, result.stderr
    assert env.sql("SELECT lt, st FROM timeout_probe") == [("5s", "2min")]


def test_a_statement_over_statement_timeout_fails_and_leaves_the_previous_revision(env, tmp_path):
    slow = '''"""A step slower than the statement timeout."""
from alembic import op
revision = "002"
down_revision = "001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE half_done (id int)")
    op.execute("SELECT pg_sleep(5)")


def downgrade() -> None:
    op.execute("DROP TABLE half_done")
'''
    env.migrations = copy_migrations(tmp_path, {"002_slow_step.py": slow}, upto=1)
    env.statement_timeout = "1s"
    env.start_worker()
    result = env.cli("migrate", "--json")
    assert result.code == 1
    body = result.json()
    assert body["status"] == "failed" and body["revision_after"] == "001"
    assert "statement timeout" in body["error"] and "002" in body["error"]
    assert env.revision() == "001" and env.sql("SELECT to_regclass('public.half_done')")[0][0] is None
    failed = [e for e in result.event_lines() if e["type"] == "migration.failed"]
    assert failed and failed[0]["data"]["revision_after"] == "001" and failed[0]["data"]["failed_step"]["revision"] == "002"
    history = env.sql("SELECT revision, outcome FROM dbagent.changelog ORDER BY id")
    assert history == [("001", "applied"), ("002", "failed")]


def test_verify_names_an_invalid_index(env):
    env.start_worker()
    assert env.cli("migrate", "--json").code == 0
    env.sql("CREATE TABLE dupes (x int)")
    env.sql("INSERT INTO dupes VALUES (1), (1)")
    with pytest.raises(Exception):
        env.sql("CREATE UNIQUE INDEX CONCURRENTLY dupes_x ON dupes (x)")
    result = env.cli("verify", "--json")
    assert result.code == 1
    checks = {c["name"]: c for c in result.json()["verify"]["checks"]}
    assert checks["invalid_indexes"]["ok"] is False and "public.dupes_x" in checks["invalid_indexes"]["detail"]
    assert "public.dupes_x" in result.json()["error"]


def test_no_wait_prints_the_command_id_and_the_outcome_arrives_later(env, redis_client):
    env.start_worker()
    queued = env.cli("status", "--no-wait", "--json")
    assert queued.code == 0 and queued.json()["status"] == "queued"
    command_id = queued.json()["command_id"]
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not redis_client.get(f"{env.prefix}:result:{command_id}"):
        time.sleep(0.1)
    outcome = json.loads(redis_client.get(f"{env.prefix}:result:{command_id}"))
    assert outcome["status"] == "succeeded" and outcome["command_id"] == command_id
    assert env.sql("SELECT status FROM dbagent.commands WHERE id = %s", command_id) == [("succeeded",)]
