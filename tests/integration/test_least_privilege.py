"""dbagent as a production install runs it: a non-superuser migration role owning the database, the agent running.

The roles and the database come from docs/least-privilege.md's own SQL
(``least_privilege_env``); every dbagent process connects as the migration role.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.faults.test_faults import wait_for
from tests.servers import copy_migrations, script

pytestmark = pytest.mark.integration

GOOD_012 = script("012", "011", "Add a nickname to users.",
                  ["ALTER TABLE users ADD COLUMN nickname text"], ["ALTER TABLE users DROP COLUMN nickname"])


def agent_staging_table(env) -> bool:
    """The agent's audit sink holds its session-private staging table (audit_in) in this database."""
    return bool(env.admin_sql(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relname = 'audit_in' AND c.relpersistence = 't' AND n.nspname LIKE 'pg_temp_%'"
    )[0][0])


def running_as_the_role(env, redis_client) -> None:
    """Worker and agent up, and the agent's temporary table there: the state every backup below meets."""
    env.start_worker()
    env.start_agent()
    status = env.cli("status", "--json")
    assert status.code == 0, status.stdout + status.stderr
    wait_for(lambda: agent_staging_table(env), 60, "the agent's audit sink to stage a batch")


def manifest_of(path: str) -> dict:
    return json.loads(Path(path + ".manifest.json").read_text())


def event(env, redis_client, command_id: str, kind: str) -> dict:
    [found] = [e for e in env.stream_events(redis_client, command_id) if e["type"] == kind]
    return found


def test_the_role_of_the_doc_is_no_superuser_and_owns_the_database(least_privilege_env):
    env = least_privilege_env
    assert env.admin_sql("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = %s", env.role) == [
        (False, False, False)
    ]
    assert env.admin_sql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", env.name) == [(env.role,)]
    assert env.sql("SELECT current_user")[0][0] == env.role


def test_migrate_with_its_pre_migration_backup_as_the_migration_role_with_the_agent_running(least_privilege_env, redis_client):
    env = least_privilege_env
    env.extra_config += "\npre_migration_backup = true"
    running_as_the_role(env, redis_client)
    run = env.cli("migrate", "--json")
    assert run.code == 0, run.stdout + run.stderr
    body = run.json()
    assert body["status"] == "succeeded" and body["revision_after"] == "011"
    completed = event(env, redis_client, body["command_id"], "backup.completed")
    assert completed["data"]["trigger"] == "pre-migration"
    manifest = manifest_of(completed["data"]["path"])
    # the agent's temporary table is another session's: neither counted nor reported
    assert manifest["skipped"] == [] and not any("audit_in" in t for t in manifest["tables"])
    assert env.revision() == "011"
    # the tables belong to the role, and the application's role may use them, by default privileges
    assert env.admin_sql("SELECT tableowner FROM pg_tables WHERE tablename = 'users'") == [(env.role,)]
    assert env.admin_sql("SELECT has_table_privilege(%s, 'public.users', 'INSERT'),"
                         " has_table_privilege(%s, 'public.users', 'TRUNCATE')", env.app_role, env.app_role) == [(True, False)]
    # the agent wrote the run's events into dbagent.audit_log
    wait_for(lambda: env.sql("SELECT count(*) FROM dbagent.audit_log WHERE command_id = %s AND type = 'migration.completed'",
                             body["command_id"])[0][0], 60, "the audit sink")


def test_backup_full_schema_and_data_as_the_migration_role_with_the_agent_running(least_privilege_env, redis_client):
    env = least_privilege_env
    running_as_the_role(env, redis_client)
    assert env.cli("migrate", "--json").code == 0
    env.sql("INSERT INTO users (email, password_hash) VALUES ('a@example.com', 'x'), ('b@example.com', 'y')")
    for kind in ("full", "schema", "data"):
        result = env.cli("backup", kind, "--json")
        assert result.code == 0, result.stdout + result.stderr
        manifest = manifest_of(result.json()["path"])
        assert manifest["type"] == kind and manifest["verified"] is True and manifest["skipped"] == []
        # the application's tables and alembic_version, not the agent's audit_in
        assert manifest["table_count"] == env.admin_sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")[0][0] == 13
        if kind == "schema":
            assert manifest["tables"] is None
        else:
            assert manifest["tables"]["public.users"] == 2
        completed = event(env, redis_client, result.json()["command_id"], "backup.completed")
        assert completed["data"]["skipped"] == []


