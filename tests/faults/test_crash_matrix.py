"""A crash at every phase of every writing command, with the agent running: the invariants hold afterwards.

For each command type (migrate, rollback, backup full, restore, prune) and each
phase it has, the worker is killed there (kill -9 of its process group; for a
migrate step also SIGTERM to the group, and a PostgreSQL restart on a cluster
of the test's own), restarted, and then:

* the database is at or above the run's revision before (a migrate), or
  between its target and its start (a rollback), and exactly where the phase
  says it must be once the agent is done;
* a marker row inserted before the run survives;
* at most one automatic rollback, and only for a migrate that changed something;
* no command row is left unfinished;
* the waiting CLI gets a terminal result within ``lease_ttl`` + 30 s of the restart;
* the lock is free.

Marked ``slow``: the default ``pytest`` run skips it, ``make test`` (and CI) runs it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.test_faults import wait_for
from tests.servers import ROOT, Env, copy_migrations

pytestmark = [pytest.mark.faults, pytest.mark.slow]

LEASE_TTL_S = 3.0  # tests.servers writes lease_ttl = "3s"
ANSWER_WITHIN_S = LEASE_TTL_S + 30

STEP = '''"""Crash test step {rev}."""
import os

from alembic import op

revision = "{rev}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE crash_{rev} (id int)")
    if os.environ.get("SLOW_STEP") == "{rev}":
        op.execute("SELECT pg_sleep(" + os.environ.get("SLOW_SECONDS", "600") + ")")


def downgrade() -> None:
    op.execute("DROP TABLE crash_{rev}")
    if os.environ.get("SLOW_STEP") == "{rev}-down":
        op.execute("SELECT pg_sleep(" + os.environ.get("SLOW_SECONDS", "600") + ")")
'''

ORDER = [f"{n:03d}" for n in range(1, 14)]


def order(revision: str | None) -> int:
    return 0 if revision is None else ORDER.index(revision) + 1


@dataclass
class Crash:
    """What a case kills and where."""

    command: list[str]
    pause: str | None = None  # a DBAGENT_PAUSE_AT point
    slow: str | None = None  # a SLOW_STEP: kill while that step's pg_sleep runs
    signal: int = signal.SIGKILL
    ready: Callable[[Env], bool] | None = None  # else: the pause is reached, or a pg_sleep runs


def setup_world(env: Env, tmp_path: Path, extra: str = "") -> None:
    env.migrations = copy_migrations(tmp_path, {
        "012_crash.py": STEP.format(rev="012", down="011"),
        "013_crash.py": STEP.format(rev="013", down="012"),
    })
    env.extra_config = (
        "pre_migration_backup = true\n" + extra
        + '\n[worker]\nrelay_interval = "1s"\nstop_grace = "3s"\nreconnect_timeout = "30s"\n'
    )


def at_011(env: Env, tmp_path: Path, *, agent: bool = True) -> None:
    """The world of a case: the database at 011 with a marker row, the agent running, no worker yet."""
    setup_world(env, tmp_path)
    if agent:
        env.start_agent()
    setup = env.start_worker(log_name="setup-worker")
    assert env.cli("migrate", "--to", "011", "--json", "--no-backup").code == 0
    add_marker(env)
    env.kill_worker(setup, signal.SIGTERM)


def add_marker(env: Env) -> None:
    env.sql("INSERT INTO users (email, password_hash) VALUES ('marker@example.com', 'x')")


def marker_survives(env: Env) -> bool:
    if not env.sql("SELECT to_regclass('public.users')")[0][0]:
        return False
    return env.sql("SELECT count(*) FROM users WHERE email = 'marker@example.com'")[0][0] == 1


def cli(env: Env, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(env.config), *args, "--json", "--timeout", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.environ(), cwd=ROOT,
    )


def sleeping(env: Env) -> bool:
    return bool(env.sql("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(%%' AND state = 'active'"))


def crash_and_restart(env: Env, crash: Crash, **worker_env: str) -> tuple[dict, float, subprocess.Popen]:
    """Run the command, kill the worker where the case says, restart it; the CLI's result and when it came."""
    extra = dict(worker_env)
    if crash.pause:
        extra["DBAGENT_PAUSE_AT"] = crash.pause
    if crash.slow:
        extra["SLOW_STEP"] = crash.slow
    worker = env.start_worker(log_name="doomed-worker", **extra)
    waiting = cli(env, *crash.command)
    if crash.pause:
        wait_for(lambda: f"pausing at {crash.pause}" in env.log_of(worker), 60, f"the worker to reach {crash.pause}")
    else:
        wait_for(lambda: (crash.ready or sleeping)(env), 60, "the slow part")
    env.kill_worker(worker, crash.signal)
    restarted = time.monotonic()
    fresh = env.start_worker(log_name="restarted-worker")
    out, err = waiting.communicate(timeout=ANSWER_WITHIN_S + 30)
    answered = time.monotonic() - restarted
    assert out.strip(), err
    return json.loads(out.strip().splitlines()[-1]), answered, fresh


