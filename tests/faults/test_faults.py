"""Kill, forge, race and feed bad input: dbagent must stay correct."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

from dbagent.bus.producer import Producer
from dbagent.core.commands import Command, CommandType
from dbagent.settings import load_settings
from tests.servers import ROOT, SIGNING_KEY, copy_migrations

pytestmark = pytest.mark.faults

SLOW_STEP = '''"""A slow step: adds a column, then sleeps while SLOW_STEP is set in the worker's environment."""
import os

from alembic import op
revision = "012"
down_revision = "011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE users ADD COLUMN half_applied text")
    if os.environ.get("SLOW_STEP"):
        op.execute("SELECT pg_sleep(600)")


def downgrade() -> None:
    op.execute("ALTER TABLE users DROP COLUMN half_applied")
'''


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_kill_9_during_a_slow_step_leaves_the_previous_revision_and_frees_the_lock(env, tmp_path, redis_client):
    env.migrations = copy_migrations(tmp_path, {"012_slow_step.py": SLOW_STEP})
    worker = env.start_worker(SLOW_STEP="1")
    assert env.cli("migrate", "--to", "011", "--json").code == 0

    run = subprocess.Popen(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(env.config), "migrate", "--json", "--timeout", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.environ(), cwd=ROOT,
    )
    wait_for(lambda: env.sql("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(600)%%'"), 60, "the slow step")
    env.kill_worker(worker)  # kill -9 the worker's whole process group

    # the session died with the worker: the step's transaction is gone and the lock is free
    wait_for(lambda: not env.sql("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(600)%%'"), 30, "the backend to end")
    assert env.revision() == "011"
    assert env.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'users' AND column_name = 'half_applied'")[0][0] == 0
    assert env.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")[0][0] == 0
    interrupted_id = env.sql("SELECT id FROM dbagent.commands WHERE status = 'running'")[0][0]

    restarted = time.monotonic()
    env.start_worker()  # without SLOW_STEP: the step is quick now
    retry = env.cli("migrate", "--json", "--timeout", "60")
    assert retry.code == 0, retry.stderr
    assert retry.json()["revision_after"] == "012" and time.monotonic() - restarted < 60
    assert env.revision() == "012"
    assert env.sql("SELECT count(*) FROM dbagent.changelog WHERE revision = '012' AND outcome = 'applied'")[0][0] == 1

    # the restarted worker reported the interrupted command instead of leaving it 'running'
    status, result = env.sql("SELECT status, result FROM dbagent.commands WHERE id = %s", interrupted_id)[0]
    assert status == "interrupted" and result["status"] == "failed" and result["interrupted"] is True
    assert "interrupted" in result["error"] and result["revision_after"] == "011" and result["revision_before"] == "011"
    failed = [e for e in env.stream_events(redis_client, interrupted_id) if e["type"] == "migration.failed"]
    assert len(failed) == 1 and failed[0]["data"]["revision_after"] == "011"
    outcome = run.communicate(timeout=30)
    assert run.returncode == 1 and "interrupted" in json.loads(outcome[0].strip().splitlines()[-1])["error"]


def _publish(env, command: Command) -> dict:
    settings = load_settings(env.config)
    producer = Producer(settings)
    after = producer.check()
    from dbagent.bus import keys
    from dbagent.bus.queue import EXECUTE_TASK, celery_app

    app = celery_app(settings)
    app.send_task(EXECUTE_TASK, args=[command.to_message()], queue=keys.queue(settings.redis.prefix, "test"), task_id=command.id)
    return producer.wait(command, after, timeout_s=60)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda c: c.signed(b"not-the-key"), id="forged-signature"),
        pytest.param(lambda c: c.signed(SIGNING_KEY.encode()).model_copy(update={"args": {"steps": 5}}), id="altered-args"),
        pytest.param(lambda c: c.model_copy(update={"signature": None}), id="unsigned"),
        pytest.param(
            lambda c: c.model_copy(update={"issued_at": datetime.now(UTC) - timedelta(hours=3)}).signed(SIGNING_KEY.encode()),
            id="stale",
        ),
    ],
)
def test_forged_altered_unsigned_or_stale_commands_are_rejected_and_nothing_runs(env, redis_client, tamper):
    env.start_worker()
    assert env.cli("migrate", "--json").code == 0
    command = tamper(Command(type=CommandType.ROLLBACK, db="test", args={"steps": 1}, actor="mallory"))
    outcome = _publish(env, command)
    assert outcome["status"] == "rejected" and outcome["exit_code"] == 2
    assert env.revision() == "011"
    assert env.sql("SELECT count(*) FROM dbagent.commands WHERE id = %s", command.id)[0][0] == 0
    events = env.stream_events(redis_client, command.id)
    assert [e["type"] for e in events] == ["command.rejected"]
    assert env.sql("SELECT type FROM dbagent.audit_log WHERE command_id = %s", command.id) == [("command.rejected",)]


def test_a_cli_with_the_wrong_key_is_rejected(env):
    env.start_worker()
    result = env.cli("migrate", "--json", env=env.environ(DBAGENT_SIGNING_KEY="wrong"))
    assert result.code == 2 and result.json()["status"] == "rejected"
    assert "signature" in result.json()["error"] and env.revision() is None


def test_three_concurrent_migrates_with_two_workers_apply_each_step_once(env, redis_client):
    env.start_worker()
    env.start_worker()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(env.config), "migrate", "--json", "--timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.environ(), cwd=ROOT,
        )
        for _ in range(3)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["status"] == "succeeded" and r["revision_after"] == "011" for r in results)
    assert sorted(len(r["steps"]) for r in results) == [0, 0, 11]
    applied = env.sql("SELECT revision, count(*) FROM dbagent.changelog WHERE outcome = 'applied' GROUP BY 1 ORDER BY 1")
    assert applied == [(f"{n:03d}", 1) for n in range(1, 12)]
    assert env.sql("SELECT count(*) FROM dbagent.changelog WHERE outcome = 'failed'")[0][0] == 0
    workers = {e["data"]["worker"] for e in env.stream_events(redis_client) if e["type"] == "lock.acquired"}
    assert len(workers) == 2  # both workers served, one at a time
    tokens = [e["data"]["token"] for e in env.stream_events(redis_client) if e["type"] == "lock.acquired"]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    waiting = [e for e in env.stream_events(redis_client) if e["type"] == "lock.waiting"]
    assert waiting and all(e["data"]["holder"]["worker"] in workers for e in waiting)


def test_status_from_a_second_worker_names_the_lock_holder_during_a_migration(env, tmp_path):
    env.migrations = copy_migrations(tmp_path, {"012_slow_step.py": SLOW_STEP.replace("pg_sleep(600)", "pg_sleep(4)")})
    env.start_worker(SLOW_STEP="1")
    env.start_worker(SLOW_STEP="1")
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    run = subprocess.Popen(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(env.config), "migrate", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.environ(), cwd=ROOT,
    )
    wait_for(lambda: env.sql("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(4)%%'"), 60, "the slow step")
    status = env.cli("status", "--json")
    assert status.code == 0
    lock = status.json()["lock"]
    migrate_id = env.sql("SELECT id FROM dbagent.commands WHERE type = 'migrate' AND status = 'running'")[0][0]
    assert lock["lease"]["command_id"] == migrate_id and lock["lease"]["type"] == "migrate"
    assert lock["session"]["application_name"].startswith("dbagent migrate")
    human = env.cli("status")
    assert "held by test@" in human.stdout and migrate_id in human.stdout
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert env.cli("status", "--json").json()["lock"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rollback", "abc"], "whole number"),
        (["rollback", "-3"], "whole number"),
        (["rollback", "0"], "whole number"),
        (["rollback"], "either N"),
        (["migrate", "--to", "999"], "unknown revision '999'"),
        (["rollback", "--to", "999"], "unknown revision '999'"),
        (["status", "--db", "nope"], "unknown database 'nope'"),
        (["validate", "--db", "nope"], "unknown database 'nope'"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(env, args, message):
    result = env.cli(*args)
    assert result.code == 2, (result.stdout, result.stderr)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_revision_unknown_to_the_worker_is_rejected_by_it_too(env, redis_client, monkeypatch):
    monkeypatch.setenv("DBAGENT_SIGNING_KEY", SIGNING_KEY)
    env.start_worker()
    settings = load_settings(env.config)
    producer = Producer(settings)
    after = producer.check()
    command = Command(type=CommandType.MIGRATE, db="test", args={"to": "999"}, actor="t")
    producer.submit(command)
    outcome = producer.wait(command, after, timeout_s=60)
    assert outcome["status"] == "rejected" and outcome["exit_code"] == 2 and "999" in outcome["error"]
    assert env.revision() is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[redis\nurl = 1", "not valid TOML"),
        ("[databases.test]\nurl = 'postgresql://x@h/db'\nlock_timeout = 'soon'", "lock_timeout"),
        ("[databases.test]\nurl = 'postgresql://x@h/db'\ncolour = 'blue'", "unknown key 'databases.test.colour'"),
        ("[nonsense]\nx = 1", "unknown key 'nonsense'"),
    ],
)
def test_malformed_config_exits_2_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = subprocess.run(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(path), "status"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert result.returncode == 2
    assert str(path) in result.stderr and message in result.stderr and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[redis\n")
    result = subprocess.run(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--debug", "--config", str(path), "status"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_unreachable_redis_exits_3_within_10_seconds_without_the_password(env):
    env.config  # writes the file
    text = env.config.read_text().replace('url = "redis://127.0.0.1:6379/0"', 'url = "redis://:RedisSecret@10.255.255.1:6379/0"')
    path = env.tmp / "noredis.toml"
    path.write_text(text)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(path), "status"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, env=env.environ(),
    )
    assert result.returncode == 3 and time.monotonic() - started < 10
    assert "cannot reach Redis" in result.stderr and "RedisSecret" not in result.stderr + result.stdout


def test_unreachable_postgres_exits_3_and_never_shows_the_password(env, redis_client):
    env.config
    path = env.tmp / "nopg.toml"
    path.write_text(env.config.read_text().replace(env.url, "postgresql://postgres:PgSecret@127.0.0.1:1/nowhere"))
    log = open(env.tmp / "nopg-worker.log", "w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(path), "worker", "--db", "test"],
        stdout=log, stderr=subprocess.STDOUT, env=env.environ(), cwd=ROOT, start_new_session=True,
    )
    env.workers.append(worker)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(path), "status", "--json", "--timeout", "30"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, env=env.environ(),
    )
    assert result.returncode == 3, result.stderr
    body = json.loads(result.stdout.strip().splitlines()[-1])
    assert "cannot reach PostgreSQL" in body["error"]
    assert time.monotonic() - started < 30
    everything = result.stdout + result.stderr + (env.tmp / "nopg-worker.log").read_text()
    everything += json.dumps(env.stream_events(redis_client))
    assert "PgSecret" not in everything and "postgres:***@127.0.0.1:1" in body["error"]

    local = subprocess.run(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(path), "env", "validate", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, env=env.environ(),
    )
    assert local.returncode == 3 and "PgSecret" not in local.stdout + local.stderr
    checks = {c["name"]: c["status"] for c in json.loads(local.stdout)["checks"]}
    assert checks["postgres"] == "fail" and checks["redis"] == "ok"
