"""Events: the audit trail's entries, in the shape docs/contract.md gives them.

Pure: the model and its encodings. Writing them to PostgreSQL and the Redis
Stream is ``dbagent.operations.journal``'s and ``dbagent.bus.eventlog``'s job.
"""

from __future__ import annotations

import json
import socket
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EventType(StrEnum):
    COMMAND_ACCEPTED = "command.accepted"
    COMMAND_REJECTED = "command.rejected"
    LOCK_ACQUIRED = "lock.acquired"
    LOCK_RELEASED = "lock.released"
    LOCK_WAITING = "lock.waiting"
    LOCK_BLOCKING = "lock.blocking"
    VALIDATION_COMPLETED = "validation.completed"
    VALIDATION_FAILED = "validation.failed"
    BACKUP_STARTED = "backup.started"
    BACKUP_PROGRESS = "backup.progress"
    BACKUP_COMPLETED = "backup.completed"
    BACKUP_FAILED = "backup.failed"
    MIGRATION_STARTED = "migration.started"
    MIGRATION_STEP = "migration.step"
    MIGRATION_COMPLETED = "migration.completed"
    MIGRATION_FAILED = "migration.failed"
    VERIFY_COMPLETED = "verify.completed"
    VERIFY_FAILED = "verify.failed"
    ROLLBACK_STARTED = "rollback.started"
    ROLLBACK_COMPLETED = "rollback.completed"
    ROLLBACK_FAILED = "rollback.failed"
    RESTORE_STARTED = "restore.started"
    RESTORE_COMPLETED = "restore.completed"
    RESTORE_FAILED = "restore.failed"
    BACKUP_VERIFIED = "backup.verified"
    PRUNE_COMPLETED = "prune.completed"
    PRUNE_FAILED = "prune.failed"
    # A command with no failure event of its own (status, history, a backup check) that failed or was interrupted.
    COMMAND_FAILED = "command.failed"
    APP_STARTUP_FAILED = "app.startup_failed"
    BACKFILL_PROGRESS = "backfill.progress"


HOST = socket.gethostname()


class Event(BaseModel):
    """One audit-trail entry. ``id`` is ours (consumers deduplicate by it), not the stream's."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    ts: datetime = Field(default_factory=lambda: datetime.now(UTC))
    type: str
    db: str
    command_id: str | None = None
    actor: str | None = None
    ticket: str | None = None
    host: str = HOST
    data: dict[str, Any] = {}

    def to_json(self) -> dict[str, Any]:
        body = self.model_dump(mode="json")
        body["ts"] = iso(self.ts)
        return body

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for XADD."""
        body = self.to_json()
        body["data"] = json.dumps(self.data, separators=(",", ":"), default=str)
        return {key: "" if value is None else str(value) for key, value in body.items()}

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> Event:
        text = {_str(k): _str(v) for k, v in fields.items()}
        return cls(
            id=text["id"],
            ts=datetime.fromisoformat(text["ts"]),
            type=text["type"],
            db=text["db"],
            command_id=text.get("command_id") or None,
            actor=text.get("actor") or None,
            ticket=text.get("ticket") or None,
            host=text.get("host", ""),
            data=json.loads(text.get("data") or "{}"),
        )


def iso(ts: datetime) -> str:
    """UTC ISO-8601 with a Z, milliseconds kept."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
