"""`dbagent validate --rehearse`: up, verify, down, compare, up again on a scratch database, on real PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from tests.servers import ADMIN_URL, ROOT, copy_migrations, script

pytestmark = pytest.mark.integration

SHIPPED = [f"{n:03d}" for n in range(1, 12)]




GOOD_012 = script("012", "011", "Add a nickname to users.",
                  ["ALTER TABLE users ADD COLUMN nickname text"], ["ALTER TABLE users DROP COLUMN nickname"])


def database_exists(name: str) -> bool:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def rehearse(env, *extra: str):
    result = env.cli("validate", "--rehearse", "--json", *extra, timeout=300)
    body = result.json()
    assert not database_exists(body["rehearsal"]["database"])  # always dropped
    return result, body


def rehearsal_findings(body: dict) -> list[dict]:
    return [f for f in body["findings"] if f["rule"].startswith("rehearsal-")]


def test_the_shipped_migrations_rehearse_clean_from_an_empty_database(env):
    result, body = rehearse(env)
    assert result.code == 0, result.stdout + result.stderr
    assert body["status"] == "passed" and rehearsal_findings(body) == []
    rehearsal = body["rehearsal"]
    assert rehearsal["source"] == "empty" and rehearsal["revision_from"] is None and rehearsal["status"] == "passed"
    assert rehearsal["database"].startswith("dbagent_rehearse_test_")
    assert [(s["revision"], s["status"]) for s in rehearsal["steps"]] == [(rev, "ok") for rev in SHIPPED]
    assert env.revision() is None  # the target database was never touched


def test_rehearsal_catches_a_downgrade_that_forgets_to_drop_a_column(env, tmp_path):
    forgetful = script(
        "012", "011", "Add a nickname and a bio to users.",
        ["ALTER TABLE users ADD COLUMN nickname text", "ALTER TABLE users ADD COLUMN bio varchar(200)"],
        ["ALTER TABLE users DROP COLUMN bio"],
    )
    env.migrations = copy_migrations(tmp_path, {"012_add_nickname_and_bio.py": forgetful})
    result, body = rehearse(env)
    assert result.code == 1
    assert body["status"] == "failed"
    [finding] = rehearsal_findings(body)
    assert finding == {
        "revision": "012",
        "rule": "rehearsal-downgrade-mismatch",
        "severity": "error",
        "message": "column public.users.nickname (text) is still there after downgrade of 012",
        "statement": None,
        "fix": "downgrade() must drop what upgrade() created",
        "file": "012_add_nickname_and_bio.py",
    }
    steps = body["rehearsal"]["steps"]
    assert [(s["revision"], s["status"]) for s in steps] == [(rev, "ok") for rev in SHIPPED] + [("012", "failed")]

    # a person at a terminal sees one line per step, then the finding
    human = env.cli("validate", "--rehearse", timeout=300)
    assert human.code == 1
    assert "rehearse 011 " in human.stdout and "rehearse 012 Add a nickname and a bio to users: failed" in human.stdout
    assert (
        "error: 012 [rehearsal-downgrade-mismatch] column public.users.nickname (text) is still there after downgrade of 012"
        in human.stderr
    )
    assert "rehearse: dropped the scratch database dbagent_rehearse_test_" in human.stdout


def test_a_later_step_is_not_rehearsed_on_a_schema_a_downgrade_left_wrong(env, tmp_path):
    forgetful = script("012", "011", "Add nickname.", ["ALTER TABLE users ADD COLUMN nickname text"],
                       ["ALTER TABLE users ALTER COLUMN email DROP NOT NULL"])
    env.migrations = copy_migrations(tmp_path, {
        "012_add_nickname.py": forgetful,
        "013_add_bio.py": script("013", "012", "Add bio.", ["ALTER TABLE users ADD COLUMN bio text"],
                                 ["ALTER TABLE users DROP COLUMN bio"]),
    })
    result, body = rehearse(env)
    assert result.code == 1
    assert sorted(f["message"] for f in rehearsal_findings(body)) == [
        "column public.users.email differs after downgrade of 012: text, was text not null",
        "column public.users.nickname (text) is still there after downgrade of 012",
    ]
    assert [(s["revision"], s["status"]) for s in body["rehearsal"]["steps"][-2:]] == [("012", "failed"), ("013", "not rehearsed")]


def test_a_step_failing_verification_is_an_error_naming_the_check(env, tmp_path):
    not_valid = script(
        "012", "011", "Require an email domain.",
        ["ALTER TABLE users ADD CONSTRAINT users_email_domain CHECK (email LIKE '%@%') NOT VALID"],
        ["ALTER TABLE users DROP CONSTRAINT users_email_domain"],
    )
    env.migrations = copy_migrations(tmp_path, {"012_require_email_domain.py": not_valid})
    result, body = rehearse(env)
    assert result.code == 1
    [finding] = rehearsal_findings(body)
    assert (finding["revision"], finding["rule"], finding["severity"]) == ("012", "rehearsal-verify-failed", "error")
    assert finding["message"].startswith("after upgrade to 012, check not_valid_constraints failed: ")
    assert "users_email_domain" in finding["message"]
    # the downgrade itself was sound: the step was rehearsed to the end
    assert body["rehearsal"]["steps"][-1]["status"] == "failed"


@pytest.mark.parametrize(
    ("upgrade", "downgrade", "rule", "message"),
    [
        (["ALTER TABLE users ADD COLUMN nickname text", "SELECT 1 / 0"], ["ALTER TABLE users DROP COLUMN nickname"],
         "rehearsal-upgrade-failed", "upgrade to 012 failed: division by zero"),
        (["ALTER TABLE users ADD COLUMN nickname text"], ["ALTER TABLE users DROP COLUMN no_such_column"],
         "rehearsal-downgrade-failed", 'downgrade of 012 failed: column "no_such_column" of relation "users" does not exist'),
    ],
    ids=["upgrade", "downgrade"],
)
def test_a_failing_step_is_an_error_with_the_servers_message_and_the_scratch_database_is_dropped(
    env, tmp_path, upgrade, downgrade, rule, message
):
    env.migrations = copy_migrations(tmp_path, {"012_add_nickname.py": script("012", "011", "Add nickname.", upgrade, downgrade)})
    result, body = rehearse(env)  # asserts the scratch database is gone
    assert result.code == 1
    [finding] = rehearsal_findings(body)
    assert (finding["revision"], finding["rule"], finding["severity"]) == ("012", rule, "error")
    assert finding["message"] == message
    assert body["rehearsal"]["steps"][-1] == {**body["rehearsal"]["steps"][-1], "revision": "012", "status": "failed"}


def test_rehearsal_from_the_newest_schema_backup_rehearses_only_the_pending_migrations(env, tmp_path):
    env.migrations = copy_migrations(tmp_path)
    env.start_worker()
    assert env.cli("migrate", "--to", "009", "--no-backup", "--json").code == 0
    older = env.cli("backup", "schema", "--json")
    assert older.code == 0, older.stderr
    env.sql("ALTER TABLE users ADD COLUMN drifted text")  # only in the newest schema backup
    newest = env.cli("backup", "schema", "--json")
    assert newest.code == 0, newest.stderr
    assert env.cli("backup", "full", "--json").code == 0  # newer, but not a schema backup
    (env.migrations / "versions" / "012_add_nickname.py").write_text(GOOD_012)

    result, body = rehearse(env)
    assert result.code == 0, result.stdout + result.stderr
    rehearsal = body["rehearsal"]
    assert rehearsal["source"] == newest.json()["path"] and rehearsal["revision_from"] == "009"
    assert [(s["revision"], s["status"]) for s in rehearsal["steps"]] == [("010", "ok"), ("011", "ok"), ("012", "ok")]
    assert env.revision() == "009"

    human = env.cli("validate", "--rehearse", timeout=300)
    assert human.code == 0
    assert f"from schema backup {newest.json()['path'].rsplit('/', 1)[-1]} (revision 009)" in human.stdout

    # --from-empty ignores the backups
    result, body = rehearse(env, "--from-empty")
    assert result.code == 0
    assert body["rehearsal"]["source"] == "empty"
    assert [s["revision"] for s in body["rehearsal"]["steps"]] == [*SHIPPED, "012"]

    # a damaged backup cannot seed it: a warning, and the rehearsal starts empty
    with open(newest.json()["path"], "r+b") as archive:
        archive.seek(100)
        archive.write(b"\xff\xff\xff\xff")
    result, body = rehearse(env)
    assert result.code == 0
    [warning] = rehearsal_findings(body)
    assert (warning["rule"], warning["severity"]) == ("rehearsal-backup-unusable", "warning")
    assert "checksum mismatch" in warning["message"] and "starts from an empty database" in warning["message"]
    assert body["rehearsal"]["source"] == "empty" and len(body["rehearsal"]["steps"]) == 12


def test_a_server_refusing_create_database_exits_3_with_a_clear_error(env):
    role = f"nocreate_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide: one per test
    env.sql(f"CREATE ROLE {role} LOGIN NOCREATEDB")
    try:
        url = env.url.replace("postgresql://postgres@", f"postgresql://{role}@")
        result = env.cli("validate", "--rehearse", env=env.environ(DBAGENT_DATABASES__TEST__URL=url))
        assert result.code == 3, result.stdout + result.stderr
        assert "error: the server refused to create the scratch database dbagent_rehearse_test_" in result.stderr
        assert "permission denied to create database" in result.stderr and "CREATEDB" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        env.sql(f"DROP ROLE IF EXISTS {role}")


def _scratch_in_use() -> str | None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        row = conn.execute(
            "SELECT datname FROM pg_stat_activity WHERE application_name = 'dbagent rehearse'"
            " AND datname LIKE 'dbagent\\_rehearse\\_test\\_%%' AND query LIKE '%%pg_sleep%%'"
        ).fetchone()
    return row[0] if row else None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_rehearsal_drops_its_scratch_database(env, tmp_path, sig):
    slow = script("012", "011", "A slow step.", ["SELECT pg_sleep(60)"], ["SELECT 1"])
    env.migrations = copy_migrations(tmp_path, {"012_slow_step.py": slow})
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(env.config), "validate", "--rehearse"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.environ(), cwd=ROOT,
        # As from a terminal: a test run started in the background (`pytest &` from a script) ignores SIGINT, and
        # the child would inherit that and never see the Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        scratch = None
        while scratch is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            scratch = _scratch_in_use()
        assert scratch is not None, "the slow step never started"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    assert f"rehearse: dropped the scratch database {scratch}" in out
    assert not database_exists(scratch)
