"""Lock-timeout retries: the backoff policy, which tables a step locks, and spotting a lock timeout."""

from __future__ import annotations

import random

import psycopg.errors
import pytest
import sqlalchemy.exc

from dbagent.core.retries import (
    ACCESS_EXCLUSIVE,
    ACCESS_SHARE,
    CONFLICTS,
    MODES,
    ROW_EXCLUSIVE,
    SHARE,
    SHARE_ROW_EXCLUSIVE,
    SHARE_UPDATE_EXCLUSIVE,
    RetryPolicy,
    describe,
    is_lock_timeout,
    lock_targets,
)
from dbagent.settings import DatabaseSettings


def test_each_attempt_waits_longer_for_its_locks_up_to_the_cap():
    policy = RetryPolicy(lock_timeout_s=2.0, growth=1.5, max_lock_timeout_s=5.0)
    assert [policy.lock_timeout(n) for n in range(1, 6)] == [2.0, 3.0, 4.5, 5.0, 5.0]


def test_the_cap_never_shortens_the_configured_timeout():
    assert RetryPolicy(lock_timeout_s=8.0, max_lock_timeout_s=5.0).lock_timeout(1) == 8.0


def test_pauses_double_are_capped_and_jittered_between_half_and_all():
    policy = RetryPolicy(pause_s=1.0, max_pause_s=6.0)
    rng = random.Random(7)
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 6.0), (9, 6.0)]:
        samples = [policy.pause(attempt, rng) for _ in range(200)]
        assert all(base * 0.5 <= s <= base for s in samples)
        assert max(samples) - min(samples) > base * 0.3  # jittered, not constant


def test_the_policy_comes_from_the_database_config_with_2s_and_10_attempts_by_default():
    policy = DatabaseSettings(url="postgresql://x@h/db").retry_policy()
    assert (policy.lock_timeout_s, policy.attempts, policy.max_lock_timeout_s) == (2.0, 10, 10.0)
    assert policy.holder_grace_s == 0.2
    custom = DatabaseSettings(url="postgresql://x@h/db", lock_timeout="500ms", lock_retries=3, lock_retry_pause="2s").retry_policy()
    assert (custom.lock_timeout_s, custom.attempts, custom.pause_s) == (0.5, 3, 2.0)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("ALTER TABLE users ADD COLUMN nickname text", {"users": ACCESS_EXCLUSIVE}),
        ("ALTER TABLE public.users ALTER COLUMN email SET NOT NULL", {"public.users": ACCESS_EXCLUSIVE}),
        ("ALTER TABLE users RENAME COLUMN a TO b", {"users": ACCESS_EXCLUSIVE}),
        ("ALTER TABLE users RENAME TO people", {"users": ACCESS_EXCLUSIVE}),
        ("DROP TABLE a, b", {"a": ACCESS_EXCLUSIVE, "b": ACCESS_EXCLUSIVE}),
        ("TRUNCATE sessions", {"sessions": ACCESS_EXCLUSIVE}),
        ("CREATE INDEX i ON users (email)", {"users": SHARE}),
        ("CREATE INDEX CONCURRENTLY i ON users (email)", {"users": SHARE_UPDATE_EXCLUSIVE}),
        ("ALTER TABLE users VALIDATE CONSTRAINT c", {"users": SHARE_UPDATE_EXCLUSIVE}),
        (
            "ALTER TABLE sessions ADD CONSTRAINT f FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID",
            {"sessions": SHARE_ROW_EXCLUSIVE, "users": SHARE_ROW_EXCLUSIVE},
        ),
        ("LOCK TABLE users IN SHARE MODE", {"users": SHARE}),
        ("LOCK TABLE users", {"users": ACCESS_EXCLUSIVE}),
        ("CREATE TRIGGER t BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION f()", {"users": SHARE_ROW_EXCLUSIVE}),
        # a brand-new table is nobody else's; only the table it references is locked
        (
            "CREATE TABLE prefs (id int PRIMARY KEY, user_id uuid REFERENCES users (id));"
            " CREATE INDEX ON prefs (user_id); ALTER TABLE prefs ADD COLUMN x int",
            {"users": SHARE_ROW_EXCLUSIVE},
        ),
        # row changes and Alembic's own bookkeeping do not get in the application's way
        ("INSERT INTO roles VALUES (1); UPDATE alembic_version SET version_num = '012'", {}),
    ],
)
def test_lock_targets(sql, expected):
    assert lock_targets(sql) == expected


def test_the_strongest_lock_on_a_table_wins():
    assert lock_targets("CREATE INDEX i ON users (a); ALTER TABLE users ADD COLUMN b int") == {"users": ACCESS_EXCLUSIVE}


def test_unparseable_sql_is_a_value_error():
    with pytest.raises(ValueError):
        lock_targets("ALTER TABLE")


def test_the_conflict_table_is_the_manuals():
    assert CONFLICTS[ACCESS_EXCLUSIVE] == frozenset(MODES)
    assert CONFLICTS[ACCESS_SHARE] == {ACCESS_EXCLUSIVE}
    assert ROW_EXCLUSIVE in CONFLICTS[SHARE] and SHARE in CONFLICTS[ROW_EXCLUSIVE]
    for mode in MODES:  # conflicts are symmetric
        for other in CONFLICTS[mode]:
            assert mode in CONFLICTS[other]


def test_a_lock_timeout_is_recognised_through_sqlalchemy():
    timeout = psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")
    wrapped = sqlalchemy.exc.OperationalError("ALTER TABLE users ...", {}, timeout)
    assert is_lock_timeout(wrapped) and is_lock_timeout(timeout)
    other = sqlalchemy.exc.ProgrammingError("x", {}, psycopg.errors.UndefinedTable("no such table"))
    assert not is_lock_timeout(other) and not is_lock_timeout(RuntimeError("x"))


def test_blockers_are_described_for_an_error_message():
    text = describe([{"pid": 42, "application_name": "report", "state": "idle in transaction",
                      "xact_age_s": 73.4, "query": "SELECT count(*) FROM users"}])
    assert text == "pid 42 (report, idle in transaction, transaction open 73s: SELECT count(*) FROM users)"
    assert "let go" in describe([])
