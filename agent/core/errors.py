"""Exceptions of dbagent: one root, and one subclass per exit code.

Adapters convert driver errors (psycopg, redis, kombu) into these at the
boundary, so the CLI, the worker and the HTTP API can report them alike.
"""

from __future__ import annotations


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


class LockLost(OperationFailed):
    """Raised when a writer finds that a newer holder has taken the database."""
