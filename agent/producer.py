"""The producer side: sign a command, put it on its database's queue, wait for the outcome."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis

from agent import keys
from agent.commands import Command
from agent.connections import ping_redis, redis_client
from agent.errors import BadInput, Unavailable
from agent.eventlog import EventLog
from agent.events import Event
from agent.queue import EXECUTE_TASK, celery_app
from agent.redact import redact
from agent.settings import Settings

# How often a waiting producer looks for the outcome between stream reads.
POLL_MS = 50


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
        """Sign and enqueue; returns the command as sent."""
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

    def result(self, command_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(keys.result(self.prefix, command_id))
        return json.loads(raw) if raw else None

    def wait(
        self,
        command: Command,
        after: str,
        on_event: Callable[[Event], None] | None = None,
        timeout_s: float = 3600.0,
        on_idle: Callable[[float], None] | None = None,
    ) -> dict[str, Any]:
        """Stream the command's events until its outcome is there; Unavailable after timeout_s."""
        command_id = command.id
        deadline = time.monotonic() + timeout_s
        started = time.monotonic()
        try:
            while True:
                for entry_id, event in self.events.wait(after, POLL_MS):
                    after = entry_id
                    if event.command_id == command_id and on_event is not None:
                        on_event(event)
                outcome = self.result(command_id)
                if outcome is not None:
                    for entry_id, event in self.events.read(after=after, command_id=command_id):
                        if on_event is not None:
                            on_event(event)
                    return outcome
                if on_idle is not None:
                    on_idle(time.monotonic() - started)
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"no outcome for command {command_id} after {timeout_s:.0f}s: is a worker running"
                        f" for queue {keys.queue(self.prefix, command.db)}? The command stays"
                        " queued and will run when one starts."
                    )
        except redis.RedisError as exc:
            raise Unavailable(f"lost Redis while waiting for command {command_id}: {redact(exc)}") from None

