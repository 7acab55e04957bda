"""agent/bus/lease.py: the Redis lease (fencing token, heartbeat) on fakeredis (Lua through lupa)."""

from __future__ import annotations

import json
import time

import fakeredis
import pytest

from dbagent.bus import keys
from dbagent.bus.lease import RedisLease, describe_holder, read_lease
from dbagent.core.errors import LockTimeout, OperationFailed

OWNER_A = {"worker": "production@host-a:101", "command_id": "cmd-a", "type": "migrate"}
OWNER_B = {"worker": "production@host-b:202", "command_id": "cmd-b", "type": "rollback"}


@pytest.fixture
def names(prefix):
    return keys.lease(prefix, "production"), keys.fence(prefix, "production")


@pytest.fixture
def make_lease(fake_server, names):
    """Leases on one database, each with its own client of the same fake server."""
    made: list[RedisLease] = []

    def make(owner: dict, ttl_s: float = 30.0) -> RedisLease:
        lease = RedisLease(fakeredis.FakeRedis(server=fake_server), names[0], names[1], owner, ttl_s)
        made.append(lease)
        return lease

    yield make
    for lease in made:  # stop heartbeats a failing test may have left running
        lease.release()


def expire_now(client, key: str) -> None:
    """The lease's ttl runs out (without waiting for it)."""
    client.pexpire(key, 1)
    time.sleep(0.01)


def test_key_names_carry_the_prefix(prefix, names):
    assert names == (f"{prefix}:lease:production", f"{prefix}:fence:production")


def test_first_acquire_gets_token_1(make_lease, fake_redis, names):
    a = make_lease(OWNER_A)

    assert a.try_acquire() is True

    assert a.token == 1
    stored = json.loads(fake_redis.get(names[0]))
    assert stored["token"] == 1
    assert stored["worker"] == OWNER_A["worker"]
    assert 0 < fake_redis.pttl(names[0]) <= 30_000


def test_second_owner_cannot_acquire_while_held(make_lease, fake_redis, names):
    a, b = make_lease(OWNER_A), make_lease(OWNER_B)
    assert a.try_acquire() is True

    assert b.try_acquire() is False

    assert b.token is None
    assert json.loads(fake_redis.get(names[0]))["command_id"] == "cmd-a"


def test_acquire_times_out_naming_the_holder_and_reports_waiting(make_lease):
    a, b = make_lease(OWNER_A), make_lease(OWNER_B)
    assert a.try_acquire() is True
    waits: list[tuple[float, dict | None]] = []

    started = time.monotonic()
    with pytest.raises(LockTimeout) as caught:
        b.acquire(timeout_s=0.5, on_wait=lambda waited, holder: waits.append((waited, holder)), poll_s=0.1)
    elapsed = time.monotonic() - started

    assert isinstance(caught.value, OperationFailed) and caught.value.exit_code == 1
    message = caught.value.message
    assert "still held by production@host-a:101, command cmd-a, migrate" in message
    assert b.key in message
    assert 0.5 <= elapsed < 2.0
    assert len(waits) >= 3
    assert [w for w, _ in waits] == sorted(w for w, _ in waits)
    for _, holder in waits:
        assert holder is not None
        assert holder["worker"] == OWNER_A["worker"]
        assert holder["command_id"] == "cmd-a"
        assert holder["token"] == 1


def test_fencing_tokens_increase_across_acquisitions(make_lease):
    a, b = make_lease(OWNER_A), make_lease(OWNER_B)

    assert a.try_acquire()
    first = a.token
    assert a.release() is True
    assert b.try_acquire()
    second = b.token
    assert b.release() is True
    assert a.try_acquire()
    third = a.token

    assert first is not None and second is not None and third is not None
    assert first < second < third


def test_failed_attempts_also_advance_the_fence(make_lease):
    a, b = make_lease(OWNER_A), make_lease(OWNER_B)
    assert a.try_acquire()
    assert not b.try_acquire()
    assert a.release()

    assert b.try_acquire()
    assert b.token is not None and a.token is not None and b.token > a.token + 1


def test_release_by_non_owner_keeps_the_key(make_lease, fake_redis, names):
    a, b = make_lease(OWNER_A), make_lease(OWNER_B)
    assert a.try_acquire()
    before = fake_redis.get(names[0])

    assert b.release() is False

    assert fake_redis.get(names[0]) == before


def test_release_after_takeover_keeps_the_new_owners_key(make_lease, fake_redis, names):
    a, b = make_lease(OWNER_A), make_lease(OWNER_B)
    assert a.try_acquire()
    expire_now(fake_redis, names[0])
    assert b.try_acquire()

    assert a.release() is False

    holder = json.loads(fake_redis.get(names[0]))
    assert holder["command_id"] == "cmd-b"
    assert holder["token"] == b.token


