"""One writer per database: a PostgreSQL advisory lock, with a Redis lease in front.

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

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from dbagent.core.errors import OperationFailed
from dbagent.core.redact import redact
from sqlalchemy import Connection

log = logging.getLogger(__name__)

# The advisory lock key, computed by the server so every client of one
# database agrees on it whatever the database is called in their config.
ADVISORY_KEY_SQL = "hashtextextended('dbagent:writer:' || current_database(), 0)"

Waiting = Callable[[float, dict[str, Any] | None], None]

# Extend only if we still own it: compare the whole value (owner and token).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LockTimeout(OperationFailed):
    """Raised when a lock is still held by someone else after the wait allowed."""


class RedisLease:
    """A lease on one database in Redis, with a fencing token and heartbeat renewal."""

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        fence_key: str | None,
        owner: dict[str, Any],
        ttl_s: float,
    ) -> None:
        self.client = client
        self.key = key
        self.fence_key = fence_key
        self.owner = owner
        self.ttl_ms = max(int(ttl_s * 1000), 1000)
        self.token: int | None = None
        self.lost = threading.Event()
        self._value: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def try_acquire(self) -> bool:
        token = int(self.client.incr(self.fence_key)) if self.fence_key else None
        value = json.dumps({**self.owner, "token": token, "since": time.time()}, sort_keys=True)
        if self.client.set(self.key, value, nx=True, px=self.ttl_ms):
            self.token, self._value = token, value
            self.lost.clear()
            return True
        return False

    def acquire(self, timeout_s: float, on_wait: Waiting | None = None, poll_s: float = 0.2) -> int | None:
        """Wait for the lease; returns its fencing token (None without a fence key). Calls on_wait(waited_s, holder)."""
        started = time.monotonic()
        while not self.try_acquire():
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise LockTimeout(
                    f"lease {self.key} still held by {describe_holder(self.holder())} after {waited:.0f}s"
                )
            if on_wait is not None:
                on_wait(waited, self.holder())
            time.sleep(poll_s)
        self.start_heartbeat()
        return self.token

    def holder(self) -> dict[str, Any] | None:
        return read_lease(self.client, self.key)

    def renew(self) -> bool:
        if self._value is None:
            return False
        return bool(self._renew(keys=[self.key], args=[self._value, self.ttl_ms]))

    def release(self) -> bool:
        """Release if still ours; never deletes another owner's lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._value is None:
            return False
        try:
            return bool(self._release(keys=[self.key], args=[self._value]))
        except redis.RedisError as exc:
            log.warning("could not release lease %s (it expires by itself): %s", self.key, exc)
            return False
        finally:
            self._value = None

    def start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat {self.key}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval_s = self.ttl_ms / 3000
        while not self._stop.wait(interval_s):
            try:
                ok = self.renew()
            except redis.RedisError as exc:
                log.warning("lease %s renewal failed: %s", self.key, exc)
                continue
            if not ok:
                # The advisory lock still guards the database; the lease only
                # stops showing us as the holder.
                log.warning("lease %s was lost (expired or taken over)", self.key)
                self.lost.set()
                return


def read_lease(client: redis.Redis, key: str) -> dict[str, Any] | None:
    raw = client.get(key)
    if raw is None:
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        return {"raw": raw.decode() if isinstance(raw, bytes) else str(raw)}
    ttl_ms = client.pttl(key)
    if isinstance(ttl_ms, int) and ttl_ms >= 0:
        holder["expires_in_ms"] = ttl_ms
    return holder


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "nobody"
    parts = [str(holder.get("worker") or holder.get("pid") or "?")]
    if holder.get("command_id"):
        parts.append(f"command {holder['command_id']}")
    if holder.get("type"):
        parts.append(str(holder["type"]))
    return ", ".join(parts)


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