def test_restore_as_the_migration_role_brings_back_what_the_backup_holds(least_privilege_env, redis_client):
    env = least_privilege_env
    running_as_the_role(env, redis_client)
    assert env.cli("migrate", "--json").code == 0
    env.sql("INSERT INTO users (email, password_hash) VALUES ('a@example.com', 'x'), ('b@example.com', 'y')")
    taken = env.cli("backup", "full", "--json")
    assert taken.code == 0, taken.stdout + taken.stderr
    env.sql("DELETE FROM users WHERE email = 'a@example.com'")
    result = env.cli("restore", taken.json()["path"], "--yes", "--json")
    assert result.code == 0, result.stdout + result.stderr
    assert result.json()["revision_after"] == "011"
    assert env.sql("SELECT email FROM users ORDER BY 1") == [("a@example.com",), ("b@example.com",)]
    # what the restore recreated is still the role's, and still the application's to use
    assert env.admin_sql("SELECT tableowner FROM pg_tables WHERE tablename = 'users'") == [(env.role,)]
    assert env.admin_sql("SELECT has_table_privilege(%s, 'public.users', 'SELECT')", env.app_role) == [(True,)]
    assert result.json()["skipped"] == []


def a_table_the_role_cannot_read(env, schema: str = "public") -> str:
    """Created by the superuser where the role can look (USAGE), with nothing granted to the role."""
    if schema != "public":
        env.admin_sql(f"CREATE SCHEMA {schema}")
        env.admin_sql(f"GRANT USAGE ON SCHEMA {schema} TO {env.role}")
    env.admin_sql(f"CREATE TABLE {schema}.payroll (id serial PRIMARY KEY, salary int)")
    env.admin_sql(f"INSERT INTO {schema}.payroll (salary) VALUES (100), (200)")
    env.admin_sql(f"REVOKE ALL ON {schema}.payroll FROM PUBLIC, {env.role}")
    return f"{schema}.payroll"


@pytest.mark.parametrize("schema", ["public", "vault"])
def test_a_table_the_role_cannot_read_is_left_out_of_backups_and_said_so(least_privilege_env, redis_client, schema):
    env = least_privilege_env
    running_as_the_role(env, redis_client)
    assert env.cli("migrate", "--json").code == 0
    table = a_table_the_role_cannot_read(env, schema)
    env.sql("INSERT INTO users (email, password_hash) VALUES ('a@example.com', 'x')")
    reason = f"not readable by {env.role}: no SELECT on the table"
    for kind in ("full", "schema", "data"):
        result = env.cli("backup", kind, "--json")
        assert result.code == 0, result.stdout + result.stderr
        body = result.json()
        # the table and its sequence, which the role cannot read either
        expected = [{"table": table, "reason": reason},
                    {"table": f"{table}_id_seq", "reason": f"not readable by {env.role}: no SELECT on the sequence"}]
        assert body["skipped"] == expected
        manifest = manifest_of(body["path"])
        assert manifest["skipped"] == expected and table not in (manifest["tables"] or {})
        if kind != "schema":
            assert manifest["tables"]["public.users"] == 1
        assert event(env, redis_client, body["command_id"], "backup.completed")["data"]["skipped"] == expected
        toc = subprocess.run(["pg_restore", "--list", body["path"]], capture_output=True, text=True, check=True).stdout
        assert " payroll " not in toc
    # a person at a terminal is told
    human = env.cli("backup", "full")
    assert human.code == 0
    assert f"warning: {table} not in this backup: {reason}" in human.stderr
    assert "skipped 2" in human.stderr  # the backup.completed line


