"""Every Redis name dbagent uses, in one place.

All of them start with the configured prefix, so several deployments (or test
runs) can share one Redis without seeing each other.
"""

from __future__ import annotations

# How long a command's outcome stays readable in Redis for a waiting CLI or
# `GET /v1/commands/{id}`; PostgreSQL keeps it for good.
RESULT_TTL_S = 7 * 24 * 3600

# Approximate cap on the event stream: Redis is the carrier, PostgreSQL the
# record, so old entries may be trimmed without losing audit history.
EVENTS_MAXLEN = 1_000_000


def queue(prefix: str, db: str) -> str:
    """Celery queue of one database's worker."""
    return f"{prefix}.{db}"


def events(prefix: str) -> str:
    """The event stream (audit trail carrier)."""
    return f"{prefix}:events"


def result(prefix: str, command_id: str) -> str:
    """A command's outcome (JSON), expires after RESULT_TTL_S."""
    return f"{prefix}:result:{command_id}"


def lease(prefix: str, db: str) -> str:
    """The writer lease of one database; expires unless its holder renews it."""
    return f"{prefix}:lease:{db}"


def fence(prefix: str, db: str) -> str:
    """Counter issuing the lease's fencing tokens; never expires."""
    return f"{prefix}:fence:{db}"


def broker_prefix(prefix: str) -> str:
    """Prefix Celery/kombu put before their own keys (bindings, unacked)."""
    return f"{prefix}:celery:"
