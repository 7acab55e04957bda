"""When to roll back, and to where: pure planning from failure events (no I/O).

A failed run (``migration.failed``, ``verify.failed`` from a migrate) or an
application that cannot start after a deploy (``app.startup_failed``) gets one
rollback to the revision the database had before the run. The rollback's
command id is derived from the failed run's command id, so however many
events, agents or redeliveries there are, the worker executes it once.
A failed rollback never plans another rollback: it alerts, and may escalate
to restoring the run's pre-migration backup when the database allows it.

The rollback never goes below the failed run's starting revision, and only
follows a revision before that is known: a failure whose run's start was not
recorded (an interrupted command from an older worker) alerts and does
nothing else, and ``base`` is a target only for a run recorded as having
started there. A failure that changed nothing (it stopped before its first
step committed) needs no rollback.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from dbagent.core.events import Event, EventType

ROLLBACK_TRIGGERS = frozenset({EventType.MIGRATION_FAILED, EventType.VERIFY_FAILED, EventType.APP_STARTUP_FAILED})
AGENT_ACTOR = "agent"


def _derived_id(kind: str, of: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dbagent:{kind}-for:{of}"))


@dataclass(frozen=True)
class RollbackPlan:
    """A rollback to enqueue: back to ``target`` (None: base) because of ``cause``."""

    db: str
    target: str | None
    command_id: str
    cause: dict[str, Any] = field(default_factory=dict)

    def args(self) -> dict[str, Any]:
        return {"to": self.target or "base", "cause": self.cause}


@dataclass(frozen=True)
class Escalation:
    """What to do about a failed rollback: always alert; restore a backup when allowed."""

    db: str
    message: str
    restore_path: str | None
    restore_command_id: str | None


@dataclass(frozen=True)
class NoRollback:
    """Why a failure event gets no rollback; ``alert`` when an operator must look."""

    reason: str
    alert: bool = False


def backup_path(backup: Any) -> str | None:
    return backup.get("path") if isinstance(backup, dict) else None


def revision_before_known(data: dict[str, Any]) -> bool:
    """Whether a failure event knows where its run started (``revision_before`` None then means base).

    Events say so; an event from before they did knows it when it carries the
    key and is not an interrupted-command report (those read it from a plan that
    never held it).
    """
    if "revision_before_known" in data:
        return bool(data["revision_before_known"])
    return "revision_before" in data and not data.get("interrupted")


def plan_rollback(event: Event, last_run: dict[str, Any] | None = None) -> RollbackPlan | None:
    """The rollback a failure event calls for, or None (``decide`` says why not)."""
    decision = decide(event, last_run)
    return decision if isinstance(decision, RollbackPlan) else None


def decide(event: Event, last_run: dict[str, Any] | None = None) -> RollbackPlan | NoRollback:
    """The rollback a failure event calls for, or why there is none.

    ``last_run`` is, for ``app.startup_failed``, the database's last completed
    migrate run: ``{"command_id", "revision_before", "backup"}``.
    """
    data = event.data
    known = revision_before_known(data)
    after_known = data.get("revision_after_known", True)
    if event.type == EventType.MIGRATION_FAILED:
        run_id, before, after = event.command_id, data.get("revision_before"), data.get("revision_after")
        backup = data.get("backup")
    elif event.type == EventType.VERIFY_FAILED:
        # Only a migrate's verification says which run to undo; a standalone verify alerts only.
        if "run_command_id" not in data:
            return NoRollback("a standalone verify names no run to undo")
        run_id, before, after = data.get("run_command_id"), data.get("revision_before"), data.get("revision")
        backup = data.get("backup")
    elif event.type == EventType.APP_STARTUP_FAILED:
        if not last_run:
            return NoRollback("no migrate run changed this database", alert=True)
        run_id, before, after = last_run.get("command_id"), last_run.get("revision_before"), last_run.get("revision_after")
        backup = last_run.get("backup")
        known = "revision_before" in last_run
    else:
        return NoRollback(f"{event.type} does not call for a rollback")
    if not run_id:
        return NoRollback("the event names no run", alert=True)
    if data.get("claimed") is False:
        return NoRollback("the run never started: nothing was changed")
    if not known:
        return NoRollback(
            f"where run {run_id} started is not recorded: not rolling back (the database is at"
            f" {after or 'base' if after_known else 'an unknown revision'}); look at it and roll back by hand if needed",
            alert=True,
        )
    if not after_known:
        return NoRollback(f"the revision run {run_id} left could not be read: not rolling back", alert=True)
    if after == before:
        return NoRollback(f"run {run_id} changed nothing (the database is still at {before or 'base'})")
    cause = {
        "event_id": event.id,
        "event_type": event.type,
        "run_command_id": run_id,
        "revision_before": before,
        # The worker rolls back only while the database is still where the failure left it:
        # a failure read late (an agent that was down) must not undo later, good runs.
        "expect_revision": after,
        "backup": backup_path(backup),
    }
    return RollbackPlan(db=event.db, target=before, command_id=_derived_id("rollback", run_id), cause=cause)


def plan_escalation(event: Event, auto_restore: bool) -> Escalation | None:
    """For a ``rollback.failed``: the alert, and the restore to enqueue when auto_restore is on."""
    if event.type != EventType.ROLLBACK_FAILED:
        return None
    cause = event.data.get("cause") or {}
    path = cause.get("backup")
    next_step = event.data.get("next_step") or (
        f"restore the pre-migration backup: dbagent restore {path} --db {event.db}" if path
        else f"restore the newest pre-migration backup (dbagent backups list --db {event.db})"
    )
    message = f"rollback of {event.db} failed: {event.data.get('error', 'unknown error')}; {next_step}"
    if auto_restore and path and event.command_id:
        return Escalation(event.db, message, path, _derived_id("restore", event.command_id))
    return Escalation(event.db, message, None, None)
