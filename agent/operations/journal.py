"""A command's events and outcome: into PostgreSQL first (the record), then onto Redis.

Events describing a change are written in the change's own transaction
(``stage``) and published once it committed. Every other event is written on
the command's connection only while that connection is idle, never inside a
transaction the operation has open (a pg_dump snapshot, a step): otherwise,
and from other threads (the lock sampler, backup progress, backfills), it goes
through a connection of its own. An event the stream did not take (Redis
down) is marked ``unpublished`` in the audit log, and a result gets ``commands.published_at
IS NULL``, for the worker's relay to publish once Redis is back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from dbagent.bus import keys
from dbagent.bus.eventlog import EventLog
from dbagent.core.commands import Command
from dbagent.core.events import Event, EventType
from dbagent.core.redact import redact
from dbagent.postgres import store
from dbagent.postgres.connections import rollback_quietly

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

    from dbagent.settings import DatabaseSettings

log = logging.getLogger(__name__)

# Events of committed steps go out together, at most this long after the first of them (flush_soon).
PUBLISH_EVERY_S = 0.1


class Journal:
    """The events and the outcome of one command (or of a rejected message)."""

    def __init__(
        self, eventlog: EventLog, prefix: str, db: str, command: Command | None, database: DatabaseSettings | None = None
    ) -> None:
        self.eventlog = eventlog
        self.prefix = prefix
        self.db = db
        self.command = command
        self.database = database  # where the aside connection goes; None: the command's connection only
        self.conn: Connection | None = None
        self._owner = threading.get_ident()
        self._unpublished: list[Event] = []  # staged or written, not yet published
        self._committed: list[Event] = []  # of committed work, published within PUBLISH_EVERY_S (flush_soon)
        self._publish_lock = threading.RLock()  # one publisher at a time: the stream keeps the order of events
        self._published_at = float("-inf")
        self._due = threading.Condition(self._publish_lock)  # wakes the publisher thread (flush_soon)
        self._publisher: threading.Thread | None = None  # started by the first deferred batch, ends at close()
        self._closing = False
        self.emitted: set[str] = set()
        self._aside: Connection | None = None
        self._aside_engine: Engine | None = None
        self._aside_lock = threading.Lock()

    def make(self, type_: EventType | str, data: dict[str, Any]) -> Event:
        command = self.command
        return Event(
            type=type_,
            db=self.db,
            command_id=command.id if command else data.get("command_id"),
            actor=command.actor if command else None,
            ticket=command.ticket if command else None,
            data=json.loads(json.dumps(data, default=str)),
        )

    # -- writing -------------------------------------------------------------

    def _idle_conn(self) -> Connection | None:
        """The command's connection, when this thread may use it and no transaction is open on it."""
        conn = self.conn
        if conn is None or threading.get_ident() != self._owner:
            return None
        try:
            return None if conn.in_transaction() or conn.closed or conn.invalidated else conn
        except Exception:  # noqa: BLE001 - a broken connection
            return None

    def _write(self, event: Event) -> bool:
        return self.record(lambda conn: store.insert_event(conn, event), what=str(event.type))

    def _write_aside(self, event: Event) -> bool:
        return self.aside(lambda conn: store.insert_event(conn, event), what=str(event.type))

    def aside(self, work: Callable[[Connection], Any], what: str) -> bool:
        """Run ``work`` and commit on the journal's own connection (opened on first use, shared by threads)."""
        if self.database is None:
            return False
        import sqlalchemy.exc

        from dbagent.postgres.connections import pg_engine

        with self._aside_lock:
            for attempt in (1, 2):  # a connection broken since its last use is opened again, once
                try:
                    if self._aside is None:
                        self._aside_engine = pg_engine(self.database, "dbagent events")
                        self._aside = self._aside_engine.connect()
                    work(self._aside)
                    self._aside.commit()
                    return True
                except sqlalchemy.exc.SQLAlchemyError as exc:
                    self._close_aside()
                    if attempt == 2:
                        log.warning("%s not written to the audit log: %s", what, redact(exc))
        return False

    def _close_aside(self) -> None:
        if self._aside is not None:
            try:
                self._aside.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
            self._aside = None
        if self._aside_engine is not None:
            self._aside_engine.dispose()
            self._aside_engine = None

    @property
    def reported_failure(self) -> bool:
        """Whether the command's failure has an event already: of its own kind, or its validation's or verification's."""
        from dbagent.core.lifecycle import failure_event

        if self.command is None:
            return False
        own = {str(failure_event(self.command.type)), str(EventType.VALIDATION_FAILED), str(EventType.VERIFY_FAILED)}
        return bool(self.emitted & own)

    def emit(self, type_: EventType | str, **data: Any) -> Event:
        """Record an event in PostgreSQL, then publish it on the stream."""
        event = self.make(type_, data)
        self.emitted.add(str(event.type))
        self._write(event)
        self._unpublished.append(event)
        self.flush()
        return event

    def stage(self, conn: Connection, type_: EventType | str, **data: Any) -> None:
        """Write an event inside the caller's open transaction; flush() publishes it after the commit."""
        store.insert_event(conn, self.staged(type_, **data))

    def staged(self, type_: EventType | str, **data: Any) -> Event:
        """An event flush() publishes after the commit of the transaction the caller writes it in."""
        event = self.make(type_, data)
        self.emitted.add(str(event.type))
        self._unpublished.append(event)
        return event

    def emit_aside(self, type_: EventType | str, data: dict[str, Any]) -> None:
        """An event from beside the operation (another thread, or inside a step): never on its connection."""
        event = self.make(type_, data)
        written = self._write_aside(event)
        try:
            self.eventlog.publish([event])
        except redis.RedisError as exc:
            log.warning("could not publish %s: %s", event.type, redact(exc))
            if written:
                self.aside(lambda conn: store.mark_unpublished(conn, [event.id]), what="unpublished mark")

    def discard_staged(self) -> None:
        """Forget the events staged in a transaction that rolled back (those of committed work stay)."""
        with self._publish_lock:
            self._unpublished.clear()

    def flush(self) -> None:
        """Publish every event written or staged so far (their transactions have committed), in order."""
        with self._publish_lock:
            events, self._committed, self._unpublished = self._committed + self._unpublished, [], []
            self._publish(events)

    def flush_soon(self) -> None:
        """The events staged so far committed: publish them now, or within PUBLISH_EVERY_S of the last
        publication together with those that follow (a plan of many short steps: one XADD batch per 0.1 s,
        not one round trip per step). What a crash leaves unpublished is in the audit log for the relay."""
        with self._publish_lock:
            self._committed.extend(self._unpublished)
            self._unpublished = []
            if not self._committed:
                return
            wait = self._published_at + PUBLISH_EVERY_S - time.monotonic()
            if wait <= 0 or self._closing:
                events, self._committed = self._committed, []
                self._publish(events)
            else:
                if self._publisher is None and not self._closing:
                    # One thread for the command's batches (not one per batch: a plan of many steps would start
                    # ten a second, each waiting for the GIL to say it started).
                    self._publisher = threading.Thread(target=self._publish_later, name="events publisher", daemon=True)
                    self._publisher.start()
                self._due.notify()

    def _publish_later(self) -> None:
        """The publisher thread: each batch of committed events PUBLISH_EVERY_S after the last publication."""
        with self._publish_lock:
            while not self._closing:
                if not self._committed:
                    self._due.wait()
                    continue
                wait = self._published_at + PUBLISH_EVERY_S - time.monotonic()
                if wait > 0:
                    self._due.wait(wait)
                    continue
                events, self._committed = self._committed, []
                self._publish(events)

    def _publish(self, events: list[Event]) -> None:
        if not events:
            return
        self._published_at = time.monotonic()
        try:
            self.eventlog.publish(events)
        except redis.RedisError as exc:
            log.warning("could not publish %d event(s) to the stream (the relay will): %s", len(events), redact(exc))
            ids = [e.id for e in events]
            self.record(lambda conn: store.mark_unpublished(conn, ids), what="unpublished mark")

    def record(self, work: Callable[[Connection], Any], what: str) -> bool:
        """Run ``work`` and commit: on the command's connection while it is idle, else aside."""
        conn = self._idle_conn()
        if conn is not None:
            try:
                work(conn)
                conn.commit()
                return True
            except Exception as exc:  # noqa: BLE001 - try the aside connection
                log.warning("%s not written on the command's connection: %s", what, redact(exc))
                rollback_quietly(conn)
        return self.aside(work, what)

    # -- the outcome -------------------------------------------------------------

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """Publish the command's outcome where waiting producers look for it; note in PostgreSQL that it is there."""
        self.flush()
        command_id = result.get("command_id")
        if not command_id:
            self.close()
            return result
        if not publish_result(self.eventlog.client, self.prefix, command_id, result):
            self.record(lambda conn: store.mark_unpublished_result(conn, command_id), what="unpublished mark")
        self.close()
        return result

    def refuse(self, result: dict[str, Any], digest: str) -> dict[str, Any]:
        """Publish the refusal of a message that did not run, where only its own producer looks:
        under ``rejection:<id>:<digest>``, never over the real command's ``result:<id>``."""
        self.flush()
        command_id = result.get("command_id")
        if command_id:
            try:
                _set_outcome(self.eventlog.client, self.prefix, keys.rejection(self.prefix, command_id, digest), command_id, result)
            except redis.RedisError as exc:
                log.error("could not publish the rejection of %s: %s", command_id, redact(exc))
        self.close()
        return result

    def close(self) -> None:
        with self._publish_lock:
            self._closing = True
            self._due.notify_all()  # the publisher thread ends
            events, self._committed = self._committed, []
            self._publish(events)
        with self._aside_lock:
            self._close_aside()


