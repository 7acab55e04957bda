"""Execute one command on the database's worker, through the lifecycle of ``agent.core.lifecycle``.

``execute`` is what the Celery task calls (tests call it too): decode → check →
record → lock → claim → run → finish. It always returns the command's result
and publishes it where producers wait, whatever failed and wherever; it never
raises. ``reap`` reports the commands a dead worker left (at worker start,
before every claim, and from the worker's relay), and ``relay`` re-publishes
what Redis missed. Each operation (``status``, ``migrate``, ``rollback``,
``verify``, ``history``) is one plain function of a ``Run``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import redis
from alembic.util import CommandError
from sqlalchemy import Connection

from agent.bus import keys
from agent.bus.eventlog import EventLog
from agent.checks import preflight
from agent.core import lifecycle, retries
from agent.core.commands import (
    FINISHED,
    Command,
    CommandStatus,
    CommandType,
    HistoryArgs,
    MigrateArgs,
    RollbackArgs,
    VerifyArgs,
    check_command,
    message_digest,
    utcnow,
)
from agent.core.durations import postgres_interval
from agent.core.errors import (
    BadInput,
    CommandRejected,
    DbAgentError,
    OperationFailed,
    Unavailable,
    error_text,
)
from agent.core.events import HOST, Event, EventType
from agent.core.lifecycle import STOP, Phase, StopRequest, pause_point
from agent.core.redact import redact
from agent.monitoring import alert
from agent.operations import backup as backup_operations
from agent.operations.journal import Journal, Presence, publish_result, rollback_quietly
from agent.postgres import blocking, store
from agent.postgres.backups import BackupKind, Trigger, list_backups
from agent.postgres.blocking import BlockingMonitor
from agent.postgres.connections import pg_connection, redis_client
from agent.postgres.locks import AdvisoryLock, RedisLease, holder_backend, read_lease
from agent.postgres.migrator import (
    SEPARATOR,
    Migrator,
    Step,
    find_ini,
    find_pyproject,
    state_text,
    version_directories,
)
from agent.postgres.verify import Baseline, capture_baseline, run_checks, summary
from agent.settings import DatabaseSettings, Settings

log = logging.getLogger(__name__)

# While a writer waits for the database, it says so this often.
LOCK_WAITING_EVERY_S = 5.0
# A command id longer than this is no id of ours (Command allows 100): not echoed back.
MAX_ID_CHARS = 100

_rollback_quietly = rollback_quietly


def worker_name(db: str) -> str:
    return f"{db}@{HOST}:{os.getpid()}"


class Stopped(OperationFailed):
    """Raised when a worker told to stop ends its command before the next step (or lock, or retry)."""


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
    stop: StopRequest = STOP
    presence: Presence | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    claimed: bool = False
    per_step: bool = True  # env.py's transaction_per_migration (read by _check_environment); else one for the plan
    _offline: dict[Step, str] = field(default_factory=dict)

    def migrations(self) -> Migrator:
        if self.migrator is None:
            self.migrator = cached_migrator(self.db.migrations, self.db.url)
        return self.migrator

    def emit(self, type_: EventType, **data: Any) -> Event:
        return self.journal.emit(type_, **data)

    def phase(self, phase: Phase | None = None, *, persist: bool = True, soon: bool = False, **changes: Any) -> None:
        """Persist where a claimed command is, before it does it, for whoever finds it after a crash.

        ``persist=False``: only shown live (presence) and a pause point, not recorded; ``soon``: shown
        within ``journal.PUBLISH_EVERY_S``, coalesced with the updates that follow (``Presence.update``).
        """
        if phase is not None:
            changes["phase"] = phase.value
        if persist:
            self.plan.update(changes)
        if self.claimed and persist:
            command_id = self.command.id
            if not self.journal.record(
                lambda conn: store.update_plan(conn, command_id, changes, durable=False), what="the command's phase"
            ):
                raise Unavailable(f"could not record the phase of command {command_id} in PostgreSQL")
        if self.presence is not None and phase is not None:
            self.presence.update(soon=soon, phase=phase.value, step=changes.get("step"))
        if phase is not None:
            step = changes.get("step")
            pause_point(f"phase:{phase.value}" + (f":{step['number']}" if step else ""))

    def check_stop(self, before: str) -> None:
        if self.stop.is_set():
            raise Stopped(f"stopped before {before}: {self.stop.reason}", interrupted=True)

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
_migrators_lock = threading.Lock()


def cached_migrator(location: str, url: str) -> Migrator:
    """The scripts of a directory, parsed again only when a file in it changed."""
    root = Path(location)
    # The scripts where the project keeps them, and what configures them (env.py's version table, the
    # project's alembic.ini or pyproject.toml).
    directories, recursive = version_directories(root)
    scripts = [p for d in directories for p in (d.rglob("*.py") if recursive else d.glob("*.py"))]
    settings = (root / "env.py", find_ini(root), find_pyproject(root))
    files = [*scripts, *(f for f in settings if f is not None and f.is_file())]
    stamp = tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    with _migrators_lock:
        cached = _migrators.get((location, url))
        if cached is None or cached[0] != stamp:
            cached = (stamp, Migrator(location, url))
            _migrators[(location, url)] = cached
        return cached[1]


def base_result(command_id: str | None, type_: str | None, db: str) -> dict[str, Any]:
    return {"command_id": command_id, "type": type_, "db": db, "status": None, "error": None, "exit_code": None}


# -- the lifecycle, on the worker -------------------------------------------------


def execute(
    settings: Settings,
    db_name: str,
    message: object,
    *,
    client: redis.Redis | None = None,
    worker: str | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Run one queue message on the worker of database ``db_name``; returns the result, never raises."""
    client = client if client is not None else redis_client(settings.redis)
    eventlog = EventLog(client, settings.redis.prefix)
    worker = worker or worker_name(db_name)
    db = settings.databases[db_name]

    # Until the command is authenticated and its id claimed, nothing is written under its id:
    # a refusal goes where only the message's own producer looks (keys.rejection, by digest).
    digest = message_digest(message)
    try:
        command = Command.from_message(message)
    except CommandRejected as exc:
        claimed = message.get("id") if isinstance(message, dict) else None
        command_id = claimed if isinstance(claimed, str) and 0 < len(claimed) <= MAX_ID_CHARS else None
        journal = Journal(eventlog, settings.redis.prefix, db_name, None)
        record_rejection(journal, db, str(exc), worker, command_id=command_id, digest=digest)
        return journal.refuse(_outcome(base_result(command_id, None, db_name), exc), digest)

    journal = Journal(eventlog, settings.redis.prefix, db_name, command, db)
    result = base_result(command.id, str(command.type), db_name)
    try:
        check_command(
            command,
            settings.security.signing_key(),
            db=db_name,
            now=utcnow(),
            max_age_s=settings.security.max_command_age,
            max_skew_s=settings.security.max_clock_skew,
            max_ttl_s=settings.security.max_command_ttl,
        )
    except BadInput as exc:
        # Forged, expired, or arguments this worker cannot read (a producer of another
        # version): nothing of it runs; only its rejection is recorded.
        record_rejection(journal, db, exc.message, worker, digest=digest)
        return journal.refuse(_outcome(result, exc), digest)

    try:
        return _execute(settings, db_name, db, command, journal, client, worker, stop or STOP, result)
    except Exception as exc:  # noqa: BLE001 - the last line: the producer gets an answer, whatever escaped
        log.exception("command %s failed before or outside its operation", command.id)
        journal.conn = None
        return journal.finish(_outcome(result, as_dbagent_error(exc)))


