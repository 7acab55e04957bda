"""Commands: what producers ask a database's worker to do, signed so it can trust them.

A command is signed with HMAC-SHA256 over its canonical JSON (every field but
the signature), so a forged, altered or replayed-too-late message is rejected
before anything runs. This module is pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.errors import BadInput, CommandRejected


class CommandType(StrEnum):
    STATUS = "status"
    MIGRATE = "migrate"
    ROLLBACK = "rollback"
    VERIFY = "verify"
    HISTORY = "history"
    BACKUP = "backup"
    RESTORE = "restore"
    LIST_BACKUPS = "list_backups"
    VERIFY_BACKUP = "verify_backup"
    PRUNE = "prune"


class CommandStatus(StrEnum):
    ACCEPTED = "accepted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"


FINISHED = frozenset({CommandStatus.SUCCEEDED, CommandStatus.FAILED, CommandStatus.REJECTED})


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StatusArgs(_Args):
    pass


class HistoryArgs(_Args):
    limit: int = Field(50, ge=1, le=10_000)


class VerifyArgs(_Args):
    expect: str | None = None


class MigrateArgs(_Args):
    dry_run: bool = False
    to: str | None = None
    no_backup: bool = False
    allow: list[str] = []  # validation rules whose errors may not stop this migration


class RollbackArgs(_Args):
    steps: int | None = Field(None, ge=1)
    to: str | None = None
    cause: dict[str, Any] | None = None  # set by the agent: the failure this undoes

    @model_validator(mode="after")
    def _one_target(self) -> RollbackArgs:
        if (self.steps is None) == (self.to is None):
            raise ValueError("give either a number of steps or a target revision (--to REV|base)")
        return self


class BackupArgs(_Args):
    kind: str = Field("full", pattern="^(full|schema|data)$")
    trigger: str = Field("manual", pattern="^(manual|schedule)$")
    mark: str | None = Field(None, pattern="^(daily|weekly|monthly|interval)$")
    prune: bool = False


class RestoreArgs(_Args):
    path: str = Field(min_length=1)
    jobs: int = Field(1, ge=1, le=64)


class ListBackupsArgs(_Args):
    pass


class VerifyBackupArgs(_Args):
    path: str | None = None
    drill: bool = False


class PruneArgs(_Args):
    dry_run: bool = False


ARGS: dict[CommandType, type[_Args]] = {
    CommandType.STATUS: StatusArgs,
    CommandType.HISTORY: HistoryArgs,
    CommandType.VERIFY: VerifyArgs,
    CommandType.MIGRATE: MigrateArgs,
    CommandType.ROLLBACK: RollbackArgs,
    CommandType.BACKUP: BackupArgs,
    CommandType.RESTORE: RestoreArgs,
    CommandType.LIST_BACKUPS: ListBackupsArgs,
    CommandType.VERIFY_BACKUP: VerifyBackupArgs,
    CommandType.PRUNE: PruneArgs,
}

# Commands that change the database or delete backups: without a signing key
# configured, they are refused outright.
DESTRUCTIVE = frozenset({CommandType.MIGRATE, CommandType.ROLLBACK, CommandType.RESTORE, CommandType.PRUNE})


def is_destructive(type_: CommandType, args: dict[str, Any]) -> bool:
    return type_ in DESTRUCTIVE or (type_ == CommandType.BACKUP and bool(args.get("prune")))

# Commands that hold the database's writer lock while they run (a dry run does not).
LOCKED = DESTRUCTIVE | {CommandType.BACKUP}


def new_command_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


class Command(BaseModel):
    """One request to one database's worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default_factory=new_command_id, min_length=1, max_length=100)
    type: CommandType
    db: str = Field(min_length=1)
    args: dict[str, Any] = {}
    actor: str = Field(min_length=1, max_length=200)
    ticket: str | None = Field(None, max_length=200)
    issued_at: datetime = Field(default_factory=utcnow)
    signature: str | None = None

    @property
    def is_writer(self) -> bool:
        """Changes the database or deletes backups: needs a signature."""
        return is_destructive(self.type, self.args)

    @property
    def needs_lock(self) -> bool:
        return self.type in LOCKED and not self.dry_run

    @property
    def dry_run(self) -> bool:
        return bool(self.args.get("dry_run"))

    def parsed_args(self) -> _Args:
        """The arguments validated against this command type's schema."""
        try:
            return ARGS[self.type].model_validate(self.args)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            )
            raise BadInput(f"invalid arguments for {self.type}: {problems}") from None

    def canonical(self) -> bytes:
        """The bytes the signature covers: every field but the signature, keys sorted."""
        body = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def signed(self, key: bytes) -> Command:
        return self.model_copy(update={"signature": _mac(key, self.canonical())})

    def to_message(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_message(cls, message: object) -> Command:
        """Decode a queue message; a malformed one is a CommandRejected."""
        try:
            return cls.model_validate(message)
        except ValidationError as exc:
            raise CommandRejected(f"malformed command: {exc.errors()[0]['msg']}") from None


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def check_command(
    command: Command,
    key: bytes | None,
    *,
    db: str,
    now: datetime,
    max_age_s: float,
    max_skew_s: float,
) -> None:
    """Raise CommandRejected unless the command may run on this database now."""
    if command.db != db:
        raise CommandRejected(f"command is for database {command.db!r}, this worker serves {db!r}")
    if key is None:
        if command.is_writer:
            raise CommandRejected(
                f"{command.type} changes the database and no signing key is configured: refusing it"
            )
    else:
        if not command.signature:
            raise CommandRejected("command is not signed")
        # Compare bytes: the signature is untrusted input and may not even be ASCII.
        if not hmac.compare_digest(command.signature.encode(), _mac(key, command.canonical()).encode()):
            raise CommandRejected("signature does not match: the command was forged or altered")
    issued = command.issued_at if command.issued_at.tzinfo else command.issued_at.replace(tzinfo=UTC)
    age = now - issued
    if age > timedelta(seconds=max_age_s):
        raise CommandRejected(
            f"command is stale: issued {age.total_seconds():.0f}s ago, the limit is {max_age_s:.0f}s"
        )
    if -age > timedelta(seconds=max_skew_s):
        raise CommandRejected(
            f"command is issued {-age.total_seconds():.0f}s in the future: check the producer's clock"
        )
    command.parsed_args()
