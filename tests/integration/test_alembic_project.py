"""A team's own Alembic project, made with Alembic's own commands: hash ids, its alembic.ini, its env.py and
version table (real PostgreSQL, a real worker)."""

from __future__ import annotations

import shutil

import pytest

from tests.alembic_projects import FIXTURE, linear_project
from tests.servers import MIGRATIONS

pytestmark = pytest.mark.integration


def test_validate_detects_alembic_naming_and_a_sound_project_with_hash_ids_passes(env, tmp_path):
    env.migrations = tmp_path / "project"
    linear_project(env.migrations)
    result = env.cli("validate", "--json")
    assert result.code == 0, result.stdout + result.stderr
    body = result.json()
    assert body["status"] == "passed" and body["naming"] == "alembic" and body["naming_detected"] is True
    assert [f for f in body["findings"] if f["severity"] == "error"] == []
    assert "naming: alembic (detected)" in env.cli("validate").stdout


def test_the_branched_and_merged_fixture_validates_clean_and_the_shipped_migrations_as_sequential(env, tmp_path):
    env.migrations = tmp_path / "fixture"
    shutil.copytree(FIXTURE, env.migrations)
    body = env.cli("validate", "--json").json()
    assert body["naming"] == "alembic", body
    assert [f for f in body["findings"] if f["severity"] == "error"] == [], body["findings"]
    # The lint read the scripts (rendered offline with the project's env.py): its one data change is reported.
    assert {f["rule"] for f in body["findings"]} == {"data-change"}

    env.migrations = MIGRATIONS
    shipped = env.cli("validate", "--json").json()
    assert shipped["status"] == "passed" and shipped["naming"] == "sequential"


def test_a_structural_error_hides_neither_the_lint_of_other_scripts_nor_its_own(env, tmp_path):
    env.migrations = tmp_path / "project"
    ids = linear_project(env.migrations, steps=[
        ("create accounts table", 'op.execute("CREATE TABLE accounts (id int)")', 'op.execute("DROP TABLE accounts")'),
        ("index accounts", 'op.execute("CREATE INDEX ix_accounts_id ON accounts (id)")', "pass"),
        ("drop a column", 'op.execute("ALTER TABLE accounts DROP COLUMN id")', 'op.execute("ALTER TABLE accounts ADD COLUMN id int")'),
    ])
    findings = env.cli("validate", "--json").json()["findings"]
    by_revision = {(f["revision"], f["rule"]) for f in findings}
    assert (ids[1], "downgrade") in by_revision  # the structural error…
    assert (ids[1], "index-not-concurrently") in by_revision  # …its own lint…
    assert (ids[2], "drop-column") in by_revision  # …and the others'
    allowed = env.cli("validate", "--allow", "downgrade", "--allow", "index-not-concurrently", "--allow", "drop-column", "--json")
    assert allowed.code == 0 and allowed.json()["status"] == "passed", allowed.stdout


def test_migrate_status_and_rollback_use_the_projects_version_table(env, tmp_path, redis_client):
    env.migrations = tmp_path / "project"
    ids = linear_project(env.migrations)
    env.start_worker()
    status = env.cli("status", "--json")
    assert status.code == 0 and status.json()["current"] is None, status.stdout + status.stderr
    run = env.cli("migrate", "--json")
    assert run.code == 0, run.stdout + run.stderr
    assert run.json()["revision_after"] == ids[-1]
    assert env.sql("SELECT version_num FROM app_versions") == [(ids[-1],)]
    assert env.sql("SELECT to_regclass('public.alembic_version')") == [(None,)]
    assert env.cli("status", "--json").json()["current"] == ids[-1]
    # Nothing is applied twice: a second migrate has nothing to do.
    again = env.cli("migrate", "--json")
    assert again.code == 0 and again.json()["revision_after"] == ids[-1]
    assert env.sql("SELECT count(*) FROM dbagent.changelog WHERE direction = 'up'") == [(len(ids),)]

    back = env.cli("rollback", "2", "--json")
    assert back.code == 0, back.stdout + back.stderr
    assert back.json()["revision_after"] == ids[-3]
    assert env.sql("SELECT version_num FROM app_versions") == [(ids[-3],)]
    assert env.sql("SELECT revision FROM dbagent.changelog WHERE direction = 'down' ORDER BY id") == [(ids[-1],), (ids[-2],)]
    assert env.sql("SELECT to_regclass('public.tasks')") == [(None,)]


@pytest.mark.parametrize("variant", ["stock", "env_own_engine.py"])
def test_an_env_py_that_migrates_on_its_own_connection_is_refused_before_anything_changes(env, tmp_path, variant):
    env.migrations = tmp_path / "project"
    linear_project(env.migrations, env=variant)
    env.start_worker()
    run = env.cli("migrate", "--json")
    assert run.code == 2, run.stdout
    error = run.json()["error"]
    assert "env.py ran the migrations on a connection of its own" in error
    assert 'config.attributes.get("connection", None)' in error  # the change it needs, spelled out
    # Nothing ran, on any connection: no table, no version table of either name.
    assert env.sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    assert not env.sql("SELECT 1 FROM dbagent.changelog")