def automatic_rollbacks(env: Env) -> list[dict]:
    rows = env.sql("SELECT data FROM dbagent.audit_log WHERE type = 'rollback.started' AND actor = 'agent' ORDER BY seq")
    return [r[0] for r in rows]


def settle(env: Env, *, rollback_expected: bool) -> None:
    """Wait for the agent to act (or to have had every chance to), and for every command to end."""
    if rollback_expected:
        wait_for(lambda: env.sql("SELECT 1 FROM dbagent.audit_log WHERE type IN ('rollback.completed', 'rollback.failed',"
                                 " 'command.rejected') AND actor = 'agent'"), 60, "the agent's rollback")
    else:
        time.sleep(3)  # the agent reads a failure within milliseconds: this is ample time to do something wrong
    wait_for(lambda: not env.sql("SELECT 1 FROM dbagent.commands WHERE status IN ('accepted', 'claimed', 'running')"),
             30, "every command to end")


def assert_invariants(env: Env, result: dict, answered_s: float, *, before: str, expect: str, rollback: bool,
                      failure: str) -> None:
    """The invariants of the module docstring, for a run that started at ``before``."""
    assert result["status"] == "failed" and result.get("error"), result
    assert answered_s < ANSWER_WITHIN_S, f"the CLI waited {answered_s:.1f}s after the restart"
    settle(env, rollback_expected=rollback)
    revision = env.revision()
    assert revision == expect, (revision, expect)
    assert marker_survives(env)
    rollbacks = automatic_rollbacks(env)
    assert len(rollbacks) == (1 if rollback else 0), rollbacks
    for data in rollbacks:
        assert data["cause"]["event_type"] in ("migration.failed", "verify.failed")
        assert order(data["target"] if data["target"] != "base" else None) >= order(before)
    assert not env.sql("SELECT id, status FROM dbagent.commands WHERE status IN ('accepted', 'claimed', 'running')")
    wait_for(lambda: not env.sql("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"), 15, "the lock to be free")
    failures = env.sql("SELECT type, data FROM dbagent.audit_log WHERE command_id = %s AND type LIKE '%%failed'",
                       result["command_id"])
    assert [t for t, _ in failures] == [failure], failures
    assert failures[0][1].get("interrupted") is True


# -- migrate -----------------------------------------------------------------------

MIGRATE_PHASES = [
    # (case, how it is killed, where the database must end, whether the agent rolls back)
    pytest.param(Crash(["migrate"], pause="phase:claimed"), "011", False, id="claimed"),
    pytest.param(Crash(["migrate"], pause="phase:validation"), "011", False, id="validation"),
    pytest.param(Crash(["migrate"], pause="phase:backup"), "011", False, id="pre-migration-backup"),
    pytest.param(Crash(["migrate"], pause="backup:dumping"), "011", False, id="pre-migration-backup-dumping"),
    pytest.param(Crash(["migrate"], slow="012"), "011", False, id="in-step-1-of-2"),
    pytest.param(Crash(["migrate"], pause="phase:between_steps:1"), "011", True, id="between-steps"),
    pytest.param(Crash(["migrate"], pause="phase:step:2"), "011", True, id="step-2-of-2-begun"),
    pytest.param(Crash(["migrate"], slow="013"), "011", True, id="in-step-2-of-2"),
    pytest.param(Crash(["migrate"], pause="phase:verify"), "011", True, id="verify"),
    pytest.param(Crash(["migrate"], slow="012", signal=signal.SIGTERM), "011", False, id="sigterm-group-in-step"),
]


