"""Poison on a database's queue: the worker stays up, dead-letters each message with an event, and serves
the real commands behind them; a forged message reusing a real id leaves that command's outcome alone."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from dbagent.bus import keys
from dbagent.bus.producer import Producer
from dbagent.core.commands import Command, CommandType, message_digest
from dbagent.settings import load_settings
from tests.faults.test_faults import wait_for
from tests.messages import call, command_message, envelope
from tests.servers import SIGNING_KEY

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def push(env, redis_client, *items: bytes) -> None:
    queue = keys.broker_prefix(env.prefix) + keys.queue(env.prefix, "test")
    for item in items:
        redis_client.lpush(queue, item)


def dead_letters(env, redis_client) -> list[dict]:
    return [json.loads(r) for r in redis_client.lrange(keys.dead_commands(env.prefix, "test"), 0, -1)]


def test_poison_messages_are_dead_lettered_and_the_real_migrate_behind_them_runs(env, redis_client):
    poison = {
        "invalid JSON": b'{"body": "eyJ', 
        "not UTF-8": b"\xff\xfe{}",
        "bad base64": envelope(None, raw_body="!!! not base64 !!!"),
        "JSON string body": envelope("just a string"),
        "JSON string message": json.dumps("hello").encode(),
        "wrong task name": envelope(call(command_message()), task="celery.backend_cleanup"),
        "missing properties": envelope(call(command_message()), drop=("properties",)),
        "wrong arity": envelope(call(command_message(), "extra")),
        "10 MB body": envelope(call(command_message(marker="x" * 10_000_000))),
        "unsigned": envelope(call(command_message(signature=None))),
        "chained callback": envelope([[command_message()], {}, {"callbacks": [{"task": "x"}]}]),
    }
    # A real signed command in an envelope with headers Celery would trip on: run, from the rebuilt payload.
    odd = command_message(CommandType.STATUS, key=SIGNING_KEY)
    odd_envelope = envelope(call(odd), headers={"timelimit": "soon", "retries": "many", "origin": "x" * 100_000})
    push(env, redis_client, *poison.values(), odd_envelope)
    worker = env.start_worker()
    # Queued behind all of it: a real migrate.
    result = env.cli("migrate", "--to", "011", "--no-backup", "--json", timeout=180)
    assert result.code == 0, result.stderr + env.log_of(worker)
    assert env.revision() == "011"
    assert worker.poll() is None, "the worker process died:\n" + env.log_of(worker)

    wait_for(lambda: len(dead_letters(env, redis_client)) == len(poison), 20, "every poison message dead-lettered")
    assert json.loads(redis_client.get(keys.result(env.prefix, odd["id"])))["status"] == "succeeded"
    letters = dead_letters(env, redis_client)
    assert all(len(json.dumps(letter)) < 2000 for letter in letters), "a dead letter carries the payload"
    assert max(letter["size"] for letter in letters) > 10_000_000
    rejected = [e for e in env.stream_events(redis_client) if e["type"] == "command.rejected" and e["data"].get("dead_letter")]
    assert len(rejected) == len(poison)
    assert {e["data"]["sha256"] for e in rejected} == {letter["sha256"] for letter in letters}
    assert all(len(json.dumps(e)) < 2000 for e in rejected), "an event carries the payload"
    # Durable too: in the database's audit log.
    rows = env.sql("SELECT count(*) FROM dbagent.audit_log WHERE type = 'command.rejected' AND data->>'dead_letter' = 'true'")
    assert rows[0][0] == len(poison)
    # Nothing is left on the queue or unacknowledged, and the log quotes no 10 MB field.
    assert redis_client.llen(keys.broker_prefix(env.prefix) + keys.queue(env.prefix, "test")) == 0
    assert len(env.log_of(worker)) < 200_000


def test_a_forged_message_reusing_a_real_id_leaves_the_real_outcome_untouched(env, redis_client):
    env.start_worker()
    done = env.cli("migrate", "--to", "003", "--no-backup", "--json")
    assert done.code == 0, done.stderr
    real_id = done.json()["command_id"]
    outcome_key = keys.result(env.prefix, real_id)
    before = json.loads(redis_client.get(outcome_key))
    assert before["status"] == "succeeded"

    # Forged (a signature made without the key), unsigned, and signed-but-expired, all under the real id.
    forged = command_message(CommandType.ROLLBACK, command_id=real_id, steps=1)
    unsigned = command_message(CommandType.ROLLBACK, command_id=real_id, signature=None, steps=1)
    past = datetime.now(UTC) - timedelta(hours=2)
    expired = Command(id=real_id, type=CommandType.ROLLBACK, db="test", args={"steps": 1}, actor="mallory",
                      issued_at=past, expires_at=past + timedelta(minutes=5)).signed(SIGNING_KEY.encode()).to_message()
    push(env, redis_client, *(envelope(call(m), task_id=real_id) for m in (forged, unsigned, expired)))
    wait_for(lambda: len(dead_letters(env, redis_client)) == 2, 20, "the forged and unsigned messages dead-lettered")
    wait_for(lambda: redis_client.get(keys.rejection(env.prefix, real_id, message_digest(expired))), 20,
             "the expired message's rejection")

    assert json.loads(redis_client.get(outcome_key)) == before
    assert {d["command_id"] for d in dead_letters(env, redis_client)} == {real_id}
    # Each refusal is readable by the producer of that message, and only under its digest.
    for message in (forged, expired):
        refusal = json.loads(redis_client.get(keys.rejection(env.prefix, real_id, message_digest(message))))
        assert refusal["status"] == "rejected" and refusal["command_id"] == real_id
    # Nothing ran: still at 003, and the record says succeeded.
    assert env.revision() == "003"
    assert env.sql("SELECT status FROM dbagent.commands WHERE id = %s", real_id) == [("succeeded",)]
    # A producer reading the id afterwards sees the real outcome.
    assert Producer(load_settings(env.config)).result(real_id) == before


def test_a_producer_with_the_wrong_key_is_told_why_at_once(env, redis_client):
    env.start_worker()
    result = env.cli("migrate", "--to", "003", "--json", timeout=60,
                     env=env.environ(DBAGENT_SIGNING_KEY="not-the-deployment-key"))
    assert result.code == 2, result.stdout + result.stderr
    assert result.json()["status"] == "rejected"
    assert "signature does not match" in result.json()["error"]
    assert result.seconds < 30
    assert env.revision() is None
    assert len(dead_letters(env, redis_client)) == 1


def test_garbage_in_the_unacknowledged_hash_is_dead_lettered_not_fatal(env, redis_client):
    """Redelivery after the visibility timeout decodes every unacked entry: one kombu did not write used to
    stop the worker at each start."""
    broker = keys.broker_prefix(env.prefix)
    for tag, entry in (("tag-not-json", b"{nope"), ("tag-wrong-shape", b'"just a string"')):
        redis_client.hset(broker + "unacked", tag, entry)
        redis_client.zadd(broker + "unacked_index", {tag: 0})  # long past any visibility timeout
    worker = env.start_worker()
    result = env.cli("migrate", "--to", "003", "--no-backup", "--json", timeout=120)
    assert result.code == 0, result.stderr + env.log_of(worker)
    wait_for(lambda: len(dead_letters(env, redis_client)) == 2, 20, "both entries dead-lettered")
    assert worker.poll() is None, env.log_of(worker)
    assert redis_client.hlen(broker + "unacked") == 0
    assert {d["queue"] for d in dead_letters(env, redis_client)} == {"unacked"}