# Commands this process is executing: its own relay leaves them to their executor, which reports
# them itself (after losing PostgreSQL, say) with what really happened.
_executing: set[str] = set()
_executing_lock = threading.Lock()


def _execute(
    settings: Settings, db_name: str, db: DatabaseSettings, command: Command, journal: Journal, client: redis.Redis,
    worker: str, stop: StopRequest, result: dict[str, Any],
) -> dict[str, Any]:
    with _executing_lock:
        _executing.add(command.id)
    try:
        return _execute_here(settings, db_name, db, command, journal, client, worker, stop, result)
    finally:
        with _executing_lock:
            _executing.discard(command.id)


def _execute_here(
    settings: Settings, db_name: str, db: DatabaseSettings, command: Command, journal: Journal, client: redis.Redis,
    worker: str, stop: StopRequest, result: dict[str, Any],
) -> dict[str, Any]:
    with pg_connection(db, application_name=f"dbagent {command.type} {command.id[:8]}") as conn:
        store.ensure_schema(conn)
        apply_timeouts(conn, db)
        if not store.try_command_lock(conn, command.id):
            conn.commit()
            # A second delivery (the visibility timeout passed during a long backup): the
            # live execution reports; this one must not touch the row or the result.
            log.warning("command %s is being executed by a live worker: this delivery is left to it", command.id)
            return {**result, "status": "duplicate"}
        conn.commit()
        journal.conn = conn
        presence = Presence(client, settings.redis.prefix, command.id, worker, settings.redis.lease_ttl)
        run = Run(settings, db_name, db, command, conn, journal, client, worker, stop=stop, presence=presence)
        try:
            fresh = store.record_command(conn, command, worker)
            conn.commit()
            if not fresh:
                row = store.command_row(conn, command.id) or {}
                conn.commit()
                if row.get("status") in FINISHED:
                    log.info("command %s was already executed (%s): reporting, not re-running", command.id, row["status"])
                    return journal.finish(row.get("result") or {**result, "status": row.get("status")})
                # Not finished, and its command lock was free: whoever ran it is gone.
                return _report_own_orphan(run, row, f"the worker running it ({row.get('worker')}) died")
            presence.start()
            run.emit(EventType.COMMAND_ACCEPTED, worker=worker, args=command.args, expires_at=command.expires_at)
            try:
                outcome = _run(run, result)
            except Exception as exc:  # noqa: BLE001 - recorded below as the command's failure
                if not isinstance(exc, DbAgentError):
                    log.exception("command %s failed unexpectedly", command.id)
                outcome = _outcome(result, as_dbagent_error(exc))
            outcome = _finish(run, outcome)
        finally:
            # Only once the outcome is published: a producer never sees "gone" for a command that finished.
            presence.stop()
        return outcome  # the command lock goes with the session, closed now


def _run(run: Run, result: dict[str, Any]) -> dict[str, Any]:
    """The operation, under the writer lock and claimed with its plan when it writes."""
    command, conn = run.command, run.conn
    operation = OPERATIONS[command.type]
    if not command.needs_lock:
        return _run_operation(run, operation, result)
    with writer_lock(run):
        # Whatever a dead writer left is reported first, while the database is where it left it.
        reap(run.settings, run.db_name, conn, run.redis, holding_writer_lock=True, exclude=command.id)
        before, known = _revision_before(run)
        plan = lifecycle.initial_plan(command.type, before, known)
        if not store.claim_command(conn, command.id, run.worker, plan):
            # Only this session (holding the command's lock) moves its row: something else is wrong.
            conn.rollback()
            raise OperationFailed(f"command {command.id} could not be claimed: its record is no longer 'accepted'")
        conn.commit()
        run.plan, run.claimed = plan, True
        if run.presence is not None:
            run.presence.update(phase=lifecycle.Phase.CLAIMED.value)
        pause_point("phase:claimed")
        return _run_operation(run, operation, result)


def _current(run: Run) -> str | None:
    """The database's revision as the operation starts: read at claim, under the lock, when it was claimed."""
    if run.claimed and run.plan.get("revision_before_known"):
        return run.plan.get("revision_before")
    return run.migrations().current(run.conn)


def _revision_before(run: Run) -> tuple[str | None, bool]:
    """Where the database is as the command starts, and whether that could be read at all."""
    if not (Path(run.db.migrations) / "env.py").is_file():
        return None, False
    try:
        return run.migrations().current(run.conn), True
    except DbAgentError:
        rollback_quietly(run.conn)
        if run.command.type in (CommandType.MIGRATE, CommandType.ROLLBACK):
            raise
        return None, False


def _run_operation(run: Run, operation: Callable[[Run], dict[str, Any]], result: dict[str, Any]) -> dict[str, Any]:
    try:
        return {**result, **operation(run), "status": CommandStatus.SUCCEEDED.value, "exit_code": 0}
    except BadInput as exc:
        rollback_quietly(run.conn)
        run.emit(EventType.COMMAND_REJECTED, reason=exc.message, worker=run.worker)
        return _outcome(dict(result), exc)
    except DbAgentError as exc:
        rollback_quietly(run.conn)
        return _outcome(dict(result), exc)
    except Exception as exc:  # noqa: BLE001 - a script or a driver: reported as the command's failure
        log.exception("command %s failed unexpectedly", run.command.id)
        rollback_quietly(run.conn)
        return _outcome(dict(result), as_dbagent_error(exc))


def _finish(run: Run, outcome: dict[str, Any]) -> dict[str, Any]:
    """Record the terminal state in PostgreSQL (the record), then publish it; never leaves the row open."""
    command, conn = run.command, run.conn
    if run.stop.is_set() and outcome.get("status") == CommandStatus.FAILED.value:
        outcome.setdefault("interrupted", True)
    if outcome.get("status") != CommandStatus.SUCCEEDED.value and _lost(conn):
        return _finish_after_losing_postgres(run, outcome)
    if outcome.get("status") == CommandStatus.FAILED.value and not run.journal.reported_failure:
        # Whatever stopped it (a lock wait, a dependency), the failure has an event of its kind.
        run.emit(
            lifecycle.failure_event(command.type), error=outcome.get("error"), phase=run.plan.get("phase"),
            claimed=run.claimed,  # unclaimed, a writer changed nothing: nothing for the agent to undo
            **{k: outcome[k] for k in ("revision_before", "revision_after", "interrupted") if k in outcome},
            revision_before_known=bool(run.claimed and run.plan.get("revision_before_known")),
        )
    try:
        rollback_quietly(conn)
        status = CommandStatus.INTERRUPTED if outcome.get("interrupted") else CommandStatus(outcome["status"])
        finished = store.finish_command(conn, command.id, status.value, outcome)
        conn.commit()
    except Exception as exc:  # noqa: BLE001 - the connection died at the very end
        log.warning("could not record the outcome of %s: %s", command.id, redact(exc))
        rollback_quietly(conn)
        return _finish_after_losing_postgres(run, outcome)
    if not finished:  # reported by someone else meanwhile (a reaper): theirs is the record
        row = store.command_row(conn, command.id) or {}
        conn.commit()
        return run.journal.finish(row.get("result") or outcome)
    return run.journal.finish(outcome)


