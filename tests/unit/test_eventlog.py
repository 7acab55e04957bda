"""agent/core/events.py (the model and its stream encoding) and agent/bus/eventlog.py on fakeredis."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from dbagent.bus.eventlog import EventLog
from dbagent.core.events import Event, EventType, iso


def ev(db: str = "production", seq: int = 0, command_id: str | None = None, **fields) -> Event:
    return Event(type=EventType.MIGRATION_STEP, db=db, command_id=command_id, data={"seq": seq}, **fields)


# -- Event encoding ----------------------------------------------------------------------


def test_fields_round_trip_keeps_every_value():
    ts = datetime(2025, 3, 14, 12, 30, 45, 123000, tzinfo=UTC)
    event = Event(
        id="e-1",
        ts=ts,
        type=EventType.MIGRATION_COMPLETED,
        db="production",
        command_id="c-1",
        actor="deploy-bot",
        ticket="CHG-1",
        host="worker-7",
        data={"revision_before": "009", "revision_after": "011", "steps": [1, 2], "nested": {"a": None}},
    )

    fields = event.to_fields()
    back = Event.from_fields(fields)

    assert back == event
    assert back.ts.tzinfo is not None and back.ts.utcoffset() == timedelta(0)
    assert back.data == {"revision_before": "009", "revision_after": "011", "steps": [1, 2], "nested": {"a": None}}


def test_fields_are_flat_strings_in_the_contract_shape():
    event = Event(
        id="e-2",
        ts=datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        type=EventType.LOCK_ACQUIRED,
        db="staging",
        host="h",
        data={"token": 7},
    )

    fields = event.to_fields()

    assert fields == {
        "id": "e-2",
        "ts": "2025-01-02T03:04:05.678Z",
        "type": "lock.acquired",
        "db": "staging",
        "command_id": "",
        "actor": "",
        "ticket": "",
        "host": "h",
        "data": '{"token":7}',
    }


def test_none_fields_come_back_as_none():
    event = Event(type=EventType.COMMAND_REJECTED, db="production")

    back = Event.from_fields(event.to_fields())

    assert back.command_id is None
    assert back.actor is None
    assert back.ticket is None
    assert back.data == {}


def test_ts_is_stored_in_utc_whatever_the_offset():
    plus_two = timezone(timedelta(hours=2))
    event = ev(ts=datetime(2025, 6, 1, 14, 0, 0, tzinfo=plus_two))

    fields = event.to_fields()
    back = Event.from_fields(fields)

    assert fields["ts"] == "2025-06-01T12:00:00.000Z"
    assert back.ts == datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
    assert back.ts.utcoffset() == timedelta(0)


def test_ts_keeps_milliseconds():
    event = ev(ts=datetime(2025, 6, 1, 12, 0, 0, 987654, tzinfo=UTC))

    back = Event.from_fields(event.to_fields())

    assert back.ts == datetime(2025, 6, 1, 12, 0, 0, 987000, tzinfo=UTC)
    assert iso(event.ts) == "2025-06-01T12:00:00.987Z"


def test_from_fields_accepts_bytes_as_redis_returns_them():
    event = ev(command_id="c-9", actor="me")
    raw = {k.encode(): v.encode() for k, v in event.to_fields().items()}

    back = Event.from_fields(raw)

    assert back == Event.from_fields(event.to_fields())
    assert (back.command_id, back.actor, back.data) == ("c-9", "me", {"seq": 0})


def test_to_json_has_the_contract_keys():
    body = ev(command_id="c").to_json()

    assert set(body) == {"id", "ts", "type", "db", "command_id", "actor", "ticket", "host", "data"}
    assert body["ts"].endswith("Z")
    assert body["data"] == {"seq": 0}


# -- EventLog on fakeredis ------------------------------------------------------------------


@pytest.fixture
def log(fake_redis, prefix) -> EventLog:
    return EventLog(fake_redis, prefix)


def test_stream_name_is_prefix_events(log, fake_redis, prefix):
    assert log.stream == f"{prefix}:events"

    log.publish([ev()])

    assert fake_redis.exists(f"{prefix}:events") == 1
    assert fake_redis.xlen(f"{prefix}:events") == 1
    assert fake_redis.keys("*") == [f"{prefix}:events".encode()]


def test_publish_then_read(log):
    events = [ev("production", 1, "c1"), ev("staging", 2, "c2"), ev("production", 3, "c3")]

    log.publish(events)
    entries = log.read()

    assert [e for _, e in entries] == [Event.from_fields(x.to_fields()) for x in events]
    ids = [eid for eid, _ in entries]
    assert len(set(ids)) == 3 and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


def test_read_filters_by_db_and_command_id(log):
    log.publish([ev("production", 1, "c1"), ev("staging", 2, "c2"), ev("production", 3, "c1"), ev("production", 4, "c3")])

    assert [e.data["seq"] for _, e in log.read(db="production")] == [1, 3, 4]
    assert [e.data["seq"] for _, e in log.read(db="staging")] == [2]
    assert [e.data["seq"] for _, e in log.read(command_id="c1")] == [1, 3]
    assert [e.data["seq"] for _, e in log.read(db="production", command_id="c3")] == [4]
    assert log.read(db="staging", command_id="c1") == []
    assert log.read(db="nowhere") == []


def test_read_after_an_id_is_exclusive(log):
    log.publish([ev(seq=i) for i in range(5)])
    ids = [eid for eid, _ in log.read()]

    later = log.read(after=ids[1])

    assert [e.data["seq"] for _, e in later] == [2, 3, 4]
    assert [e.data["seq"] for _, e in log.read(after="0-0")] == [0, 1, 2, 3, 4]


def test_publish_in_a_caller_pipeline_waits_for_execute(log, fake_redis):
    pipe = fake_redis.pipeline(transaction=True)
    log.publish([ev(seq=1), ev(seq=2)], pipeline=pipe)

    assert fake_redis.xlen(log.stream) == 0
    pipe.execute()
    assert [e.data["seq"] for _, e in log.read()] == [1, 2]


def test_malformed_entries_are_skipped(log, fake_redis):
    log.publish([ev(seq=1)])
    fake_redis.xadd(log.stream, {"junk": "1"})
    log.publish([ev(seq=2)])

    assert [e.data["seq"] for _, e in log.read()] == [1, 2]


def test_last_id(log):
    assert log.last_id() == "0-0"

    log.publish([ev(seq=1), ev(seq=2)])

    ids = [eid for eid, _ in log.read()]
    assert log.last_id() == ids[-1]


@pytest.fixture
def many(log):
    """450 events alternating between two databases: seq 0..449, even = production."""
    events = [ev("production" if i % 2 == 0 else "staging", i) for i in range(450)]
    log.publish(events)
    return events


def test_tail_newest_n_oldest_first(log, many):
    assert [e.data["seq"] for _, e in log.tail(5)] == [445, 446, 447, 448, 449]


def test_tail_one_db_across_several_batches(log, many):
    # 150 production events are spread over the newest 300 entries: two batches of 200.
    tail = log.tail(150, db="production")

    assert [e.data["seq"] for _, e in tail] == list(range(150, 450, 2))
    assert all(e.db == "production" for _, e in tail)


def test_tail_other_db_across_several_batches(log, many):
    tail = log.tail(210, db="staging")

    assert [e.data["seq"] for _, e in tail] == list(range(31, 450, 2))


def test_tail_asking_for_more_than_exists_returns_all_of_that_db(log, many):
    tail = log.tail(1000, db="staging")

    assert [e.data["seq"] for _, e in tail] == list(range(1, 450, 2))


def test_tail_larger_than_the_default_batch_without_filter(log, many):
    tail = log.tail(420)

    assert [e.data["seq"] for _, e in tail] == list(range(30, 450))


def test_tail_of_empty_stream_or_unknown_db(log, many, fake_redis, prefix):
    assert log.tail(10, db="nowhere") == []
    assert EventLog(fake_redis, prefix + "-other").tail(10) == []


def test_wait_returns_only_later_entries(log):
    log.publish([ev(seq=i) for i in range(4)])
    ids = [eid for eid, _ in log.read()]

    later = log.wait(ids[1], block_ms=50)

    assert [e.data["seq"] for _, e in later] == [2, 3]
    assert [eid for eid, _ in later] == ids[2:]


def test_wait_times_out_empty(log):
    log.publish([ev(seq=1)])
    after = log.last_id()

    started = time.monotonic()
    assert log.wait(after, block_ms=100) == []
    assert time.monotonic() - started >= 0.09


def test_wait_wakes_up_for_a_new_entry(log, fake_server, prefix):
    import fakeredis

    log.publish([ev(seq=1)])
    after = log.last_id()
    other = EventLog(fakeredis.FakeRedis(server=fake_server), prefix)
    timer = threading.Timer(0.1, lambda: other.publish([ev(seq=2)]))
    timer.start()
    try:
        started = time.monotonic()
        got = log.wait(after, block_ms=3000)
        elapsed = time.monotonic() - started
    finally:
        timer.join()

    assert [e.data["seq"] for _, e in got] == [2]
    assert elapsed < 2.0


def test_follow_yields_later_entries_of_one_db(log):
    log.publish([ev("production", 0)])
    after = log.last_id()
    log.publish([ev("staging", 1), ev("production", 2), ev("production", 3)])

    follower = log.follow(after, db="production", block_ms=50)
    got = [next(follower)[1].data["seq"], next(follower)[1].data["seq"]]

    assert got == [2, 3]
