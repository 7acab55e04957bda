"""Validation before every migrate, --allow, and checksums of applied migrations, through a real worker."""

from __future__ import annotations

import pytest

from tests.servers import copy_migrations, script

pytestmark = pytest.mark.integration

DROPS_SETTINGS = script(
    "012", "011", "Drop the settings table.", ["DROP TABLE settings"],
    ["CREATE TABLE settings (id bigserial PRIMARY KEY, key text UNIQUE NOT NULL, value jsonb)"],
)
ADDS_NOTE = script("012", "011", "Add roles.note.", ["ALTER TABLE roles ADD COLUMN note text"], ["ALTER TABLE roles DROP COLUMN note"])

ENFORCE = 'validate_before_migrate = "enforce"'


def events_of(env, redis_client, type_):
    return [e for e in env.stream_events(redis_client) if e["type"] == type_]


def test_the_shipped_migrations_validate_with_no_errors_and_record_their_checksums(env):
    env.extra_config = ENFORCE
    env.start_worker()
    result = env.cli("validate", "--json")
    assert result.code == 0, result.stdout
    assert [f for f in result.json()["findings"] if f["severity"] == "error"] == []
    assert env.cli("migrate", "--json").code == 0
    rows = env.sql("SELECT revision, checksum FROM dbagent.changelog WHERE direction = 'up' ORDER BY revision")
    assert [r for r, _ in rows] == [f"{n:03d}" for n in range(1, 12)]
    assert all(len(c) == 64 for _, c in rows)
    assert env.cli("validate", "--json").code == 0  # checked against the database now, still clean


def test_a_migration_edited_after_it_was_applied_is_applied_migration_changed(env, tmp_path, redis_client):
    env.extra_config = ENFORCE
    env.migrations = copy_migrations(tmp_path, upto=11)
    env.start_worker()
    assert env.cli("migrate", "--to", "009", "--json").code == 0
    edited = next((env.migrations / "versions").glob("005_*.py"))
    edited.write_text(edited.read_text().replace("def upgrade() -> None:", "def upgrade() -> None:  # tweaked", 1))

    result = env.cli("validate", "--json")
    assert result.code == 1
    changed = [f for f in result.json()["findings"] if f["rule"] == "applied-migration-changed"]
    assert [(f["revision"], f["severity"], f["file"]) for f in changed] == [("005", "error", edited.name)]
    assert "edited after it was applied" in changed[0]["message"] and changed[0]["fix"]

    # A migrate stops before touching anything...
    refused = env.cli("migrate", "--json")
    assert refused.code == 1
    body = refused.json()
    assert body["status"] == "failed" and "validation failed, nothing was changed" in body["error"]
    assert "applied-migration-changed" in body["error"] and env.revision() == "009"
    assert body["revision_before"] == body["revision_after"] == "009"
    assert events_of(env, redis_client, "validation.failed")
    assert not events_of(env, redis_client, "migration.failed")  # nothing for the agent to roll back
    # ...unless the operator accepts that finding, which the audit trail keeps.
    allowed = env.cli("migrate", "--allow", "applied-migration-changed", "--ticket", "OPS-7", "--json")
    assert allowed.code == 0, allowed.stderr
    assert env.revision() == "011"
    completed = events_of(env, redis_client, "validation.completed")[-1]
    assert completed["data"]["allowed"] == ["005:applied-migration-changed"] and completed["ticket"] == "OPS-7"
    assert env.sql(
        "SELECT data->'allowed'->>0 FROM dbagent.audit_log WHERE type = 'validation.completed' AND command_id = %s",
        allowed.json()["command_id"],
    ) == [("005:applied-migration-changed",)]


def test_a_lint_error_stops_a_production_migration_unless_allowed(env, tmp_path, redis_client):
    env.extra_config = ENFORCE
    env.migrations = copy_migrations(tmp_path, {"012_drop_settings.py": DROPS_SETTINGS})
    env.start_worker()
    assert env.cli("migrate", "--to", "011", "--json").code == 0

    dry = env.cli("migrate", "--dry-run", "--json")
    assert dry.code == 0 and [f["rule"] for f in dry.json()["validation"]["findings"] if f["severity"] == "error"] == ["drop-table"]

    refused = env.cli("migrate", "--json")
    assert refused.code == 1 and "drop-table" in refused.json()["error"] and env.revision() == "011"
    human = env.cli("migrate")
    assert human.code == 1 and "[drop-table]" in human.stderr and "fix:" in human.stdout

    assert env.cli("migrate", "--allow", "drop-tabel").code == 2  # a typo allows nothing
    accepted = env.cli("migrate", "--allow", "drop-table", "--json")
    assert accepted.code == 0, accepted.stderr
    assert env.revision() == "012"
    assert accepted.json()["validation"]["allowed"] == ["012:drop-table"]
    accepted_event = [e for e in events_of(env, redis_client, "command.accepted") if e["command_id"] == accepted.json()["command_id"]]
    assert accepted_event[0]["data"]["args"]["allow"] == ["drop-table"]


def test_where_validation_is_advisory_findings_are_reported_not_enforced(env, tmp_path, redis_client):
    # The database is called "test": validate_before_migrate = "auto" only warns there.
    env.migrations = copy_migrations(tmp_path, {"012_drop_settings.py": DROPS_SETTINGS})
    env.start_worker()
    result = env.cli("migrate", "--json")
    assert result.code == 0, result.stderr
    validation = result.json()["validation"]
    assert validation["enforced"] is False and validation["status"] == "failed"
    assert "drop-table" in [f["rule"] for f in validation["findings"]]


def test_a_clean_migration_passes_validation_and_only_pending_ones_are_linted(env, tmp_path, redis_client):
    env.extra_config = ENFORCE
    env.migrations = copy_migrations(tmp_path, {"012_add_note.py": ADDS_NOTE})
    env.start_worker()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    result = env.cli("migrate", "--json")
    assert result.code == 0, result.stderr
    linted = {f["revision"] for f in result.json()["validation"]["findings"]}
    assert linted <= {"012"}  # 011's data-change warnings were reported when it was applied
