"""One writer per database: a PostgreSQL advisory lock, with a Redis lease in front (``dbagent.bus.lease``).

The advisory lock is the authority. It is taken on the dedicated connection
that also runs the migration's statements, so losing the lock and losing the
ability to write are one event, and a dead worker's lock frees itself when its
session ends. The Redis lease keeps queues orderly and shows who holds a
database, and is renewed by a heartbeat. A writer's fencing token comes from
the database's own sequence once it holds the advisory lock
(``store.next_fencing_token``), so tokens only grow, whatever Redis forgets;
the beat's leader lease keeps a counter in Redis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection

from dbagent.core.errors import LockTimeout
from dbagent.core.redact import redact

log = logging.getLogger(__name__)

# Told how long it has waited so far and who holds the lock.
Waiting = Callable[[float, dict[str, Any] | None], None]

# The advisory lock key, computed by the server so every client of one
# database agrees on it whatever the database is called in their config.
ADVISORY_KEY_SQL = "hashtextextended('dbagent:writer:' || current_database(), 0)"


class AdvisoryLock:
    """The session-level advisory lock of the database, on one dedicated connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.held = False

    def try_acquire(self) -> bool:
        got = bool(self.conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({ADVISORY_KEY_SQL})").scalar())
        self.conn.commit()
        self.held = got
        return got

    def acquire(self, timeout_s: float, on_wait: Waiting | None = None, poll_s: float = 0.25) -> None:
        started = time.monotonic()
        while not self.try_acquire():
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise LockTimeout(
                    f"advisory lock still held by {describe_backend(holder_backend(self.conn))}"
                    f" after {waited:.0f}s"
                )
            if on_wait is not None:
                on_wait(waited, holder_backend(self.conn))
            time.sleep(poll_s)

    def release(self) -> None:
        if not self.held:
            return
        try:
            self.conn.rollback()
            self.conn.exec_driver_sql(f"SELECT pg_advisory_unlock({ADVISORY_KEY_SQL})")
            self.conn.commit()
        except Exception as exc:  # the session ending frees the lock anyway
            log.warning("could not release the advisory lock (closing the session frees it): %s", exc)
        self.held = False


def holder_backend(conn: Connection) -> dict[str, Any] | None:
    """The PostgreSQL session holding the writer lock of conn's database, if any."""
    row = conn.exec_driver_sql(
        "SELECT a.pid, a.usename, a.application_name, host(a.client_addr) AS client_addr,"
        " a.backend_start, a.state, now() - a.xact_start AS xact_age"
        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        f" AND ((l.classid::bigint << 32) | l.objid::bigint) = {ADVISORY_KEY_SQL}"
    ).mappings().first()
    conn.commit()
    if row is None:
        return None
    holder = dict(row)
    holder["application_name"] = redact(holder["application_name"]) if holder["application_name"] else None
    holder["backend_start"] = holder["backend_start"].isoformat() if holder["backend_start"] else None
    holder["xact_age"] = str(holder["xact_age"]) if holder["xact_age"] is not None else None
    return holder


def describe_backend(backend: dict[str, Any] | None) -> str:
    if not backend:
        return "nobody"
    return f"pid {backend['pid']} ({backend.get('application_name') or backend.get('usename')})"

