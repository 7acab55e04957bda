"""GroupConsumer on fakeredis: acknowledgement after work, takeover from the dead, dead letters."""

from __future__ import annotations

import uuid

import fakeredis
import pytest

from dbagent.bus.consumer import ConsumerOptions, GroupConsumer, Outcome
from dbagent.bus.eventlog import EventLog
from dbagent.core.events import Event


@pytest.fixture
def client():
    return fakeredis.FakeRedis()


def publish(client, prefix: str, n: int, **fields) -> list[Event]:
    events = [Event(type=fields.get("type", "migration.step"), db="db1", command_id=f"c{i}") for i in range(n)]
    EventLog(client, prefix).publish(events)
    return events


def consumer(client, prefix, name, handler, **options) -> GroupConsumer:
    return GroupConsumer(
        client, f"{prefix}:events", "audit", name, handler, f"{prefix}:events:dead",
        ConsumerOptions(block_ms=10, **options),
    )


def test_events_published_before_the_group_existed_are_delivered_and_acknowledged(client):
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    events = publish(client, prefix, 5)
    seen: list[str] = []

    def handler(batch):
        seen.extend(e.id for _, e in batch)
        return Outcome(done={eid for eid, _ in batch})

    c = consumer(client, prefix, "a", handler)
    c.ensure_group()
    assert c.run_once() == 5
    assert seen == [e.id for e in events]
    assert client.xpending(f"{prefix}:events", "audit")["pending"] == 0
    assert c.run_once() == 0  # nothing is delivered twice


def test_entries_a_dead_consumer_left_pending_are_taken_over(client):
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    publish(client, prefix, 3)
    dying = consumer(client, prefix, "dying", lambda batch: Outcome())  # reads, never finishes
    dying.ensure_group()
    dying.run_once()
    assert client.xpending(f"{prefix}:events", "audit")["pending"] == 3
    done: list[str] = []

    def handler(batch):
        done.extend(eid for eid, _ in batch)
        return Outcome(done={eid for eid, _ in batch})

    heir = consumer(client, prefix, "heir", handler, claim_idle_ms=0)
    assert heir.run_once() == 3 and len(done) == 3
    assert client.xpending(f"{prefix}:events", "audit")["pending"] == 0


def test_an_entry_that_keeps_failing_goes_to_the_dead_letter_stream_once(client):
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    events = publish(client, prefix, 3)
    poison = events[1].id
    dead_reports: list[str] = []

    def handler(batch):
        return Outcome(done={eid for eid, e in batch if e.id != poison})

    c = GroupConsumer(
        client, f"{prefix}:events", "audit", "a", handler, f"{prefix}:events:dead",
        ConsumerOptions(block_ms=10, max_deliveries=3), on_dead=lambda eid, fields, reason: dead_reports.append(reason),
    )
    c.ensure_group()
    for _ in range(5):
        c.run_once()
    dead = client.xrange(f"{prefix}:events:dead")
    assert len(dead) == 1 and dead[0][1][b"id"].decode() == poison
    assert b"failed 3 times" in dead[0][1][b"dead_reason"]
    assert len(dead_reports) == 1
    assert client.xpending(f"{prefix}:events", "audit")["pending"] == 0


def test_a_handler_can_dead_letter_an_entry_at_once(client):
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    events = publish(client, prefix, 2)
    c = consumer(client, prefix, "a", lambda batch: Outcome(done={batch[0][0]}, dead={batch[1][0]: "unknown database"}))
    c.ensure_group()
    c.run_once()
    dead = client.xrange(f"{prefix}:events:dead")
    assert [d[1][b"id"].decode() for d in dead] == [events[1].id]
    assert dead[0][1][b"dead_reason"] == b"unknown database"


def test_consumers_gone_for_good_are_removed_once_nothing_is_pending_with_them(client):
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    stream = f"{prefix}:events"
    publish(client, prefix, 3)

    def never_finishes(batch):
        return Outcome()

    dead = consumer(client, prefix, "dead-agent", never_finishes)
    dead.ensure_group()
    dead.run_once()  # 3 entries left pending with a consumer that then dies
    quiet = consumer(client, prefix, "quiet-agent", lambda batch: Outcome(done={eid for eid, _ in batch}))
    quiet.run_once()  # a consumer that read and has nothing pending

    live = consumer(client, prefix, "live-agent", lambda batch: Outcome(done={eid for eid, _ in batch}),
                    claim_idle_ms=0, forget_idle_ms=0)
    # Not before what it left pending is taken over: DELCONSUMER would drop those entries.
    assert client.xpending(stream, "audit")["pending"] == 3
    removed_early = live.forget_gone()
    assert "dead-agent" not in removed_early and removed_early == ["quiet-agent"]
    assert live.run_once() == 3  # takes over the dead one's entries
    assert live.forget_gone() == ["dead-agent"]
    assert [c["name"] for c in client.xinfo_consumers(stream, "audit")] in (["live-agent"], [b"live-agent"])
    assert client.xpending(stream, "audit")["pending"] == 0


def test_a_recently_active_consumer_is_kept(client):
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    publish(client, prefix, 1)
    other = consumer(client, prefix, "other", lambda batch: Outcome(done={eid for eid, _ in batch}))
    other.ensure_group()
    other.run_once()
    me = consumer(client, prefix, "me", lambda batch: Outcome(), forget_idle_ms=600_000)
    assert me.forget_gone() == []
    assert len(client.xinfo_consumers(f"{prefix}:events", "audit")) == 1
