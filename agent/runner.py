"""Execute one command on the database's worker: decode → check → record → lock → run → report.

``execute`` is what the Celery task calls; tests call it too. Each operation
(``status``, ``migrate``, ``rollback``, ``verify``, ``history``) is one plain
function of a ``Run``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import Connection

from agent import backup_operations, keys, preflight, retries, store
from agent.backups import BackupKind, Trigger, list_backups
from agent.blocking import BlockingMonitor
from agent.commands import (
    FINISHED,
    Command,
    CommandStatus,
    CommandType,
    HistoryArgs,
    MigrateArgs,
    RollbackArgs,
    VerifyArgs,
    check_command,
    utcnow,
)
from agent.connections import pg_connection, redis_client
from agent.durations import postgres_interval
from agent.errors import BadInput, CommandRejected, DbAgentError, OperationFailed, Unavailable
from agent.eventlog import EventLog
from agent.events import HOST, Event, EventType
from agent.locks import AdvisoryLock, RedisLease, holder_backend, read_lease
from agent.migrator import Migrator, Step
from agent.redact import redact
from agent.settings import DatabaseSettings, Settings
from agent.verify import Baseline, capture_baseline, run_checks, summary

log = logging.getLogger(__name__)

# While a writer waits for the database, it says so this often.
LOCK_WAITING_EVERY_S = 5.0


def worker_name(db: str) -> str:
    return f"{db}@{HOST}:{os.getpid()}"


class Journal:
    """A command's events: written to PostgreSQL first (the record), then to the stream."""

    def __init__(self, eventlog: EventLog, prefix: str, db: str, command: Command | None) -> None:
        self.eventlog = eventlog
        self.prefix = prefix
        self.db = db
        self.command = command
        self.conn: Connection | None = None
        self.db_url: str | None = None
        self._unpublished: list[Event] = []

    def make(self, type_: EventType, data: dict[str, Any]) -> Event:
        command = self.command
        return Event(
            type=type_,
            db=self.db,
            command_id=command.id if command else data.get("command_id"),
            actor=command.actor if command else None,
            ticket=command.ticket if command else None,
            data=json.loads(json.dumps(data, default=str)),
        )

    def emit(self, type_: EventType, **data: Any) -> Event:
        """Record an event in PostgreSQL, then publish it on the stream."""
        event = self.make(type_, data)
        if self.conn is not None:
            try:
                store.insert_event(self.conn, event)
                self.conn.commit()
            except Exception as exc:  # the stream still carries it; the sink (agent) backfills
                log.warning("could not write event %s to the audit log: %s", event.type, redact(exc))
                _rollback_quietly(self.conn)
        self._unpublished.append(event)
        self.flush()
        return event

    def stage(self, conn: Connection, type_: EventType, **data: Any) -> None:
        """Write an event inside the caller's open transaction; flush() publishes it after commit."""
        event = self.make(type_, data)
        store.insert_event(conn, event)
        self._unpublished.append(event)

    def emit_aside(self, type_: EventType, data: dict[str, Any]) -> None:
        """An event from beside the step (the lock sampler's thread, a backfill inside a step).

        The step's connection is busy with the step's own transaction, so a
        connection of its own writes the audit row.
        """
        event = self.make(type_, data)
        if self.db_url is not None:
            try:
                import psycopg

                with psycopg.connect(self.db_url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(
                        f"INSERT INTO {store.SCHEMA}.audit_log (id, ts, type, db, command_id, actor, ticket, host, data)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                        (event.id, event.ts, event.type, event.db, event.command_id, event.actor, event.ticket,
                         event.host, json.dumps(event.data, default=str)),
                    )
            except Exception as exc:
                log.warning("%s not written to the audit log: %s", event.type, redact(exc))
        try:
            self.eventlog.publish([event])
        except redis.RedisError as exc:
            log.warning("could not publish %s: %s", event.type, redact(exc))

    def discard_staged(self) -> None:
        self._unpublished.clear()

    def flush(self) -> None:
        events, self._unpublished = self._unpublished, []
        if not events:
            return
        try:
            self.eventlog.publish(events)
        except redis.RedisError as exc:
            log.warning("could not publish %d event(s) to the stream: %s", len(events), redact(exc))

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """Publish the command's outcome, where waiting producers look for it."""
        self.flush()
        if not result.get("command_id"):
            return result
        try:
            self.eventlog.client.set(
                keys.result(self.prefix, result["command_id"]), json.dumps(result, default=str), ex=keys.RESULT_TTL_S
            )
        except redis.RedisError as exc:
            log.error("could not publish the outcome of %s: %s", result.get("command_id"), redact(exc))
        return result


