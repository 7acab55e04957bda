"""agent/operations/journal.py on fakeredis: the events of a plan's committed steps go out in batches
(``Journal.flush_soon``) and the live step is written coalesced (``Presence.update(soon=True)``), in order,
never before their transaction committed, and never later than ``PUBLISH_EVERY_S`` after it."""

from __future__ import annotations

import json
import time

import pytest

from dbagent.bus import keys
from dbagent.bus.eventlog import EventLog
from dbagent.core.events import EventType
from dbagent.operations import journal as journal_module
from dbagent.operations.journal import Journal, Presence

PREFIX = "dbagent-test-journal"


@pytest.fixture
def counted(fake_redis):
    """A journal whose publications are counted (one call: one XADD round trip)."""
    eventlog = EventLog(fake_redis, PREFIX)
    calls: list[int] = []
    publish = eventlog.publish
    eventlog.publish = lambda events, pipeline=None: (calls.append(len(events)), publish(events, pipeline))[1]
    journal = Journal(eventlog, PREFIX, "production", None)
    yield journal, eventlog, calls
    journal.close()


def stream(eventlog: EventLog) -> list[int]:
    return [event.data["number"] for _, event in eventlog.read()]


def test_the_events_of_many_short_steps_go_out_in_a_few_batches_in_order(counted):
    journal, eventlog, calls = counted
    for number in range(1, 201):
        journal.staged(EventType.MIGRATION_STEP, number=number)
        journal.flush_soon()  # the step committed
    deadline = time.monotonic() + 2
    while len(stream(eventlog)) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream(eventlog) == list(range(1, 201))
    assert calls[0] == 1  # the first step's event goes out at once
    assert len(calls) < 20, calls  # not one round trip per step


def test_a_step_event_is_published_at_most_publish_every_s_after_its_commit(counted):
    journal, eventlog, _ = counted
    journal.staged(EventType.MIGRATION_STEP, number=1)
    journal.flush_soon()
    journal.staged(EventType.MIGRATION_STEP, number=2)
    committed = time.monotonic()
    journal.flush_soon()  # within PUBLISH_EVERY_S of the first: waits for its turn...
    while stream(eventlog) != [1, 2]:
        assert time.monotonic() - committed < journal_module.PUBLISH_EVERY_S + 0.5, stream(eventlog)
        time.sleep(0.005)  # ...and nothing else has to happen for it to go out (a long next step)


def test_an_event_staged_in_an_open_transaction_is_never_published_by_the_timer(counted):
    journal, eventlog, _ = counted
    journal.staged(EventType.MIGRATION_STEP, number=1)
    journal.flush_soon()
    journal.staged(EventType.MIGRATION_STEP, number=2)
    journal.flush_soon()
    journal.staged(EventType.MIGRATION_STEP, number=3)  # the next step, not committed yet
    time.sleep(journal_module.PUBLISH_EVERY_S * 3)
    assert stream(eventlog) == [1, 2]
    journal.discard_staged()  # that step rolled back
    journal.emit(EventType.MIGRATION_FAILED, number=4)
    assert stream(eventlog) == [1, 2, 4]


def test_an_emitted_event_goes_out_after_the_steps_still_waiting(counted):
    journal, eventlog, _ = counted
    for number in (1, 2, 3):
        journal.staged(EventType.MIGRATION_STEP, number=number)
        journal.flush_soon()
    journal.emit(EventType.MIGRATION_COMPLETED, number=4)  # at once, and behind the steps before it
    assert stream(eventlog) == [1, 2, 3, 4]


def test_closing_the_journal_publishes_what_waits(fake_redis):
    eventlog = EventLog(fake_redis, PREFIX)
    journal = Journal(eventlog, PREFIX, "production", None)
    for number in (1, 2):
        journal.staged(EventType.MIGRATION_STEP, number=number)
        journal.flush_soon()
    journal.close()
    assert stream(eventlog) == [1, 2]


def test_one_publisher_thread_serves_every_batch_of_a_plan_and_ends_with_the_journal(fake_redis):
    eventlog = EventLog(fake_redis, PREFIX)
    journal = Journal(eventlog, PREFIX, "production", None)
    publishers = set()
    started = time.monotonic()
    number = 0
    while time.monotonic() - started < journal_module.PUBLISH_EVERY_S * 5:  # several batches' worth
        number += 1
        journal.staged(EventType.MIGRATION_STEP, number=number)
        journal.flush_soon()
        if journal._publisher is not None:
            publishers.add(journal._publisher)
        time.sleep(0.002)
    deadline = time.monotonic() + 2
    while len(stream(eventlog)) < number and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream(eventlog) == list(range(1, number + 1))
    assert len(publishers) == 1, f"{len(publishers)} threads started for the batches of one plan"
    journal.close()
    (publisher,) = publishers
    publisher.join(timeout=2)
    assert not publisher.is_alive()


def test_the_live_step_is_written_coalesced_and_shows_the_last_one_soon(fake_redis):
    writes: list[str] = []
    presence = Presence(fake_redis, PREFIX, "c-1", "worker-1", ttl_s=30)
    write = presence._write
    presence._write = lambda: (writes.append("w"), write())[1]
    presence.start()
    try:
        for number in range(1, 301):
            presence.update(soon=True, phase="step", step={"number": number, "of": 300})
        deadline = time.monotonic() + journal_module.PUBLISH_EVERY_S + 1
        key = keys.running(PREFIX, "c-1")
        while (json.loads(fake_redis.get(key)).get("step") or {}).get("number") != 300:
            assert time.monotonic() < deadline, fake_redis.get(key)
            time.sleep(0.01)
        assert len(writes) < 10, len(writes)
        presence.update(phase="verify")  # not soon: written at once
        assert json.loads(fake_redis.get(key))["phase"] == "verify"
    finally:
        presence.stop()
    assert fake_redis.get(keys.running(PREFIX, "c-1")) is None
