"""Every command ends with a result its producer reads, whatever fails and wherever (real servers)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from dbagent.bus import keys
from dbagent.bus.producer import Producer
from dbagent.core.commands import Command, CommandType
from dbagent.settings import load_settings
from tests.faults.test_crash_matrix import STEP, cli, sleeping
from tests.faults.test_faults import _publish, wait_for
from tests.servers import ROOT, SIGNING_KEY, copy_migrations

pytestmark = pytest.mark.faults


def slow_world(env, tmp_path, extra: str = "") -> None:
    env.migrations = copy_migrations(tmp_path, {"012_slow.py": STEP.format(rev="012", down="011")})
    env.extra_config = extra


def test_a_command_queued_behind_a_slow_step_longer_than_max_command_age_still_runs(env, tmp_path):
    slow_world(env, tmp_path, '\n[security]\nmax_command_age = "2s"\n')
    env.start_worker(SLOW_STEP="012", SLOW_SECONDS="6")
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    slow = cli(env, "migrate")
    wait_for(lambda: sleeping(env), 60, "the slow step")
    queued_at = time.monotonic()
    behind = env.cli("status", "--json", "--timeout", "60")
    # it waited in the queue three times max_command_age: its signed expiry (an hour) had not passed
    assert time.monotonic() - queued_at > 4
    assert behind.code == 0, behind.stderr
    assert behind.json()["status"] == "succeeded" and behind.json()["current"] == "012"
    out, _ = slow.communicate(timeout=60)
    assert json.loads(out.strip().splitlines()[-1])["status"] == "succeeded"


def test_an_expired_command_is_rejected_naming_its_expiry(env, redis_client):
    env.start_worker()
    command = Command(type=CommandType.STATUS, db="test", actor="t").expiring_in(-1).signed(SIGNING_KEY.encode())
    outcome = _publish(env, command)
    assert outcome["status"] == "rejected" and "expired at" in outcome["error"]


def test_redis_down_across_the_end_of_a_step_the_outcome_is_readable_afterwards(env, tmp_path, private_redis):
    env.redis_url = private_redis.url
    slow_world(env, tmp_path, '\n[worker]\nrelay_interval = "1s"\n')
    env.start_worker(SLOW_STEP="012", SLOW_SECONDS="4")
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    waiting = cli(env, "migrate")
    wait_for(lambda: sleeping(env), 60, "the slow step")
    private_redis.stop()
    # the step ends, and the command with it, while Redis is away
    wait_for(lambda: env.sql("SELECT 1 FROM dbagent.commands WHERE type = 'migrate' AND status = 'succeeded'"
                             " AND published_at IS NULL AND args->>'to' IS NULL"), 60, "the run to end unpublished")
    # the waiting CLI did not give up on Redis: it read the outcome from the database's record
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "succeeded" and result["revision_after"] == "012"
    assert env.sql("SELECT published_at FROM dbagent.commands WHERE id = %s", result["command_id"]) == [(None,)]
    private_redis.start()  # empty: an unpersisted Redis after a restart
    # the relay re-published the outcome and the events the stream missed
    wait_for(lambda: env.sql("SELECT 1 FROM dbagent.commands WHERE id = %s AND published_at IS NOT NULL",
                             result["command_id"]), 30, "the outcome to be marked published")
    wait_for(lambda: not env.sql("SELECT 1 FROM dbagent.audit_log WHERE unpublished"), 30, "the events to be re-published")
    client = __import__("redis").Redis.from_url(private_redis.url)
    stream = [fields[b"type"].decode() for _, fields in client.xrange(f"{env.prefix}:events")]
    assert "migration.completed" in stream and "verify.completed" in stream
    assert json.loads(client.get(keys.result(env.prefix, result["command_id"])))["status"] == "succeeded"
    # the API reads it too
    from fastapi.testclient import TestClient

    from dbagent.interfaces.api import create_app

    settings = load_settings(env.config)
    import os

    os.environ["DBAGENT_API_TOKENS"] = "t0ken=ci"
    try:
        api = TestClient(create_app(settings))
        body = api.get(f"/v1/commands/{result['command_id']}", headers={"Authorization": "Bearer t0ken"}).json()
    finally:
        del os.environ["DBAGENT_API_TOKENS"]
    assert body["status"] == "succeeded" and body["revision_after"] == "012"
    # and the worker serves again
    assert env.cli("status", "--json", "--timeout", "60").json()["current"] == "012"


def test_the_outcome_is_read_from_postgres_when_redis_lost_it(env, redis_client):
    env.start_worker()
    run = env.cli("migrate", "--to", "003", "--json")
    assert run.code == 0
    command_id = run.json()["command_id"]
    redis_client.delete(keys.result(env.prefix, command_id))  # Redis restarted without its data
    settings = load_settings(env.config)
    from dbagent.core.commands import Command as C

    outcome = Producer(settings).wait(C(id=command_id, type="migrate", db="test", actor="x"), "0-0", timeout_s=0.5)
    assert outcome["status"] == "succeeded" and outcome["revision_after"] == "003"


def test_a_fencing_token_after_a_redis_restart_is_larger_than_before_it(env, private_redis):
    env.redis_url = private_redis.url
    env.start_worker()
    assert env.cli("migrate", "--to", "005", "--json").code == 0
    before = env.sql("SELECT max((data->>'token')::bigint) FROM dbagent.audit_log WHERE type = 'lock.acquired'")[0][0]
    private_redis.stop()
    private_redis.start()
    wait_for(lambda: env.cli("status", "--json", "--timeout", "10").code == 0, 60, "the worker to serve again")
    assert env.cli("migrate", "--to", "006", "--json").code == 0
    after = env.sql("SELECT (data->>'token')::bigint FROM dbagent.audit_log WHERE type = 'lock.acquired'"
                    " ORDER BY seq DESC LIMIT 1")[0][0]
    assert after > before >= 1


def test_arguments_the_worker_cannot_read_are_rejected_with_a_result(env, redis_client):
    env.start_worker()
    # a producer of another version: a field this worker does not know
    command = Command(type=CommandType.ROLLBACK, db="test", args={"steps": 1, "dry_run_v2": True}, actor="cli-v9")
    started = time.monotonic()
    outcome = _publish(env, command.expiring_in(600).signed(SIGNING_KEY.encode()))
    assert time.monotonic() - started < 20
    assert outcome["status"] == "rejected" and outcome["exit_code"] == 2 and "dry_run_v2" in outcome["error"]
    assert [e["type"] for e in env.stream_events(redis_client, command.id)] == ["command.rejected"]


def test_a_database_error_before_the_operation_is_a_failed_result_not_a_silent_timeout(env, redis_client):
    env.start_worker()
    assert env.cli("status", "--json").code == 0  # dbagent's schema is there
    env.sql("ALTER TABLE dbagent.commands ADD CONSTRAINT no_status CHECK (type <> 'status') NOT VALID")
    started = time.monotonic()
    result = env.cli("status", "--json", "--timeout", "60")
    assert time.monotonic() - started < 20
    assert result.code == 1 and result.json()["status"] == "failed"
    assert "no_status" in result.json()["error"]


def test_a_writer_lock_timeout_announces_no_lock_it_never_held(env, tmp_path, redis_client):
    env.extra_config = 'lock_wait_timeout = "2s"\n'
    env.start_worker()
    assert env.cli("status", "--json").code == 0
    import psycopg

    with psycopg.connect(env.url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtextextended('dbagent:writer:' || current_database(), 0))")
        result = env.cli("migrate", "--json", "--timeout", "60")
    assert result.code == 1 and "advisory lock still held" in result.json()["error"]
    types = [e["type"] for e in env.stream_events(redis_client, result.json()["command_id"])]
    assert "lock.acquired" not in types and "lock.released" not in types
    failed = [e for e in env.stream_events(redis_client, result.json()["command_id"]) if e["type"] == "migration.failed"]
    assert len(failed) == 1 and failed[0]["data"]["claimed"] is False  # nothing ran: nothing for the agent to undo
    assert env.revision() is None


def test_an_automatic_rollback_below_the_failed_runs_start_is_refused(env, redis_client):
    env.start_worker()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    run = env.cli("migrate", "--json")  # nothing to do: recorded as starting at 011
    assert run.code == 0
    forged = Command(
        type=CommandType.ROLLBACK, db="test", actor="agent",
        args={"to": "base", "cause": {"run_command_id": run.json()["command_id"], "expect_revision": "011"}},
    )
    outcome = _publish(env, forged.expiring_in(600).signed(SIGNING_KEY.encode()))
    assert outcome["status"] == "rejected"
    assert "would go to base, but the failed run" in outcome["error"] and "started at 011" in outcome["error"]
    assert env.revision() == "011"


@pytest.mark.parametrize("kind", ["backup", "migrate"])
def test_a_run_left_running_by_an_older_worker_is_never_undone_to_base(env, redis_client, kind):
    """The reported wipe: the old claim stored only the args, so the revision before read as None → base."""
    env.start_worker()
    env.start_agent()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    env.sql("INSERT INTO users (email, password_hash) VALUES ('marker@example.com', 'x')")
    workers = list(env.workers)
    for proc in workers:
        env.kill_worker(proc, signal.SIGKILL)
    env.sql(
        "INSERT INTO dbagent.commands (id, type, db, args, actor, status, worker, plan, started_at)"
        " VALUES ('old-run', %s, 'test', '{}', 'deploy', 'running', 'test@old:1', '{\"args\": {}}', now())",
        kind,
    )
    env.start_worker(log_name="upgraded-worker")
    wait_for(lambda: env.sql("SELECT 1 FROM dbagent.commands WHERE id = 'old-run' AND status = 'interrupted'"), 30,
             "the old run to be reported")
    failed = env.sql("SELECT type, data FROM dbagent.audit_log WHERE command_id = 'old-run'")
    expected = "backup.failed" if kind == "backup" else "migration.failed"
    assert [t for t, _ in failed] == [expected]
    assert failed[0][1]["revision_before_known"] is False and failed[0][1]["revision_after"] == "011"
    time.sleep(3)
    assert not env.sql("SELECT 1 FROM dbagent.audit_log WHERE type = 'rollback.started'")
    assert env.revision() == "011"
    assert env.sql("SELECT count(*) FROM users WHERE email = 'marker@example.com'")[0][0] == 1


def test_a_second_delivery_of_a_running_command_leaves_it_alone(env, tmp_path, redis_client):
    """What a visibility-timeout redelivery during a long step does: nothing, and the first run reports."""
    slow_world(env, tmp_path, 'lock_wait_timeout = "2s"\n')
    env.start_worker(SLOW_STEP="012", SLOW_SECONDS="5")
    env.start_worker(SLOW_STEP="012", SLOW_SECONDS="5")
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    settings = load_settings(env.config)
    command = Command(type=CommandType.MIGRATE, db="test", args={}, actor="t").expiring_in(600).signed(SIGNING_KEY.encode())
    producer = Producer(settings)
    after = producer.check()
    from dbagent.bus.queue import EXECUTE_TASK, celery_app

    app = celery_app(settings)
    for _ in range(2):
        app.send_task(EXECUTE_TASK, args=[command.to_message()], queue=keys.queue(env.prefix, "test"), task_id=command.id)
    outcome = producer.wait(command, after, timeout_s=60)
    assert outcome["status"] == "succeeded" and outcome["revision_after"] == "012"
    time.sleep(1)
    assert env.sql("SELECT status FROM dbagent.commands WHERE id = %s", command.id) == [("succeeded",)]
    assert json.loads(redis_client.get(keys.result(env.prefix, command.id)))["status"] == "succeeded"
    logs = "".join(env.log_of(p) for p in env.workers)
    assert "being executed by a live worker" in logs


def test_backup_progress_is_written_beside_the_dump_and_the_snapshot_holds(env, redis_client, monkeypatch):
    """backup.progress on its own connection: the dump's snapshot transaction is never touched."""
    from dbagent.operations import lifecycle
    from dbagent.postgres import backups

    env.start_worker()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    env.sql("CREATE TABLE bulk AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 300000) g")
    for proc in list(env.workers):
        env.kill_worker(proc, signal.SIGTERM)
    monkeypatch.setattr(backups, "PROGRESS_EVERY_S", 0.05)
    monkeypatch.setenv("DBAGENT_SIGNING_KEY", SIGNING_KEY)
    settings = load_settings(env.config)
    command = Command(type=CommandType.BACKUP, db="test", args={"kind": "full"}, actor="t").expiring_in(600)
    result = lifecycle.execute(settings, "test", command.signed(SIGNING_KEY.encode()).to_message(), client=redis_client)
    assert result["status"] == "succeeded", result
    progress = env.sql("SELECT count(*) FROM dbagent.audit_log WHERE command_id = %s AND type = 'backup.progress'", command.id)
    assert progress[0][0] >= 1
    manifest = json.loads((env.tmp / "backups" / (result["path"].rsplit("/", 1)[1] + ".manifest.json")).read_text())
    assert manifest["tables"]["public.bulk"] == 300000