def _lost(conn: Connection) -> bool:
    """Whether the command's connection is dead (PostgreSQL restarted, the network went)."""
    if conn.closed or conn.invalidated:
        return True
    try:
        rollback_quietly(conn)
        conn.exec_driver_sql("SELECT 1")
        conn.commit()
        return False
    except Exception:  # noqa: BLE001 - any error here means the session is gone
        rollback_quietly(conn)
        return True


def _finish_after_losing_postgres(run: Run, outcome: dict[str, Any]) -> dict[str, Any]:
    """PostgreSQL went away mid-command: wait for it, then report the command as interrupted, truthfully.

    The step in progress rolled back with the session; where the database now
    stands is read once it answers again, under the writer lock. If it stays
    away longer than ``reconnect_timeout``, the producer hears that the outcome
    is not recorded yet, and the next worker to reach the database reports it.
    """
    command = run.command
    error = outcome.get("error") or "the connection to PostgreSQL was lost"
    reason = f"lost PostgreSQL ({error})"
    deadline = time.monotonic() + run.settings.worker.reconnect_timeout
    while True:
        try:
            with pg_connection(run.db, application_name=f"dbagent report {command.id[:8]}") as conn:
                apply_timeouts(conn, run.db)
                reported = report_orphan(
                    run.settings, run.db_name, conn, run.redis, command.id, reason, wait_s=max(deadline - time.monotonic(), 1.0)
                )
                if reported is not None:
                    return reported
                break
        except Unavailable:
            if time.monotonic() >= deadline or run.stop.wait(1.0):
                break
        except Exception as exc:  # noqa: BLE001 - the server answered but the report failed: leave it to a reaper
            log.warning("could not report command %s after losing PostgreSQL: %s", command.id, redact(exc))
            break
    outcome = {
        **outcome,
        "status": CommandStatus.FAILED.value,
        "exit_code": 3,
        "error": f"{error}; the outcome is not recorded yet: the next worker to reach the database reports it"
        " as interrupted",
    }
    run.journal.conn = None
    return run.journal.finish(outcome)


def report_orphan(
    settings: Settings,
    db_name: str,
    conn: Connection,
    client: redis.Redis,
    command_id: str,
    reason: str,
    *,
    holding_writer_lock: bool = False,
    wait_s: float = 0.0,
) -> dict[str, Any] | None:
    """Report a command whose executor is gone, as ``lifecycle.interrupted_report`` says; its result, or None.

    None when it is not ours to report: finished already, or still alive (its
    command lock is held), or a writer's and the writer lock stays busy for
    ``wait_s`` (a live writer will reap it before it claims).
    """
    row = store.command_row(conn, command_id)
    conn.commit()
    if row is None or row["status"] in FINISHED:
        if row is not None and row.get("result"):
            publish_result(client, settings.redis.prefix, command_id, row["result"])
        return row.get("result") if row else None
    if not store.try_command_lock(conn, command_id):
        conn.commit()
        return None
    conn.commit()
    writer = row["status"] in (CommandStatus.CLAIMED, CommandStatus.RUNNING)
    advisory = AdvisoryLock(conn)
    try:
        if writer and not holding_writer_lock:
            if not advisory.try_acquire():
                if wait_s <= 0:
                    return None
                try:
                    advisory.acquire(wait_s)
                except DbAgentError:
                    return None
        return _report(settings, db_name, conn, client, row, reason)
    finally:
        advisory.release()
        try:
            store.release_command_lock(conn, command_id)
            conn.commit()
        except Exception:  # noqa: BLE001 - the session ending frees it
            rollback_quietly(conn)


def _report(
    settings: Settings, db_name: str, conn: Connection, client: redis.Redis, row: dict[str, Any], reason: str
) -> dict[str, Any]:
    db = settings.databases[db_name]
    command = _command_of(row)
    eventlog = EventLog(client, settings.redis.prefix)
    journal = Journal(eventlog, settings.redis.prefix, db_name, command, db)
    journal.conn = conn
    current, known = None, False
    if (Path(db.migrations) / "env.py").is_file():
        try:
            current, known = cached_migrator(db.migrations, db.url).current(conn), True
        except Exception:  # noqa: BLE001 - a version table that cannot be read: said so in the report
            rollback_quietly(conn)
            current, known = None, False
    kept = _remove_unfinished_backup(db, row.get("plan") or {})
    report = lifecycle.interrupted_report(
        row["type"], row["status"], row.get("plan"), revision_now=current, revision_now_known=known, reason=reason,
        left=f"its backup {kept} was complete and is kept" if kept else None,
    )
    outcome = {**base_result(command.id, str(command.type), db_name), **report.result}
    # The failure event and the terminal state commit together: reported once, or not at all.
    journal.stage(conn, report.event, **report.data, worker=row.get("worker"))
    finished = store.finish_command(conn, command.id, CommandStatus.INTERRUPTED.value, outcome)
    if not finished:
        conn.rollback()
        journal.discard_staged()
        fresh = store.command_row(conn, command.id) or {}
        conn.commit()
        return fresh.get("result") or outcome
    conn.commit()
    journal.finish(outcome)
    log.warning("command %s (%s) was interrupted: %s", command.id, command.type, report.data["error"])
    alert(f"{command.type} on {db_name} was interrupted: {report.data['error']}", level="error", db=db_name,
          command_id=command.id, actor=command.actor)
    return outcome


def _remove_unfinished_backup(db: DatabaseSettings, plan: dict[str, Any]) -> str | None:
    """Remove what an interrupted backup left unfinished (the partial file, an archive renamed before its
    manifest was written); returns the archive's name when it was complete after all."""
    from agent.postgres import backups as bk

    backup = plan.get("backup") if isinstance(plan.get("backup"), dict) else {}
    if not db.backup_dir or not backup:
        return None
    directory = Path(db.backup_dir)
    complete = None
    for key in ("partial", "path"):
        name = backup.get(key)
        if not name:
            continue
        path = directory / Path(name).name  # only ever inside backup_dir
        if key == "path" and path.with_name(path.name + bk.MANIFEST_SUFFIX).exists():
            complete = path.name  # listed: kept
            continue
        if path.exists():
            bk.remove_path(path)
            log.warning("removed %s, left unfinished by an interrupted backup", path)
    return complete


