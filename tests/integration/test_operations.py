"""Each operation is a plain function of a context (``dbagent.operations.context.Run``) that a test builds
without a worker, Celery or a Redis server: a real PostgreSQL database, fakeredis for the stream.

What each returns, what it changes, and the events it records (in the audit log, the record of truth, and
in the stream).
"""

from __future__ import annotations

import fakeredis
import pytest

from dbagent.bus.eventlog import EventLog
from dbagent.core.commands import Command, CommandType
from dbagent.core.errors import BadInput, OperationFailed
from dbagent.operations import backup as backup_operations
from dbagent.operations import inspect, migrate
from dbagent.operations.context import Run
from dbagent.operations.lifecycle import OPERATIONS
from dbagent.postgres import store
from dbagent.postgres.connections import apply_timeouts, pg_connection
from dbagent.settings import load_settings
from tests.servers import script

VERBS = {CommandType.STATUS: inspect.status, CommandType.HISTORY: inspect.history, CommandType.VERIFY: inspect.verify,
         CommandType.MIGRATE: migrate.migrate, CommandType.ROLLBACK: migrate.rollback,
         CommandType.BACKUP: backup_operations.backup, CommandType.RESTORE: backup_operations.restore,
         CommandType.LIST_BACKUPS: backup_operations.list_backups,
         CommandType.VERIFY_BACKUP: backup_operations.verify_backup, CommandType.PRUNE: backup_operations.prune}


class Context:
    """Runs operations on the test's database as the worker would, minus the worker."""

    def __init__(self, env) -> None:
        self.env = env
        self.settings = load_settings(env.config)
        self.redis = fakeredis.FakeRedis()
        self.stream = EventLog(self.redis, self.settings.redis.prefix)

    def __call__(self, type_: CommandType, **args) -> tuple[dict, list[str]]:
        """The operation's result body and the types of the events it recorded."""
        command = Command(type=type_, db="test", args=args, actor="ops-test")
        db = self.settings.databases["test"]
        with pg_connection(db, "dbagent operations test") as conn:
            store.ensure_schema(conn)
            apply_timeouts(conn, db)
            run = Run.build(self.settings, "test", command, conn, self.redis)
            try:
                body = VERBS[type_](run)
                conn.commit()
            finally:
                run.journal.close()
        return body, self.events(command.id)

    def events(self, command_id: str) -> list[str]:
        audited = [r[0] for r in self.env.sql(
            "SELECT type FROM dbagent.audit_log WHERE command_id = %s ORDER BY ts, seq", command_id)]
        streamed = [e.type for _, e in self.stream.tail(1000) if e.command_id == command_id]
        assert streamed == audited, "the stream carries what the record holds, in its order"
        return audited


@pytest.fixture
def ops(env):
    return Context(env)


def test_every_command_type_has_its_operation():
    assert OPERATIONS == VERBS


def test_status_of_an_empty_database(ops):
    body, events = ops(CommandType.STATUS)
    assert body["current"] is None and body["head"] == "011"
    assert [s["revision"] for s in body["pending"]][:2] == ["001", "002"] and len(body["pending"]) == 11
    assert body["lock"] is None and events == []


def test_migrate_then_status_history_and_verify(ops, env):
    body, events = ops(CommandType.MIGRATE, to="003", no_backup=True)
    assert (body["revision_before"], body["revision_after"]) == (None, "003")
    assert body["backup"] == "skipped: --no-backup" and [s["revision"] for s in body["steps"]] == ["001", "002", "003"]
    assert body["verify"]["expected"] == "003" and all(check["ok"] for check in body["verify"]["checks"])
    assert events == ["validation.completed", "migration.started", "migration.step", "migration.step", "migration.step",
                      "migration.completed", "verify.completed"]
    assert env.revision() == "003"

    status, _ = ops(CommandType.STATUS)
    assert status["current"] == "003" and [s["revision"] for s in status["pending"]][0] == "004"
    history, _ = ops(CommandType.HISTORY, limit=10)
    assert [(r["revision"], r["direction"], r["outcome"]) for r in history["entries"]] == [
        ("001", "up", "applied"), ("002", "up", "applied"), ("003", "up", "applied")]
    assert {r["actor"] for r in history["entries"]} == {"ops-test"} and all(len(r["checksum"]) == 64 for r in history["entries"])
    verified, events = ops(CommandType.VERIFY, expect="003")
    assert verified["verify"]["revision"] == "003" and all(check["ok"] for check in verified["verify"]["checks"])
    assert events == ["verify.completed"]


