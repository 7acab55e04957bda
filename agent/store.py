"""dbagent's own tables, in schema ``dbagent`` of each target database.

* ``commands``: every command id a worker has seen (at most once per id);
* ``audit_log``: the durable record of every event (the stream's source of truth);
* ``changelog``: one row per migration step applied or reverted.

All functions take the SQLAlchemy connection to write through, so a caller
can put them in the same transaction as the change they describe.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from agent.commands import Command, CommandStatus
from agent.events import Event

SCHEMA = "dbagent"

# Serialises concurrent bootstraps of the schema (CREATE ... IF NOT EXISTS races on pg_type).
_BOOTSTRAP_LOCK = "hashtextextended('dbagent:bootstrap', 0)"

DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};

CREATE TABLE IF NOT EXISTS {SCHEMA}.commands (
    id           text PRIMARY KEY,
    type         text NOT NULL,
    db           text NOT NULL,
    args         jsonb NOT NULL DEFAULT '{{}}',
    actor        text,
    ticket       text,
    issued_at    timestamptz,
    received_at  timestamptz NOT NULL DEFAULT now(),
    status       text NOT NULL,
    worker       text,
    plan         jsonb,
    result       jsonb,
    started_at   timestamptz,
    finished_at  timestamptz
);

CREATE TABLE IF NOT EXISTS {SCHEMA}.audit_log (
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    id          text PRIMARY KEY,
    ts          timestamptz NOT NULL,
    type        text NOT NULL,
    db          text NOT NULL,
    command_id  text,
    actor       text,
    ticket      text,
    host        text,
    data        jsonb NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS audit_log_seq ON {SCHEMA}.audit_log (seq);
CREATE INDEX IF NOT EXISTS audit_log_command ON {SCHEMA}.audit_log (command_id);

CREATE TABLE IF NOT EXISTS {SCHEMA}.changelog (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id   text,
    revision     text NOT NULL,
    description  text,
    direction    text NOT NULL CHECK (direction IN ('up', 'down')),
    actor        text,
    ticket       text,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    duration_ms  integer,
    outcome      text NOT NULL CHECK (outcome IN ('applied', 'reverted', 'failed')),
    error        text
);
-- sha256 of the script file an applied step ran (validate: applied-migration-changed)
ALTER TABLE {SCHEMA}.changelog ADD COLUMN IF NOT EXISTS checksum text;
"""


def bootstrap(conn: Connection) -> None:
    """Create dbagent's schema and tables if they are missing, and commit."""
    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_BOOTSTRAP_LOCK})")
    conn.exec_driver_sql(DDL)
    conn.commit()


# The changelog as of the checksums (validate: applied-migration-changed); false before dbagent ran here.
_CHECKSUMS_KEPT = (
    f"EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('{SCHEMA}.changelog')"
    " AND attname = 'checksum' AND NOT attisdropped)"
)


def ensure_schema(conn: Connection) -> None:
    """Bootstrap unless dbagent's tables are all there (one catalog query when they are)."""
    present = conn.exec_driver_sql(
        f"SELECT to_regclass('{SCHEMA}.commands') IS NOT NULL AND to_regclass('{SCHEMA}.audit_log') IS NOT NULL"
        f" AND {_CHECKSUMS_KEPT}"
    ).scalar()
    conn.commit()
    if not present:
        bootstrap(conn)


def insert_event(conn: Connection, event: Event) -> None:
    """Write an event to the audit log; an id already there is left as it is."""
    conn.execute(
        text(
            f"INSERT INTO {SCHEMA}.audit_log (id, ts, type, db, command_id, actor, ticket, host, data)"
            " VALUES (:id, :ts, :type, :db, :command_id, :actor, :ticket, :host, CAST(:data AS jsonb))"
            " ON CONFLICT (id) DO NOTHING"
        ),
        {**event.model_dump(exclude={"data"}), "data": json.dumps(event.data, default=str)},
    )


