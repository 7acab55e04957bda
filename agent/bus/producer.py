"""The producer side: sign a command, put it on its database's queue, wait for the outcome.

While it waits, a producer says what is true of its command: queued (no
worker took it yet, and until when it may still run), running (on which
worker, in which phase), finished, or the worker running it is gone (its
presence key expired). It rides out a Redis that goes away (reconnecting
until its timeout) and, when Redis has no outcome, reads it from the
database's own record (``dbagent.commands``) where it can reach it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis

from dbagent.bus import keys
from dbagent.bus.eventlog import EventLog
from dbagent.bus.queue import EXECUTE_TASK, celery_app
from dbagent.core.commands import Command, default_ttl_s, message_digest
from dbagent.core.errors import BadInput, DbAgentError, Unavailable
from dbagent.core.events import Event
from dbagent.core.redact import redact
from dbagent.postgres.connections import ping_redis, redis_client
from dbagent.settings import Settings

log = logging.getLogger(__name__)

# How often a waiting producer looks for the outcome between stream reads.
POLL_MS = 50
# How often it looks at the command's presence (queued / running / gone).
PRESENCE_EVERY_S = 0.5
# How often it asks PostgreSQL for the outcome while Redis is down or the worker is gone.
POSTGRES_EVERY_S = 5.0
# While Redis is down, how long between reconnection attempts.
RECONNECT_EVERY_S = 1.0


@dataclass
class Progress:
    """What a waiting producer knows of its command; ``say`` turns a change into one true sentence."""

    command: Command
    queue: str
    expiry: datetime
    state: str = "queued"  # queued | running | gone | redis-lost
    worker: str | None = None
    phase: str | None = None
    step: dict[str, Any] | None = None
    seen_running: bool = False
    waited_s: float = 0.0
    absent_since: float | None = None

    def where(self) -> str:
        if self.phase == "step" and self.step:
            return f"step {self.step.get('number')}/{self.step.get('of')} ({self.step.get('revision')})"
        return (self.phase or "starting").replace("_", " ")

    def say(self) -> str:
        expiry = self.expiry.isoformat(timespec="seconds")
        if self.state == "queued":
            return f"queued on {self.queue}; waiting for its worker (the command expires at {expiry})"
        if self.state == "running":
            return f"running on {self.worker}: {self.where()}"
        if self.state == "gone":
            return (
                f"the worker running it ({self.worker}) is gone: no heartbeat; a worker for {self.queue} reports"
                " it as interrupted when it starts, or at once if another one runs"
            )
        return "lost Redis; reconnecting (the command goes on without us)"


class Producer:
    """Publishes commands for one deployment (one Redis, one prefix)."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.prefix = settings.redis.prefix
        self.redis = client if client is not None else redis_client(settings.redis)
        self.events = EventLog(self.redis, self.prefix)
        self._app = None

    def check(self) -> str:
        """Ping Redis; returns the stream position to read events from."""
        ping_redis(self.redis, self.settings.redis)
        try:
            return self.events.last_id()
        except redis.RedisError as exc:
            raise Unavailable(f"cannot read the event stream: {redact(exc)}") from None

    def sign(self, command: Command) -> Command:
        """The command with its expiry (the producer's default unless it chose one), signed."""
        if command.expires_at is None:
            command = command.expiring_in(default_ttl_s(command.type, command.args))
        key = self.settings.security.signing_key()
        if key is None:
            if command.is_writer:
                raise BadInput(
                    f"{command.type} needs a signed command: set the signing key in "
                    f"${self.settings.security.signing_key_env}"
                )
            return command
        return command.signed(key)

    def submit(self, command: Command) -> Command:
        """Sign and enqueue; returns the command as sent (with its expiry)."""
        signed = self.sign(command)
        if self._app is None:
            self._app = celery_app(self.settings)
        try:
            self._app.send_task(
                EXECUTE_TASK,
                args=[signed.to_message()],
                queue=keys.queue(self.prefix, command.db),
                task_id=command.id,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
            )
        except Exception as exc:  # kombu raises its own and socket errors alike
            raise Unavailable(f"could not enqueue the command on Redis: {redact(exc)}") from None
        return signed

    def result(self, command_id: str, digest: str | None = None) -> dict[str, Any] | None:
        """The command's outcome; with the digest of the message sent (``commands.message_digest``),
        also its refusal, which the worker publishes apart from the outcome so that no other message
        under the same id can pass for it."""
        if digest is None:
            raw = self.redis.get(keys.result(self.prefix, command_id))
            return json.loads(raw) if raw else None
        raw, refused = self.redis.mget(keys.result(self.prefix, command_id), keys.rejection(self.prefix, command_id, digest))
        return json.loads(raw) if raw else json.loads(refused) if refused else None

    def presence(self, command_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(keys.running(self.prefix, command_id))
        return json.loads(raw) if raw else None

    def outcome_from_postgres(self, command_id: str, db: str) -> dict[str, Any] | None:
        """The command's result from its database's record, when this host can reach it; else None."""
        database = self.settings.databases.get(db)
        if database is None:
            return None
        import sqlalchemy.exc

        from dbagent.postgres import store
        from dbagent.postgres.connections import pg_connection

        try:
            with pg_connection(database, application_name="dbagent wait") as conn:
                outcome = store.command_outcome(conn, command_id)
                conn.rollback()
                return outcome
        except (DbAgentError, sqlalchemy.exc.SQLAlchemyError) as exc:
            log.debug("outcome of %s not read from PostgreSQL: %s", command_id, redact(exc))
            return None

    def wait(
        self,
        command: Command,
        after: str,
        on_event: Callable[[Event], None] | None = None,
        timeout_s: float = 3600.0,
        on_state: Callable[[Progress], None] | None = None,
    ) -> dict[str, Any]:
        """Stream the command's events until its outcome is there; Unavailable after timeout_s.

        ``on_state(progress)`` is called on every turn of the loop, so a front end
        can say when the state changes (queued, running, gone, redis-lost).
        """
        command_id = command.id
        digest = message_digest(command.to_message())
        queue = keys.queue(self.prefix, command.db)
        ready, ready_after = keys.outcome_ready(self.prefix, command_id), "0-0"  # wakes the XREAD once the outcome is set
        progress = Progress(command, queue, command.expiry(self.settings.security.max_command_age))
        started = time.monotonic()
        deadline = started + timeout_s
        next_presence = next_postgres = 0.0
        redis_lost = False
        while True:
            now = time.monotonic()
            try:
                if redis_lost:
                    after = self._resume_after(after)
                    redis_lost = False
                    progress.state = "running" if progress.seen_running else "queued"
                entries, woken = self.events.wait_or_wake(after, POLL_MS, wake=(ready, ready_after))
                ready_after = woken or ready_after  # a refusal of another message under this id wakes once
                for entry_id, event in entries:
                    after = entry_id
                    if event.command_id == command_id and on_event is not None:
                        on_event(event)
                outcome = self.result(command_id, digest)
                if outcome is not None:
                    for entry_id, event in self.events.read(after=after, command_id=command_id):
                        if on_event is not None:
                            on_event(event)
                    return outcome
                if now >= next_presence:
                    next_presence = now + PRESENCE_EVERY_S
                    self._update(progress, self.presence(command_id), now, self.settings.redis.lease_ttl / 2)
            except redis.RedisError as exc:
                if not redis_lost:
                    log.debug("lost Redis while waiting for %s: %s", command_id, redact(exc))
                redis_lost = True
                progress.state = "redis-lost"
            if on_state is not None:
                progress.waited_s = time.monotonic() - started
                on_state(progress)
            if (redis_lost or progress.state == "gone") and now >= next_postgres:
                next_postgres = now + POSTGRES_EVERY_S
                outcome = self.outcome_from_postgres(command_id, command.db)
                if outcome is not None:
                    return outcome
            if time.monotonic() > deadline:
                outcome = self.outcome_from_postgres(command_id, command.db)
                if outcome is not None:
                    return outcome
                raise Unavailable(self._timeout_message(progress, timeout_s))
            if redis_lost:
                time.sleep(min(RECONNECT_EVERY_S, max(deadline - time.monotonic(), 0)))

    def _resume_after(self, after: str) -> str:
        """Where to read the stream from after a reconnection: a Redis that restarted empty starts again at 0."""
        last = self.events.last_id()
        return after if _stream_id(last) >= _stream_id(after) else "0-0"

    @staticmethod
    def _update(progress: Progress, presence: dict[str, Any] | None, now: float, gone_after_s: float) -> None:
        """Presence renewed: running. Absent after it was there: gone, once that lasted (a Redis that
        restarted empty forgets the key until the worker's next renewal)."""
        if presence is not None:
            progress.state, progress.seen_running, progress.absent_since = "running", True, None
            progress.worker, progress.phase, progress.step = presence.get("worker"), presence.get("phase"), presence.get("step")
        elif progress.seen_running:
            progress.absent_since = progress.absent_since if progress.absent_since is not None else now
            if now - progress.absent_since >= gone_after_s:
                progress.state = "gone"
        else:
            progress.state = "queued"

    def _timeout_message(self, progress: Progress, timeout_s: float) -> str:
        command_id, queue = progress.command.id, progress.queue
        expiry = progress.expiry.isoformat(timespec="seconds")
        if progress.state == "queued":
            return (
                f"no outcome for command {command_id} after {timeout_s:.0f}s: no worker took it. Is a worker running"
                f" for queue {queue}? The command stays queued and runs if a worker starts before {expiry}"
                " (its expiry)."
            )
        if progress.state == "running":
            return (
                f"no outcome for command {command_id} after {timeout_s:.0f}s: it is still running on {progress.worker}"
                f" ({progress.where()}); follow it with: dbagent events --follow --command {command_id}"
            )
        if progress.state == "gone":
            return (
                f"no outcome for command {command_id} after {timeout_s:.0f}s: the worker running it ({progress.worker})"
                f" is gone. A worker for {queue} reports it as interrupted when it starts; it never runs twice."
            )
        return (
            f"no outcome for command {command_id} after {timeout_s:.0f}s: Redis is unreachable"
            f" ({redact(self.settings.redis.url)}); its outcome is recorded in PostgreSQL once it is done."
        )


def _stream_id(value: str) -> tuple[int, int]:
    millis, _, seq = value.partition("-")
    try:
        return int(millis), int(seq or 0)
    except ValueError:
        return 0, 0