@pytest.mark.parametrize(("crash", "expect", "rollback"), MIGRATE_PHASES)
def test_migrate_killed_at_each_phase(env, tmp_path, crash, expect, rollback):
    at_011(env, tmp_path)

    result, answered, _ = crash_and_restart(env, crash)

    assert_invariants(env, result, answered, before="011", expect=expect, rollback=rollback, failure="migration.failed")
    assert result["revision_before"] == "011" and result["interrupted"] is True
    # the backup directory holds complete backups only
    backups = Path(env.tmp / "backups")
    assert not list(backups.glob(".partial-*"))
    for dump in backups.glob("*.dump"):
        assert dump.with_name(dump.name + ".manifest.json").exists()
    # and the database is usable: the next migrate runs to head
    again = env.cli("migrate", "--json", "--no-backup")
    assert again.code == 0, again.stderr
    assert env.revision() == "013" and marker_survives(env)


def test_sigterm_lets_a_short_step_finish_and_stops_before_the_next(env, tmp_path, redis_client):
    at_011(env, tmp_path)
    worker = env.start_worker(log_name="stopped-worker", SLOW_STEP="012", SLOW_SECONDS="1.5")
    waiting = cli(env, "migrate", "--no-backup")
    wait_for(lambda: sleeping(env), 60, "the slow step")
    told = time.monotonic()
    env.kill_worker(worker, signal.SIGTERM)  # to the whole group, as systemd's KillMode=control-group does
    out, err = waiting.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    # answered by the stopping worker itself, before any restart
    assert time.monotonic() - told < 15 and worker.returncode == 0, env.log_of(worker)
    assert result["status"] == "failed" and result["interrupted"] is True
    assert "stopped before step 2/2 (013)" in result["error"] and result["revision_after"] == "012"
    assert env.sql("SELECT status FROM dbagent.commands WHERE id = %s", result["command_id"]) == [("interrupted",)]
    assert not env.sql("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted")
    # the agent undoes the half-run once a worker serves the database again
    env.start_worker(log_name="restarted-worker")
    settle(env, rollback_expected=True)
    assert env.revision() == "011" and marker_survives(env) and len(automatic_rollbacks(env)) == 1


@pytest.mark.parametrize("to", ["group", "main-process"])
def test_sigterm_cancels_a_long_step_after_the_grace_and_reports_it(env, tmp_path, to):
    at_011(env, tmp_path)
    worker = env.start_worker(log_name="stopped-worker", SLOW_STEP="012")
    waiting = cli(env, "migrate", "--no-backup")
    wait_for(lambda: sleeping(env), 60, "the slow step")
    told = time.monotonic()
    if to == "group":
        env.kill_worker(worker, signal.SIGTERM)
    else:
        import os

        os.kill(worker.pid, signal.SIGTERM)  # systemd's KillMode=mixed: the main process only
        worker.wait(timeout=30)
    out, err = waiting.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    took = time.monotonic() - told
    assert 3 <= took < 15 and worker.returncode == 0, (took, env.log_of(worker))  # stop_grace = 3s
    assert result["interrupted"] is True and "did not finish within stop_grace (3s)" in result["error"]
    assert result["revision_after"] == "011" and env.revision() == "011" and marker_survives(env)
    assert not env.sql("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted")
    env.start_worker(log_name="restarted-worker")
    settle(env, rollback_expected=False)
    assert env.revision() == "011" and not automatic_rollbacks(env)


def test_postgres_restarted_during_a_step_then_the_worker_restarted(env, tmp_path, private_cluster):
    from tests.servers import create_database, drop_database

    env.admin = private_cluster.admin_url
    create_database(env.name, env.admin)
    try:
        setup_world(env, tmp_path)
        env.start_agent()
        worker = env.start_worker(log_name="worker", SLOW_STEP="013")
        assert env.cli("migrate", "--to", "011", "--json").code == 0
        add_marker(env)
        waiting = cli(env, "migrate")
        wait_for(lambda: sleeping(env), 60, "the slow step")
        private_cluster.restart()
        out, err = waiting.communicate(timeout=90)
        result = json.loads(out.strip().splitlines()[-1])
        # the worker waited for the server, then reported the step's failure where the database stood
        assert result["status"] == "failed" and result["interrupted"] is True, result
        assert "lost PostgreSQL" in result["error"] and result["revision_after"] == "012"
        assert result["revision_before"] == "011"
        assert env.sql("SELECT status FROM dbagent.commands WHERE id = %s", result["command_id"]) == [("interrupted",)]
        settle(env, rollback_expected=True)
        assert env.revision() == "011" and marker_survives(env)
        # any later restart finds nothing to undo: never below where the run started
        env.kill_worker(worker, signal.SIGKILL)
        env.start_worker(log_name="restarted-worker")
        settle(env, rollback_expected=False)
        assert env.revision() == "011" and marker_survives(env) and len(automatic_rollbacks(env)) == 1
    finally:
        env.stop_workers()
        drop_database(env.name, env.admin)