def test_a_restore_leaves_what_others_own_as_it_is(least_privilege_env, redis_client):
    env = least_privilege_env
    running_as_the_role(env, redis_client)
    assert env.cli("migrate", "--json").code == 0
    env.sql("INSERT INTO users (email, password_hash) VALUES ('a@example.com', 'x')")
    a_table_the_role_cannot_read(env, "vault")
    # readable, hence in the backup, but the superuser's: the role could not drop and recreate it
    env.admin_sql("CREATE TABLE vault.rates (code text PRIMARY KEY)")
    env.admin_sql("INSERT INTO vault.rates VALUES ('eur')")
    env.admin_sql(f"GRANT SELECT ON vault.rates TO {env.role}")
    taken = env.cli("backup", "full", "--json")
    assert taken.code == 0, taken.stdout + taken.stderr
    assert [s["table"] for s in taken.json()["skipped"]] == ["vault.payroll", "vault.payroll_id_seq"]
    env.sql("DELETE FROM users")
    env.admin_sql("INSERT INTO vault.rates VALUES ('usd')")
    result = env.cli("restore", taken.json()["path"], "--yes", "--json")
    assert result.code == 0, result.stdout + result.stderr
    assert env.sql("SELECT email FROM users") == [("a@example.com",)]
    left = {s["table"] for s in result.json()["skipped"]}
    assert {"SCHEMA vault", "TABLE vault.rates", "TABLE DATA vault.rates"} <= left
    assert all(s["reason"] == "owned by postgres: left as it is" for s in result.json()["skipped"])
    assert env.admin_sql("SELECT code FROM vault.rates ORDER BY 1") == [("eur",), ("usd",)]  # as it was
    assert env.admin_sql("SELECT count(*) FROM vault.payroll") == [(2,)]
    assert event(env, redis_client, result.json()["command_id"], "restore.completed")["data"]["skipped"] == result.json()["skipped"]
    human = env.cli("restore", taken.json()["path"], "--yes")
    assert human.code == 0 and "warning: SCHEMA vault not restored: owned by postgres" in human.stderr


def test_verify_and_a_drill_as_the_migration_role(least_privilege_env, redis_client):
    env = least_privilege_env
    running_as_the_role(env, redis_client)
    assert env.cli("migrate", "--json").code == 0
    a_table_the_role_cannot_read(env)
    verify = env.cli("verify", "--json")
    assert verify.code == 0, verify.stdout + verify.stderr
    assert verify.json()["status"] == "succeeded"
    taken = env.cli("backup", "full", "--json")
    assert taken.code == 0, taken.stdout + taken.stderr
    # without CREATEDB the drill stops, saying why, and touches nothing
    refused = env.cli("backups", "verify", "--drill", "--json")
    assert refused.code == 3 and "CREATEDB" in refused.json()["error"]
    env.admin_sql(f"ALTER ROLE {env.role} CREATEDB")  # as docs/least-privilege.md says, for drills and rehearsals
    drill = env.cli("backups", "verify", "--drill", "--json")
    assert drill.code == 0, drill.stdout + drill.stderr
    [report] = drill.json()["backups"]
    assert report["drill"]["status"] == "ok" and report["drill"]["tables"] == 13  # the skipped table is not missed


def test_rehearse_as_the_migration_role(least_privilege_env, redis_client, tmp_path):
    env = least_privilege_env
    env.migrations = copy_migrations(tmp_path, {"012_add_nickname.py": GOOD_012})
    env.admin_sql(f"ALTER ROLE {env.role} CREATEDB")
    running_as_the_role(env, redis_client)
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    assert env.cli("backup", "schema", "--json").code == 0  # the rehearsal starts from it
    result = env.cli("validate", "--rehearse", "--json", timeout=300)
    assert result.code == 0, result.stdout + result.stderr
    rehearsal = json.loads(result.stdout)["rehearsal"]
    assert rehearsal["status"] == "passed" and rehearsal["revision_from"] == "011"
    assert [(s["revision"], s["status"]) for s in rehearsal["steps"]] == [("012", "ok")]
    assert env.admin_sql("SELECT count(*) FROM pg_database WHERE datname = %s", rehearsal["database"]) == [(0,)]


