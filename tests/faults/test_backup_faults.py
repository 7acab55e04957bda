"""Backups under duress: pg_dump killed, the database going away, passwords, two beats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.test_faults import wait_for
from tests.servers import ROOT

pytestmark = pytest.mark.faults

PASSWORD = "Backup-Secret-7f3a"


def big_database(env) -> None:
    """Enough rows that pg_dump runs for a few seconds."""
    env.sql("CREATE TABLE big (id bigint PRIMARY KEY, payload text)")
    env.sql("INSERT INTO big SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 1500000) g")


def pg_dump_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"pg_dump") and any(b"--snapshot" in a for a in argv):
            return int(entry.name)
    return None


def assert_nothing_left(env) -> None:
    backups = env.tmp / "backups"
    assert sorted(p.name for p in backups.iterdir()) == []
    listed = env.cli("backups", "list", "--json")
    assert listed.code == 0 and listed.json()["backups"] == []


@pytest.mark.parametrize("how", ["kill pg_dump", "terminate its session"])
def test_an_interrupted_dump_leaves_no_file_no_manifest_and_is_not_listed(env, redis_client, how):
    env.start_worker()
    big_database(env)
    run = subprocess.Popen(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(env.config), "backup", "full", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.environ(), cwd=ROOT,
    )
    pid = wait_for(pg_dump_pid, 60, "pg_dump to start")
    wait_for(lambda: any((env.tmp / "backups").glob(".partial-*")), 30, "the partial file")
    if how == "kill pg_dump":
        os.kill(pid, signal.SIGKILL)
    else:
        env.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'dbagent pg_dump' AND datname = current_database()")
    out, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    assert "pg_dump failed" in json.loads(out.strip().splitlines()[-1])["error"]
    assert_nothing_left(env)
    failed = [e for e in env.stream_events(redis_client) if e["type"] == "backup.failed"]
    assert len(failed) == 1 and "pg_dump failed" in failed[0]["data"]["error"]


def test_the_password_is_in_no_argv_no_environment_and_no_log(env, redis_client):
    role = f"pw_{env.name}"  # roles are cluster-wide: one per test
    env.sql(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    try:
        env.config
        path = env.tmp / "password.toml"
        path.write_text(env.config.read_text().replace("postgresql://postgres@", f"postgresql://{role}:{PASSWORD}@"))
        log = open(env.tmp / "pw-worker.log", "w")
        worker = subprocess.Popen(
            [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(path), "worker", "--db", "test", "--loglevel", "DEBUG"],
            stdout=log, stderr=subprocess.STDOUT, env=env.environ(), cwd=ROOT, start_new_session=True,
        )
        env.workers.append(worker)
        big_database(env)
        run = subprocess.Popen(
            [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(path), "backup", "full", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.environ(), cwd=ROOT,
        )
        pid = wait_for(pg_dump_pid, 60, "pg_dump to start")
        cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        environ = (Path("/proc") / str(pid) / "environ").read_bytes()
        assert PASSWORD.encode() not in cmdline and PASSWORD.encode() not in environ
        assert b"PGPASSFILE=" in environ  # the password travels in a private file
        passfile = next(v for v in environ.split(b"\0") if v.startswith(b"PGPASSFILE=")).split(b"=", 1)[1].decode()
        assert oct(os.stat(passfile).st_mode & 0o777) == "0o600"
        out, err = run.communicate(timeout=180)
        assert run.returncode == 0, err
        assert not os.path.exists(passfile)  # removed once pg_dump is done
        everything = out + err + (env.tmp / "pw-worker.log").read_text() + json.dumps(env.stream_events(redis_client))
        everything += json.dumps(env.sql("SELECT data::text FROM dbagent.audit_log"))
        assert PASSWORD not in everything
        assert PASSWORD not in Path(json.loads(out.strip().splitlines()[-1])["path"] + ".manifest.json").read_text()
    finally:
        env.stop_workers()
        env.sql(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
        env.sql(f"DROP OWNED BY {role}")
        env.sql(f"DROP ROLE IF EXISTS {role}")


def test_two_beats_one_schedule_run_one_backup(env, redis_client):
    env.extra_config = '[databases.test.schedule]\nevery = "4s"'
    env.start_worker()
    beats = []
    for number in range(2):
        log = open(env.tmp / f"beat-{number}.log", "w")
        beats.append(subprocess.Popen(
            [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(env.config), "beat"],
            stdout=log, stderr=subprocess.STDOUT, env=env.environ(), cwd=ROOT, start_new_session=True,
        ))
        env.workers.append(beats[-1])
        time.sleep(0.5)
    try:
        wait_for(lambda: list((env.tmp / "backups").glob("*.manifest.json")), 30, "the scheduled backup")
        logs = [(env.tmp / f"beat-{n}.log").read_text() for n in range(2)]
    finally:
        for beat in beats:
            os.killpg(beat.pid, signal.SIGKILL)
        for beat in beats:
            beat.wait(timeout=10)
    time.sleep(1)
    manifests = [json.loads(p.read_text()) for p in (env.tmp / "backups").glob("*.manifest.json")]
    assert len(manifests) == 1
    assert manifests[0]["trigger"] == "schedule" and manifests[0]["mark"] == "interval"
    accepted = [e for e in env.stream_events(redis_client) if e["type"] == "command.accepted"]
    assert len(accepted) == 1 and accepted[0]["actor"] == "beat"
    assert sum("leads the schedule" in text for text in logs) == 1
    assert sum("standing by" in text for text in logs) == 1
    # the backup was followed by a prune
    result = json.loads(redis_client.get(f"{env.prefix}:result:{accepted[0]['command_id']}"))
    assert result["status"] == "succeeded" and result["prune"]["kept"] == 1
