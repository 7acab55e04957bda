"""Verification after a migrate and in `dbagent verify`, through a real worker on real PostgreSQL and Redis."""

from __future__ import annotations

import psycopg
import pytest

from dbagent.core.events import Event
from dbagent.core.rollback import plan_rollback
from dbagent.postgres.verify import CHECK_NAMES, NO_RUN
from tests.servers import copy_migrations, script

pytestmark = pytest.mark.integration




def checks_of(body: dict) -> dict[str, dict]:
    checks = body["verify"]["checks"]
    assert [c["name"] for c in checks] == list(CHECK_NAMES)
    return {c["name"]: c for c in checks}


def failed_names(checks: dict[str, dict]) -> set[str]:
    return {name for name, c in checks.items() if not c["ok"]}


def verify_events(result, type_: str) -> list[dict]:
    return [e for e in result.event_lines() if e["type"] == type_]


def test_a_health_check_failing_after_the_run_fails_migrate_and_names_the_query(env, redis_client):
    wildcard_absent = "select not exists (select 1 from permissions where name = '*')"
    env.extra_config = (
        "pre_migration_backup = true\n"
        f'health_checks = ["select true", "{wildcard_absent}", "select count(*) > 0 from no_such_table"]\n'
    )
    env.start_worker()
    run = env.cli("migrate", "--json")
    assert run.code == 1, run.stderr
    body = run.json()
    assert body["status"] == "failed" and body["revision_after"] == "011"
    checks = checks_of(body)
    assert failed_names(checks) == {"health_checks"}
    detail = checks["health_checks"]["detail"]
    assert detail.startswith("2 of 3 failed")
    assert f"[2] {wildcard_absent}: returned false" in detail
    assert '[3] select count(*) > 0 from no_such_table: failed: relation "no_such_table" does not exist' in detail
    assert "[1]" not in detail
    assert wildcard_absent in body["error"]

    # the event an agent consumes says which run to undo, from where, and with which backup
    failed = verify_events(run, "verify.failed")
    assert len(failed) == 1 and not verify_events(run, "verify.completed")
    data = failed[0]["data"]
    assert data["run_command_id"] == body["command_id"] and data["revision_before"] is None
    assert data["backup"]["path"] == body["backup"]["path"] and data["backup"]["sha256"]
    assert [c["name"] for c in data["checks"]] == list(CHECK_NAMES)
    assert {c["name"]: c["ok"] for c in data["checks"]} == {n: n != "health_checks" for n in CHECK_NAMES}
    stream = [e for e in env.stream_events(redis_client, body["command_id"]) if e["type"] == "verify.failed"]
    plan = plan_rollback(Event(**stream[0]))
    assert plan is not None and plan.target is None and plan.cause["backup"] == body["backup"]["path"]

    # a standalone verify says the same, and names no run to roll back
    alone = env.cli("verify", "--json")
    assert alone.code == 1
    checks = checks_of(alone.json())
    assert failed_names(checks) == {"health_checks"} and wildcard_absent in checks["health_checks"]["detail"]
    event = verify_events(alone, "verify.failed")[0]["data"]
    assert "run_command_id" not in event and "revision_before" not in event


def test_a_constraint_left_not_valid_by_the_run_fails_but_one_from_before_does_not(env, tmp_path):
    orders = script(
        "012", "011", "Orders, with a foreign key added NOT VALID and left so.",
        [
            "CREATE TABLE orders (id serial PRIMARY KEY, user_id uuid)",
            "ALTER TABLE orders ADD CONSTRAINT fk_orders_user_id_users FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID",
        ],
        ["DROP TABLE orders"],
    )
    env.migrations = copy_migrations(tmp_path, {"012_orders.py": orders})
    env.start_worker()
    first = env.cli("migrate", "--to", "011", "--json")
    assert first.code == 0, first.stdout
    env.sql("ALTER TABLE users ADD CONSTRAINT ck_users_email_nonempty CHECK (email <> '') NOT VALID")

    run = env.cli("migrate", "--json")
    assert run.code == 1, run.stderr
    checks = checks_of(run.json())
    assert failed_names(checks) == {"not_valid_constraints"}
    detail = checks["not_valid_constraints"]["detail"]
    assert detail == "left NOT VALID by the run: public.orders.fk_orders_user_id_users"
    assert checks["fk_orphans"]["detail"].startswith("no orphans for the 1 foreign key on or to the 1 table")
    assert verify_events(run, "verify.failed")[0]["data"]["revision_before"] == "011"

    # without a run to compare with, every NOT VALID constraint is named
    alone = env.cli("verify", "--json")
    assert alone.code == 1
    checks = checks_of(alone.json())
    assert failed_names(checks) == {"not_valid_constraints"}
    assert checks["not_valid_constraints"]["detail"] == (
        "NOT VALID constraints: public.orders.fk_orders_user_id_users, public.users.ck_users_email_nonempty"
    )
    assert checks["fk_orphans"] == {"name": "fk_orphans", "ok": True, "detail": NO_RUN}