def test_env_validate_passes_for_the_roles_of_the_doc(least_privilege_env, redis_client):
    env = least_privilege_env
    running_as_the_role(env, redis_client)
    assert env.cli("migrate", "--json").code == 0
    result = env.cli("env", "validate", "--json")
    assert result.code == 0, result.stdout + result.stderr
    checks = {c["name"]: (c["status"], c["detail"]) for c in json.loads(result.stdout)["checks"]}
    for name in ("postgres", "migration_user", "app_user", "privileges", "schema_owner", "dbagent_schema", "temporary",
                 "readable"):
        assert checks[name][0] == "ok", (name, checks[name])
    assert checks["privileges"][1] == f"{env.role} is not a superuser"
    assert "public (owner)" in checks["schema_owner"][1]
    assert checks["createdb"][0] == "warn" and "--rehearse" in checks["createdb"][1]
    human = env.cli("env", "validate")
    assert human.code == 0 and "warn createdb" in human.stdout


# -- each role check, on what a misconfigured install has -------------------------------------------


def validate_in_process(env, app_user: str | None = None) -> dict[str, tuple[str, str]]:
    from dbagent.checks.envcheck import check_postgres
    from dbagent.settings import DatabaseSettings

    db = DatabaseSettings(url=env.url, app_user=app_user or env.app_role)
    checks, _ = check_postgres("test", db)
    return {c.name: (c.status, c.detail) for c in checks}


def test_env_validate_fails_an_application_role_that_is_the_migration_role_or_a_member_of_it(least_privilege_env):
    env = least_privilege_env
    assert validate_in_process(env)["app_user"][0] == "ok"
    same = validate_in_process(env, app_user=env.role)
    assert same["migration_user"][0] == "fail" and "app_user" not in same
    env.admin_sql(f"GRANT {env.role} TO {env.app_role}")
    member = validate_in_process(env)["app_user"]
    assert member[0] == "fail" and f"is a member of {env.role}" in member[1]
    env.admin_sql(f"REVOKE {env.role} FROM {env.app_role}")
    env.admin_sql(f"DROP OWNED BY {env.app_role}")  # its grants in this database
    env.admin_sql(f"DROP ROLE {env.app_role}")
    missing = validate_in_process(env)["app_user"]
    assert missing[0] == "warn" and "does not exist" in missing[1]


def test_env_validate_names_the_tables_the_role_cannot_read(least_privilege_env):
    env = least_privilege_env
    table = a_table_the_role_cannot_read(env)
    status, detail = validate_in_process(env)["readable"]
    assert status == "warn" and f"{table} (no SELECT on the table)" in detail and "backups leave them out" in detail


def test_env_validate_fails_a_schema_the_role_cannot_create_in_and_warns_of_tables_others_own(least_privilege_env):
    env = least_privilege_env
    env.admin_sql("CREATE TABLE public.legacy (id int)")  # the superuser's, in the role's schema
    status, detail = validate_in_process(env)["schema_owner"]
    assert status == "warn" and "other roles own public.legacy" in detail
    env.admin_sql("CREATE SCHEMA billing")  # the superuser's; the role may look in it, not create there
    env.admin_sql(f"GRANT USAGE ON SCHEMA billing TO {env.role}")
    env.admin_sql("CREATE TABLE billing.invoices (id int)")
    status, detail = validate_in_process(env)["schema_owner"]
    assert status == "fail" and "schema(s) billing" in detail


def test_env_validate_checks_the_dbagent_schema_and_the_right_to_create_it(least_privilege_env):
    env = least_privilege_env
    fresh = validate_in_process(env)["dbagent_schema"]
    assert fresh[0] == "ok" and "may CREATE it" in fresh[1]
    env.admin_sql(f"ALTER DATABASE {env.name} OWNER TO postgres")
    env.admin_sql(f"GRANT CONNECT ON DATABASE {env.name} TO {env.role}")
    closed = validate_in_process(env)
    assert closed["dbagent_schema"][0] == "fail" and "may not CREATE" in closed["dbagent_schema"][1]
    assert closed["temporary"][0] == "fail" and "GRANT TEMPORARY" in closed["temporary"][1]
    env.admin_sql("CREATE SCHEMA dbagent")  # someone else's, not granted
    foreign = validate_in_process(env)["dbagent_schema"]
    assert foreign[0] == "fail" and "may not use schema dbagent" in foreign[1]
    env.admin_sql(f"ALTER SCHEMA dbagent OWNER TO {env.role}")
    env.admin_sql("CREATE TABLE dbagent.commands (id text)")
    taken = validate_in_process(env)["dbagent_schema"]
    assert taken[0] == "fail" and "dbagent.commands belong to another role" in taken[1]
    env.admin_sql(f"ALTER TABLE dbagent.commands OWNER TO {env.role}")
    assert validate_in_process(env)["dbagent_schema"][0] == "ok"