# -- rollback ------------------------------------------------------------------------

ROLLBACK_PHASES = [
    pytest.param(Crash(["rollback", "2"], pause="phase:claimed"), "013", id="claimed"),
    pytest.param(Crash(["rollback", "2"], pause="phase:step:1"), "013", id="step-1-of-2-begun"),
    pytest.param(Crash(["rollback", "2"], slow="013-down"), "013", id="in-step-1-of-2"),
    pytest.param(Crash(["rollback", "2"], pause="phase:between_steps:1"), "012", id="between-steps"),
]


@pytest.mark.parametrize(("crash", "expect"), ROLLBACK_PHASES)
def test_rollback_killed_at_each_phase(env, tmp_path, crash, expect):
    setup_world(env, tmp_path)
    env.start_agent()
    setup = env.start_worker(log_name="setup-worker")
    assert env.cli("migrate", "--json", "--no-backup").code == 0
    add_marker(env)
    env.kill_worker(setup, signal.SIGTERM)

    result, answered, _ = crash_and_restart(env, crash)

    # a rollback is never undone nor redone by the automation: it stays where the crash left it
    assert_invariants(env, result, answered, before="011", expect=expect, rollback=False, failure="rollback.failed")
    assert result["revision_before"] == "013"


# -- backup, restore, prune ---------------------------------------------------------------

BACKUP_PHASES = [
    pytest.param(Crash(["backup", "full"], pause="phase:claimed"), id="claimed"),
    pytest.param(Crash(["backup", "full"], pause="phase:backup"), id="before-pg_dump"),
    pytest.param(Crash(["backup", "full"], pause="backup:dumping"), id="pg_dump-running"),
    pytest.param(Crash(["backup", "full"], pause="backup:renamed"), id="renamed-no-manifest-yet"),
]


def complete_backups_only(env: Env) -> list[Path]:
    backups = Path(env.tmp / "backups")
    assert not list(backups.glob(".partial-*"))
    dumps = sorted(backups.glob("*.dump"))
    for dump in dumps:
        assert dump.with_name(dump.name + ".manifest.json").exists(), dump
    for manifest in backups.glob("*.manifest.json"):
        assert manifest.with_name(manifest.name.removesuffix(".manifest.json")).exists(), manifest
    return dumps


@pytest.mark.parametrize("crash", BACKUP_PHASES)
def test_backup_killed_at_each_phase(env, tmp_path, crash):
    at_011(env, tmp_path)

    result, answered, _ = crash_and_restart(env, crash)

    assert_invariants(env, result, answered, before="011", expect="011", rollback=False, failure="backup.failed")
    assert not complete_backups_only(env)  # the killed backup left nothing behind, and nothing is listed
    listed = env.cli("backups", "list", "--json")
    assert listed.code == 0 and listed.json()["backups"] == []
    assert not env.sql("SELECT 1 FROM dbagent.audit_log WHERE type = 'migration.failed'")
    # the next backup works
    assert env.cli("backup", "full", "--json").code == 0 and len(complete_backups_only(env)) == 1


RESTORE_PHASES = [
    pytest.param(Crash(["restore", "{path}", "--yes"], pause="phase:claimed"), id="claimed"),
    pytest.param(Crash(["restore", "{path}", "--yes"], pause="phase:check"), id="checksum-and-full-read"),
    pytest.param(Crash(["restore", "{path}", "--yes"], pause="phase:restore"), id="before-pg_restore"),
    pytest.param(Crash(["restore", "{path}", "--yes"], ready=lambda env: bool(env.sql(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'dbagent pg_restore' AND wait_event_type = 'Lock'"
    ))), id="pg_restore-running"),
]


