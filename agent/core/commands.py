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
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from dbagent.core.errors import BadInput, CommandRejected
from dbagent.core.redact import has_control


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
    """Where a command is in its lifecycle (``dbagent.core.lifecycle`` has the transitions)."""

    ACCEPTED = "accepted"
    CLAIMED = "claimed"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    INTERRUPTED = "interrupted"


FINISHED = frozenset(
    {CommandStatus.SUCCEEDED, CommandStatus.FAILED, CommandStatus.REJECTED, CommandStatus.INTERRUPTED}
)


# Bounds on what a command carries. Producers take these values from people and programs
# (the API, Slack, a deploy system's --actor); the worker checks them again. A control
# character (a newline, an ANSI escape) could forge a line in a log or a terminal.
MAX_ACTOR_CHARS = 200
MAX_TICKET_CHARS = 200
MAX_REVISION_CHARS = 200  # a revision id, a relative target (+2, base), rev@branch
MAX_PATH_CHARS = 4096  # PATH_MAX
MAX_RULE_CHARS = 100
MAX_RULES = 100
MAX_STEPS = 10_000
MAX_DETAIL_CHARS = 4000  # what an app.startup_failed report says (an event, not a command)


def _no_control(value: str) -> str:
    if has_control(value):
        raise ValueError("must not contain control characters (newlines, escapes)")
    return value


_Plain = AfterValidator(_no_control)
Revision = Annotated[str, Field(min_length=1, max_length=MAX_REVISION_CHARS), _Plain]
FilePath = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS), _Plain]
Rule = Annotated[str, Field(min_length=1, max_length=MAX_RULE_CHARS), _Plain]
Actor = Annotated[str, Field(min_length=1, max_length=MAX_ACTOR_CHARS), _Plain]
Ticket = Annotated[str, Field(max_length=MAX_TICKET_CHARS), _Plain]


class _Args(BaseModel):
    # Strict: a JSON true is not 1 step, "5" is not a limit of 5. Every producer builds args
    # from typed values, and the worker reads them from JSON, which keeps the types.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class StatusArgs(_Args):
    pass


class HistoryArgs(_Args):
    limit: int = Field(50, ge=1, le=10_000)


class VerifyArgs(_Args):
    expect: Revision | None = None


class MigrateArgs(_Args):
    dry_run: bool = False
    to: Revision | None = None
    no_backup: bool = False
    # validation rules whose errors may not stop this migration
    allow: list[Rule] = Field([], max_length=MAX_RULES)


class RollbackArgs(_Args):
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    to: Revision | None = None
    cause: dict[str, Any] | None = None  # set by the agent only (AGENT_ONLY_ARGS): the failure this undoes

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
    path: FilePath
    jobs: int = Field(1, ge=1, le=64)


class ListBackupsArgs(_Args):
    pass


class VerifyBackupArgs(_Args):
    path: FilePath | None = None
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

# Arguments only the agent sets, on the rollbacks it queues after a failure: the worker
# accepts them (signed), a producer taking input from people or programs refuses them.
AGENT_ONLY_ARGS: dict[CommandType, frozenset[str]] = {CommandType.ROLLBACK: frozenset({"cause"})}


def check_client_args(type_: CommandType, args: dict[str, Any]) -> None:
    """Raise BadInput if a client (the CLI, the API, Slack) sets an argument only the agent may set."""
    refused = sorted(AGENT_ONLY_ARGS.get(type_, frozenset()) & set(args))
    if refused:
        raise BadInput(f"invalid arguments for {type_}: {', '.join(refused)}: only the agent sets it")


# Commands that change the database or delete backups: without a signing key
# configured, they are refused outright.
DESTRUCTIVE = frozenset({CommandType.MIGRATE, CommandType.ROLLBACK, CommandType.RESTORE, CommandType.PRUNE})


def is_destructive(type_: CommandType, args: dict[str, Any]) -> bool:
    return type_ in DESTRUCTIVE or (type_ == CommandType.BACKUP and bool(args.get("prune")))

# Commands that hold the database's writer lock while they run (a dry run does not).
LOCKED = DESTRUCTIVE | {CommandType.BACKUP}

# How long a command may wait for its worker before it expires (the producer signs
# ``expires_at``; waiting in the queue is not staleness). Work that changes the
# database keeps a day: a queue stopped for a maintenance window still runs it.
# A read is useless to whoever asked long before then.
WRITER_TTL_S = 24 * 3600.0
READER_TTL_S = 3600.0


