"""A team's own Alembic project, made with Alembic's own commands: hash ids, its alembic.ini, its env.py and
version table (real PostgreSQL, a real worker)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from dbagent.postgres.migrator import Migrator
from tests.alembic_projects import FIXTURE, linear_project
from tests.servers import MIGRATIONS, ROOT

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
    else:  # the fixture's env.py leaves transaction_per_migration off: one transaction for the plan, said
        assert checks["transactions"]["detail"].startswith("one for the whole plan"), checks["transactions"]
    assert env.sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]


def test_env_validate_says_when_each_migration_has_its_own_transaction(env, tmp_path):
    from tests.alembic_projects import per_migration_transactions

    env.migrations = tmp_path / "project"
    linear_project(env.migrations)
    per_migration_transactions(env.migrations)
    result = env.cli("env", "validate", "--json")
    checks = {c["name"]: c for c in result.json()["checks"]}
    assert checks["transactions"]["status"] == "ok" and checks["transactions"]["detail"].startswith("one per migration")


def init(env, project, output, *extra):
    import subprocess
    import sys

    from tests.servers import ROOT

    done = subprocess.run(
        [sys.executable, "-m", "dbagent.interfaces.cli", "init", "--db", f"app={env.url}", "--redis", env.redis_url,
         "--prefix", env.prefix, "--output", str(output), "--json", *extra],
        # Run from the project's directory, as a user would; this checkout's dbagent first on the path.
        capture_output=True, text=True, cwd=project, env=env.environ(PYTHONPATH=str(ROOT)), timeout=60,
    )
    return done


def test_init_adopts_a_project_writes_a_config_that_works_and_names_the_env_py_change(env, tmp_path, redis_client):
    import json

    from dbagent.settings import load_settings

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


# -- branches and merges: the fixture's graph is 00b6 → 38df → fb02 (a branch point); 6c76 → 826e on one branch,
# 1372 → e2cd on the other; the merge 5b39 of 826e and e2cd; then 8ebd → bdb2.


def _branched(env, tmp_path) -> dict[str, str]:
    env.migrations = tmp_path / "fixture"
    shutil.copytree(FIXTURE, env.migrations)
    return {p.name[:4]: p.name.split("_", 1)[0] for p in (env.migrations / "versions").glob("*.py")}


def _versions(env) -> list[str]:
    return sorted(r[0] for r in env.sql("SELECT version_num FROM app_versions"))


def _tables(env, *names) -> list[str | None]:
    return [env.sql(f"SELECT to_regclass('public.{n}')::text")[0][0] for n in names]


def test_a_branched_project_through_the_whole_loop(env, tmp_path):
    rev = _branched(env, tmp_path)
    env.start_worker()
    # --to a revision on one branch: only what it needs.
    first = env.cli("migrate", "--to", rev["826e"], "--json")
    assert first.code == 0, first.stdout + first.stderr
    assert first.json()["revision_after"] == rev["826e"] and _versions(env) == [rev["826e"]]
    assert _tables(env, "tasks", "labels") == ["tasks", None]
    # --to the other branch: the database is at two heads, and dbagent still operates on it.
    second = env.cli("migrate", "--to", rev["e2cd"], "--json")
    assert second.code == 0, second.stdout + second.stderr
    both = ",".join(sorted([rev["826e"], rev["e2cd"]]))
    assert second.json()["revision_before"] == rev["826e"] and second.json()["revision_after"] == both
    assert _versions(env) == sorted([rev["826e"], rev["e2cd"]])
    status = env.cli("status", "--json")
    assert status.code == 0, status.stdout + status.stderr
    body = status.json()
    assert body["current_heads"] == sorted([rev["826e"], rev["e2cd"]]) and body["heads"] == [rev["bdb2"]]
    assert body["branch_points"] == [rev["fb02"]] and body["problem"] is None
    assert [s["revision"] for s in body["pending"]] == [rev["5b39"], rev["8ebd"], rev["bdb2"]]
    text = env.cli("status").stdout
    assert "(2 heads)" in text and f"branches  from {rev['fb02']}" in text
    assert env.cli("verify", "--expect", both).code == 0
    # Up across the merge, to 8ebd.
    third = env.cli("migrate", "--to", rev["8ebd"], "--json")
    assert third.code == 0 and third.json()["revision_after"] == rev["8ebd"], third.stdout + third.stderr
    assert _versions(env) == [rev["8ebd"]]
    # rollback 2 undoes exactly two revisions, across the merge: both branches' heads are back.
    back = env.cli("rollback", "2", "--json")
    assert back.code == 0, back.stdout + back.stderr
    assert back.json()["revision_after"] == both and _versions(env) == sorted([rev["826e"], rev["e2cd"]])
    assert [s["revision"] for s in back.json()["steps"]] == [rev["8ebd"], rev["5b39"]]
    # From two heads, a count cannot say which branch to undo: refused, nothing changed.
    refused = env.cli("rollback", "1", "--json")
    assert refused.code == 2 and "ambiguous" in refused.json()["error"], refused.stdout
    assert _versions(env) == sorted([rev["826e"], rev["e2cd"]])
    # migrate goes to the heads by default; then rollback --to a branch revision ends exactly there.
    done = env.cli("migrate", "--json")
    assert done.code == 0 and done.json()["revision_after"] == rev["bdb2"], done.stdout + done.stderr
    assert env.cli("verify").code == 0
    to_branch = env.cli("rollback", "--to", rev["826e"], "--json")
    assert to_branch.code == 0, to_branch.stdout + to_branch.stderr
    assert to_branch.json()["revision_after"] == rev["826e"] and _versions(env) == [rev["826e"]]
    assert _tables(env, "task_comments", "task_labels", "labels", "tasks") == [None, None, None, "tasks"]
    # The change log: one row per revision applied or reverted, in order, with its direction.
    log = env.sql("SELECT direction, revision FROM dbagent.changelog WHERE outcome <> 'failed' ORDER BY id")
    short = {v: k for k, v in rev.items()}
    assert [f"{'+' if d == 'up' else '-'}{short[r]}" for d, r in log] == [
        "+00b6", "+38df", "+fb02", "+6c76", "+826e",  # --to 826e
        "+1372", "+e2cd",  # --to e2cd
        "+5b39", "+8ebd",  # --to 8ebd, across the merge
        "-8ebd", "-5b39",  # rollback 2
        "+5b39", "+8ebd", "+bdb2",  # migrate
        "-bdb2", "-8ebd", "-5b39", "-e2cd", "-1372",  # rollback --to 826e
    ]
    # Plain Alembic agrees with what dbagent left: it reads the same version table and has the same plan.
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(env.migrations / "alembic.ini"))
    cfg.file_config  # noqa: B018 - read the ini now; without the file name, the stock env.py's fileConfig()
    cfg.config_file_name = None  # does not disable the loggers of this test process (caplog in later tests)
    cfg.set_main_option("script_location", str(env.migrations))
    cfg.set_main_option("sqlalchemy.url", env.url.replace("postgresql://", "postgresql+psycopg://"))
    command.upgrade(cfg, "heads")
    assert _versions(env) == [rev["bdb2"]]
    assert env.cli("status", "--json").json()["pending"] == []


def test_a_branched_project_rehearses_along_its_graph(env, tmp_path):
    _branched(env, tmp_path)
    result = env.cli("validate", "--rehearse", "--json", timeout=300)
    assert result.code == 0, result.stdout + result.stderr
    rehearsal = result.json()["rehearsal"]
    assert [s["status"] for s in rehearsal["steps"]] == ["ok"] * 10, rehearsal
    assert rehearsal["status"] == "passed" and rehearsal["source"] == "empty"
    assert [s["revision"] for s in rehearsal["steps"]] == [s for s in Migrator(env.migrations, env.url).order()]
    assert not [f for f in result.json()["findings"] if f["rule"].startswith("rehearsal")], result.json()["findings"]


def test_the_agent_rolls_a_failed_run_back_to_exactly_the_two_heads_it_started_from(env, tmp_path, redis_client):
    from tests.alembic_projects import add_revision, per_migration_transactions
    from tests.faults.test_faults import wait_for

    rev = _branched(env, tmp_path)
    per_migration_transactions(env.migrations)  # each step commits alone: the failed run leaves work to undo
    failing = add_revision(env.migrations, "doomed", 'op.execute("CREATE TABLE doomed (id int); SELECT 1/0")',
                           'op.execute("DROP TABLE IF EXISTS doomed")')
    env.start_worker()
    env.start_agent()
    assert env.cli("migrate", "--to", f"{rev['826e']},{rev['e2cd']}", "--json").code == 0
    both = sorted([rev["826e"], rev["e2cd"]])
    assert _versions(env) == both
    run = env.cli("migrate", "--json")
    assert run.code == 1, run.stdout + run.stderr
    assert run.json()["revision_before"] == ",".join(both) and run.json()["revision_after"] == rev["bdb2"]
    assert f"step {failing} (doomed) failed" in run.json()["error"], run.json()["error"]

    def rolled_back():
        return [e for e in env.stream_events(redis_client) if e["type"] in ("rollback.completed", "rollback.failed")]

    wait_for(rolled_back, 60, "the agent's rollback")
    assert rolled_back()[0]["type"] == "rollback.completed", rolled_back()
    # Exactly where the run started: both branches' heads, the merge and what followed it undone, nothing more.
    assert _versions(env) == both
    assert _tables(env, "task_comments", "labels", "task_labels", "doomed") == [None, "labels", "task_labels", None]
    down = env.sql("SELECT revision FROM dbagent.changelog WHERE direction = 'down' ORDER BY id")
    assert [r for (r,) in down] == [rev["bdb2"], rev["8ebd"], rev["5b39"]]


def test_lint_from_takes_an_old_history_as_reviewed_and_validate_all_lints_it_anyway(env, tmp_path):
    env.migrations = tmp_path / "project"
    ids = linear_project(env.migrations, steps=[
        ("create accounts table", 'op.execute("CREATE TABLE accounts (id int, email text)")', 'op.execute("DROP TABLE accounts")'),
        ("drop accounts email", 'op.execute("ALTER TABLE accounts DROP COLUMN email")', "pass"),  # old, reviewed
        ("index accounts", 'op.execute("CREATE INDEX ix_accounts_id ON accounts (id)")', 'op.execute("DROP INDEX ix_accounts_id")'),
    ])
    env.extra_config = 'validate_before_migrate = "enforce"'
    full = {(f["revision"], f["rule"]) for f in env.cli("validate", "--json").json()["findings"]}
    assert {(ids[1], "drop-column"), (ids[1], "downgrade"), (ids[2], "index-not-concurrently")} <= full

    env.extra_config += f'\nlint_from = "{ids[1][:6]}"'  # a prefix, as Alembic accepts
    result = env.cli("validate", "--json")
    body = result.json()
    found = {(f["revision"], f["rule"]) for f in body["findings"]}
    assert body["lint_from"] == ids[1][:6]
    assert not {(ids[1], "drop-column"), (ids[1], "downgrade")} & found, found
    assert (ids[2], "index-not-concurrently") in found and result.code == 1  # after the baseline: linted
    assert "taken as reviewed" in env.cli("validate").stdout
    everything = env.cli("validate", "--all", "--json").json()
    assert everything["lint_from"] is None
    assert {(ids[1], "drop-column"), (ids[1], "downgrade")} <= {(f["revision"], f["rule"]) for f in everything["findings"]}

    # A migrate judges what it applies the same way: the baseline's findings do not stop it.
    env.start_worker()
    run = env.cli("migrate", "--allow", "index-not-concurrently", "--json")
    assert run.code == 0, run.stdout + run.stderr
    env.extra_config = 'validate_before_migrate = "enforce"\nlint_from = "feedbeef"'
    unknown = env.cli("validate")
    assert unknown.code == 2 and "lint_from = 'feedbeef': unknown revision" in unknown.stderr, unknown.stderr


# -- transaction_per_migration off (Alembic's default, and the fixture's): the plan is one transaction -------------


def _doomed_after_the_merge(env, tmp_path) -> tuple[dict[str, str], list[str], str]:
    from tests.alembic_projects import add_revision

    rev = _branched(env, tmp_path)
    failing = add_revision(env.migrations, "doomed", 'op.execute("CREATE TABLE doomed (id int); SELECT 1/0")',
                           'op.execute("DROP TABLE IF EXISTS doomed")')
    return rev, sorted([rev["826e"], rev["e2cd"]]), failing


def test_a_plan_in_one_transaction_fails_whole_and_leaves_the_agent_nothing_to_undo(env, tmp_path, redis_client):
    from tests.faults.test_faults import wait_for

    rev, both, failing = _doomed_after_the_merge(env, tmp_path)
    env.start_worker()
    agent = env.start_agent()
    assert env.cli("migrate", "--to", ",".join(both), "--json").code == 0
    run = env.cli("migrate", "--json")

    assert run.code == 1, run.stdout + run.stderr
    body = run.json()
    # The merge and the two steps after it ran, then "doomed" failed: all of it is undone, as plain Alembic does.
    assert body["revision_before"] == ",".join(both) and body["revision_after"] == ",".join(both)
    assert f"step {failing} (doomed) failed" in body["error"] and "undone with it" in body["error"], body["error"]
    assert _versions(env) == both
    assert _tables(env, "task_comments", "labels", "task_labels", "doomed") == [None, "labels", "task_labels", None]
    rows = env.sql("SELECT revision, outcome FROM dbagent.changelog WHERE command_id = %s ORDER BY id", body["command_id"])
    assert rows == [(failing, "failed")], rows  # no step is recorded as applied: none is
    events = [e for e in env.stream_events(redis_client, body["command_id"])]
    started = [e for e in events if e["type"] == "migration.started"]
    assert started and started[0]["data"]["transactions"] == "plan"
    assert not [e for e in events if e["type"] == "migration.step"], "a step of an undone plan was announced"
    assert env.sql("SELECT steps_done FROM dbagent.commands WHERE id = %s", body["command_id"])[0][0] in (0, None)
    wait_for(lambda: "changed nothing" in env.log_of(agent), 30, "the agent to read the failure")
    assert not env.sql("SELECT 1 FROM dbagent.audit_log WHERE type = 'rollback.started'")


def test_a_plan_in_one_transaction_publishes_its_steps_once_it_committed(env, tmp_path, redis_client):
    _branched(env, tmp_path)
    env.start_worker()
    run = env.cli("migrate", "--json")

    assert run.code == 0, run.stdout + run.stderr
    order = Migrator(env.migrations, env.url).order()
    events = env.stream_events(redis_client, run.json()["command_id"])
    steps = [e["data"]["revision"] for e in events if e["type"] == "migration.step"]
    assert steps == order  # one event per step, in order, after the plan committed (before migration.completed)
    kinds = [e["type"] for e in events]
    assert kinds.index("migration.completed") > max(i for i, k in enumerate(kinds) if k == "migration.step")
    rows = env.sql("SELECT revision, outcome FROM dbagent.changelog WHERE command_id = %s ORDER BY id", run.json()["command_id"])
    assert rows == [(r, "applied") for r in order]
    assert env.sql("SELECT steps_done FROM dbagent.commands WHERE id = %s", run.json()["command_id"])[0][0] == len(order)


def test_a_worker_killed_inside_a_plan_in_one_transaction_leaves_the_database_where_the_run_started(env, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.faults.test_faults import wait_for
    from tests.servers import ROOT

    rev, both, _ = _doomed_after_the_merge(env, tmp_path)
    env.start_agent()
    setup = env.start_worker(log_name="setup-worker")
    assert env.cli("migrate", "--to", ",".join(both), "--json").code == 0
    env.kill_worker(setup, signal.SIGTERM)
    doomed = env.start_worker(log_name="doomed-worker", DBAGENT_PAUSE_AT="phase:between_steps:3")
    waiting = subprocess.Popen(
        [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(env.config), "migrate", "--json", "--timeout", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.environ(), cwd=ROOT,
    )
    wait_for(lambda: "pausing at phase:between_steps:3" in env.log_of(doomed), 60, "the worker inside the plan")
    # The merge, display_name and task_comments are applied inside the plan's transaction: not visible outside.
    assert _versions(env) == both and _tables(env, "task_comments")[0] is None
    env.kill_worker(doomed, signal.SIGKILL)
    env.start_worker(log_name="restarted-worker")
    out, err = waiting.communicate(timeout=120)

    result = __import__("json").loads(out.strip().splitlines()[-1])
    assert result["status"] == "failed" and result.get("interrupted") is True, result
    assert _versions(env) == both  # never below where the run started, and nothing half-applied above it
    assert _tables(env, "task_comments", "labels", "task_labels") == [None, "labels", "task_labels"]
    assert not env.sql("SELECT 1 FROM information_schema.columns WHERE table_name = 'accounts' AND column_name = 'display_name'")
    time.sleep(3)  # the agent reads the interruption within milliseconds: ample time to do something wrong
    assert not env.sql("SELECT 1 FROM dbagent.audit_log WHERE type = 'rollback.started'")
    assert not env.sql("SELECT 1 FROM dbagent.commands WHERE status IN ('accepted', 'claimed', 'running')")
    wait_for(lambda: not env.sql("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"), 15, "the lock to be free")


def _migrate_while_accounts_is_held(env, redis_client, waits: int) -> tuple[subprocess.CompletedProcess, list[dict], int]:
    """From both heads to the head while a long transaction reads accounts (which the step after the merge alters)."""
    import psycopg

    from tests.faults.test_faults import wait_for

    both = sorted([r for r in _branched_heads(env)])
    env.start_worker()
    assert env.cli("migrate", "--to", ",".join(both), "--json").code == 0
    holder = psycopg.connect(env.url, application_name="long report")
    holder.execute("SELECT count(*) FROM accounts")  # ACCESS SHARE on accounts, held by an open transaction
    run = subprocess.Popen([sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(env.config), "migrate", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.environ(), cwd=ROOT)

    def table_waits() -> list[dict]:
        return [e["data"] for e in env.stream_events(redis_client) if e["type"] == "lock.waiting"
                and e["data"].get("guard") == "table_locks"]

    try:
        wait_for(lambda: len(table_waits()) >= waits, 60, f"{waits} lock.waiting events")
        assert _versions(env) == both  # nothing of the plan is visible while it waits
    finally:
        holder.rollback()
        holder.close()
    out, err = run.communicate(timeout=120)
    return subprocess.CompletedProcess(run.args, run.returncode, out, err), table_waits(), both


def _branched_heads(env) -> list[str]:
    rev = {p.name[:4]: p.name.split("_", 1)[0] for p in (env.migrations / "versions").glob("*.py")}
    return [rev["826e"], rev["e2cd"]]


def test_a_plan_in_one_transaction_waits_out_an_old_transaction_before_it_starts(env, tmp_path, redis_client):
    rev = _branched(env, tmp_path)
    env.extra_config = 'lock_retry_pause = "200ms"\nlock_retry_max_pause = "400ms"\nlock_retries = 60'
    run, waits, both = _migrate_while_accounts_is_held(env, redis_client, waits=2)

    assert run.returncode == 0, run.stdout + run.stderr
    assert _versions(env) == [rev["bdb2"]]
    # Checked whole before it started (it would hold its locks to the end): the step that needs accounts is
    # named, and the plan never asked for a lock while the transaction was there.
    assert waits and all(d["tried"] is False and d["revision"] == rev["8ebd"] for d in waits), waits
    rows = env.sql("SELECT revision FROM dbagent.changelog WHERE command_id = %s AND outcome = 'applied' ORDER BY id",
                   run_json(run)["command_id"])
    assert [r for (r,) in rows] == [rev["5b39"], rev["8ebd"], rev["bdb2"]]


def test_a_plan_in_one_transaction_that_times_out_on_a_lock_is_retried_whole(env, tmp_path, redis_client):
    rev = _branched(env, tmp_path)
    env.lock_timeout = "300ms"
    env.extra_config = ('lock_holder_grace = "1h"\nlock_timeout_max = "500ms"\nlock_retry_pause = "200ms"\n'
                        'lock_retry_max_pause = "300ms"\nlock_retries = 60')
    run, waits, both = _migrate_while_accounts_is_held(env, redis_client, waits=2)

    assert run.returncode == 0, run.stdout + run.stderr
    assert _versions(env) == [rev["bdb2"]]
    assert waits and all(d["tried"] is True and d["revision"] == rev["8ebd"] for d in waits), waits
    # Each timed-out attempt undid the merge with it: every step is recorded applied exactly once.
    rows = env.sql("SELECT revision, outcome FROM dbagent.changelog WHERE command_id = %s ORDER BY id",
                   run_json(run)["command_id"])
    assert rows == [(rev["5b39"], "applied"), (rev["8ebd"], "applied"), (rev["bdb2"], "applied")], rows


def run_json(run: subprocess.CompletedProcess) -> dict:
    import json

    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_one_transaction_plan_whose_script_commits_unseen_keeps_the_record_of_what_committed(env, tmp_path):
    from tests.alembic_projects import add_revision

    env.migrations = tmp_path / "project"
    first, = linear_project(env.migrations, steps=[("create a", 'op.execute("CREATE TABLE a (id int)")', 'op.execute("DROP TABLE a")')])
    # An autocommit block reached in a way no scan of the source sees: what came before it commits.
    hidden = ('with getattr(op.get_context(), "autocommit" + "_block")():\n'
              '        op.execute("CREATE TABLE b (id int)")')
    add_revision(env.migrations, "create b", hidden, 'op.execute("DROP TABLE b")')
    add_revision(env.migrations, "create c", 'op.execute("CREATE TABLE c (id int)")', 'op.execute("DROP TABLE c")')
    failing = add_revision(env.migrations, "fails", 'op.execute("SELECT 1/0")', "pass")
    env.start_worker()

    run = env.cli("migrate", "--json")

    assert run.code == 1, run.stdout + run.stderr
    body = run.json()
    assert body["revision_after"] == first and _versions(env) == [first]  # Alembic committed the first step
    assert "undone with it" not in body["error"], body["error"]
    rows = env.sql("SELECT revision, outcome FROM dbagent.changelog WHERE command_id = %s ORDER BY id", body["command_id"])
    assert rows == [(first, "applied"), (failing, "failed")], rows  # the committed step is recorded
    assert env.sql("SELECT count(*) FROM dbagent.audit_log WHERE command_id = %s AND type = 'migration.step'",
                   body["command_id"]) == [(1,)]
