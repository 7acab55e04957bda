"""The audit sink: every stream event lands in its database's ``dbagent.audit_log``.

Workers write their own events there first (in the same transaction as the
change, where there is one); the sink adds what only the stream carries
(events from producers such as ``app.startup_failed``) and any entry a worker
could not write. Inserts are idempotent by event id. Reading the audit trail
back from PostgreSQL is how ``dbagent events`` survives a Redis that lost its stream.
"""

from __future__ import annotations

import logging
from datetime import datetime

import psycopg
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from dbagent.bus.consumer import Entry, Outcome
from dbagent.core.errors import OperationFailed, Unavailable, error_text
from dbagent.core.events import Event
from dbagent.core.redact import redact
from dbagent.postgres import store
from dbagent.postgres.connections import open_connection, pg_connection, rollback_quietly
from dbagent.settings import DatabaseSettings, Settings

log = logging.getLogger(__name__)


class AuditSink:
    """Handler for the ``audit`` consumer group: one long-lived connection per database, opened on demand."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._conns: dict[str, Connection] = {}

    def _conn(self, db: str) -> Connection:
        conn = self._conns.get(db)
        if conn is None or conn.closed or conn.invalidated:
            conn = open_connection(self.settings.databases[db], "dbagent audit sink")
            self._conns[db] = conn
            store.ensure_schema(conn)
        return conn

    def __call__(self, entries: list[Entry]) -> Outcome:
        outcome = Outcome()
        by_db: dict[str, list[Entry]] = {}
        for entry_id, event in entries:
            if event.db not in self.settings.databases:
                outcome.dead[entry_id] = f"database {event.db!r} is not configured: its audit log cannot be reached"
            else:
                by_db.setdefault(event.db, []).append((entry_id, event))
        for db, items in by_db.items():
            try:
                self.write(db, [event for _, event in items])
            except (SQLAlchemyError, psycopg.Error, Unavailable) as exc:
                log.warning("audit log of %s unavailable (%s): %d entries stay pending", db, redact(exc), len(items))
                self._drop(db)
                continue
            outcome.done.update(entry_id for entry_id, _ in items)
        return outcome

    def write(self, db: str, events: list[Event]) -> None:
        conn = self._conn(db)
        try:
            store.insert_events(conn, events)
            conn.commit()
        except (SQLAlchemyError, psycopg.Error):
            rollback_quietly(conn)
            raise

    def _drop(self, db: str) -> None:
        conn = self._conns.pop(db, None)
        if conn is not None:
            try:
                conn.close()
            except (SQLAlchemyError, psycopg.Error):
                pass

    def close(self) -> None:
        for db in list(self._conns):
            self._drop(db)


def read_audit(
    db_name: str, db: DatabaseSettings, *, limit: int, command_id: str | None = None, after_ts: datetime | None = None
) -> list[Event]:
    """The newest ``limit`` audit entries of a database from PostgreSQL, oldest first."""
    try:
        with pg_connection(db, "dbagent events") as conn:
            rows = store.recent_events(conn, limit=limit, command_id=command_id, after_ts=after_ts)
    except SQLAlchemyError as exc:
        raise OperationFailed(f"cannot read the audit log of {db_name}: {error_text(exc, one_line=True)}") from None
    return [Event(**{**r, "db": r["db"] or db_name, "host": r["host"] or "", "data": r["data"] or {}}) for r in rows]