def _command_of(row: dict[str, Any]) -> Command:
    return Command.model_validate(
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


def _report_own_orphan(run: Run, row: dict[str, Any], reason: str) -> dict[str, Any]:
    """A redelivered command whose first execution died: report it (under the writer lock if it wrote)."""
    conn = run.conn
    if row.get("status") in (CommandStatus.CLAIMED, CommandStatus.RUNNING):
        with writer_lock(run):
            outcome = _report(run.settings, run.db_name, conn, run.redis, row, reason)
    else:
        outcome = _report(run.settings, run.db_name, conn, run.redis, row, reason)
    store.release_command_lock(conn, run.command.id)
    conn.commit()
    return outcome


def reap(
    settings: Settings,
    db_name: str,
    conn: Connection,
    client: redis.Redis,
    *,
    holding_writer_lock: bool = False,
    exclude: str | None = None,
) -> list[str]:
    """Report every command a dead worker left unfinished on this database; returns their ids."""
    reported = []
    rows = store.open_commands(conn)
    conn.commit()
    for row in rows:
        with _executing_lock:
            ours = row["id"] in _executing
        if row["id"] == exclude or ours:
            continue
        outcome = report_orphan(
            settings, db_name, conn, client, row["id"], f"the worker running it ({row.get('worker')}) is gone",
            holding_writer_lock=holding_writer_lock,
        )
        if outcome is not None and outcome.get("interrupted"):
            reported.append(row["id"])
    return reported


def relay(settings: Settings, db_name: str, client: redis.Redis) -> dict[str, int]:
    """One round of the worker's relay: report orphans, re-publish results and events Redis missed."""
    db = settings.databases[db_name]
    prefix = settings.redis.prefix
    with pg_connection(db, application_name="dbagent relay") as conn:
        store.ensure_schema(conn)
        apply_timeouts(conn, db)
        reaped = reap(settings, db_name, conn, client)
        results = store.unpublished_results(conn, keys.RESULT_TTL_S)
        conn.commit()
        published = [row["id"] for row in results if row["result"] and publish_result(client, prefix, row["id"], row["result"])]
        if published:
            store.mark_published(conn, published)
            conn.commit()
        events = store.unpublished_events(conn)
        conn.commit()
        if events:
            try:
                EventLog(client, prefix).publish(events)
            except redis.RedisError as exc:
                log.info("unpublished events wait for Redis: %s", redact(exc))
                events = []
            if events:
                store.mark_published_events(conn, [e.id for e in events])
                conn.commit()
    if reaped or published or events:
        log.info("relay: %d interrupted command(s) reported, %d result(s) and %d event(s) re-published",
                 len(reaped), len(published), len(events))
    return {"reaped": len(reaped), "results": len(published), "events": len(events)}


class Relay:
    """The worker's background relay: ``relay`` every ``[worker] relay_interval`` while the worker runs."""

    def __init__(self, settings: Settings, db_name: str, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.db_name = db_name
        self.client = client if client is not None else redis_client(settings.redis)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._said: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"dbagent relay {self.db_name}", daemon=True)
        self._thread.start()

    def once(self) -> dict[str, int] | None:
        try:
            counts = relay(self.settings, self.db_name, self.client)
            self._said = None
            return counts
        except Exception as exc:  # noqa: BLE001 - PostgreSQL or Redis away: retried next round
            text = exc.message if isinstance(exc, DbAgentError) else redact(exc)
            if text != self._said:
                log.warning("relay: %s (retrying every %.0fs)", text, self.settings.worker.relay_interval)
                self._said = text
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.worker.relay_interval):
            self.once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def as_dbagent_error(exc: BaseException) -> DbAgentError:
    """Any exception as the dbagent error a producer reads: lost dependencies are Unavailable (exit 3)."""
    if isinstance(exc, DbAgentError):
        return exc
    import psycopg
    import sqlalchemy.exc

    if isinstance(exc, redis.RedisError):
        return Unavailable(f"Redis failed during the command: {redact(exc)}")
    if isinstance(exc, psycopg.OperationalError):
        return Unavailable(f"PostgreSQL failed during the command: {redact(exc)}")
    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError) or (
        isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated
    ):
        return Unavailable(f"PostgreSQL failed during the command: {error_text(exc)}")
    if isinstance(exc, sqlalchemy.exc.SQLAlchemyError):
        return OperationFailed(f"database error: {error_text(exc)}")
    return OperationFailed(f"unexpected error: {type(exc).__name__}: {redact(exc)}")


def apply_timeouts(conn: Connection, db: DatabaseSettings) -> None:
    """Every statement of the session waits for locks and runs at most as long as configured."""
    settings = {"lock_timeout": postgres_interval(db.lock_timeout), "statement_timeout": postgres_interval(db.statement_timeout)}
    if conn.dialect.server_version_info >= (14,):
        # A statement keeps running after its client died unless the server
        # checks the socket; without this, a killed worker's long step would
        # hold the database's lock until the step finished on its own.
        settings["client_connection_check_interval"] = "1s"
    # One round trip for all of them; session-level (is_local false), like SET.
    conn.exec_driver_sql(
        "SELECT " + ", ".join("set_config(%s, %s, false)" for _ in settings),
        tuple(value for pair in settings.items() for value in pair),
    )
    conn.commit()


def record_rejection(journal: Journal, db: DatabaseSettings, reason: str, worker: str, **data: Any) -> None:
    """command.rejected into the audit log (when the database answers) and the stream."""
    try:
        with pg_connection(db, application_name="dbagent audit") as conn:
            store.ensure_schema(conn)
            journal.conn = conn
            journal.emit(EventType.COMMAND_REJECTED, reason=reason, worker=worker, **data)
            return
    except Exception as exc:  # noqa: BLE001 - the stream still carries it
        log.warning("rejection not written to the audit log: %s", as_dbagent_error(exc).message)
    finally:
        journal.conn = None
    journal.emit(EventType.COMMAND_REJECTED, reason=reason, worker=worker, **data)


def _outcome(result: dict[str, Any], exc: DbAgentError) -> dict[str, Any]:
    status = CommandStatus.REJECTED if isinstance(exc, BadInput) else CommandStatus.FAILED
    return {**result, **exc.details, "status": status.value, "error": redact(exc.message), "exit_code": exc.exit_code}


# -- the writer lock ----------------------------------------------------------


