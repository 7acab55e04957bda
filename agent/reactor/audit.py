"""The audit sink: every stream event lands in its database's ``dbagent.audit_log``.

Workers write their own events there first (in the same transaction as the
change, where there is one); the sink adds what only the stream carries
(events from producers such as ``app.startup_failed``) and any entry a worker
could not write. Inserts are idempotent by event id. Reading the audit trail
back from PostgreSQL is how ``dbagent events`` survives a Redis that lost its stream.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime

import psycopg

from agent.bus.consumer import Entry, Outcome
from agent.core.errors import OperationFailed, Unavailable
from agent.core.events import Event
from agent.core.redact import redact
from agent.postgres import store
from agent.settings import DatabaseSettings, Settings

log = logging.getLogger(__name__)

# Batches go in by COPY into a session-private staging table, then one idempotent INSERT.
_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS audit_in (id text, ts timestamptz, type text, db text, command_id text,"
    " actor text, ticket text, host text, data jsonb) ON COMMIT DELETE ROWS"
)
_COLUMNS = "id, ts, type, db, command_id, actor, ticket, host, data"
_MERGE = (
    f"INSERT INTO {store.SCHEMA}.audit_log ({_COLUMNS}) SELECT {_COLUMNS} FROM audit_in"
    " ON CONFLICT (id) DO NOTHING"
)


def connect(db: DatabaseSettings, application_name: str) -> psycopg.Connection:
    try:
        return psycopg.connect(db.url, connect_timeout=max(1, round(db.connect_timeout)), application_name=application_name)
    except psycopg.OperationalError as exc:
        raise Unavailable(f"cannot reach PostgreSQL at {redact(db.url)}: {redact(str(exc).strip().splitlines()[0])}") from None


def ensure_schema(conn: psycopg.Connection) -> None:
    """``store.ensure_schema`` on a psycopg connection: the same test of "present", the same DDL."""
    if not conn.execute(store.SCHEMA_CURRENT).fetchone()[0]:
        conn.execute(f"SELECT pg_advisory_xact_lock({store._BOOTSTRAP_LOCK})")
        conn.execute(store.DDL)
    conn.commit()


class AuditSink:
    """Handler for the ``audit`` consumer group."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._conns: dict[str, psycopg.Connection] = {}

    def _conn(self, db: str) -> psycopg.Connection:
        conn = self._conns.get(db)
        if conn is None or conn.closed:
            conn = connect(self.settings.databases[db], "dbagent audit sink")
            ensure_schema(conn)
            self._conns[db] = conn
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
            except (psycopg.Error, Unavailable) as exc:
                log.warning("audit log of %s unavailable (%s): %d entries stay pending", db, redact(exc), len(items))
                self._drop(db)
                continue
            outcome.done.update(entry_id for entry_id, _ in items)
        return outcome

    def write(self, db: str, events: list[Event]) -> None:
        conn = self._conn(db)
        try:
            with conn.cursor() as cur:
                cur.execute(_STAGING)
                with cur.copy(f"COPY audit_in ({_COLUMNS}) FROM STDIN") as copy:
                    for e in events:
                        copy.write_row(
                            (e.id, e.ts, e.type, e.db, e.command_id, e.actor, e.ticket, e.host, json.dumps(e.data, default=str))
                        )
                cur.execute(_MERGE)
            conn.commit()
        except psycopg.Error:
            conn.rollback()
            raise

    def _drop(self, db: str) -> None:
        conn = self._conns.pop(db, None)
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def close(self) -> None:
        for db in list(self._conns):
            self._drop(db)


def read_audit(
    db_name: str, db: DatabaseSettings, *, limit: int, command_id: str | None = None, after_ts: datetime | None = None
) -> list[Event]:
    """The newest ``limit`` audit entries of a database from PostgreSQL, oldest first."""
    try:
        return _read_audit(db_name, db, limit=limit, command_id=command_id, after_ts=after_ts)
    except psycopg.Error as exc:
        raise OperationFailed(f"cannot read the audit log of {db_name}: {redact(exc)}") from None


def _read_audit(
    db_name: str, db: DatabaseSettings, *, limit: int, command_id: str | None, after_ts: datetime | None
) -> list[Event]:
    with connect(db, "dbagent events") as conn:
        if conn.execute(f"SELECT to_regclass('{store.SCHEMA}.audit_log')").fetchone()[0] is None:
            return []
        rows = conn.execute(
            f"SELECT id, ts, type, db, command_id, actor, ticket, host, data FROM ("
            f" SELECT * FROM {store.SCHEMA}.audit_log"
            " WHERE (%(command)s::text IS NULL OR command_id = %(command)s)"
            " AND (%(after)s::timestamptz IS NULL OR ts > %(after)s)"
            " ORDER BY ts DESC, seq DESC LIMIT %(limit)s) newest ORDER BY ts, seq",
            {"command": command_id, "after": after_ts, "limit": limit},
        ).fetchall()
    return [
        Event(id=r[0], ts=r[1], type=r[2], db=r[3] or db_name, command_id=r[4], actor=r[5], ticket=r[6], host=r[7] or "", data=r[8] or {})
        for r in rows
    ]
