"""Commands that run on the local host: env validate, validate, events --follow."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.servers import ROOT

pytestmark = pytest.mark.integration


def test_env_validate_passes_on_a_ready_host(env):
    env.extra_config = 'app_user = "aegisx_app"'
    result = env.cli("env", "validate", "--json")
    assert result.code == 0, result.stdout
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["postgres"]["status"] == "ok" and "PostgreSQL 15" in checks["postgres"]["detail"]
    assert checks["redis"]["status"] == "ok"
    assert checks["pg_dump"]["status"] == "ok" and checks["pg_restore"]["status"] == "ok"
    assert checks["migration_user"]["status"] == "ok"
    assert checks["backup_dir"]["status"] == "ok" and "private" in checks["backup_dir"]["detail"]
    assert checks["migrations"]["status"] == "ok" and checks["signing_key"]["status"] == "ok"


def test_env_validate_fails_on_a_shared_role_and_a_readable_backup_dir(env):
    env.extra_config = 'app_user = "postgres"'
    env.config
    (env.tmp / "backups").chmod(0o755)
    result = env.cli("env", "validate", "--json")
    assert result.code == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["migration_user"]["status"] == "fail" and "application" in checks["migration_user"]["detail"]
    assert checks["backup_dir"]["status"] == "fail" and "0755" in checks["backup_dir"]["detail"]
    human = env.cli("env", "validate")
    assert human.code == 1 and "FAIL backup_dir" in human.stdout


def test_env_show_masks_the_password(env):
    env.config
    path = env.tmp / "secret.toml"
    path.write_text(env.config.read_text().replace("postgresql://postgres@", "postgresql://postgres:Hunter2@"))
    result = subprocess.run(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(path), "env", "show", "--json"],
        capture_output=True, text=True, cwd=ROOT, env=env.environ(), timeout=60,
    )
    assert result.returncode == 0 and "Hunter2" not in result.stdout
    body = json.loads(result.stdout)
    assert body["source"] == str(path) and body["databases"]["test"]["url"].startswith("postgresql://postgres:***@")


def test_validate_the_shipped_migrations(env):
    result = env.cli("validate", "--json")
    assert result.code == 0
    body = json.loads(result.stdout)
    assert body["status"] == "passed"
    # only the one data migration draws (warning) findings: 011's INSERTs
    assert {(f["revision"], f["rule"], f["severity"]) for f in body["findings"]} == {("011", "data-change", "warning")}
    assert all(set(f) >= {"revision", "rule", "severity", "message", "statement", "fix"} for f in body["findings"])


def test_validate_lints_risky_sql(env, tmp_path):
    from tests.servers import copy_migrations

    risky = '''"""Drop the users' phone column."""
from alembic import op
revision = "012"
down_revision = "011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_column("users", "phone")


def downgrade() -> None:
    op.execute("ALTER TABLE users ADD COLUMN phone text")
'''
    env.migrations = copy_migrations(tmp_path, {"012_drop_phone.py": risky})
    result = env.cli("validate", "--json")
    assert result.code == 1
    errors = [f for f in json.loads(result.stdout)["findings"] if f["severity"] == "error"]
    assert [(f["revision"], f["rule"]) for f in errors] == [("012", "drop-column")]
    assert "phone" in errors[0]["statement"] and errors[0]["fix"]


def test_validate_exits_1_on_an_error_finding(env, tmp_path):
    from tests.servers import copy_migrations

    env.migrations = copy_migrations(tmp_path, {"013_skipped_a_number.py": 'revision = "013"\ndown_revision = "011"\n\ndef upgrade():\n    pass\n\ndef downgrade():\n    pass\n'})
    result = env.cli("validate", "--json")
    assert result.code == 1
    body = json.loads(result.stdout)
    assert body["status"] == "failed"
    assert {(f["revision"], f["rule"], f["severity"]) for f in body["findings"]} >= {("013", "sequence", "error"), ("013", "downgrade", "error")}


def test_events_follow_prints_new_events_as_they_come(env):
    env.start_worker()
    follower = subprocess.Popen(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(env.config), "events", "--follow", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env.environ(),
    )
    try:
        time.sleep(1.5)
        status = env.cli("status", "--json")
        assert status.code == 0
        line = follower.stdout.readline()
        event = json.loads(line)
        assert event["type"] == "command.accepted" and event["command_id"] == status.json()["command_id"]
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def test_validate_without_the_database_says_the_checksums_were_not_checked(env):
    unreachable = env.environ(DBAGENT_DATABASES__TEST__URL="postgresql://postgres@127.0.0.1:1/nowhere",
                              DBAGENT_DATABASES__TEST__CONNECT_TIMEOUT="1s")
    result = env.cli("validate", "--json", env=unreachable)
    assert result.code == 0, result.stdout  # the scripts themselves are fine
    unchecked = [f for f in result.json()["findings"] if f["rule"] == "checksums-unchecked"]
    assert unchecked and unchecked[0]["severity"] == "warning"
    assert unchecked[0]["message"].startswith("checksums of applied migrations not checked")


def test_rehearse_is_skipped_while_the_scripts_do_not_form_one_chain(env, tmp_path):
    from tests.servers import copy_migrations

    env.migrations = copy_migrations(tmp_path)
    next((env.migrations / "versions").glob("005_*.py")).unlink()  # a gap in the numbering
    result = env.cli("validate", "--rehearse", "--json")
    assert result.code == 1
    rules = {f["rule"]: f["severity"] for f in result.json()["findings"]}
    assert rules.get("rehearsal-skipped") == "warning"
    assert rules.get("sequence") == "error" and result.json()["rehearsal"] is None