@contextmanager
def writer_lock(run: Run) -> Iterator[int]:
    """Hold the database: the Redis lease first (queue order, visibility), then the advisory lock.

    The fencing token comes from the database's sequence once the advisory lock
    is held: it grows across Redis restarts.
    """
    command = run.command
    prefix = run.settings.redis.prefix
    owner = {"worker": run.worker, "pid": os.getpid(), "command_id": command.id, "type": str(command.type), "actor": command.actor}
    lease = RedisLease(run.redis, keys.lease(prefix, run.db_name), None, owner, run.settings.redis.lease_ttl)
    started = time.monotonic()
    last_said = [float("-inf")]

    def waiting(guard: str) -> Callable[[float, dict[str, Any] | None], None]:
        def on_wait(waited_s: float, holder: dict[str, Any] | None) -> None:
            run.check_stop("it got the database's lock")
            if waited_s - last_said[0] >= LOCK_WAITING_EVERY_S:
                last_said[0] = waited_s
                run.emit(EventType.LOCK_WAITING, guard=guard, waited_ms=round(waited_s * 1000), holder=holder)
        return on_wait

    timeout_s = run.db.lock_wait_timeout
    lease.acquire(timeout_s, waiting("redis_lease"))
    advisory = AdvisoryLock(run.conn)
    token: int | None = None
    try:
        remaining = max(timeout_s - (time.monotonic() - started), 1.0)
        advisory.acquire(remaining, waiting("postgres_advisory"))
        token = store.next_fencing_token(run.conn)
        run.conn.commit()
        run.emit(EventType.LOCK_ACQUIRED, token=token, worker=run.worker, waited_ms=round((time.monotonic() - started) * 1000))
        yield token
    finally:
        advisory.release()
        lease.release()
        if token is not None:  # only a lock that was announced is announced released
            run.emit(EventType.LOCK_RELEASED, token=token, worker=run.worker)


# -- operations ---------------------------------------------------------------


def status(run: Run) -> dict[str, Any]:
    migrator = run.migrations()
    current = migrator.current(run.conn)
    try:
        head, heads, branch_points = migrator.head(), list(migrator.heads()), migrator.branch_points()
        pending = [s.to_json() for s in migrator.upgrade_plan(current)]
        problem = None
    except (BadInput, CommandError) as exc:  # the database's state, or the scripts, are not what Alembic can plan
        head, heads, branch_points, pending = None, [], [], []
        problem = exc.message if isinstance(exc, BadInput) else f"Alembic cannot plan these migrations: {exc}"
    lease = read_lease(run.redis, keys.lease(run.settings.redis.prefix, run.db_name))
    session = holder_backend(run.conn)
    last_backups = {}
    if run.db.backup_dir:
        for manifest in list_backups(run.db.backup_dir):
            last_backups.setdefault(str(manifest.type), manifest.summary(run.db.backup_dir))
    return {
        "last_backups": last_backups,
        "current": current,
        "current_heads": current.split(SEPARATOR) if current else [],
        "head": head,
        "heads": heads,
        "branch_points": branch_points,
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
    expected = migrator.head() if args.expect in (None, "head", "heads") else state_text(migrator.resolve(args.expect))
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
    before = _current(run)
    plan = migrator.upgrade_plan(before, args.to)
    target = migrator.state_after(before, plan)  # every head it leaves: the other branch's too
    run.phase(Phase.VALIDATION, target=target, steps=[s.to_json() for s in plan])
    if plan:
        _check_environment(run, before)
    run.render_offline(plan)
    validation = _preflight(run, before, plan, args)
    if args.dry_run:
        return {
            "dry_run": True,
            "revision_before": before,
            "revision_after": before,
            "target": target,
            "steps": [{**s.to_json(), "sql": run.offline_sql(s)} for s in plan],
            "validation": validation,
        }
    # Nothing below changes the schema until the steps: a failure here leaves the database at `before`.
    unchanged = {"revision_before": before, "revision_after": before, "revision_before_known": True, "target": target}
    backup: dict[str, Any] | str
    try:
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
            if manifest.skipped:  # what the migration role could not read is not in the backup: the result says so
                backup["skipped"] = [s.model_dump() for s in manifest.skipped]
            run.phase(backup=backup)
        # What verification compares the run against; nothing is changed if it cannot be read.
        baseline = capture_baseline(run.conn, run.db)
    except DbAgentError as exc:
        exc.details.update(unchanged)
        raise
    run.emit(
        EventType.MIGRATION_STARTED,
        revision_before=before,
        target=target,
        steps=[s.to_json() for s in plan],
        backup=backup,
        transactions=_transactions(run),
    )
    started = time.monotonic()
    facts = {"revision_before": before, "revision_before_known": True, "target": target, "backup": backup}
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
    run.phase(Phase.VERIFY)
    try:
        verified = _verify(
            run, target, baseline, {"revision_before": before, "run_command_id": run.command.id, "backup": backup}
        )
    except OperationFailed as exc:
        exc.details.update(facts)
        raise
    return {**facts, **verified, "validation": validation}


def _transactions(run: Run) -> str:
    """How the plan's transactions run, as env.py configures them: ``step`` (transaction_per_migration) or ``plan``."""
    return "step" if run.per_step else "plan"


def _check_environment(run: Run, before: str | None) -> None:
    """Refuse, before anything changes, an env.py that would migrate outside the lock (its own connection)."""
    try:
        run.per_step = run.migrations().check_environment(run.conn)
    except DbAgentError as exc:
        exc.details.update(revision_before=before, revision_after=before, revision_before_known=True)
        raise
    except Exception as exc:  # noqa: BLE001 - env.py is the project's code
        raise OperationFailed(
            f"env.py failed before any migration ran: {type(exc).__name__}: {redact(exc)}",
            revision_before=before, revision_after=before, revision_before_known=True,
        ) from None


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
        run.db.migrations, naming=run.db.naming, migrator=run.migrations(), current=before, recorded=recorded,
        lint_only={s.revision for s in plan}, render=run.offline_sql, lint_from=run.db.lint_from,
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
    before = _current(run)
    cause = args.cause or {}
    expected = cause.get("expect_revision", before)
    if expected != before:
        raise BadInput(
            f"not rolling back: the database moved on since the failure (it left {expected or 'base'},"
            f" the database is now at {before or 'base'})",
            revision_before=before,
            revision_after=before,
        )
    plan = migrator.downgrade_plan(before, steps=args.steps, to=args.to)
    target = migrator.state_after(before, plan) or "base"
    if args.cause is not None:
        _check_automatic_rollback(run, cause, target, before)
    run.phase(target=target, steps=[s.to_json() for s in plan])
    if plan:
        _check_environment(run, before)
    run.render_offline(plan)
    run.emit(EventType.ROLLBACK_STARTED, revision_before=before, target=target, steps=[s.to_json() for s in plan],
             cause=args.cause, transactions=_transactions(run))
    started = time.monotonic()
    facts = {"revision_before": before, "revision_before_known": True, "target": None if target == "base" else target,
             "cause": args.cause}
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


# Causes that say the run itself failed (app.startup_failed follows a run that succeeded).
_FAILURES_OF_THE_RUN = (EventType.MIGRATION_FAILED.value, EventType.VERIFY_FAILED.value)


def _check_automatic_rollback(run: Run, cause: dict[str, Any], target: str, before: str | None) -> None:
    """An automatic rollback undoes its failed run and nothing more: checked against that run's own record.

    The failed migrate's plan, persisted in this database when it claimed the
    lock, says where it started (a run from before plans held it: its
    ``migration.started`` event). A rollback that would go elsewhere (below it,
    or to base for a run not recorded as starting there), or whose run left no
    such record, is refused: whatever sent it (an agent of another version, a
    hand-made cause) cannot make the automation undo more than the crashed run.
    """
    run_id = cause.get("run_command_id")
    row = store.command_row(run.conn, run_id) if run_id else None
    known, started_at = store.recorded_start(run.conn, run_id) if row else (False, None)
    run.conn.commit()
    refuse = None
    if row is None:
        refuse = f"the failed run {run_id} is not recorded in this database"
    elif row["type"] != CommandType.MIGRATE:
        refuse = f"the failed run {run_id} is a {row['type']}, not a migrate"
    elif row["status"] == CommandStatus.SUCCEEDED and cause.get("event_type") in _FAILURES_OF_THE_RUN:
        # The event stream is not signed: a migration.failed for a run that succeeded is not the run's.
        refuse = f"the run {run_id} is recorded as succeeded, but the rollback's cause says it failed ({cause['event_type']})"
    elif not known:
        refuse = f"where the failed run {run_id} started was not recorded"
    elif (started_at or "base") != target:
        refuse = f"it would go to {target}, but the failed run {run_id} started at {started_at or 'base'}"
    if refuse:
        raise BadInput(
            f"not rolling back automatically: {refuse}; nothing was changed (roll back by hand if needed)",
            revision_before=before, revision_after=before,
        )


def _apply_steps(run: Run, plan: list[Step], facts: dict[str, Any], failed: EventType) -> None:
    """Apply the plan, one transaction per step (or one for the plan); on failure report where the database stands.

    The plan runs in one Alembic run (env.py loaded once) as long as nothing
    is in its way. Each step's own transaction records it done
    (``steps_done``), with its change-log row and event, so the plan never
    claims more than what committed; its events are published once it has
    committed, in batches of at most 0.1 s (``Journal.flush_soon``); which
    step runs now is shown live (presence, coalesced the same way). A worker
    told to stop ends here between steps, or cancels the step in progress once
    the stop grace is over. Locks: ``_PlanRun``.

    Where env.py leaves ``transaction_per_migration`` off (Alembic's default),
    the plan is one transaction, as plain Alembic runs it: the records of every
    step commit with it, a failure or a stop undoes all of it, and its events
    are published once it committed. Its tables are checked for old
    transactions in their way once, before it starts (it holds every lock it
    takes until the end); a lock timeout retries the whole plan.
    """
    if not plan:
        return
    conn = run.conn
    backend_pid = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() or 0)
    conn.commit()
    invalid_before = _invalid_indexes(conn)  # a step that succeeds leaves no invalid index; one that fails may
    monitor = BlockingMonitor(run.db.url, backend_pid, run.db.lock_blocking_threshold, lambda data: run.journal.emit_aside(EventType.LOCK_BLOCKING, data))
    run.phase(Phase.STEPS, steps_done=0)
    with monitor:
        _PlanRun(run, plan, facts, failed, invalid_before).apply()


