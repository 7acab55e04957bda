"""Every Redis name dbagent uses, in one place.

All of them start with the configured prefix, so several deployments (or test
runs) can share one Redis without seeing each other.
"""

from __future__ import annotations

import hashlib

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


def rejection(prefix: str, command_id: str, digest: str) -> str:
    """Why a message naming ``command_id`` was refused before it ran, by the message's digest
    (``commands.message_digest``): only the command's own verified execution writes ``result``,
    so a forged message reusing a real id leaves that command's outcome alone. Expires after
    RESULT_TTL_S."""
    return f"{prefix}:rejection:{command_id}:{digest}"


def outcome_ready(prefix: str, command_id: str) -> str:
    """A stream of one entry, added with the command's outcome or a refusal under its id: a producer
    blocked on the event stream (``XREAD``) listens on it too, so it wakes the moment the outcome is
    there rather than at its next timeout. It carries no data (the outcome is read from ``result`` or
    ``rejection``); expires after OUTCOME_READY_TTL_S."""
    return f"{prefix}:outcome-ready:{command_id}"


# Only a producer already waiting needs the wake-up: one that comes later reads the outcome at once.
OUTCOME_READY_TTL_S = 3600


def dead_commands(prefix: str, db: str) -> str:
    """Messages a worker of ``db`` took off its queue and refused unread (malformed, unsigned,
    oversized): a bounded record of each (reason, size, digest, excerpt), newest first, the last
    DEAD_COMMANDS_KEPT of them."""
    return f"{prefix}:dead-commands:{db}"


DEAD_COMMANDS_KEPT = 1000


def running(prefix: str, command_id: str) -> str:
    """Where a command is (worker, phase), while its worker lives: renewed every third of
    [redis] lease_ttl and expiring after it, so a producer can tell a dead worker from a slow one."""
    return f"{prefix}:running:{command_id}"


def lease(prefix: str, db: str) -> str:
    """The writer lease of one database; expires unless its holder renews it."""
    return f"{prefix}:lease:{db}"


def fence(prefix: str, db: str) -> str:
    """Counter issuing the beat leader lease's fencing tokens; never expires. (A writer's
    token comes from the database's own sequence, ``dbagent.fencing_token``, and is only
    shown here.)"""
    return f"{prefix}:fence:{db}"


def broker_prefix(prefix: str) -> str:
    """Prefix Celery/kombu put before their own keys (bindings, unacked)."""
    return f"{prefix}:celery:"


def submitted(prefix: str, command_id: str) -> str:
    """A command the API queued (its JSON and the stream position before it), so that
    ``GET /v1/commands/{id}`` answers "queued" until the worker picks it up rather
    than 404. Expires with the result, after RESULT_TTL_S."""
    return f"{prefix}:submitted:{command_id}"


def slack_seen(prefix: str, signature: str) -> str:
    """A Slack request already handled, by a hash of its signature: a signed request
    replayed within the replay window is refused instead of queueing the same
    rollback twice. Expires once the window has passed."""
    return f"{prefix}:slack-seen:{hashlib.sha256(signature.encode()).hexdigest()}"


def beat_leader(prefix: str) -> str:
    """The lease of the beat that schedules; renewed by its holder, expires after [beat] leader_ttl."""
    return f"{prefix}:beat:leader"


def dead_letters(prefix: str) -> str:
    """Events the agent could not handle after [agent] max_deliveries attempts; kept for an operator."""
    return f"{events(prefix)}:dead"