def test_release_by_owner_deletes_the_key(make_lease, fake_redis, names):
    a = make_lease(OWNER_A)
    assert a.try_acquire()

    assert a.release() is True

    assert fake_redis.exists(names[0]) == 0
    assert a.release() is False  # a second release is a no-op
    # the fence counter stays, so the next token is still higher
    assert int(fake_redis.get(names[1])) == 1


def test_after_the_ttl_expires_another_can_acquire_with_a_higher_token(make_lease, fake_redis, names):
    a, b = make_lease(OWNER_A, ttl_s=1), make_lease(OWNER_B, ttl_s=1)
    assert a.try_acquire()  # no heartbeat: try_acquire does not start one
    assert not b.try_acquire()

    time.sleep(1.1)

    assert fake_redis.exists(names[0]) == 0
    assert b.try_acquire() is True
    assert b.token is not None and a.token is not None and b.token > a.token
    assert json.loads(fake_redis.get(names[0]))["command_id"] == "cmd-b"


def test_ttl_has_a_floor_of_one_second(make_lease):
    assert make_lease(OWNER_A, ttl_s=0.01).ttl_ms == 1000
    assert make_lease(OWNER_A, ttl_s=2.5).ttl_ms == 2500


def test_renew_extends_for_the_owner(make_lease, fake_redis, names):
    a = make_lease(OWNER_A, ttl_s=1)
    assert a.try_acquire()
    fake_redis.pexpire(names[0], 200)  # most of the ttl has run out

    assert a.renew() is True

    assert fake_redis.pttl(names[0]) > 900


def test_renew_by_non_owner_does_nothing(make_lease, fake_redis, names):
    a, b = make_lease(OWNER_A, ttl_s=1), make_lease(OWNER_B, ttl_s=1)
    assert a.try_acquire()
    fake_redis.pexpire(names[0], 200)

    assert b.renew() is False

    assert fake_redis.pttl(names[0]) <= 200
    assert json.loads(fake_redis.get(names[0]))["command_id"] == "cmd-a"


def test_renew_after_takeover_does_not_extend_the_new_owner(make_lease, fake_redis, names):
    a, b = make_lease(OWNER_A, ttl_s=1), make_lease(OWNER_B, ttl_s=1)
    assert a.try_acquire()
    expire_now(fake_redis, names[0])
    assert b.try_acquire()
    fake_redis.pexpire(names[0], 300)

    assert a.renew() is False

    assert fake_redis.pttl(names[0]) <= 300
    assert json.loads(fake_redis.get(names[0]))["command_id"] == "cmd-b"


def test_read_lease_returns_owner_fields_and_expiry(make_lease, fake_redis, names):
    a = make_lease(OWNER_A, ttl_s=10)
    assert read_lease(fake_redis, names[0]) is None
    assert a.try_acquire()

    holder = read_lease(fake_redis, names[0])

    assert holder is not None
    assert {k: holder[k] for k in OWNER_A} == OWNER_A
    assert holder["token"] == a.token
    assert abs(holder["since"] - time.time()) < 5
    assert 0 < holder["expires_in_ms"] <= 10_000
    via_lease = a.holder()
    assert via_lease is not None
    assert {k: v for k, v in via_lease.items() if k != "expires_in_ms"} == {
        k: v for k, v in holder.items() if k != "expires_in_ms"
    }


def test_read_lease_of_a_non_json_value(fake_redis, names):
    fake_redis.set(names[0], "not json")

    assert read_lease(fake_redis, names[0]) == {"raw": "not json"}


def test_describe_holder():
    assert describe_holder(None) == "nobody"
    assert describe_holder(OWNER_A) == "production@host-a:101, command cmd-a, migrate"
    assert describe_holder({"pid": 7}) == "7"
    assert describe_holder({"token": 3}) == "?"


def test_heartbeat_keeps_a_short_lease_alive_while_held(make_lease, fake_redis, names):
    a, b = make_lease(OWNER_A, ttl_s=1), make_lease(OWNER_B, ttl_s=1)

    token = a.acquire(timeout_s=1)
    assert token == a.token == 1

    time.sleep(2.2)  # more than twice the ttl

    holder = read_lease(fake_redis, names[0])
    assert holder is not None and holder["token"] == 1 and holder["command_id"] == "cmd-a"
    assert not a.lost.is_set()
    assert b.try_acquire() is False

    assert a.release() is True
    assert fake_redis.exists(names[0]) == 0
    assert a._thread is None  # the heartbeat stopped
    assert b.try_acquire() is True


def test_heartbeat_notices_a_lost_lease(make_lease, fake_redis, names):
    a = make_lease(OWNER_A, ttl_s=1)
    a.acquire(timeout_s=1)

    fake_redis.set(names[0], json.dumps({"worker": "intruder", "token": 99}))
    assert a.lost.wait(timeout=2.0) is True

    assert json.loads(fake_redis.get(names[0]))["worker"] == "intruder"
    assert a.release() is False
    assert fake_redis.exists(names[0]) == 1