def test_the_cli_says_a_command_is_queued_until_when_when_no_worker_runs(env):
    result = env.cli("status", "--timeout", "3")
    assert result.code == 3
    assert "queued on" in result.stderr and "expires at" in result.stderr
    assert "runs if a worker starts before" in result.stderr


def test_the_cli_says_when_the_worker_running_its_command_is_gone(env, tmp_path):
    slow_world(env, tmp_path)
    worker = env.start_worker(SLOW_STEP="012")
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    waiting = subprocess.Popen(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(env.config), "migrate", "--timeout", "12"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.environ(), cwd=ROOT,
    )
    wait_for(lambda: sleeping(env), 60, "the slow step")
    env.kill_worker(worker, signal.SIGKILL)
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 3
    assert "is gone" in err and "reports it as interrupted when it starts" in err


def test_a_run_recorded_by_an_older_worker_is_still_rolled_back_to_its_start(env, redis_client):
    """Its plan held only the args, but its migration.started event says where it started."""
    env.start_worker()
    env.start_agent()
    assert env.cli("migrate", "--to", "008", "--json").code == 0
    run = env.cli("migrate", "--json")
    assert run.code == 0 and env.revision() == "011"
    env.sql("UPDATE dbagent.commands SET plan = '{\"args\": {}}' WHERE id = %s", run.json()["command_id"])
    assert env.cli("notify", "startup-failed", "--json").code == 0
    wait_for(lambda: env.sql("SELECT 1 FROM dbagent.audit_log WHERE type = 'rollback.completed'"), 60, "the rollback")
    assert env.revision() == "008"


def test_a_forged_failure_event_for_a_run_that_succeeded_rolls_nothing_back(env, redis_client):
    """The event stream is not signed: anyone with Redis access can add a migration.failed to it."""
    from dbagent.bus.eventlog import EventLog
    from dbagent.core.events import Event, EventType

    env.start_worker()
    env.start_agent()
    assert env.cli("migrate", "--to", "008", "--json").code == 0
    run = env.cli("migrate", "--json")
    assert run.code == 0 and env.revision() == "011"
    run_id = run.json()["command_id"]
    forged = Event(type=EventType.MIGRATION_FAILED, db="test", command_id=run_id, actor="mallory", data={
        "revision_before": "008", "revision_before_known": True, "revision_after": "011", "claimed": True,
    })
    EventLog(redis_client, env.prefix).publish([forged])
    refusal = wait_for(lambda: env.sql(
        "SELECT data->>'reason' FROM dbagent.audit_log WHERE type = 'command.rejected' AND actor = 'agent'"), 60,
        "the agent's rollback refused by the worker")
    assert "recorded as succeeded" in refusal[0][0]
    assert env.revision() == "011"
    assert not env.sql("SELECT 1 FROM dbagent.audit_log WHERE type = 'rollback.started'")