@pytest.mark.parametrize("crash", RESTORE_PHASES)
def test_restore_killed_at_each_phase(env, tmp_path, crash):
    setup_world(env, tmp_path)
    env.lock_timeout = "60s"  # pg_restore waits on the test's lock until it is killed
    env.start_agent()
    setup = env.start_worker(log_name="setup-worker")
    assert env.cli("migrate", "--to", "011", "--json", "--no-backup").code == 0
    taken = env.cli("backup", "full", "--json")
    assert taken.code == 0
    add_marker(env)  # after the backup: a restore that went through would take it away
    env.kill_worker(setup, signal.SIGTERM)
    crash.command = [part.replace("{path}", taken.json()["path"]) for part in crash.command]

    import psycopg

    with psycopg.connect(env.url) as blocker:
        if crash.ready is not None:
            blocker.execute("LOCK TABLE users IN ACCESS SHARE MODE")  # pg_restore's DROP waits behind it
        result, answered, _ = crash_and_restart(env, crash)
        blocker.rollback()

    assert_invariants(env, result, answered, before="011", expect="011", rollback=False, failure="restore.failed")
    assert len(complete_backups_only(env)) == 1


def age_backups(env: Env, days: list[int]) -> None:
    """Make the listed backups (newest first) pre-migration backups of ``days`` ago, due for pruning."""
    from datetime import UTC, datetime, timedelta

    manifests = sorted(Path(env.tmp / "backups").glob("*.manifest.json"))
    for path, age in zip(manifests, days, strict=True):
        body = json.loads(path.read_text())
        when = (datetime.now(UTC) - timedelta(days=age)).isoformat()
        body.update(trigger="pre-migration", finished=when, started=when)
        path.write_text(json.dumps(body))


PRUNE_PHASES = [
    pytest.param(Crash(["backups", "prune"], pause="phase:claimed"), 3, id="claimed"),
    pytest.param(Crash(["backups", "prune"], pause="phase:prune"), 3, id="before-deleting"),
    pytest.param(Crash(["backups", "prune"], pause="prune:deleted:1"), 2, id="after-one-deletion"),
]


@pytest.mark.parametrize(("crash", "left"), PRUNE_PHASES)
def test_prune_killed_at_each_phase(env, tmp_path, crash, left):
    setup_world(env, tmp_path)
    env.start_agent()
    setup = env.start_worker(log_name="setup-worker")
    assert env.cli("migrate", "--to", "011", "--json", "--no-backup").code == 0
    for _ in range(3):
        assert env.cli("backup", "full", "--json").code == 0
        time.sleep(1.1)  # one backup a second: distinct names
    age_backups(env, [60, 50, 40])  # all due; the newest verified one is kept whatever its age
    add_marker(env)
    env.kill_worker(setup, signal.SIGTERM)

    result, answered, _ = crash_and_restart(env, crash)

    assert_invariants(env, result, answered, before="011", expect="011", rollback=False, failure="prune.failed")
    assert len(complete_backups_only(env)) == left
    # the next prune finishes the job
    pruned = env.cli("backups", "prune", "--json")
    assert pruned.code == 0 and len(complete_backups_only(env)) == 1


def test_sigterm_during_a_backup_finishes_it_or_leaves_nothing(env, tmp_path):
    at_011(env, tmp_path, agent=False)
    worker = env.start_worker(log_name="stopped-worker", DBAGENT_PAUSE_AT="backup:dumping")
    waiting = cli(env, "backup", "full")
    wait_for(lambda: "pausing at backup:dumping" in env.log_of(worker), 60, "pg_dump to run")
    env.kill_worker(worker, signal.SIGTERM)
    out, _ = waiting.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert worker.returncode == 0
    dumps = complete_backups_only(env)
    if result["status"] == "succeeded":  # pg_dump was done within the grace: the backup is whole
        assert [str(d) for d in dumps] == [result["path"]]
    else:
        assert result["interrupted"] is True and dumps == []
    assert env.sql("SELECT status FROM dbagent.commands WHERE id = %s", result["command_id"])[0][0] in (
        "succeeded", "interrupted")
    assert not env.sql("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted")


# -- a branched project: a run that starts at two heads --------------------------------