def publish_result(client: redis.Redis, prefix: str, command_id: str, result: dict[str, Any]) -> bool:
    """SET the outcome a producer waits for; False (logged) when Redis is unreachable."""
    try:
        _set_outcome(client, prefix, keys.result(prefix, command_id), command_id, result)
        return True
    except redis.RedisError as exc:
        log.error("could not publish the outcome of %s (the relay retries): %s", command_id, redact(exc))
        return False


def _set_outcome(client: redis.Redis, prefix: str, key: str, command_id: str, result: dict[str, Any]) -> None:
    """SET an outcome and, in the same transaction, wake the producers waiting for it (``keys.outcome_ready``)."""
    ready = keys.outcome_ready(prefix, command_id)
    pipe = client.pipeline(transaction=True)
    pipe.set(key, json.dumps(result, default=str), ex=keys.RESULT_TTL_S)
    pipe.xadd(ready, {"key": key}, maxlen=1)
    pipe.expire(ready, keys.OUTCOME_READY_TTL_S)
    pipe.execute()


class Presence:
    """``<prefix>:running:<id>``: where a command is, renewed while its worker lives.

    Producers read it to say what is true while they wait (queued, running in
    phase X, or the worker running it is gone); it expires ``ttl_s`` after the
    worker stopped renewing it.
    """

    def __init__(self, client: redis.Redis, prefix: str, command_id: str, worker: str, ttl_s: float) -> None:
        self.client = client
        self.key = keys.running(prefix, command_id)
        self.ttl_ms = max(int(ttl_s * 1000), 1000)
        self.state: dict[str, Any] = {"worker": worker, "since": time.time(), "phase": "accepted"}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._dirty = threading.Event()  # an update waits for its turn (update(soon=True))
        self._written_at = float("-inf")
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._write()
        self._thread = threading.Thread(target=self._beat, name=f"presence {self.key}", daemon=True)
        self._thread.start()

    def update(self, *, soon: bool = False, **state: Any) -> None:
        """Show ``state`` now; ``soon``: within PUBLISH_EVERY_S, coalesced with the updates that follow it
        (a plan of many short steps writes the step it is at ten times a second, not once per step)."""
        with self._lock:
            self.state.update(state)
            due = time.monotonic() - self._written_at >= PUBLISH_EVERY_S
        if soon and not due and self._thread is not None:
            self._dirty.set()
            return
        self._write()

    def _write(self) -> None:
        with self._lock:
            value = json.dumps(self.state, default=str)
            self._written_at = time.monotonic()
        try:
            self.client.set(self.key, value, px=self.ttl_ms)
        except redis.RedisError as exc:
            log.debug("presence of %s not written: %s", self.key, redact(exc))

    def _beat(self) -> None:
        """Renew the key every third of its time to live, and write a coalesced update when it is due."""
        while not self._stop.is_set():
            if self._dirty.wait(self.ttl_ms / 3000):
                self._dirty.clear()
                wait = self._written_at + PUBLISH_EVERY_S - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return
            if self._stop.is_set():
                return
            self._write()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()  # wakes the beat now
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.client.delete(self.key)
        except redis.RedisError as exc:
            log.debug("presence of %s not removed (it expires): %s", self.key, redact(exc))