@dataclass
class Run:
    """Everything one command's execution works with."""

    settings: Settings
    db_name: str
    db: DatabaseSettings
    command: Command
    conn: Connection
    journal: Journal
    redis: redis.Redis
    worker: str
    migrator: Migrator | None = None
    details: dict[str, Any] = field(default_factory=dict)
    _offline: dict[Step, str] = field(default_factory=dict)

    def migrations(self) -> Migrator:
        if self.migrator is None:
            self.migrator = cached_migrator(self.db.migrations, self.db.url)
        return self.migrator

    def emit(self, type_: EventType, **data: Any) -> Event:
        return self.journal.emit(type_, **data)

    def render_offline(self, plan: list[Step]) -> None:
        """Render a whole plan's offline SQL in one pass, for ``offline_sql`` to hand out."""
        try:
            self._offline.update(self.migrations().offline_sql_many([s for s in plan if s not in self._offline]))
        except Exception as exc:  # noqa: BLE001 - a script's own code may raise anything; step by step says which
            log.info("could not render the plan's SQL in one pass (%s); rendering step by step", redact(exc))

    def offline_sql(self, step: Step) -> str:
        """A step's SQL rendered offline, once per run (validation and the lock pre-check both read it)."""
        if step not in self._offline:
            self._offline[step] = self.migrations().offline_sql(step)
        return self._offline[step]


_migrators: dict[tuple[str, str], tuple[tuple, Migrator]] = {}


def cached_migrator(location: str, url: str) -> Migrator:
    """The scripts of a directory, parsed again only when a file in it changed."""
    versions = Path(location) / "versions"
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in versions.glob("*.py")))
    cached = _migrators.get((location, url))
    if cached is None or cached[0] != stamp:
        cached = (stamp, Migrator(location, url))
        _migrators[(location, url)] = cached
    return cached[1]


def base_result(command_id: str | None, type_: str | None, db: str) -> dict[str, Any]:
    return {"command_id": command_id, "type": type_, "db": db, "status": None, "error": None, "exit_code": None}


def execute(
    settings: Settings,
    db_name: str,
    message: object,
    *,
    client: redis.Redis | None = None,
    worker: str | None = None,
) -> dict[str, Any]:
    """Run one queue message on the worker of database ``db_name``; returns the result object."""
    client = client if client is not None else redis_client(settings.redis)
    eventlog = EventLog(client, settings.redis.prefix)
    worker = worker or worker_name(db_name)
    db = settings.databases[db_name]

    try:
        command = Command.from_message(message)
    except CommandRejected as exc:
        command_id = message.get("id") if isinstance(message, dict) else None
        journal = Journal(eventlog, settings.redis.prefix, db_name, None)
        _record_rejection(journal, db, str(exc), worker, command_id=command_id)
        return journal.finish(_outcome(base_result(command_id, None, db_name), exc))

    journal = Journal(eventlog, settings.redis.prefix, db_name, command)
    result = base_result(command.id, str(command.type), db_name)
    try:
        check_command(
            command,
            settings.security.signing_key(),
            db=db_name,
            now=utcnow(),
            max_age_s=settings.security.max_command_age,
            max_skew_s=settings.security.max_clock_skew,
        )
    except CommandRejected as exc:
        # Nothing of a forged or stale command runs; only its rejection is recorded.
        _record_rejection(journal, db, str(exc), worker)
        return journal.finish(_outcome(result, exc))

    try:
        with pg_connection(db, application_name=f"dbagent {command.type} {command.id[:8]}") as conn:
            store.ensure_schema(conn)
            apply_timeouts(conn, db)
            journal.conn = conn
            journal.db_url = db.url
            run = Run(settings, db_name, db, command, conn, journal, client, worker)
            return journal.finish(_execute(run, result))
    except DbAgentError as exc:
        journal.conn = None
        if isinstance(exc, BadInput):
            journal.emit(EventType.COMMAND_REJECTED, reason=exc.message, worker=worker)
        return journal.finish(_outcome(result, exc))
    except redis.RedisError as exc:
        return journal.finish(_outcome(result, Unavailable(f"Redis failed during the command: {redact(exc)}")))


