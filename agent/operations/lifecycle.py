"""The command lifecycle on the worker (the states of ``dbagent.core.lifecycle``).

``execute`` is what the Celery task calls (tests call it too): decode → authorise → record → lock → claim →
call the operation (``OPERATIONS``) → emit → finish. It always returns the command's result and publishes it
where producers wait, whatever failed and wherever; it never raises. ``reap`` reports the commands a dead
worker left (at worker start, before every claim, and from the worker's relay), and ``relay`` re-publishes
what Redis missed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Connection

from dbagent.bus import keys
from dbagent.bus.eventlog import EventLog
from dbagent.bus.lease import RedisLease
from dbagent.core import lifecycle
from dbagent.core.commands import (
    FINISHED,
    Command,
    CommandStatus,
    CommandType,
    check_command,
    message_digest,
    utcnow,
)
from dbagent.core.errors import (
    BadInput,
    CommandRejected,
    DbAgentError,
    OperationFailed,
    Unavailable,
    error_text,
)
from dbagent.core.events import EventType
from dbagent.core.lifecycle import STOP, StopRequest, pause_point
from dbagent.core.redact import redact
from dbagent.monitoring import alert
from dbagent.operations import backup as backup_operations
from dbagent.operations.context import Run, base_result, cached_migrator, worker_name
from dbagent.operations.inspect import history, status, verify
from dbagent.operations.journal import Journal, Presence, publish_result
from dbagent.operations.migrate import migrate, rollback
from dbagent.postgres import store
from dbagent.postgres.connections import (
    apply_timeouts,
    pg_connection,
    redis_client,
    rollback_quietly,
)
from dbagent.postgres.locks import AdvisoryLock
from dbagent.settings import DatabaseSettings, Settings

log = logging.getLogger(__name__)


# While a writer waits for the database, it says so this often.
LOCK_WAITING_EVERY_S = 5.0


LOCK_WAITING_EVERY_S = 5.0
# A command id longer than this is no id of ours (Command allows 100): not echoed back.
MAX_ID_CHARS = 100


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
    from dbagent.postgres import backups as bk

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