SLOW_BODY = ('op.execute("CREATE TABLE crash_tail (id int)"); __import__("os").environ.get("SLOW_STEP") == "tail"'
             ' and op.execute("SELECT pg_sleep(600)")')

FROM_TWO_HEADS = [
    # (case, env.py's transactions, whether the agent rolls back: then to exactly the two heads the run started from)
    # transaction_per_migration on: each step commits alone, so a run killed after one did leaves work to undo.
    pytest.param(Crash(["migrate"], pause="phase:validation"), "step", False, id="validation"),
    pytest.param(Crash(["migrate"], pause="phase:between_steps:1"), "step", True, id="after-the-merge"),
    pytest.param(Crash(["migrate"], pause="phase:step:3"), "step", True, id="step-3-of-4-begun"),
    pytest.param(Crash(["migrate"], slow="tail"), "step", True, id="in-step-4-of-4"),
    pytest.param(Crash(["migrate"], pause="phase:verify"), "step", True, id="verify"),
    # Off (Alembic's default, and the fixture's): the plan is one transaction; killed before it committed, it
    # undid itself whole and there is nothing to roll back.
    pytest.param(Crash(["migrate"], pause="phase:between_steps:1"), "plan", False, id="one-transaction-after-the-merge"),
    pytest.param(Crash(["migrate"], pause="phase:step:3"), "plan", False, id="one-transaction-step-3-of-4-begun"),
    pytest.param(Crash(["migrate"], slow="tail"), "plan", False, id="one-transaction-in-step-4-of-4"),
    pytest.param(Crash(["migrate"], pause="phase:verify"), "plan", True, id="one-transaction-verify"),
]


@pytest.mark.parametrize(("crash", "transactions", "rollback"), FROM_TWO_HEADS)
def test_migrate_from_two_heads_killed_at_each_phase(env, tmp_path, crash, transactions, rollback):
    """The branched fixture at 826e + e2cd (between its branch point and its merge); the run applies the merge,
    two more revisions and a slow one. Whatever the phase, the database ends at exactly the two heads it started
    from (never below either), the marker survives, and every command ends."""
    import shutil

    from tests.alembic_projects import FIXTURE, add_revision, per_migration_transactions

    env.migrations = tmp_path / "fixture"
    shutil.copytree(FIXTURE, env.migrations)
    if transactions == "step":
        per_migration_transactions(env.migrations)
    ids = {p.name[:4]: p.name.split("_", 1)[0] for p in (env.migrations / "versions").glob("*.py")}
    tail = add_revision(env.migrations, "crash tail", SLOW_BODY, 'op.execute("DROP TABLE crash_tail")')
    env.extra_config = '\n[worker]\nrelay_interval = "1s"\nstop_grace = "3s"\nreconnect_timeout = "30s"\n'
    env.start_agent()
    setup = env.start_worker(log_name="setup-worker")
    start = sorted([ids["826e"], ids["e2cd"]])
    assert env.cli("migrate", "--to", ",".join(start), "--json").code == 0
    env.sql("INSERT INTO accounts (email) VALUES ('marker@example.com')")
    env.kill_worker(setup, signal.SIGTERM)

    result, answered, _ = crash_and_restart(env, crash)

    assert result["status"] == "failed" and result.get("interrupted") is True, result
    assert result["revision_before"] == ",".join(start)
    assert answered < ANSWER_WITHIN_S, f"the CLI waited {answered:.1f}s after the restart"
    settle(env, rollback_expected=rollback)
    versions = sorted(r[0] for r in env.sql("SELECT version_num FROM app_versions"))
    assert versions == start, versions
    assert env.sql("SELECT count(*) FROM accounts WHERE email = 'marker@example.com'") == [(1,)]
    assert env.sql("SELECT to_regclass('public.labels')::text, to_regclass('public.crash_tail')") == [("labels", None)]
    rollbacks = automatic_rollbacks(env)
    assert len(rollbacks) == (1 if rollback else 0), rollbacks
    for data in rollbacks:
        assert data["target"] == ",".join(start), data
    assert not env.sql("SELECT id, status FROM dbagent.commands WHERE status IN ('accepted', 'claimed', 'running')")
    # And the database is usable: the next migrate goes to the head.
    again = env.cli("migrate", "--json")
    assert again.code == 0, again.stdout + again.stderr
    assert [r[0] for r in env.sql("SELECT version_num FROM app_versions")] == [tail]