def apply_timeouts(conn: Connection, db: DatabaseSettings) -> None:
    """Every statement of the session waits for locks and runs at most as long as configured."""
    conn.exec_driver_sql(f"SET lock_timeout = '{postgres_interval(db.lock_timeout)}'")
    conn.exec_driver_sql(f"SET statement_timeout = '{postgres_interval(db.statement_timeout)}'")
    if conn.dialect.server_version_info >= (14,):
        # A statement keeps running after its client died unless the server
        # checks the socket; without this, a killed worker's long step would
        # hold the database's lock until the step finished on its own.
        conn.exec_driver_sql("SET client_connection_check_interval = '1s'")
    conn.commit()


def _record_rejection(journal: Journal, db: DatabaseSettings, reason: str, worker: str, **data: Any) -> None:
    """command.rejected into the audit log (when the database answers) and the stream."""
    try:
        with pg_connection(db, application_name="dbagent audit") as conn:
            store.ensure_schema(conn)
            journal.conn = conn
            journal.emit(EventType.COMMAND_REJECTED, reason=reason, worker=worker, **data)
            return
    except DbAgentError as exc:
        log.warning("rejection not written to the audit log: %s", exc)
    finally:
        journal.conn = None
    journal.emit(EventType.COMMAND_REJECTED, reason=reason, worker=worker, **data)


def _execute(run: Run, result: dict[str, Any]) -> dict[str, Any]:
    command, conn = run.command, run.conn
    fresh = store.record_command(conn, command, run.worker)
    conn.commit()
    if not fresh:
        row = store.command_row(conn, command.id)
        if row and row["status"] in FINISHED:
            log.info("command %s was already executed (%s): reporting, not re-running", command.id, row["status"])
            return row["result"] or {**result, "status": row["status"]}
    run.emit(EventType.COMMAND_ACCEPTED, worker=run.worker, redelivered=not fresh, args=command.args)
    operation = OPERATIONS[command.type]
    try:
        if command.needs_lock:
            with writer_lock(run):
                row = store.command_row(conn, command.id)
                conn.commit()
                if row and row["status"] in FINISHED:
                    return row["result"] or {**result, "status": row["status"]}
                if row and row["status"] == CommandStatus.RUNNING:
                    # We hold the lock, so whoever was running it is gone.
                    outcome = _interrupted(run, row, result)
                else:
                    if not store.claim_command(conn, command.id, run.worker, {"args": command.args}):
                        conn.rollback()
                        row = store.command_row(conn, command.id) or {}
                        return row.get("result") or {**result, "status": row.get("status")}
                    conn.commit()
                    outcome = _run_operation(run, operation, result)
                store.finish_command(conn, command.id, outcome["status"], outcome)
                conn.commit()
                return outcome
        outcome = _run_operation(run, operation, result)
    except DbAgentError as exc:
        outcome = _outcome(dict(result), exc)
        if isinstance(exc, BadInput):
            run.emit(EventType.COMMAND_REJECTED, reason=exc.message, worker=run.worker)
    _rollback_quietly(conn)
    store.finish_command(conn, command.id, outcome["status"], outcome)
    conn.commit()
    return outcome


def _run_operation(run: Run, operation: Callable[[Run], dict[str, Any]], result: dict[str, Any]) -> dict[str, Any]:
    try:
        return {**result, **operation(run), "status": CommandStatus.SUCCEEDED.value, "exit_code": 0}
    except BadInput as exc:
        _rollback_quietly(run.conn)
        run.emit(EventType.COMMAND_REJECTED, reason=exc.message, worker=run.worker)
        return _outcome(dict(result), exc)
    except DbAgentError as exc:
        _rollback_quietly(run.conn)
        return _outcome(dict(result), exc)
    except Exception as exc:
        log.exception("command %s failed unexpectedly", run.command.id)
        _rollback_quietly(run.conn)
        return _outcome(dict(result), OperationFailed(f"unexpected error: {redact(exc)}"))


def _outcome(result: dict[str, Any], exc: DbAgentError) -> dict[str, Any]:
    status = CommandStatus.REJECTED if isinstance(exc, BadInput) else CommandStatus.FAILED
    return {**result, **exc.details, "status": status.value, "error": redact(exc.message), "exit_code": exc.exit_code}


