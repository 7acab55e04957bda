"""Backups and restores on real PostgreSQL through a real worker."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psycopg
import pytest

from tests.servers import create_database, db_url, drop_database

pytestmark = pytest.mark.integration


def migrated_with_rows(env) -> None:
    env.start_worker()
    assert env.cli("migrate", "--json").code == 0
    env.sql("INSERT INTO roles (name, description) VALUES ('editor', 'edits'), ('viewer', 'views')")
    env.sql("INSERT INTO users (email, password_hash) VALUES ('a@example.com', 'x'), ('b@example.com', 'y')")


def backup(env, kind: str = "full") -> dict:
    result = env.cli("backup", kind, "--json")
    assert result.code == 0, result.stderr
    return result.json()


def restore_raw(path: str, target: str) -> None:
    proc = subprocess.run(["pg_restore", "--no-owner", "--exit-on-error", "--dbname", db_url(target), path],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def scratch():
    names: list[str] = []

    def make(suffix: str) -> str:
        name = f"{suffix}_{os.getpid()}_{len(names)}"
        create_database(name)
        names.append(name)
        return name

    yield make
    for name in names:
        drop_database(name)


def count(url: str, query: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchone()[0]


def test_each_backup_kind_restores_into_an_empty_database_with_what_it_should_hold(env, scratch):
    migrated_with_rows(env)
    full, schema, data = backup(env, "full"), backup(env, "schema"), backup(env, "data")
    for result, kind in ((full, "full"), (schema, "schema"), (data, "data")):
        path = Path(result["path"])
        assert path.name.startswith(f"test_backup_{kind}_") and path.suffix == ".dump"
        manifest = json.loads(path.with_name(path.name + ".manifest.json").read_text())
        assert manifest["sha256"] == result["sha256"] and manifest["bytes"] == result["bytes"] == path.stat().st_size
        assert manifest["type"] == kind and manifest["format"] == "custom" and manifest["trigger"] == "manual"
        assert manifest["revision"] == "011" and manifest["verified"] is True
        assert manifest["server_version"].startswith("15") and manifest["pg_dump_version"].startswith("15")

    full_db = scratch("full")
    restore_raw(full["path"], full_db)
    assert count(db_url(full_db), "SELECT count(*) FROM users") == 2
    assert count(db_url(full_db), "SELECT count(*) FROM roles") == 3  # editor, viewer and 011's admin
    assert count(db_url(full_db), "SELECT count(*) FROM pg_tables WHERE schemaname = 'dbagent'") == 0  # never dumped

    schema_db = scratch("schema")
    restore_raw(schema["path"], schema_db)
    assert count(db_url(schema_db), "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 13
    assert count(db_url(schema_db), "SELECT count(*) FROM users") == 0
    assert count(db_url(schema_db), "SELECT count(*) FROM alembic_version") == 0

    toc = subprocess.run(["pg_restore", "--list", data["path"]], capture_output=True, text=True, check=True).stdout
    entries = [line for line in toc.splitlines() if line and not line.startswith(";")]
    assert entries and all(" TABLE DATA " in line or " SEQUENCE SET " in line for line in entries)  # no DDL
    restore_raw(data["path"], schema_db)  # into the schema-only copy
    assert count(db_url(schema_db), "SELECT count(*) FROM users") == 2
    assert count(db_url(schema_db), "SELECT version_num FROM alembic_version") == "011"


def test_restore_brings_back_a_row_deleted_after_the_backup(env, redis_client):
    migrated_with_rows(env)
    taken = backup(env)
    env.sql("DELETE FROM users WHERE email = 'a@example.com'")
    assert env.sql("SELECT count(*) FROM users")[0][0] == 1
    result = env.cli("restore", taken["path"], "--yes", "--json")
    assert result.code == 0, result.stderr
    assert env.sql("SELECT email FROM users ORDER BY 1") == [("a@example.com",), ("b@example.com",)]
    assert result.json()["revision_after"] == "011"
    types = [e["type"] for e in env.stream_events(redis_client, result.json()["command_id"])]
    assert types.index("restore.started") < types.index("restore.completed")
    # the audit trail survived the restore: dbagent's schema is never restored over
    assert env.sql("SELECT count(*) FROM dbagent.audit_log WHERE type = 'restore.completed'")[0][0] == 1


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("compression", [None, 0], ids=["compressed", "Z0"])
@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_backup_is_refused_and_the_database_is_untouched(env, how, compression):
    if compression is not None:
        env.extra_config = f"backup_compression = {compression}"
    migrated_with_rows(env)
    taken = backup(env)
    path = Path(taken["path"])
    manifest = json.loads(path.with_name(path.name + ".manifest.json").read_text())
    assert manifest["compression"] == compression
    env.sql("DELETE FROM users WHERE email = 'a@example.com'")
    _damage(path, how)
    result = env.cli("restore", str(path), "--yes", "--json")
    assert result.code == 1
    assert "checksum" in result.json()["error"] and taken["sha256"] in result.json()["error"]
    assert env.sql("SELECT email FROM users") == [("b@example.com",)]  # untouched
    verify = env.cli("backups", "verify", str(path), "--json")
    assert verify.code == 1 and "checksum" in verify.json()["error"]


@pytest.mark.parametrize("cut", ["half", "tail"])
def test_damage_the_checksum_cannot_see_fails_the_restore_in_its_one_transaction(env, cut):
    # The restore reads the archive once, itself: a damaged one fails it before it commits (issue 13). Cut in
    # half, its table of contents is unreadable and nothing starts; cut at the tail, its last data is missing
    # and the restore's one transaction rolls back.
    migrated_with_rows(env)
    taken = backup(env)
    path = Path(taken["path"])
    if cut == "half":
        _damage(path, "truncate")
    else:
        path.write_bytes(path.read_bytes()[:-64])
    # someone "repairs" the manifest: the checksum now matches, the archive is still broken
    import hashlib

    manifest_path = path.with_name(path.name + ".manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest["bytes"] = path.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    env.sql("DELETE FROM users")
    result = env.cli("restore", str(path), "--yes", "--json")
    error = result.json()["error"]
    assert result.code == 1 and "pg_restore" in error, error
    if cut == "tail":
        assert "pg_restore failed" in error and "nothing was changed" in error, error
    assert env.sql("SELECT count(*) FROM users")[0][0] == 0
    assert env.sql("SELECT count(*) FROM information_schema.tables WHERE table_name = 'users'")[0][0] == 1
    # a verification still reads it in full, and says so
    verify = env.cli("backups", "verify", str(path), "--json")
    assert verify.code == 1 and "does not read back" in verify.json()["error"]


def test_paths_outside_backup_dir_dotdot_and_symlinks_are_refused_with_exit_2(env, tmp_path):
    migrated_with_rows(env)
    taken = backup(env)
    outside = tmp_path / "elsewhere.dump"
    outside.write_bytes(Path(taken["path"]).read_bytes())
    backups = Path(taken["path"]).parent
    link = backups / "sneaky.dump"
    link.symlink_to(outside)
    for candidate in (str(outside), f"{backups}/../elsewhere.dump", "../elsewhere.dump", str(link), "/etc/passwd"):
        result = env.cli("restore", candidate, "--yes", "--json")
        assert result.code == 2, (candidate, result.stdout)
        assert "outside the backup directory" in result.json()["error"]


def test_restore_without_yes_off_a_terminal_is_refused(env):
    migrated_with_rows(env)
    taken = backup(env)
    result = env.cli("restore", taken["path"])
    assert result.code == 2 and "--yes" in result.stderr


def test_files_are_0600_in_a_0700_directory_under_umask_022(env):
    os.umask(0o022)
    migrated_with_rows(env)
    (env.tmp / "backups").chmod(0o755)
    taken = backup(env)
    path = Path(taken["path"])
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    for member in path.parent.iterdir():
        assert oct(member.stat().st_mode & 0o777) == "0o600", member


def test_backups_list_shows_complete_backups_newest_first(env):
    migrated_with_rows(env)
    first, second = backup(env, "full"), backup(env, "schema")
    Path(first["path"]).parent.joinpath(".partial-999999-leftover").write_bytes(b"half a dump")
    result = env.cli("backups", "list", "--json")
    assert result.code == 0
    listed = result.json()["backups"]
    assert [b["path"] for b in listed] == [second["path"], first["path"]]
    assert set(listed[0]) >= {"path", "type", "trigger", "bytes", "created", "revision", "verified"}
    status = env.cli("status", "--json").json()
    assert status["last_backups"]["full"]["path"] == first["path"]


def test_verify_drill_restores_into_a_scratch_database_and_compares_rows(env):
    migrated_with_rows(env)
    taken = backup(env)
    result = env.cli("backups", "verify", taken["path"], "--drill", "--json")
    assert result.code == 0, result.stderr
    drill = result.json()["backups"][0]["drill"]
    assert drill["status"] == "ok" and drill["tables"] == 13 and drill["rows"] >= 4
    with psycopg.connect(db_url("postgres")) as conn:
        leftovers = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (drill["database"],)).fetchone()[0]
    assert leftovers == 0


def test_migrate_takes_a_pre_migration_backup_first(env, redis_client):
    env.extra_config = "pre_migration_backup = true"
    env.start_worker()
    assert env.cli("migrate", "--to", "005", "--json").code == 0
    result = env.cli("migrate", "--json")
    assert result.code == 0, result.stderr
    body = result.json()
    assert body["backup"]["path"].endswith(".dump") and Path(body["backup"]["path"]).exists()
    manifest = json.loads(Path(body["backup"]["path"] + ".manifest.json").read_text())
    assert manifest["trigger"] == "pre-migration" and manifest["revision"] == "005"
    types = [e["type"] for e in env.stream_events(redis_client, body["command_id"])]
    assert types.index("backup.completed") < types.index("migration.started") < types.index("migration.step")
    skipped = env.cli("rollback", "1", "--json")
    assert skipped.code == 0
    again = env.cli("migrate", "--no-backup", "--json")
    assert again.code == 0 and again.json()["backup"] == "skipped: --no-backup"
    started = [e for e in env.stream_events(redis_client, again.json()["command_id"]) if e["type"] == "migration.started"]
    assert started[0]["data"]["backup"] == "skipped: --no-backup"


def test_a_failed_pre_migration_backup_stops_the_migration(env):
    env.extra_config = "pre_migration_backup = true"
    env.start_worker(PATH="/nonexistent")  # no pg_dump on the worker's PATH
    result = env.cli("migrate", "--json")
    assert result.code == 3 and "pg_dump" in result.json()["error"]
    assert env.revision() is None
    assert list((env.tmp / "backups").iterdir()) == []


def test_an_archive_from_a_newer_pg_dump_is_refused(env):
    migrated_with_rows(env)
    taken = backup(env)
    manifest_path = Path(taken["path"] + ".manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["pg_dump_version"] = "99.1"
    manifest_path.write_text(json.dumps(manifest))
    env.sql("DELETE FROM users")
    result = env.cli("restore", taken["path"], "--yes", "--json")
    assert result.code == 1 and "pg_dump 99.1" in result.json()["error"] and "cannot read it" in result.json()["error"]
    assert env.sql("SELECT count(*) FROM users")[0][0] == 0


def test_a_restore_that_hits_an_sql_error_exits_1_and_changes_nothing(env):
    migrated_with_rows(env)
    data = backup(env, "data")
    env.sql("DELETE FROM users WHERE email = 'a@example.com'")
    # restoring the data over rows that are still there: duplicate keys, so pg_restore fails
    result = env.cli("restore", data["path"], "--yes", "--json")
    assert result.code == 1 and "pg_restore failed" in result.json()["error"]
    assert env.sql("SELECT email FROM users") == [("b@example.com",)]  # single transaction: nothing half-restored


def test_directory_format_with_parallel_jobs(env):
    env.extra_config = "backup_jobs = 2"
    migrated_with_rows(env)
    taken = backup(env)
    path = Path(taken["path"])
    assert path.is_dir() and oct(path.stat().st_mode & 0o777) == "0o700"
    manifest = json.loads(Path(taken["path"] + ".manifest.json").read_text())
    assert manifest["format"] == "directory" and "toc.dat" in manifest["files"]
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in path.iterdir())
    env.sql("DELETE FROM users")
    result = env.cli("restore", taken["path"], "--yes", "--jobs", "2", "--json")
    assert result.code == 0, result.stderr
    assert env.sql("SELECT count(*) FROM users")[0][0] == 2
    member = next(p for p in path.iterdir() if p.name != "toc.dat")
    member.write_bytes(member.read_bytes() + b"x")
    damaged = env.cli("restore", taken["path"], "--yes", "--json")
    assert damaged.code == 1 and "checksum" in damaged.json()["error"]


def _age(path: str, days: float, trigger: str | None = None) -> None:
    from datetime import UTC, datetime, timedelta

    manifest_path = Path(path + ".manifest.json")
    manifest = json.loads(manifest_path.read_text())
    when = datetime.now(UTC) - timedelta(days=days)
    manifest["started"] = manifest["finished"] = when.isoformat()
    if trigger:
        manifest["trigger"] = trigger
    manifest_path.write_text(json.dumps(manifest))


def test_prune_applies_retention_and_dry_run_deletes_nothing(env, redis_client):
    migrated_with_rows(env)
    old = [backup(env)["path"] for _ in range(3)]
    newest = backup(env)["path"]
    for number, path in enumerate(old):
        _age(path, 40 + number, trigger="pre-migration")
    _age(newest, 35, trigger="pre-migration")
    scheduled = backup(env)["path"]
    _age(scheduled, 1, trigger="schedule")

    dry = env.cli("backups", "prune", "--dry-run", "--json")
    assert dry.code == 0
    body = dry.json()
    assert body["dry_run"] is True and body["would_delete"] == 4 and body["deleted"] == 0
    assert all(Path(p).exists() for p in [*old, newest, scheduled])
    reasons = {d["path"]: d for d in body["decisions"]}
    assert reasons[scheduled]["keep"] and any("daily" in r for r in reasons[scheduled]["reasons"])
    assert not reasons[old[0]]["keep"] and "pre-migration" in reasons[old[0]]["reasons"][0]

    real = env.cli("backups", "prune", "--json")
    assert real.code == 0 and real.json()["deleted"] == 4
    assert not any(Path(p).exists() or Path(p + ".manifest.json").exists() for p in [*old, newest])
    assert Path(scheduled).exists()
    human = env.cli("backups", "prune", "--dry-run")
    assert "keep" in human.stdout and "0 to delete" in human.stdout
    pruned = [e for e in env.stream_events(redis_client) if e["type"] == "prune.completed"]
    assert len(pruned) == 1 and pruned[0]["data"]["deleted"] == 4


def test_prune_never_deletes_the_newest_verified_backup(env):
    migrated_with_rows(env)
    only = backup(env)["path"]
    _age(only, 400, trigger="pre-migration")
    result = env.cli("backups", "prune", "--json")
    assert result.code == 0 and result.json()["deleted"] == 0 and Path(only).exists()
    assert any("newest verified" in r for r in result.json()["decisions"][0]["reasons"])