def test_env_validate_warns_of_a_superuser(env):
    checks = validate_in_process(env)
    assert checks["privileges"][0] == "warn" and "superuser" in checks["privileges"][1]
    assert checks["createdb"][0] == "ok" and checks["readable"][0] == "ok"


def test_a_migrates_result_names_what_its_pre_migration_backup_left_out(least_privilege_env, redis_client):
    env = least_privilege_env
    env.extra_config += "\npre_migration_backup = true"
    running_as_the_role(env, redis_client)
    assert env.cli("migrate", "--to", "010", "--json").code == 0
    table = a_table_the_role_cannot_read(env)
    run = env.cli("migrate", "--json")
    assert run.code == 0, run.stdout + run.stderr
    backup = run.json()["backup"]
    assert isinstance(backup, dict), run.json()
    assert {"table": table, "reason": f"not readable by {env.role}: no SELECT on the table"} in backup["skipped"]


def test_a_user_project_in_one_transaction_migrates_fails_whole_and_rolls_back_as_the_migration_role(
        least_privilege_env, redis_client, tmp_path):
    """An Alembic project made by Alembic's own commands (env.py leaves transaction_per_migration off), run by the
    role of the doc with the agent on: the whole plan applies, a failing one undoes itself whole, a rollback works."""
    import shutil

    from tests.alembic_projects import FIXTURE, add_revision

    env = least_privilege_env
    env.migrations = tmp_path / "fixture"
    shutil.copytree(FIXTURE, env.migrations)
    env.start_worker()
    env.start_agent()
    run = env.cli("migrate", "--json")
    assert run.code == 0, run.stdout + run.stderr
    head = run.json()["revision_after"]
    assert env.admin_sql("SELECT tableowner FROM pg_tables WHERE tablename = 'task_comments'") == [(env.role,)]
    add_revision(env.migrations, "create doomed", 'op.execute("CREATE TABLE doomed (id int)")', 'op.execute("DROP TABLE doomed")')
    add_revision(env.migrations, "fails", 'op.execute("SELECT 1/0")', "pass")
    failed = env.cli("migrate", "--json")
    assert failed.code == 1 and failed.json()["revision_after"] == head, failed.stdout + failed.stderr
    assert env.admin_sql("SELECT to_regclass('public.doomed')") == [(None,)]
    back = env.cli("rollback", "2", "--json")
    assert back.code == 0, back.stdout + back.stderr
    assert back.json()["revision_before"] == head and back.json()["revision_after"] != head
    wait_for(lambda: env.sql("SELECT count(*) FROM dbagent.audit_log WHERE command_id = %s AND type = 'rollback.completed'",
                             back.json()["command_id"])[0][0], 60, "the audit sink")


def test_a_schema_4_install_gets_the_audit_indexes_as_the_migration_role(least_privilege_env, redis_client):
    # An install from before schema 5: its dbagent schema was made by the migration role, without the audit
    # log's reader indexes. The worker, as that role, brings it up to date before its first command.
    world = least_privilege_env
    world.start_worker()
    assert world.cli("status", "--json").code == 0
    world.stop_workers()
    world.sql("DROP INDEX dbagent.audit_log_ts, dbagent.audit_log_command_ts, dbagent.audit_log_completed_runs")
    world.sql("CREATE INDEX audit_log_command ON dbagent.audit_log (command_id)")
    world.sql("COMMENT ON SCHEMA dbagent IS 'dbagent schema 4'")

    world.start_worker()
    assert world.cli("migrate", "--to", "002", "--json").code == 0

    indexes = {r[0] for r in world.sql("SELECT indexname FROM pg_indexes WHERE schemaname = 'dbagent' AND tablename = 'audit_log'")}
    assert {"audit_log_ts", "audit_log_command_ts", "audit_log_completed_runs"} <= indexes
    assert "audit_log_command" not in indexes
    assert world.sql("SELECT obj_description('dbagent'::regnamespace)")[0][0] == "dbagent schema 5"
    assert world.sql("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")[0][0] is False