def _rollback_quietly(conn: Connection) -> None:
    try:
        conn.rollback()
    except Exception:  # the connection is gone; nothing left to roll back
        pass


def _interrupted(run: Run, row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Report a command whose executor died mid-way; never re-apply it."""
    current = run.migrations().current(run.conn)
    error = f"interrupted: the worker running it ({row.get('worker')}) died; the database is at revision {current or 'base'}"
    failed = (
        EventType.ROLLBACK_FAILED if run.command.type == CommandType.ROLLBACK else EventType.MIGRATION_FAILED
    )
    before = (row.get("plan") or {}).get("revision_before")
    run.emit(failed, revision_before=before, revision_after=current, error=error, interrupted=True)
    return {
        **result,
        "status": CommandStatus.FAILED.value,
        "error": error,
        "exit_code": 1,
        "revision_before": before,
        "revision_after": current,
    }


def recover_interrupted(settings: Settings, db_name: str, client: redis.Redis | None = None) -> list[str]:
    """At worker start: report commands left running by a dead worker. Returns their ids."""
    db = settings.databases[db_name]
    client = client if client is not None else redis_client(settings.redis)
    eventlog = EventLog(client, settings.redis.prefix)
    reported: list[str] = []
    with pg_connection(db, application_name="dbagent recovery") as conn:
        store.ensure_schema(conn)
        lock = AdvisoryLock(conn)
        if not lock.try_acquire():
            return reported  # a live writer holds the database: its commands are not ours to judge
        try:
            rows = conn.exec_driver_sql(
                f"SELECT id FROM {store.SCHEMA}.commands WHERE status = 'running' ORDER BY received_at"
            ).all()
            conn.commit()
            for (command_id,) in rows:
                row = store.command_row(conn, command_id) or {}
                command = Command.model_validate(
                    {
                        "id": row["id"],
                        "type": row["type"],
                        "db": row["db"],
                        "args": row["args"] or {},
                        "actor": row["actor"] or "unknown",
                        "ticket": row["ticket"],
                        "issued_at": row["issued_at"] or datetime.now(UTC),
                    }
                )
                journal = Journal(eventlog, settings.redis.prefix, db_name, command)
                journal.conn = conn
                run = Run(settings, db_name, db, command, conn, journal, client, worker_name(db_name))
                outcome = _interrupted(run, row, base_result(command.id, str(command.type), db_name))
                store.finish_command(conn, command.id, outcome["status"], outcome)
                conn.commit()
                journal.finish(outcome)
                reported.append(command_id)
        finally:
            lock.release()
    return reported


# -- the writer lock ----------------------------------------------------------


@contextmanager
def writer_lock(run: Run) -> Iterator[int]:
    """Hold the database: the Redis lease first (queue order, visibility), then the advisory lock."""
    command = run.command
    prefix = run.settings.redis.prefix
    owner = {"worker": run.worker, "pid": os.getpid(), "command_id": command.id, "type": str(command.type), "actor": command.actor}
    lease = RedisLease(run.redis, keys.lease(prefix, run.db_name), keys.fence(prefix, run.db_name), owner, run.settings.redis.lease_ttl)
    started = time.monotonic()
    last_said = [float("-inf")]

    def waiting(guard: str) -> Callable[[float, dict[str, Any] | None], None]:
        def on_wait(waited_s: float, holder: dict[str, Any] | None) -> None:
            if waited_s - last_said[0] >= LOCK_WAITING_EVERY_S:
                last_said[0] = waited_s
                run.emit(EventType.LOCK_WAITING, guard=guard, waited_ms=round(waited_s * 1000), holder=holder)
        return on_wait

    timeout_s = run.db.lock_wait_timeout
    token = lease.acquire(timeout_s, waiting("redis_lease"))
    advisory = AdvisoryLock(run.conn)
    try:
        remaining = max(timeout_s - (time.monotonic() - started), 1.0)
        advisory.acquire(remaining, waiting("postgres_advisory"))
        run.emit(EventType.LOCK_ACQUIRED, token=token, worker=run.worker, waited_ms=round((time.monotonic() - started) * 1000))
        try:
            yield token
        finally:
            advisory.release()
    finally:
        lease.release()
        if advisory.held is False and token is not None:
            run.emit(EventType.LOCK_RELEASED, token=token, worker=run.worker)


# -- operations ---------------------------------------------------------------


def status(run: Run) -> dict[str, Any]:
    migrator = run.migrations()
    current = migrator.current(run.conn)
    head = migrator.head()
    try:
        pending = [s.to_json() for s in migrator.upgrade_plan(current)]
        problem = None
    except BadInput as exc:
        pending, problem = [], exc.message
    lease = read_lease(run.redis, keys.lease(run.settings.redis.prefix, run.db_name))
    session = holder_backend(run.conn)
    last_backups = {}
    if run.db.backup_dir:
        for manifest in list_backups(run.db.backup_dir):
            last_backups.setdefault(str(manifest.type), manifest.summary(run.db.backup_dir))
    return {
        "last_backups": last_backups,
        "current": current,
        "head": head,
        "pending": pending,
        "lock": {"lease": lease, "session": session} if lease or session else None,
        "problem": problem,
    }


def history(run: Run) -> dict[str, Any]:
    args = run.command.parsed_args()
    assert isinstance(args, HistoryArgs)
    rows = store.changelog(run.conn, args.limit)
    run.conn.commit()
    return {"entries": [_json_row(row) for row in rows]}


def verify(run: Run) -> dict[str, Any]:
    args = run.command.parsed_args()
    assert isinstance(args, VerifyArgs)
    migrator = run.migrations()
    expected = migrator.revision(args.expect).revision if args.expect not in (None, "head", "base") else (
        None if args.expect == "base" else migrator.head()
    )
    return _verify(run, expected)


def _verify(
    run: Run, expected: str | None, baseline: Baseline | None = None, run_facts: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run every check; ``baseline`` and ``run_facts`` (revision_before, run_command_id, backup) come from a migrate."""
    current = run.migrations().current(run.conn)
    checks = run_checks(run.conn, current, expected, run.db, baseline)
    body = {"revision": current, "expected": expected, **(run_facts or {}), "checks": [c.to_json() for c in checks]}
    if all(c.ok for c in checks):
        run.emit(EventType.VERIFY_COMPLETED, **body)
        return {"verify": body}
    run.emit(EventType.VERIFY_FAILED, **body)
    raise OperationFailed(f"verification failed: {summary(checks)}", verify=body)


def migrate(run: Run) -> dict[str, Any]:
    args = run.command.parsed_args()
    assert isinstance(args, MigrateArgs)
    migrator = run.migrations()
    before = migrator.current(run.conn)
    plan = migrator.upgrade_plan(before, args.to)
    run.render_offline(plan)
    validation = _preflight(run, before, plan, args)
    if args.dry_run:
        return {
            "dry_run": True,
            "revision_before": before,
            "revision_after": before,
            "target": plan[-1].revision if plan else before,
            "steps": [{**s.to_json(), "sql": run.offline_sql(s)} for s in plan],
            "validation": validation,
        }
    target = plan[-1].revision if plan else before
    backup: dict[str, Any] | str
    if not plan:
        backup = "skipped: nothing to migrate"
    elif args.no_backup:
        backup = "skipped: --no-backup"
    elif not run.db.takes_pre_migration_backup(run.db_name):
        backup = "skipped: pre_migration_backup is off for this database"
    else:
        # The schema is not touched unless this succeeded and read back against its checksum.
        manifest = backup_operations.take_backup(run, BackupKind.FULL, Trigger.PRE_MIGRATION)
        backup = {"path": str(manifest.path(run.db.backup_dir or "")), "sha256": manifest.sha256, "bytes": manifest.bytes}
    try:
        # What verification compares the run against; nothing is changed if it cannot be read.
        baseline = capture_baseline(run.conn, run.db)
    except OperationFailed as exc:
        exc.details.update(revision_before=before, revision_after=before, target=target, backup=backup)
        raise
    run.emit(
        EventType.MIGRATION_STARTED,
        revision_before=before,
        target=target,
        steps=[s.to_json() for s in plan],
        backup=backup,
    )
    started = time.monotonic()
    facts = {"revision_before": before, "target": target, "backup": backup}
    _apply_steps(run, plan, facts, EventType.MIGRATION_FAILED)
    after = migrator.current(run.conn)
    run.emit(
        EventType.MIGRATION_COMPLETED,
        revision_before=before,
        revision_after=after,
        steps=len(plan),
        duration_ms=round((time.monotonic() - started) * 1000),
    )
    facts.update(revision_after=after, steps=[s.to_json() for s in plan])
    try:
        verified = _verify(
            run, target, baseline, {"revision_before": before, "run_command_id": run.command.id, "backup": backup}
        )
    except OperationFailed as exc:
        exc.details.update(facts)
        raise
    return {**facts, **verified, "validation": validation}


def _preflight(run: Run, before: str | None, plan: list[Step], args: MigrateArgs) -> dict[str, Any] | None:
    """Validate the scripts before touching anything; an error stops the run unless --allow names its rule.

    The lint covers the steps about to run (the applied ones ran already; their
    checksums say whether their files changed since). Where validation is only
    advisory (``validate_before_migrate``), findings are reported, not enforced.
    """
    allow = preflight.check_allow(args.allow)
    if not plan:
        return None
    recorded = store.applied_checksums(run.conn)
    run.conn.commit()
    found = preflight.findings(
        run.db.migrations, migrator=run.migrations(), current=before, recorded=recorded,
        lint_only={s.revision for s in plan}, render=run.offline_sql,
    )
    verdict = preflight.Verdict(found, allow)
    enforced = run.db.enforces_validation(run.db_name)
    body = {**verdict.to_json(), "enforced": enforced, "revision_before": before}
    if args.dry_run:
        return body
    if verdict.blocking and enforced:
        run.emit(EventType.VALIDATION_FAILED, **body)
        raise OperationFailed(
            f"validation failed, nothing was changed: {verdict.summary()}. Fix the migration, or accept a finding"
            f" with --allow RULE (recorded in the audit trail)",
            validation=body, revision_before=before, revision_after=before,
        )
    run.emit(EventType.VALIDATION_COMPLETED, **body)
    return body


def rollback(run: Run) -> dict[str, Any]:
    args = run.command.parsed_args()
    assert isinstance(args, RollbackArgs)
    migrator = run.migrations()
    before = migrator.current(run.conn)
    expected = (args.cause or {}).get("expect_revision", before)
    if expected != before:
        raise BadInput(
            f"not rolling back: the database moved on since the failure (it left {expected or 'base'},"
            f" the database is now at {before or 'base'})",
            revision_before=before,
            revision_after=before,
        )
    plan = migrator.downgrade_plan(before, steps=args.steps, to=args.to)
    run.render_offline(plan)
    target = plan[-1].destination if plan else (before or "base")
    cause = args.cause or {}
    run.emit(EventType.ROLLBACK_STARTED, revision_before=before, target=target, steps=[s.to_json() for s in plan],
             cause=args.cause)
    started = time.monotonic()
    facts = {"revision_before": before, "target": None if target == "base" else target, "cause": args.cause}
    if cause.get("backup"):
        facts["next_step"] = f"restore the pre-migration backup: dbagent restore {cause['backup']} --db {run.db_name}"
    else:
        facts["next_step"] = f"restore the newest pre-migration backup (dbagent backups list --db {run.db_name})"
    _apply_steps(run, plan, facts, EventType.ROLLBACK_FAILED)
    after = migrator.current(run.conn)
    run.emit(
        EventType.ROLLBACK_COMPLETED,
        revision_before=before,
        revision_after=after,
        steps=len(plan),
        duration_ms=round((time.monotonic() - started) * 1000),
    )
    return {**facts, "revision_after": after, "steps": [s.to_json() for s in plan]}


def _apply_steps(run: Run, plan: list[Step], facts: dict[str, Any], failed: EventType) -> None:
    """Apply the steps one transaction each; on failure report where the database stands."""
    if not plan:
        return
    migrator, conn, command = run.migrations(), run.conn, run.command
    backend_pid = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() or 0)
    conn.commit()
    invalid_before = _invalid_indexes(conn)  # a step that succeeds leaves no invalid index; one that fails may
    monitor = BlockingMonitor(run.db.url, backend_pid, run.db.lock_blocking_threshold, lambda data: run.journal.emit_aside(EventType.LOCK_BLOCKING, data))
    with monitor:
        outcome = "applied"
        for number, step in enumerate(plan, start=1):
            outcome = "applied" if step.direction == "up" else "reverted"
            step_started = utcnow()
            clock = time.monotonic()
            recorded: list[bool] = []

            checksum = preflight.script_checksum(migrator, step.revision) if step.direction == "up" else None

            def record(connection: Connection, step: Step = step, started: datetime = step_started, clock: float = clock,
                       checksum: str | None = checksum) -> None:
                finished = utcnow()
                store.insert_changelog(
                    connection, command=command, revision=step.revision, description=step.description,
                    direction=step.direction, started_at=started, finished_at=finished, outcome=outcome,
                    checksum=checksum,
                )
                run.journal.stage(
                    connection, EventType.MIGRATION_STEP, **step.to_json(), number=number, of=len(plan),
                    duration_ms=round((time.monotonic() - clock) * 1000),
                )
                recorded.append(True)

            def on_version_apply(*, ctx: Any, **_: Any) -> None:
                record(ctx.connection)

            try:
                _apply_politely(run, step, on_version_apply)
            except Exception as exc:
                run.journal.discard_staged()
                _rollback_quietly(conn)
                error = describe_error(exc)
                dropped = _drop_invalid_indexes(run, invalid_before)
                if dropped:
                    facts = {**facts, "dropped_invalid_indexes": dropped}
                if isinstance(exc, LocksUnavailable):
                    error = exc.message
                try:
                    after = migrator.current(conn)
                    store.insert_changelog(
                        conn, command=command, revision=step.revision, description=step.description,
                        direction=step.direction, started_at=step_started, finished_at=utcnow(),
                        outcome="failed", error=error,
                    )
                    conn.commit()
                except Exception as inner:  # the connection itself is gone
                    _rollback_quietly(conn)
                    raise Unavailable(f"lost the database during step {step.revision}: {redact(inner)}", **facts) from None
                run.emit(failed, **facts, revision_after=after, failed_step=step.to_json(), error=error)
                raise OperationFailed(
                    f"step {step.revision} ({step.description}) failed: {error.splitlines()[0] if error else type(exc).__name__};"
                    f" the database is at revision {after or 'base'}",
                    **facts,
                    revision_after=after,
                ) from None
            if not recorded:
                # env.py did not pass on_version_apply: record after the commit instead of inside it.
                record(conn)
                conn.commit()
            run.journal.flush()


