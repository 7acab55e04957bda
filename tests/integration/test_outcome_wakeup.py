"""A waiting producer wakes the moment its command's outcome is set (``keys.outcome_ready``), on real Redis:
not at the next timeout of its blocking read of the event stream, whose granularity in Redis is about 0.1 s
(every command's wall time had that much added after its last event)."""

from __future__ import annotations

import threading
import time

import pytest

from dbagent.bus import keys
from dbagent.bus import producer as producer_module
from dbagent.bus.producer import Producer
from dbagent.core.commands import client_command, message_digest
from dbagent.operations.journal import Journal, publish_result
from dbagent.settings import load_settings
from tests.servers import delete_prefix, new_env

pytestmark = pytest.mark.integration

# Long enough that a producer woken only by its read's timeout would plainly miss the bound below.
LONG_POLL_MS = 20_000


@pytest.fixture
def waiting(tmp_path, redis_client, monkeypatch):
    world = new_env(tmp_path)
    settings = load_settings(world.config)
    producer = Producer(settings)
    monkeypatch.setattr(producer_module, "POLL_MS", LONG_POLL_MS)
    reads: list[float] = []
    wait_or_wake = producer.events.wait_or_wake

    def counted(*args, **kwargs):
        reads.append(time.monotonic())
        return wait_or_wake(*args, **kwargs)

    producer.events.wait_or_wake = counted
    try:
        yield settings, producer, reads
    finally:
        delete_prefix(redis_client, settings.redis.prefix)


def later(seconds: float, work) -> threading.Thread:
    thread = threading.Timer(seconds, work)
    thread.start()
    return thread


def test_the_outcome_wakes_the_producer_with_no_event_after_it(waiting, redis_client):
    settings, producer, _ = waiting
    command = client_command("status", db="test", args={}, actor="tester", ticket=None)
    after = producer.check()
    outcome = {"command_id": command.id, "status": "succeeded", "exit_code": 0}
    thread = later(0.3, lambda: publish_result(redis_client, settings.redis.prefix, command.id, outcome))
    started = time.monotonic()

    got = producer.wait(command, after, timeout_s=60)

    waited = time.monotonic() - started
    thread.join()
    assert got == outcome
    assert waited < 5, f"woken after {waited:.1f}s: by the read's timeout, not by the outcome"
    ready = keys.outcome_ready(settings.redis.prefix, command.id)
    assert redis_client.xlen(ready) == 1 and 0 < redis_client.ttl(ready) <= keys.OUTCOME_READY_TTL_S


def test_a_refusal_of_another_message_under_the_id_wakes_once_and_is_not_taken_for_the_outcome(waiting, redis_client):
    settings, producer, reads = waiting
    prefix = settings.redis.prefix
    command = client_command("status", db="test", args={}, actor="tester", ticket=None)
    after = producer.check()
    # A forged message reusing the id is refused under its own digest: it must neither answer this
    # producer nor leave it spinning on a wake-up that is already there.
    forged = Journal(producer.events, prefix, "test", None)
    later(0.2, lambda: forged.refuse({"command_id": command.id, "status": "rejected", "exit_code": 1}, "f" * 32))
    outcome = {"command_id": command.id, "status": "succeeded", "exit_code": 0}
    thread = later(1.5, lambda: publish_result(redis_client, prefix, command.id, outcome))
    started = time.monotonic()

    got = producer.wait(command, after, timeout_s=60)

    thread.join()
    assert got == outcome
    assert time.monotonic() - started < 5
    assert len(reads) <= 4, f"{len(reads)} reads of the stream in 1.5 s: the producer spun on the refusal's wake-up"


def test_the_producers_own_refusal_wakes_it(waiting, redis_client):
    settings, producer, _ = waiting
    command = client_command("status", db="test", args={}, actor="tester", ticket=None)
    after = producer.check()
    refused = {"command_id": command.id, "status": "rejected", "exit_code": 1, "error": "forged"}
    journal = Journal(producer.events, settings.redis.prefix, "test", None)
    thread = later(0.3, lambda: journal.refuse(refused, message_digest(command.to_message())))
    started = time.monotonic()

    got = producer.wait(command, after, timeout_s=60)

    thread.join()
    assert got == refused and time.monotonic() - started < 5