# Why a plan's failure undid the steps before the one that failed.
_ONE_TRANSACTION = "the plan ran in one transaction (env.py leaves transaction_per_migration off)"


class _InTheWay(Exception):
    """Between two steps: an old transaction holds a lock the next step needs (the run ends there)."""

    def __init__(self, sessions: list[dict[str, Any]]) -> None:
        super().__init__("in the way")
        self.sessions = sessions


class _StopBetweenSteps(Exception):
    """Between two steps: the worker was told to stop (the run ends there)."""


class LocksUnavailable(OperationFailed):
    """A step kept timing out on its table locks, attempt after attempt."""


class _PlanRun:
    """One plan being applied: how far it got, and what happens before each step.

    Each step runs under a short lock_timeout, retried with backoff while
    sessions are in its way. Before a step, a transaction open longer than
    ``lock_holder_grace`` that holds a conflicting lock on a table the step
    needs means the step would only queue the application behind it: dbagent
    waits without asking. One query (``blocking.contended``) covers the tables
    of the whole rest of the plan for ``lock_holder_grace`` seconds; only a
    step on a table someone holds is checked on its own (``blocking.blockers``).
    An attempt that times out has rolled back entirely and is tried again,
    and the plan goes on from there in a new Alembic run. Each wait is a
    ``lock.waiting`` event naming the sessions in the way.
    """

    def __init__(self, run: Run, plan: list[Step], facts: dict[str, Any], failed: EventType, invalid_before: set[str]) -> None:
        self.run, self.plan, self.facts, self.failed = run, plan, facts, failed
        self.invalid_before = invalid_before
        self.migrator = run.migrations()
        self.policy = run.db.retry_policy()
        self.attributes = _script_attributes(run)
        self.outcome = "applied" if plan[0].direction == "up" else "reverted"
        self.committed = 0  # plan[:committed] are applied, committed and recorded
        self.batch_start = 0  # where the current Alembic run started
        self.attempt = 1  # of plan[committed]
        self.waiting_since = time.monotonic()
        self.lock_timeout = run.db.lock_timeout  # the session's, as last set (and committed)
        self.announced = -1
        self.current: dict[str, Any] = {}
        self.targets: dict[int, dict[str, str]] = {}
        self.contended: set[str] = set()
        self.contended_at: float | None = None
        # env.py's transaction_per_migration off: the plan is one transaction, all or nothing (Alembic's way)
        self.atomic = not run.per_step
        self.position = 0  # the step in progress (atomic: plan[:position] are applied, not committed)
        # In one transaction, the steps' records are written together before it commits (one statement, not one
        # round trip per step), unless a script may commit midway (autocommit_block, a backfill, COMMIT): then
        # each step's record goes in with it, as it would alone.
        self.batched = self.atomic and not any(_may_commit_midway(self.migrator, s) for s in plan)
        self.pending: list[store.StepRecord] = []  # batched: the records of the applied steps, not written yet

    # -- the loop -------------------------------------------------------------

    def apply(self) -> None:
        try:
            while self.committed < len(self.plan):
                self._attempt()
        finally:
            if self.lock_timeout != self.run.db.lock_timeout:  # back to the session's own (apply_timeouts)
                try:
                    self._set_lock_timeout(self.run.db.lock_timeout)
                except Exception:  # the connection is gone; the failure is reported already
                    _rollback_quietly(self.run.conn)

    def _attempt(self) -> None:
        """One attempt at plan[committed], and the rest of the plan after it while nothing is in the way."""
        run, conn = self.run, self.run.conn
        try:
            self._next(self.committed)
        except _StopBetweenSteps:
            self._stopped()
        index = self.committed
        last = self.attempt == self.policy.attempts
        timeout = self.policy.lock_timeout(self.attempt)
        if self.atomic:  # its locks are held to the end: the whole plan is checked before it starts, not between steps
            self.position, in_the_way = self._in_the_way_of_plan() if not last else (index, [])
        else:
            self.position = index
            in_the_way = self._in_the_way(index) if self._targets(index) and not last else []
        tried = not in_the_way
        if tried:
            try:
                if timeout != self.lock_timeout:
                    self._set_lock_timeout(timeout)
                self.batch_start = index
                with run.stop.cancelling(lambda: _cancel_statement(conn)):
                    self.migrator.apply_many(conn, self.plan[index:], self._on_version_apply, self.attributes,
                                             self._before_step, per_step=not self.atomic)
                if self.atomic:  # the plan's transaction committed: every step is applied, and its events go out
                    self.committed = len(self.plan)
                    run.journal.flush()
                return
            except _InTheWay as blocked:  # plan[:committed] went through; the next step waits
                in_the_way, tried = blocked.sessions, False
            except _StopBetweenSteps:
                self._stopped()
            except Exception as exc:
                if self.committed == len(self.plan):  # after the last step committed: not a step's failure
                    raise
                in_the_way = self._retry_or_fail(exc)
        # The run may have gone further than the step it started at: the wait is for the one it ended on.
        step, targets, timeout = self.plan[self._at()], self._targets(self._at()), self.policy.lock_timeout(self.attempt)
        pause = self.policy.pause(self.attempt)
        try:
            run.check_stop(f"attempt {self.attempt + 1} of step {step.revision}")
            run.emit(
                EventType.LOCK_WAITING,
                guard="table_locks",
                revision=step.revision,
                direction=step.direction,
                attempt=self.attempt,
                attempts=self.policy.attempts,
                tried=tried,
                lock_timeout_ms=round(timeout * 1000),
                retry_in_ms=round(pause * 1000),
                waited_ms=round((time.monotonic() - self.waiting_since) * 1000),
                tables=targets,
                blockers=in_the_way,
            )
            if run.stop.wait(pause):
                run.check_stop(f"attempt {self.attempt + 1} of step {step.revision}")
        except Stopped as exc:
            self._fail(exc)
        self.attempt += 1
        self.contended_at = None  # the next attempt looks again

    # -- between two steps ----------------------------------------------------

    def _before_step(self, k: int) -> None:
        """Called by the Alembic run once plan[:batch_start + k] have committed (``Migrator.apply_many``); in a plan
        that is one transaction, inside it, once they are applied."""
        index = self.batch_start + k
        if self.atomic:
            if index == len(self.plan):
                self._write_pending()
                return  # the plan's transaction commits next
            self.position = index
            if k:
                pause_point(f"phase:between_steps:{index}")
            self._next(index)  # a stop raised here undoes the plan's transaction
            self._started(index)
            return
        self.position = index
        if k:
            self.committed = index
            self.attempt = 1
            self.waiting_since = time.monotonic()
            self.run.journal.flush_soon()  # the step committed: its events go out with the next few
            pause_point(f"phase:between_steps:{index}")
            if index == len(self.plan):
                return
            self._next(index)
            if self.lock_timeout != self.run.db.lock_timeout:
                self._set_lock_timeout(self.run.db.lock_timeout)
            if self._targets(index):
                in_the_way = self._in_the_way(index)
                if in_the_way:
                    raise _InTheWay(in_the_way)
        self._started(index)

    def _started(self, index: int) -> None:
        self.current = {"index": index, "started": utcnow(), "clock": time.monotonic(),
                        "checksum": preflight.script_checksum(self.migrator, self.plan[index].revision)
                        if self.plan[index].direction == "up" else None}

    def _undone(self, index: int, after: str | None) -> bool:
        """Whether plan[committed:index] were applied and then undone with the plan's one transaction (not when a
        script's autocommit_block committed them: the database then stands past where the run started)."""
        return self.atomic and index > self.committed and after == self.facts.get("revision_before")

    def _at(self) -> int:
        """The step the plan is at: the first not committed, or (one transaction) the one in progress."""
        return self.position if self.atomic else self.committed

    def _in_the_way_of_plan(self) -> tuple[int, list[dict[str, Any]]]:
        """Before a plan that is one transaction: the first step with an old transaction in its way, and those
        sessions ((committed, []) when none)."""
        for index in range(self.committed, len(self.plan)):
            if self._targets(index):
                sessions = self._in_the_way(index)
                if sessions:
                    return index, sessions
        return self.committed, []

    def _next(self, index: int) -> None:
        """Before plan[index] (once, whatever its attempts): a stop ends the plan here; the step is shown live."""
        if index == self.announced:
            return
        if self.run.stop.is_set():
            raise _StopBetweenSteps()
        step = self.plan[index]
        self.run.phase(Phase.STEP, persist=False, soon=True,
                       step={"number": index + 1, "of": len(self.plan), "revision": step.revision, "direction": step.direction})
        self.announced = index

    def _targets(self, index: int) -> dict[str, str]:
        if index not in self.targets:
            self.targets[index] = _lock_targets(self.run, self.plan[index])
        return self.targets[index]

    def _in_the_way(self, index: int) -> list[dict[str, Any]]:
        """Old transactions holding what plan[index] needs (committed reads on the run's connection)."""
        conn, grace = self.run.conn, self.policy.holder_grace_s
        targets = self._targets(index)
        if self.attempt == 1:
            now = time.monotonic()
            if self.contended_at is None or now - self.contended_at >= grace:
                self.contended = blocking.contended(conn, (self._targets(i) for i in range(index, len(self.plan))))
                self.contended_at = now
            if not self.contended.intersection(targets):
                return []
        return blocking.blockers(conn, targets, older_than_s=grace)

    def _set_lock_timeout(self, seconds: float) -> None:
        _set_lock_timeout(self.run.conn, seconds)
        self.lock_timeout = seconds

    # -- inside each step's transaction ----------------------------------------

    def _on_version_apply(self, *, ctx: Any, **_: Any) -> None:
        """Alembic has applied plan[current] and updated its version table: its records commit with it."""
        run, index = self.run, self.current["index"]
        step, number, command = self.plan[index], self.current["index"] + 1, run.command
        event = run.journal.staged(
            EventType.MIGRATION_STEP, **step.to_json(), number=number, of=len(self.plan),
            duration_ms=round((time.monotonic() - self.current["clock"]) * 1000),
        )
        record = store.step_record(
            command=command, revision=step.revision, description=step.description, direction=step.direction,
            started_at=self.current["started"], finished_at=utcnow(), outcome=self.outcome,
            checksum=self.current["checksum"], event=event,
        )
        self.pending.append(record)
        if not self.batched:
            self._write_pending(ctx.connection)

    def _write_pending(self, conn: Connection | None = None) -> None:
        """The records of the steps applied since the last write, in the transaction they ran in."""
        if self.pending:
            done = self.current["index"] + 1  # the last step applied is the one whose record is the newest
            store.record_steps(conn or self.run.conn, self.pending, command_id=self.run.command.id,
                               steps_done=done if self.run.claimed else None)
            self.pending = []

    def _record_what_committed(self, after: str | None) -> None:
        """A batched plan undone by a failure or a stop, whose scripts committed part of it anyway (in a way
        ``_may_commit_midway`` did not see): the records of the steps the database kept, written now."""
        records, self.pending = self.pending, []
        before = self.facts.get("revision_before")
        if not self.batched or not records or after == before:
            return
        for j in range(len(records), 0, -1):
            if self.migrator.state_after(before, self.plan[self.committed:self.committed + j]) == after:
                conn = self.run.conn
                store.record_steps(conn, records[:j], command_id=self.run.command.id,
                                   steps_done=self.committed + j if self.run.claimed else None)
                conn.commit()
                try:
                    self.run.journal.eventlog.publish([r.event for r in records[:j]])
                except redis.RedisError as exc:
                    log.warning("could not publish the events of %d committed step(s): %s", j, redact(exc))
                return

    # -- when it goes wrong ---------------------------------------------------

    def _stopped(self) -> NoReturn:
        run, index = self.run, self._at()
        number = index + 1
        run.journal.discard_staged()
        _rollback_quietly(run.conn)
        after = self.migrator.current(run.conn)
        self._record_what_committed(after)
        error = f"stopped before step {number}/{len(self.plan)} ({self.plan[index].revision}): {run.stop.reason}"
        if self._undone(index, after):
            error += f"; {_ONE_TRANSACTION}: the steps before it were undone with it"
        run.emit(self.failed, **self.facts, revision_after=after, error=error, interrupted=True,
                 phase=Phase.STEPS.value, steps_done=self.committed)
        raise Stopped(f"{error}; the database is at revision {after or 'base'}", **self.facts,
                      revision_after=after, interrupted=True)

    def _retry_or_fail(self, exc: Exception) -> list[dict[str, Any]]:
        """plan[committed] failed: the sessions in its way when it timed out on a lock and is tried again;
        otherwise (and on its last attempt) the plan fails here."""
        migrator, conn, step = self.migrator, self.run.conn, self.plan[self._at()]
        if not retries.is_lock_timeout(exc):
            self._fail(exc)
        committed = _commits_in_script(migrator, step)
        if committed:
            # Part of its work may have committed before the timeout: running it again would apply it twice.
            self._fail(OperationFailed(
                f"timed out on a lock, and its script controls its own transactions ({committed}):"
                " part of it may have committed, so it is not retried; look at the database before"
                " running it again"
            ))
        self.run.journal.discard_staged()
        _rollback_quietly(conn)
        self.pending = []
        targets = self._targets(self._at())
        in_the_way = blocking.blockers(conn, targets) if targets else []
        if self.attempt == self.policy.attempts:
            self._fail(LocksUnavailable(
                f"could not get the locks it needs in {self.attempt} attempt(s) over"
                f" {time.monotonic() - self.waiting_since:.0f}s"
                f" (lock_timeout up to {postgres_interval(self.policy.lock_timeout(self.attempt))}):"
                f" blocked by {retries.describe(in_the_way)}"
            ))
        return in_the_way

    def _fail(self, exc: BaseException) -> NoReturn:
        """plan[committed] failed with exc: record it, report where the database stands, raise."""
        run, migrator, conn, command = self.run, self.migrator, self.run.conn, self.run.command
        index = self._at()
        step, number = self.plan[index], index + 1
        where = {"number": number, "of": len(self.plan), "revision": step.revision, "direction": step.direction}
        run.journal.discard_staged()
        _rollback_quietly(conn)
        error = error_text(exc, script=migrator.revision(step.revision).path)
        step_facts = dict(self.facts)
        if run.stop.is_set():
            step_facts["interrupted"] = True
            if run.stop.expired:
                error = (f"cancelled: {run.stop.reason}, and the step did not finish within"
                         f" stop_grace ({run.settings.worker.stop_grace:g}s): {error}")
        dropped = _drop_invalid_indexes(run, self.invalid_before)
        if dropped:
            step_facts["dropped_invalid_indexes"] = dropped
        started = self.current.get("started") if self.current.get("index") == index else None
        try:
            after = migrator.current(conn)
            self._record_what_committed(after)
            store.insert_changelog(
                conn, command=command, revision=step.revision, description=step.description,
                direction=step.direction, started_at=started or utcnow(), finished_at=utcnow(),
                outcome="failed", error=error,
            )
            conn.commit()
        except Exception as inner:  # the connection itself is gone: reported once it is back
            _rollback_quietly(conn)
            raise Unavailable(
                f"lost the database during step {number}/{len(self.plan)} ({step.revision}): {error or redact(inner)}",
                **step_facts,
            ) from None
        run.emit(self.failed, **step_facts, revision_after=after, failed_step=step.to_json(), error=error,
                 phase=Phase.STEP.value, step=where)
        undone = f" ({_ONE_TRANSACTION}: the steps before it were undone with it)" if self._undone(index, after) else ""
        raise OperationFailed(
            f"step {step.revision} ({step.description}) failed: {error.splitlines()[0] if error else type(exc).__name__};"
            f" the database is at revision {after or 'base'}{undone}",
            **step_facts,
            revision_after=after,
        ) from None


