"""Exceptions of dbagent: one root, and one subclass per exit code.

Adapters convert driver errors (psycopg, redis, kombu) into these at the
boundary, so the CLI, the worker and the HTTP API can report them alike.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from dbagent.core.redact import redact


class DbAgentError(Exception):
    """Root of every error dbagent raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        # Facts for the command's result (revision_before, revision_after…).
        self.details = details


class OperationFailed(DbAgentError):
    """Raised when an operation ran and failed (a migration step, a check)."""

    exit_code = 1


class BadInput(DbAgentError):
    """Raised when the request itself is wrong: unknown database or revision,
    invalid arguments, a malformed configuration file."""

    exit_code = 2


class ConfigError(BadInput):
    """Raised when the configuration file cannot be read or does not validate."""


class CommandRejected(BadInput):
    """Raised when a command's signature, age or shape does not hold up."""


class Unavailable(DbAgentError):
    """Raised when a dependency (Redis, PostgreSQL, pg_dump, a worker) cannot be reached."""

    exit_code = 3


class LockTimeout(OperationFailed):
    """Raised when a lock is still held by someone else after the wait allowed."""


class LockLost(OperationFailed):
    """Raised when a writer finds that a newer holder has taken the database."""


def error_text(exc: BaseException, *, one_line: bool = False, script: str | None = None) -> str:
    """Any error as an operator reads it, secrets masked: the one way dbagent words an error.

    A driver error (SQLAlchemy's, wrapping psycopg's in ``orig``) reads as the server's message and, unless
    ``one_line``, the statement; a dbagent error as its message; anything else as its type and message, and,
    when it was raised in the migration ``script``, that file and line. ``one_line``: the first line only.
    """
    orig = getattr(exc, "orig", None)
    if one_line:
        lines = redact(orig if orig is not None else exc).strip().splitlines()
        return lines[0] if lines else type(orig if orig is not None else exc).__name__
    if orig is not None and hasattr(exc, "statement"):
        message = str(orig).strip()
        if exc.statement:
            message += f" (statement: {exc.statement.strip()[:300]})"
        return redact(message)
    if isinstance(exc, DbAgentError):
        return redact(exc.message).strip()
    text = f"{type(exc).__name__}: {redact(exc).strip()}" if str(exc).strip() else type(exc).__name__
    frame = _script_frame(exc, script) if script else None
    return f"{text} (at {frame})" if frame else text


def _script_frame(exc: BaseException, script: str) -> str | None:
    """``file:line`` of the deepest frame of ``exc``'s traceback inside ``script``."""
    target = Path(script).resolve()
    where = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == target:
            where = f"{target.name}:{frame.lineno}"
    return where
