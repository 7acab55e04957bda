"""The event stream in Redis: ``<prefix>:events``.

PostgreSQL's ``dbagent.audit_log`` is the record; this stream carries the same
entries to live readers (the CLI, the agent, ``dbagent events --follow``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from dbagent.bus import keys
from dbagent.core.events import Event

log = logging.getLogger(__name__)


class EventLog:
    """Publish to and read from the event stream."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.stream = keys.events(prefix)

    def publish(self, events: Iterable[Event], pipeline: Any | None = None) -> None:
        """XADD each event; with a pipeline, the caller executes it (to group writes atomically)."""
        pipe = pipeline if pipeline is not None else self.client.pipeline(transaction=False)
        for event in events:
            pipe.xadd(self.stream, event.to_fields(), maxlen=keys.EVENTS_MAXLEN, approximate=True)
        if pipeline is None:
            pipe.execute()

    def last_id(self) -> str:
        """The id of the newest entry, to read only what comes after it."""
        newest = self.client.xrevrange(self.stream, count=1)
        return _text(newest[0][0]) if newest else "0-0"

    def read(
        self, *, after: str = "-", count: int = 1000, db: str | None = None, command_id: str | None = None
    ) -> list[tuple[str, Event]]:
        start = "-" if after in ("-", "0", "0-0") else f"({after}"
        entries = self.client.xrange(self.stream, min=start, count=count)
        return [(eid, ev) for eid, ev in _decode(entries) if _matches(ev, db, command_id)]

    def tail(self, count: int, db: str | None = None) -> list[tuple[str, Event]]:
        """The newest ``count`` entries (of one database), oldest first."""
        found: list[tuple[str, Event]] = []
        upper = "+"
        while len(found) < count:
            batch = self.client.xrevrange(self.stream, max=upper, count=max(count, 200))
            if not batch:
                break
            for eid, ev in _decode(batch):
                if _matches(ev, db, None):
                    found.append((eid, ev))
            upper = f"({_text(batch[-1][0])}"
        return list(reversed(found[:count]))

    def wait(self, after: str, block_ms: int) -> list[tuple[str, Event]]:
        """Entries after ``after``, blocking up to block_ms for the first one."""
        return self.wait_or_wake(after, block_ms)[0]

    def wait_or_wake(self, after: str, block_ms: int, wake: tuple[str, str] | None = None) -> tuple[list[tuple[str, Event]], str | None]:
        """Like ``wait``, and also woken by a new entry after ``wake = (key, id)`` in another stream
        (``keys.outcome_ready``): the entries, and the id of the newest wake-up seen (None if none)."""
        streams = {self.stream: after}
        if wake is not None:
            streams[wake[0]] = wake[1]
        response = self.client.xread(streams, block=block_ms, count=500)
        entries: list[tuple[str, Event]] = []
        woken: str | None = None
        for name, found in response or []:
            if _text(name) == self.stream:
                entries = list(_decode(found))
            elif found:
                woken = _text(found[-1][0])
        return entries, woken

    def follow(self, after: str, db: str | None = None, block_ms: int = 1000) -> Iterator[tuple[str, Event]]:
        while True:
            for eid, ev in self.wait(after, block_ms):
                after = eid
                if _matches(ev, db, None):
                    yield eid, ev


def _matches(event: Event, db: str | None, command_id: str | None) -> bool:
    return (db is None or event.db == db) and (command_id is None or event.command_id == command_id)


def _decode(entries: Any) -> Iterator[tuple[str, Event]]:
    for entry_id, fields in entries:
        try:
            yield _text(entry_id), Event.from_fields(fields)
        except (KeyError, ValueError) as exc:
            log.warning("skipping malformed stream entry %s: %s", _text(entry_id), exc)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