def _cancel_statement(conn: Connection) -> None:
    """Cancel what the command's session runs now (from another thread; the step then fails and rolls back)."""
    driver = conn.connection.driver_connection
    cancel = getattr(driver, "cancel_safe", None) or driver.cancel
    cancel()


def _set_lock_timeout(conn: Connection, seconds: float) -> None:
    conn.exec_driver_sql(f"SET lock_timeout = '{postgres_interval(seconds)}'")
    conn.commit()


def _script_source(migrator: Migrator, step: Step) -> str | None:
    """The step's script as text (``Migrator.source``: read once per Migrator); None when it cannot be read."""
    try:
        return migrator.source(step.revision).decode("utf-8", errors="replace")
    except OSError:
        return None


def _may_commit_midway(migrator: Migrator, step: Step) -> bool:
    """Whether the step's script may commit before it ends: in an ``autocommit_block``, a backfill (which runs
    in one), or transaction control of its own (``_commits_in_script``); or it cannot be read."""
    source = _script_source(migrator, step)
    return source is None or "autocommit_block" in source or "backfill" in source or bool(_commits_in_script(migrator, step))


def _commits_in_script(migrator: Migrator, step: Step) -> str | None:
    """Where the step's script ends or opens a transaction itself (COMMIT, ROLLBACK, BEGIN), if anywhere."""
    from agent.checks.lint import transaction_control

    source = _script_source(migrator, step)
    found = transaction_control(source) if source is not None else []
    return ", ".join(f"{what} at line {line}" for line, what in found[:3]) or None


def _lock_targets(run: Run, step: Step) -> dict[str, str]:
    """The tables a step will lock, from its offline SQL; empty when that cannot be told."""
    try:
        return retries.lock_targets(run.offline_sql(step), run.migrations().environment().version_table)
    except Exception as exc:  # noqa: BLE001 - a script's own code may raise anything offline
        log.info("step %s: cannot tell which tables it locks (%s); retrying on lock timeouts only", step.revision, redact(exc))
        return {}


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