def test_migrate_dry_run_changes_nothing(ops, env):
    body, events = ops(CommandType.MIGRATE, to="002", dry_run=True)
    assert body["dry_run"] is True and [s["revision"] for s in body["steps"]] == ["001", "002"]
    assert "CREATE TABLE" in body["steps"][0]["sql"] and body["validation"]["status"] == "passed"
    assert events == [] and env.revision() is None


def test_a_failing_step_leaves_the_database_where_it_was(tmp_path, env):
    env.migrations = _with_extra(env, tmp_path, script("012", "011", "Fails", ["SELECT 1/0"], ["SELECT 1"]))
    ops = Context(env)
    ops(CommandType.MIGRATE, to="011", no_backup=True)
    with pytest.raises(OperationFailed) as caught:
        ops(CommandType.MIGRATE, no_backup=True)
    assert "division by zero" in caught.value.message
    assert caught.value.details["revision_after"] == "011" and env.revision() == "011"


def test_rollback_by_steps(ops, env):
    ops(CommandType.MIGRATE, to="004", no_backup=True)
    body, events = ops(CommandType.ROLLBACK, steps=2)
    assert (body["revision_before"], body["revision_after"]) == ("004", "002") and env.revision() == "002"
    assert [s["revision"] for s in body["steps"]] == ["004", "003"]
    assert events == ["rollback.started", "migration.step", "migration.step", "rollback.completed"]


def test_rollback_further_than_base_is_bad_input(ops, env):
    ops(CommandType.MIGRATE, to="001", no_backup=True)
    with pytest.raises(BadInput):
        ops(CommandType.ROLLBACK, steps=5)
    assert env.revision() == "001"


def test_backup_list_verify_restore_and_prune(ops, env):
    ops(CommandType.MIGRATE, to="003", no_backup=True)
    env.sql("INSERT INTO roles (name) VALUES ('auditor')")
    backup, events = ops(CommandType.BACKUP, kind="full")
    assert events == ["backup.started", "backup.completed"]
    path = backup["path"]
    assert backup["backup"]["verified"] is True and backup["backup"]["tables"]["public.roles"] == 1
    listed, _ = ops(CommandType.LIST_BACKUPS)
    assert [(b["path"], b["revision"], b["sha256"]) for b in listed["backups"]] == [(path, "003", backup["sha256"])]
    checked, events = ops(CommandType.VERIFY_BACKUP, path=path)
    assert [(b["checksum"], b["full_read"]) for b in checked["backups"]] == [("ok", "ok")] and events == ["backup.verified"]

    env.sql("DELETE FROM roles WHERE name = 'auditor'")
    restored, events = ops(CommandType.RESTORE, path=path)
    assert events == ["restore.started", "restore.completed"] and restored["revision_after"] == "003"
    assert env.sql("SELECT count(*) FROM roles WHERE name = 'auditor'")[0][0] == 1 and env.revision() == "003"

    pruned, events = ops(CommandType.PRUNE, dry_run=True)
    assert (pruned["dry_run"], pruned["kept"], pruned["would_delete"]) == (True, 1, 0) and events == []
    assert [(d["path"], d["keep"]) for d in pruned["decisions"]] == [(path, True)]


def _with_extra(env, tmp_path, extra: str):
    from tests.servers import copy_migrations

    return copy_migrations(tmp_path, {"012_fails.py": extra})