def test_a_script_with_an_explicit_commit_is_flagged_and_not_retried_blindly(env, tmp_path):
    env.migrations = tmp_path / "project"
    ids = linear_project(env.migrations, steps=[
        ("create a", 'op.execute("CREATE TABLE a (id int)")\n    op.execute("COMMIT")\n    op.execute("CREATE TABLE b (id int)")',
         'op.execute("DROP TABLE b")\n    op.execute("DROP TABLE a")'),
    ])
    findings = env.cli("validate", "--json").json()["findings"]
    [flagged] = [f for f in findings if f["rule"] == "transaction-control"]
    assert flagged["severity"] == "error" and flagged["revision"] == ids[0] and "COMMIT at line" in flagged["message"]
    assert "autocommit_block" in flagged["fix"]


def test_an_error_raised_by_a_script_names_its_type_file_and_line(env, tmp_path):
    env.migrations = tmp_path / "project"
    ids = linear_project(env.migrations, steps=[
        ("reads the environment", 'import os\n    op.execute("CREATE TABLE a (id int)")\n    os.environ["DATABASE_URL"]',
         'op.execute("DROP TABLE a")'),
    ])
    env.start_worker()
    run = env.cli("migrate", "--allow", "data-change", "--json")
    assert run.code == 1, run.stdout + run.stderr
    error = run.json()["error"]
    assert "KeyError: 'DATABASE_URL'" in error
    [script] = list((env.migrations / "versions").glob(f"{ids[0]}_*.py"))
    line = next(n for n, text in enumerate(script.read_text().splitlines(), 1) if "DATABASE_URL" in text)
    assert f"(at {script.name}:{line})" in error
    assert env.sql("SELECT to_regclass('public.a')") == [(None,)]  # the step rolled back


@pytest.mark.parametrize(("variant", "status"), [("env.py", "ok"), ("stock", "fail"), ("env_own_engine.py", "fail")])
def test_env_validate_checks_env_py_against_the_contract(env, tmp_path, variant, status):
    env.migrations = tmp_path / "project"
    linear_project(env.migrations, env=variant)
    (env.migrations / "alembic.ini").write_text(
        (env.migrations / "alembic.ini").read_text().replace("driver://user:pass@localhost/dbname", "postgresql://nobody@nowhere/x")
    )
    result = env.cli("env", "validate", "--json")
    checks = {c["name"]: c for c in result.json()["checks"]}
    assert checks["env_py"]["status"] == status, checks["env_py"]
    assert "sqlalchemy.url is not used" in checks["alembic_ini"]["detail"]
    expected_table = "alembic_version" if variant == "stock" else "app_versions"
    assert checks["version_table"]["detail"].startswith(expected_table)
    if status == "fail":
        assert result.code == 1 and 'config.attributes.get("connection", None)' in checks["env_py"]["detail"]
    assert env.sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]


def init(env, project, output, *extra):
    import subprocess
    import sys

    from tests.servers import ROOT

    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "init", "--db", f"app={env.url}", "--redis", env.redis_url,
         "--prefix", env.prefix, "--output", str(output), "--json", *extra],
        # Run from the project's directory, as a user would; this checkout's dbagent first on the path.
        capture_output=True, text=True, cwd=project, env=env.environ(PYTHONPATH=str(ROOT)), timeout=60,
    )
    return done


def test_init_adopts_a_project_writes_a_config_that_works_and_names_the_env_py_change(env, tmp_path, redis_client):
    import json

    from agent.settings import load_settings

    stock = tmp_path / "stock"
    linear_project(stock / "alembic", env="stock")
    (stock / "alembic.ini").write_text((stock / "alembic" / "alembic.ini").read_text().replace(
        "script_location = %(here)s", "script_location = %(here)s/alembic"))
    (stock / "alembic" / "alembic.ini").unlink()
    done = init(env, stock, tmp_path / "stock.toml")
    assert done.returncode == 1, done.stdout + done.stderr
    body = json.loads(done.stdout)
    assert body["env_py"] == "refused" and 'config.attributes.get("connection", None)' in body["env_detail"]
    assert body["naming"] == "alembic" and body["migrations"] == str((stock / "alembic").resolve())

    good = tmp_path / "good"
    ids = linear_project(good)
    config = tmp_path / "good.toml"
    done = init(env, good, config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["status"] == "ok"
    settings = load_settings(config)
    assert settings.databases["app"].naming == "alembic" and settings.redis.prefix == env.prefix
    # Nothing was changed in the database, and a second init does not overwrite the file.
    assert env.sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    again = init(env, good, config)
    assert again.returncode == 2 and "exists" in again.stderr
    # The written configuration runs the loop as it is.
    env.migrations = good
    del ids
    assert env.cli("--config", str(config), "validate").code == 0
