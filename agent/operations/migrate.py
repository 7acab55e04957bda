"""The ``migrate`` and ``rollback`` operations: plan, check the environment, validate, back up, take the
verification baseline, apply the steps (``dbagent.operations.steps``), verify."""

from __future__ import annotations

import logging
import time
from typing import Any

from dbagent.checks import preflight
from dbagent.core.commands import (
    CommandStatus,
    CommandType,
    MigrateArgs,
    RollbackArgs,
)
from dbagent.core.errors import (
    BadInput,
    DbAgentError,
    OperationFailed,
)
from dbagent.core.events import EventType
from dbagent.core.lifecycle import Phase
from dbagent.core.redact import redact
from dbagent.operations import backup as backup_operations
from dbagent.operations.context import Run, current_revision
from dbagent.operations.inspect import verify_run
from dbagent.operations.steps import PlanRun, invalid_indexes
from dbagent.postgres import store
from dbagent.postgres.backups import BackupKind, Trigger
from dbagent.postgres.blocking import BlockingMonitor
from dbagent.postgres.migrator import (
    Step,
)
from dbagent.postgres.verify import capture_baseline

log = logging.getLogger(__name__)


def migrate(run: Run) -> dict[str, Any]:
    args = run.command.parsed_args()
    assert isinstance(args, MigrateArgs)
    migrator = run.migrations()
    before = current_revision(run)
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
    after = _apply(run, plan, facts, before, EventType.MIGRATION_FAILED, EventType.MIGRATION_COMPLETED, started)
    facts.update(revision_after=after, steps=[s.to_json() for s in plan])
    run.phase(Phase.VERIFY)
    try:
        verified = verify_run(
            run, target, baseline, {"revision_before": before, "run_command_id": run.command.id, "backup": backup}
        )
    except OperationFailed as exc:
        exc.details.update(facts)
        raise
    return {**facts, **verified, "validation": validation}


def _apply(
    run: Run, plan: list[Step], facts: dict[str, Any], before: str | None, failed: EventType, completed: EventType,
    started: float,
) -> str | None:
    """The plan's steps (``apply_steps``), then the run's completion event; the revision reached."""
    apply_steps(run, plan, facts, failed)
    after = run.migrations().current(run.conn)
    run.emit(completed, revision_before=before, revision_after=after, steps=len(plan),
             duration_ms=round((time.monotonic() - started) * 1000))
    return after


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
    if not plan:
        preflight.check_allow(args.allow)
        return None
    verdict = preflight.validate(
        run.db, allow=args.allow, migrator=run.migrations(), conn=run.conn, current=before,
        lint_only={s.revision for s in plan}, render=run.offline_sql,
    )
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
    before = current_revision(run)
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
    after = _apply(run, plan, facts, before, EventType.ROLLBACK_FAILED, EventType.ROLLBACK_COMPLETED, started)
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


def apply_steps(run: Run, plan: list[Step], facts: dict[str, Any], failed: EventType) -> None:
    """Apply the plan, one transaction per step (or one for the plan); on failure report where the database stands.

    The plan runs in one Alembic run (env.py loaded once) as long as nothing
    is in its way. Each step's own transaction records it done
    (``steps_done``), with its change-log row and event, so the plan never
    claims more than what committed; its events are published once it has
    committed, in batches of at most 0.1 s (``Journal.flush_soon``); which
    step runs now is shown live (presence, coalesced the same way). A worker
    told to stop ends here between steps, or cancels the step in progress once
    the stop grace is over. Locks: ``PlanRun``.

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
    invalid_before = invalid_indexes(conn)  # a step that succeeds leaves no invalid index; one that fails may
    monitor = BlockingMonitor(run.db.url, backend_pid, run.db.lock_blocking_threshold, lambda data: run.journal.emit_aside(EventType.LOCK_BLOCKING, data))
    run.phase(Phase.STEPS, steps_done=0)
    with monitor:
        PlanRun(run, plan, facts, failed, invalid_before).apply()