class LocksUnavailable(OperationFailed):
    """A step kept timing out on its table locks, attempt after attempt."""


def _set_lock_timeout(conn: Connection, seconds: float) -> None:
    conn.exec_driver_sql(f"SET lock_timeout = '{postgres_interval(seconds)}'")
    conn.commit()


def _lock_targets(run: Run, step: Step) -> dict[str, str]:
    """The tables a step will lock, from its offline SQL; empty when that cannot be told."""
    try:
        return retries.lock_targets(run.offline_sql(step))
    except Exception as exc:  # noqa: BLE001 - a script's own code may raise anything offline
        log.info("step %s: cannot tell which tables it locks (%s); retrying on lock timeouts only", step.revision, redact(exc))
        return {}


def _apply_politely(run: Run, step: Step, on_version_apply: Callable[..., None]) -> None:
    """Apply one step under a short lock_timeout, retried with backoff while sessions are in its way.

    Before each attempt, a transaction open longer than ``lock_holder_grace``
    that holds a conflicting lock on a table the step needs means the attempt
    would only queue the application behind it: dbagent waits without asking.
    An attempt that times out has rolled back entirely and is tried again.
    Each wait is a ``lock.waiting`` event naming the sessions in the way.
    """
    migrator, conn = run.migrations(), run.conn
    policy = run.db.retry_policy()
    targets = _lock_targets(run, step)
    attributes = _script_attributes(run)
    started = time.monotonic()
    attempt = 0
    try:
        for attempt in range(1, policy.attempts + 1):
            timeout = policy.lock_timeout(attempt)
            last = attempt == policy.attempts
            in_the_way = (
                retries.blockers(conn, targets, older_than_s=policy.holder_grace_s) if targets and not last else []
            )
            tried = not in_the_way
            if tried:
                if timeout != run.db.lock_timeout:
                    _set_lock_timeout(conn, timeout)
                try:
                    migrator.apply(conn, step, on_version_apply, attributes)
                    return
                except Exception as exc:
                    if not retries.is_lock_timeout(exc):
                        raise
                    run.journal.discard_staged()
                    _rollback_quietly(conn)
                    in_the_way = retries.blockers(conn, targets) if targets else []
                    if last:
                        raise LocksUnavailable(
                            f"could not get the locks it needs in {attempt} attempt(s) over"
                            f" {time.monotonic() - started:.0f}s"
                            f" (lock_timeout up to {postgres_interval(timeout)}): blocked by {retries.describe(in_the_way)}"
                        ) from exc
            pause = policy.pause(attempt)
            run.emit(
                EventType.LOCK_WAITING,
                guard="table_locks",
                revision=step.revision,
                direction=step.direction,
                attempt=attempt,
                attempts=policy.attempts,
                tried=tried,
                lock_timeout_ms=round(timeout * 1000),
                retry_in_ms=round(pause * 1000),
                waited_ms=round((time.monotonic() - started) * 1000),
                tables=targets,
                blockers=in_the_way,
            )
            time.sleep(pause)
    finally:
        if attempt > 1:  # back to the session's own lock_timeout (apply_timeouts) for what follows
            try:
                _set_lock_timeout(conn, run.db.lock_timeout)
            except Exception:  # the connection is gone; the failure is reported by the caller
                _rollback_quietly(conn)