def default_ttl_s(type_: CommandType, args: dict[str, Any]) -> float:
    """The expiry a producer signs into a command unless it has a better one (beat, the agent)."""
    return WRITER_TTL_S if type_ in LOCKED or is_destructive(type_, args) else READER_TTL_S


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
    actor: Actor
    ticket: Ticket | None = None
    issued_at: datetime = Field(default_factory=utcnow)
    # Past this, the worker rejects the command (None: the worker's max_command_age after issued_at).
    expires_at: datetime | None = None
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
            raise BadInput(f"invalid arguments for {self.type}: {problems(exc, 'args')}") from None

    def canonical(self) -> bytes:
        """The bytes the signature covers: every field but the signature, keys sorted.

        A command without an expiry signs as producers before ``expires_at`` did, so
        their signatures still verify.
        """
        body = self.model_dump(mode="json", exclude={"signature"})
        if body.get("expires_at") is None:
            body.pop("expires_at", None)
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def expiring_in(self, seconds: float) -> Command:
        """The same command, expiring ``seconds`` after it was issued (sign it afterwards)."""
        issued = self.issued_at if self.issued_at.tzinfo else self.issued_at.replace(tzinfo=UTC)
        return self.model_copy(update={"expires_at": issued + timedelta(seconds=seconds)})

    def expiry(self, max_age_s: float) -> datetime:
        """When the worker stops accepting it: its signed expiry, else ``max_age_s`` after it was issued."""
        if self.expires_at is not None:
            return self.expires_at if self.expires_at.tzinfo else self.expires_at.replace(tzinfo=UTC)
        issued = self.issued_at if self.issued_at.tzinfo else self.issued_at.replace(tzinfo=UTC)
        return issued + timedelta(seconds=max_age_s)

    def signed(self, key: bytes) -> Command:
        return self.model_copy(update={"signature": _mac(key, self.canonical())})

    def to_message(self) -> dict[str, Any]:
        """The queue message: the contract's fields, and ``expires_at`` when the producer set one."""
        return self.model_dump(mode="json", exclude={"expires_at"} if self.expires_at is None else None)

    @classmethod
    def from_message(cls, message: object) -> Command:
        """Decode a queue message; a malformed one is a CommandRejected."""
        try:
            return cls.model_validate(message)
        except ValidationError as exc:
            raise CommandRejected(f"malformed command: {exc.errors()[0]['msg']}") from None


def problems(exc: ValidationError, what: str = "command") -> str:
    """pydantic's errors on one line: ``steps: Input should be a valid integer; to: …``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or what}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
    )


def client_command(type_: str, *, db: str, args: dict[str, Any], actor: str, ticket: str | None) -> Command:
    """A command as a client (the CLI, the API, Slack) asks for it; BadInput saying what is wrong otherwise.

    Everything the worker would refuse is refused here first, and so are the
    arguments only the agent sets.
    """
    try:
        kind = CommandType(type_)
    except ValueError:
        known = ", ".join(t.value for t in CommandType)
        raise BadInput(f"unknown command type {type_[:50]!r} (known: {known})") from None
    check_client_args(kind, args)
    try:
        command = Command(type=kind, db=db, args=args, actor=actor, ticket=ticket)
    except ValidationError as exc:
        raise BadInput(problems(exc)) from None
    command.parsed_args()
    return command


def check_client_text(what: str, value: str | None, max_chars: int, *, lines: bool = False) -> None:
    """Raise BadInput unless ``value`` (when given) has at most ``max_chars`` characters and no control
    character (but newlines and tabs, with ``lines``)."""
    if value is None:
        return
    if len(value) > max_chars:
        raise BadInput(f"{what} is {len(value)} characters long, the limit is {max_chars}")
    if lines and has_control(value.replace("\n", "").replace("\t", "")):
        raise BadInput(f"{what} must not contain control characters other than newlines and tabs")
    if not lines and has_control(value):
        raise BadInput(f"{what} must not contain control characters (newlines, escapes)")


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def authenticate(command: Command, key: bytes | None) -> None:
    """Raise CommandRejected unless the command comes from a holder of the signing key.

    Without a key configured, only commands that change nothing are accepted, unsigned.
    """
    if key is None:
        if command.is_writer:
            raise CommandRejected(
                f"{command.type} changes the database and no signing key is configured: refusing it"
            )
        return
    if not command.signature:
        raise CommandRejected("command is not signed")
    # Compare bytes: the signature is untrusted input and may not even be ASCII.
    if not hmac.compare_digest(command.signature.encode(), _mac(key, command.canonical()).encode()):
        raise CommandRejected("signature does not match: the command was forged or altered")


def message_digest(message: object) -> str:
    """A short digest of a queue message as sent: where its rejection is published.

    A rejected message's answer goes under ``rejection:<id>:<digest>``, never under
    ``result:<id>``: a forged message reusing a real command's id cannot touch that
    command's outcome, and its producer, which knows what it sent, still reads why.
    """
    body = json.dumps(message, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def check_command(
    command: Command,
    key: bytes | None,
    *,
    db: str,
    now: datetime,
    max_age_s: float,
    max_skew_s: float,
    max_ttl_s: float = 7 * 24 * 3600.0,
) -> None:
    """Raise CommandRejected unless the command may run on this database now.

    A command expires at the ``expires_at`` its producer signed (a command that
    waited in the queue behind a long backup is not stale); one without falls
    back to ``max_age_s`` after it was issued. An expiry further than
    ``max_ttl_s`` from issue is refused, so no signed command lives for ever.
    """
    if command.db != db:
        raise CommandRejected(f"command is for database {command.db!r}, this worker serves {db!r}")
    authenticate(command, key)
    issued = command.issued_at if command.issued_at.tzinfo else command.issued_at.replace(tzinfo=UTC)
    age = now - issued
    expiry = command.expiry(max_age_s)
    if command.expires_at is not None:
        if expiry - issued > timedelta(seconds=max_ttl_s):
            raise CommandRejected(
                f"command expires {(expiry - issued).total_seconds():.0f}s after it was issued,"
                f" the limit is {max_ttl_s:.0f}s"
            )
        if now > expiry:
            raise CommandRejected(
                f"command expired at {expiry.isoformat(timespec='seconds')} (issued {age.total_seconds():.0f}s ago)"
            )
    elif age > timedelta(seconds=max_age_s):
        raise CommandRejected(
            f"command is stale: issued {age.total_seconds():.0f}s ago, the limit is {max_age_s:.0f}s"
        )
    if -age > timedelta(seconds=max_skew_s):
        raise CommandRejected(
            f"command is issued {-age.total_seconds():.0f}s in the future: check the producer's clock"
        )
    command.parsed_args()
