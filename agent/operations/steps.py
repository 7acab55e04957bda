"""Applying a plan's steps: one Alembic run for the plan (``PlanRun``), each step in its own transaction or
the plan in one (env.py's ``transaction_per_migration``), under lock timeouts with polite retries, the
change log and the step events recorded as each step (or the plan) commits, and the INVALID indexes a
failed ``CREATE INDEX CONCURRENTLY`` leaves dropped."""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

import redis
from sqlalchemy import Connection

from dbagent.checks import preflight
from dbagent.core import retries
from dbagent.core.commands import (
    utcnow,
)
from dbagent.core.durations import postgres_interval
from dbagent.core.errors import (
    OperationFailed,
    Unavailable,
    error_text,
)
from dbagent.core.events import EventType
from dbagent.core.lifecycle import Phase, pause_point
from dbagent.core.redact import redact
from dbagent.operations.context import Run, Stopped
from dbagent.postgres import blocking, store
from dbagent.postgres.connections import rollback_quietly
from dbagent.postgres.migrator import (
    Migrator,
    Step,
)

log = logging.getLogger(__name__)


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


class PlanRun:
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
        self.batched = self.atomic and not any(may_commit_midway(self.migrator, s) for s in plan)
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
                    rollback_quietly(self.run.conn)

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
        ``may_commit_midway`` did not see): the records of the steps the database kept, written now."""
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
        rollback_quietly(run.conn)
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
        rollback_quietly(conn)
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
        rollback_quietly(conn)
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
            store.insert_changelog(conn, store.changelog_row(
                command, step.revision, step.description, step.direction, started or utcnow(), utcnow(), "failed",
                error, None,
            ))
            conn.commit()
        except Exception as inner:  # the connection itself is gone: reported once it is back
            rollback_quietly(conn)
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


def may_commit_midway(migrator: Migrator, step: Step) -> bool:
    """Whether the step's script may commit before it ends: in an ``autocommit_block``, a backfill (which runs
    in one), or transaction control of its own (``_commits_in_script``); or it cannot be read."""
    source = _script_source(migrator, step)
    return source is None or "autocommit_block" in source or "backfill" in source or bool(_commits_in_script(migrator, step))


def _commits_in_script(migrator: Migrator, step: Step) -> str | None:
    """Where the step's script ends or opens a transaction itself (COMMIT, ROLLBACK, BEGIN), if anywhere."""
    from dbagent.checks.lint import transaction_control

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
    """What the migration scripts can read from ``context.config.attributes`` (``dbagent.backfill`` reads these)."""
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


def invalid_indexes(conn: Connection) -> set[str]:
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
        left = sorted(invalid_indexes(conn) - before)
    except Exception as exc:  # the connection is gone; the failure is reported by the caller
        log.warning("could not look for invalid indexes: %s", redact(exc))
        rollback_quietly(conn)
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
