"""The Redis lease of a database's writer (and of the beat's leader): a fencing token, a heartbeat.

The PostgreSQL advisory lock (``dbagent.postgres.locks``) is the authority over who writes; the lease in
front of it keeps queues orderly and shows who holds a database. It is renewed by a heartbeat thread and
released only by its owner (compare-and-delete in Lua).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from dbagent.core.errors import LockTimeout

log = logging.getLogger(__name__)

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