# A backfill reports after every batch; the event log hears of it at most this often (and at the end).
BACKFILL_EVENT_EVERY_S = 2.0


def _script_attributes(run: Run) -> dict[str, Any]:
    """What the migration scripts can read from ``context.config.attributes`` (``agent.backfill`` reads these)."""
    last_said: dict[str, float] = {}

    def on_progress(progress: dict[str, Any]) -> None:
        name = str(progress.get("name"))
        now = time.monotonic()
        if progress.get("finished") or now - last_said.get(name, float("-inf")) >= BACKFILL_EVENT_EVERY_S:
            last_said[name] = now
            run.journal.emit_aside(EventType.BACKFILL_PROGRESS, progress)

    return {
        "dbagent.backfill": {
            "batch_size": run.db.backfill_batch_size,
            "pause_s": run.db.backfill_pause,
            "on_progress": on_progress,
        }
    }


_INVALID_INDEXES = """
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT i.indisvalid
"""


def _invalid_indexes(conn: Connection) -> set[str]:
    names = {row[0] for row in conn.exec_driver_sql(_INVALID_INDEXES).all()}
    conn.commit()
    return names


def _drop_invalid_indexes(run: Run, before: set[str]) -> list[str]:
    """Drop the INVALID indexes a failed step left behind (a failed CREATE INDEX CONCURRENTLY).

    Such an index is useless for reads yet still maintained on every write;
    ``DROP INDEX CONCURRENTLY`` runs outside a transaction, on the step's own
    connection (which holds the database's lock). Returns the names dropped.
    """
    conn = run.conn
    try:
        left = sorted(_invalid_indexes(conn) - before)
    except Exception as exc:  # the connection is gone; the failure is reported by the caller
        log.warning("could not look for invalid indexes: %s", redact(exc))
        _rollback_quietly(conn)
        return []
    dropped = []
    driver = conn.connection.driver_connection
    for name in left:  # quoted by quote_ident
        try:
            driver.autocommit = True
            driver.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            dropped.append(name)
        except Exception as exc:
            log.error("could not drop the invalid index %s left by a failed step: %s", name, redact(exc))
        finally:
            driver.autocommit = False
    return dropped


def describe_error(exc: BaseException) -> str:
    """A driver error as an operator reads it: the server's message and the statement, secrets masked."""
    import sqlalchemy.exc

    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
        message = str(exc.orig).strip()
        if exc.statement:
            message += f" (statement: {exc.statement.strip()[:300]})"
        return redact(message)
    return redact(exc).strip()


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


OPERATIONS: dict[CommandType, Callable[[Run], dict[str, Any]]] = {
    CommandType.STATUS: status,
    CommandType.MIGRATE: migrate,
    CommandType.ROLLBACK: rollback,
    CommandType.VERIFY: verify,
    CommandType.HISTORY: history,
    CommandType.BACKUP: backup_operations.backup,
    CommandType.RESTORE: backup_operations.restore,
    CommandType.LIST_BACKUPS: backup_operations.list_backups,
    CommandType.VERIFY_BACKUP: backup_operations.verify_backup,
    CommandType.PRUNE: backup_operations.prune,
}
