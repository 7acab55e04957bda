"""Reading the event stream as a Redis consumer group: at least once, taken over from the dead.

Each entry is acknowledged (XACK) only after its handler succeeded. Entries
left pending by a consumer that died are taken over with XAUTOCLAIM once idle
long enough; an entry that keeps failing is moved to a dead-letter stream and
reported, so one poison entry cannot stall the group.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from dbagent.core.events import Event

log = logging.getLogger(__name__)

Entry = tuple[str, Event]


@dataclass
class Outcome:
    """What a handler did with a batch: ids done (acknowledged), ids that can never succeed (dead-lettered)."""

    done: set[str] = field(default_factory=set)
    dead: dict[str, str] = field(default_factory=dict)


# A handler gets a batch; entries neither done nor dead stay pending and are retried.
Handler = Callable[[list[Entry]], Outcome]


@dataclass
class ConsumerOptions:
    block_ms: int = 1000
    count: int = 1000
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    # A consumer silent this long with nothing pending is gone for good (each agent process is a
    # consumer of its own name): it is removed from the group. A live one reads every block_ms.
    forget_idle_ms: int = 600_000
    forget_every_s: float = 60.0


class GroupConsumer:
    """One consumer of one group on the event stream."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        name: str,
        handler: Handler,
        dead_letter: str,
        options: ConsumerOptions | None = None,
        on_dead: Callable[[str, dict[str, str], str], None] | None = None,
    ) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.name = name
        self.handler = handler
        self.dead_letter = dead_letter
        self.options = options or ConsumerOptions()
        self.on_dead = on_dead

    def ensure_group(self) -> None:
        """Create the group at the stream's start, so events from before the first agent are seen."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run(self, stop: threading.Event) -> None:
        self.ensure_group()
        next_forget = 0.0
        while not stop.is_set():
            try:
                self.run_once()
                if time.monotonic() >= next_forget:
                    next_forget = time.monotonic() + self.options.forget_every_s
                    self.forget_gone()
            except redis.ConnectionError as exc:
                log.warning("%s: Redis unavailable (%s); retrying", self.group, exc)
                stop.wait(1.0)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # the stream was lost (Redis restarted empty)
                    self.ensure_group()
                else:
                    raise

    def run_once(self) -> int:
        """Retry our own pending entries, take over the dead's, then read new ones. Returns entries handled."""
        handled = self._process(self._own_pending())
        handled += self._process(self._claim_idle())
        response = self.client.xreadgroup(
            self.group, self.name, {self.stream: ">"}, count=self.options.count, block=self.options.block_ms
        )
        if response:
            handled += self._process(response[0][1])
        return handled

    def forget_gone(self) -> list[str]:
        """Remove the group's consumers that are gone: idle past forget_idle_ms with nothing pending
        (what a dead one left pending is taken over first, by _claim_idle). Returns their names."""
        removed = []
        for info in self.client.xinfo_consumers(self.stream, self.group):
            name = _text(info["name"])
            if name == self.name or int(info["pending"]) or int(info["idle"]) < self.options.forget_idle_ms:
                continue
            self.client.xgroup_delconsumer(self.stream, self.group, name)
            removed.append(name)
        if removed:
            log.info("%s: removed %d consumer(s) gone for good: %s", self.group, len(removed), ", ".join(removed))
        return removed

    def _own_pending(self) -> list[Any]:
        response = self.client.xreadgroup(self.group, self.name, {self.stream: "0"}, count=self.options.count)
        return response[0][1] if response else []

    def _claim_idle(self) -> list[Any]:
        result = self.client.xautoclaim(
            self.stream, self.group, self.name, min_idle_time=self.options.claim_idle_ms, start_id="0-0",
            count=self.options.count,
        )
        claimed = result[1] if result else []
        if claimed:
            log.info("%s: took over %d entries left pending by a stopped consumer", self.group, len(claimed))
        return claimed

    def _process(self, raw: list[Any]) -> int:
        entries: list[Entry] = []
        for entry_id, fields in raw:
            entry_id = _text(entry_id)
            if not fields:  # deleted from the stream while pending
                self.client.xack(self.stream, self.group, entry_id)
                continue
            try:
                entries.append((entry_id, Event.from_fields(fields)))
            except (KeyError, ValueError) as exc:
                self._dead(entry_id, fields, f"malformed entry: {exc}")
        if not entries:
            return 0
        try:
            outcome = self.handler(entries)
        except Exception as exc:
            log.exception("%s: handler failed on %d entries", self.group, len(entries))
            outcome = Outcome()
            self._check_deliveries(entries, repr(exc))
        else:
            for entry_id, reason in outcome.dead.items():
                event = next(ev for eid, ev in entries if eid == entry_id)
                self._dead(entry_id, event.to_fields(), reason)
            failed = [(eid, ev) for eid, ev in entries if eid not in outcome.done and eid not in outcome.dead]
            if failed:
                self._check_deliveries(failed, "the handler did not finish it")
        if outcome.done:
            self.client.xack(self.stream, self.group, *outcome.done)
        return len(outcome.done)

    def _check_deliveries(self, entries: list[Entry], error: str) -> None:
        """Dead-letter the entries delivered too often; the rest are retried."""
        ids = {eid for eid, _ in entries}
        pending = self.client.xpending_range(self.stream, self.group, min=min(ids), max=max(ids), count=len(ids) * 2 + 10)
        for item in pending:
            entry_id = _text(item["message_id"])
            if entry_id in ids and item["times_delivered"] >= self.options.max_deliveries:
                event = next(ev for eid, ev in entries if eid == entry_id)
                self._dead(entry_id, event.to_fields(), f"failed {item['times_delivered']} times: {error}")

    def _dead(self, entry_id: str, fields: Any, reason: str) -> None:
        body = {_text(k): _text(v) for k, v in dict(fields).items()}
        self.client.xadd(self.dead_letter, {**body, "dead_reason": reason, "dead_group": self.group, "dead_entry": entry_id})
        self.client.xack(self.stream, self.group, entry_id)
        log.error("%s: entry %s moved to %s: %s", self.group, entry_id, self.dead_letter, reason)
        if self.on_dead is not None:
            self.on_dead(entry_id, body, reason)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