def test_an_orphan_in_a_touched_table_fails_fk_orphans_naming_the_constraint(env, tmp_path):
    # A two-column key, and names that need quoting.
    grants = script(
        "012", "011", "A grant log referencing user_roles, with an orphan slipped in.",
        [
            'CREATE TABLE "GrantLog" (id serial PRIMARY KEY, user_id uuid, role_id uuid,'
            ' CONSTRAINT "fk_GrantLog_user_roles" FOREIGN KEY (user_id, role_id) REFERENCES user_roles (user_id, role_id))',
            "SET session_replication_role = replica",
            'INSERT INTO "GrantLog" (user_id, role_id) VALUES (gen_random_uuid(), gen_random_uuid())',
            "SET session_replication_role = DEFAULT",
            # NULL in a column of the key: exempt (MATCH SIMPLE), not an orphan
            'INSERT INTO "GrantLog" (user_id, role_id) VALUES (gen_random_uuid(), NULL)',
        ],
        ['DROP TABLE "GrantLog"'],
    )
    env.migrations = copy_migrations(tmp_path, {"012_grant_log.py": grants})
    env.start_worker()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    # An orphan in a table the run does not touch is outside the run's scan.
    with psycopg.connect(env.url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO user_sessions (user_id, token_hash) VALUES (gen_random_uuid(), 'x')")

    run = env.cli("migrate", "--json")
    assert run.code == 1, run.stderr
    checks = checks_of(run.json())
    assert failed_names(checks) == {"fk_orphans"}
    detail = checks["fk_orphans"]["detail"]
    assert detail == (
        'orphan rows for public."GrantLog"."fk_GrantLog_user_roles"'
        ' (public."GrantLog"(user_id, role_id) → public.user_roles(user_id, role_id))'
    )
    assert "user_sessions" not in detail
    assert "fk_GrantLog_user_roles" in run.json()["error"]


def test_rows_deleted_from_a_critical_table_fail_critical_tables_with_both_counts(env, tmp_path):
    purge = script(
        "012", "011", "Purge two roles.",
        ["DELETE FROM roles WHERE name IN ('temp-a', 'temp-b')"],
        [],
    )
    env.migrations = copy_migrations(tmp_path, {"012_purge_roles.py": purge})
    env.extra_config = 'critical_tables = ["roles", "public.permissions"]\n'
    env.start_worker()
    first = env.cli("migrate", "--to", "011", "--json")
    assert first.code == 0, first.stdout
    assert checks_of(first.json())["critical_tables"]["detail"] == (
        "row counts kept: roles new, 1 row, public.permissions new, 1 row"
    )
    env.sql("INSERT INTO roles (name) VALUES ('temp-a'), ('temp-b'), ('temp-c')")

    run = env.cli("migrate", "--json")
    assert run.code == 1, run.stderr
    checks = checks_of(run.json())
    assert failed_names(checks) == {"critical_tables"}
    assert checks["critical_tables"]["detail"] == "roles lost rows: 4 before the run, 2 after"
    assert env.sql("SELECT count(*) FROM roles")[0][0] == 2
    # a data-only run touches no table's definition: nothing to scan for orphans
    assert checks["fk_orphans"]["detail"] == "no table was touched by the run"


def test_a_health_check_over_its_timeout_fails_quickly(env):
    env.extra_config = (
        'health_checks = ["select true from pg_sleep(60)"]\n'
        'health_check_timeout = "1s"\n'
        'critical_tables = ["users"]\n'
    )
    env.start_worker()
    run = env.cli("migrate", "--json")
    assert run.code == 1, run.stderr
    checks = checks_of(run.json())
    assert failed_names(checks) == {"health_checks"}
    expected = "1 of 1 failed: [1] select true from pg_sleep(60): timed out after 1s (health_check_timeout)"
    assert checks["health_checks"]["detail"] == expected
    # the check after the timed-out one ran normally on the same connection
    assert checks["critical_tables"] == {"name": "critical_tables", "ok": True, "detail": "row counts kept: users new, 0 rows"}

    alone = env.cli("verify", "--json")
    assert alone.code == 1
    assert alone.seconds < 10, f"verify took {alone.seconds:.1f}s"
    assert checks_of(alone.json())["health_checks"]["detail"] == expected
    assert run.seconds < 10, f"migrate took {run.seconds:.1f}s"


def test_a_clean_run_passes_every_check(env, tmp_path, redis_client):
    nickname = script(
        "012", "011", "Add users.nickname.",
        ["ALTER TABLE users ADD COLUMN nickname text"],
        ["ALTER TABLE users DROP COLUMN nickname"],
    )
    env.migrations = copy_migrations(tmp_path, {"012_nickname.py": nickname})
    env.extra_config = (
        'health_checks = ["select count(*) >= 0 from users", "select exists (select 1 from permissions where name = \'*\')"]\n'
        'critical_tables = ["users", "roles"]\n'
    )
    env.start_worker()
    first = env.cli("migrate", "--to", "011", "--json")
    assert first.code == 0, first.stdout
    body = first.json()
    checks = checks_of(body)
    assert failed_names(checks) == set()
    assert checks["revision"]["detail"] == "at 011, as expected"
    assert checks["invalid_indexes"]["detail"] == "no invalid indexes"
    assert checks["not_valid_constraints"]["detail"] == "no NOT VALID constraint left by the run"
    # every table is new (the twelve of the schema and alembic_version): all ten foreign keys scanned
    assert checks["fk_orphans"]["detail"] == "no orphans for the 10 foreign keys on or to the 13 tables the run touched"
    assert checks["health_checks"]["detail"] == "all 2 returned true"
    assert checks["critical_tables"]["detail"] == "row counts kept: users new, 0 rows, roles new, 1 row"

    completed = verify_events(first, "verify.completed")
    assert len(completed) == 1
    data = completed[0]["data"]
    assert data["run_command_id"] == body["command_id"] and data["revision_before"] is None
    assert data["backup"] == body["backup"] == "skipped: pre_migration_backup is off for this database"
    assert data["checks"] == body["verify"]["checks"]

    env.sql("INSERT INTO users (email, password_hash) VALUES ('a@example.com', 'x'), ('b@example.com', 'y')")
    second = env.cli("migrate", "--json")
    assert second.code == 0, second.stdout
    checks = checks_of(second.json())
    assert failed_names(checks) == set()
    # only users changed: the foreign keys referencing it are the ones scanned
    assert checks["fk_orphans"]["detail"] == "no orphans for the 6 foreign keys on or to the 1 table the run touched"
    assert checks["critical_tables"]["detail"] == "row counts kept: users 2 → 2, roles 1 → 1"
    assert verify_events(second, "verify.completed")[0]["data"]["revision_before"] == "011"

    alone = env.cli("verify", "--json")
    assert alone.code == 0, alone.stdout
    checks = checks_of(alone.json())
    assert failed_names(checks) == set()
    assert checks["fk_orphans"]["detail"] == checks["critical_tables"]["detail"] == NO_RUN
    assert checks["not_valid_constraints"]["detail"] == "no NOT VALID constraints"


def test_an_orphan_scan_over_fk_check_timeout_fails_saying_it_could_not_finish(env, tmp_path):
    big = script(
        "012", "011", "A big child table and its foreign key.",
        [
            "CREATE TABLE big_parent (id int PRIMARY KEY)",
            "INSERT INTO big_parent SELECT g FROM generate_series(1, 200000) AS g",
            "CREATE TABLE big_child (parent_id int)",
            "INSERT INTO big_child SELECT g FROM generate_series(1, 200000) AS g",
            "ALTER TABLE big_child ADD CONSTRAINT fk_big_child_parent_id FOREIGN KEY (parent_id) REFERENCES big_parent (id)",
        ],
        ["DROP TABLE big_child", "DROP TABLE big_parent"],
    )
    env.migrations = copy_migrations(tmp_path, {"012_big.py": big})
    env.start_worker()
    assert env.cli("migrate", "--to", "011", "--json").code == 0
    # only the run under test gets 1 ms: the set-up's own scan (of small tables) may take longer on a busy machine
    env.stop_workers()
    env.extra_config = 'fk_check_timeout = "1ms"\n'
    env.start_worker()
    run = env.cli("migrate", "--json")
    assert run.code == 1, run.stderr
    checks = checks_of(run.json())
    assert failed_names(checks) == {"fk_orphans"}
    assert checks["fk_orphans"]["detail"] == (
        "could not finish scanning public.big_child.fk_big_child_parent_id within 1ms (fk_check_timeout)"
    )