def record_command(conn: Connection, command: Command, worker: str) -> bool:
    """Record a command id before acting on it; False when the id was seen before."""
    row = conn.execute(
        text(
            f"INSERT INTO {SCHEMA}.commands (id, type, db, args, actor, ticket, issued_at, status, worker)"
            " VALUES (:id, :type, :db, CAST(:args AS jsonb), :actor, :ticket, :issued_at, :status, :worker)"
            " ON CONFLICT (id) DO NOTHING RETURNING id"
        ),
        {
            "id": command.id,
            "type": str(command.type),
            "db": command.db,
            "args": json.dumps(command.args),
            "actor": command.actor,
            "ticket": command.ticket,
            "issued_at": command.issued_at,
            "status": CommandStatus.ACCEPTED.value,
            "worker": worker,
        },
    ).first()
    return row is not None


def command_row(conn: Connection, command_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        text(f"SELECT * FROM {SCHEMA}.commands WHERE id = :id"), {"id": command_id}
    ).mappings().first()
    return dict(row) if row else None


def claim_command(conn: Connection, command_id: str, worker: str, plan: dict[str, Any]) -> bool:
    """Move an accepted command to running; False when another attempt already claimed it."""
    row = conn.execute(
        text(
            f"UPDATE {SCHEMA}.commands SET status = 'running', worker = :worker, plan = CAST(:plan AS jsonb),"
            " started_at = now() WHERE id = :id AND status = 'accepted' RETURNING id"
        ),
        {"id": command_id, "worker": worker, "plan": json.dumps(plan)},
    ).first()
    return row is not None


def finish_command(conn: Connection, command_id: str, status: str, result: dict[str, Any]) -> None:
    conn.execute(
        text(
            f"UPDATE {SCHEMA}.commands SET status = :status, result = CAST(:result AS jsonb),"
            " finished_at = now() WHERE id = :id"
        ),
        {"id": command_id, "status": status, "result": json.dumps(result, default=str)},
    )


def insert_changelog(
    conn: Connection,
    *,
    command: Command,
    revision: str,
    description: str | None,
    direction: str,
    started_at: datetime,
    finished_at: datetime | None,
    outcome: str,
    error: str | None = None,
    checksum: str | None = None,
) -> None:
    duration_ms = (
        round((finished_at - started_at).total_seconds() * 1000) if finished_at is not None else None
    )
    conn.execute(
        text(
            f"INSERT INTO {SCHEMA}.changelog (command_id, revision, description, direction, actor, ticket,"
            " started_at, finished_at, duration_ms, outcome, error, checksum) VALUES (:command_id, :revision,"
            " :description, :direction, :actor, :ticket, :started_at, :finished_at, :duration_ms,"
            " :outcome, :error, :checksum)"
        ),
        {
            "command_id": command.id,
            "revision": revision,
            "description": description,
            "direction": direction,
            "actor": command.actor,
            "ticket": command.ticket,
            "started_at": started_at,
            "finished_at": finished_at,
            "checksum": checksum,
            "duration_ms": duration_ms,
            "outcome": outcome,
            "error": error,
        },
    )


def applied_checksums(conn: Connection) -> dict[str, dict[str, Any]]:
    """Per revision, the checksum recorded when it was last applied (and when, by whom); {} before dbagent ran here."""
    if not conn.exec_driver_sql(f"SELECT {_CHECKSUMS_KEPT}").scalar():
        return {}
    rows = conn.execute(
        text(
            f"SELECT DISTINCT ON (revision) revision, checksum, finished_at, actor FROM {SCHEMA}.changelog"
            " WHERE direction = 'up' AND outcome = 'applied' ORDER BY revision, id DESC"
        )
    ).mappings()
    return {row["revision"]: dict(row) for row in rows}


def changelog(conn: Connection, limit: int) -> list[dict[str, Any]]:
    """The newest change-log entries, oldest first."""
    rows = conn.execute(
        text(
            f"SELECT * FROM (SELECT * FROM {SCHEMA}.changelog ORDER BY id DESC LIMIT :limit) newest"
            " ORDER BY id"
        ),
        {"limit": limit},
    ).mappings()
    return [dict(row) for row in rows]
