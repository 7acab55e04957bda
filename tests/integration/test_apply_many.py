"""``Migrator.apply_many``: a whole plan in one Alembic run, one committed transaction per step, on real
PostgreSQL, with projects made by ``alembic init`` + ``alembic revision`` and env.py as users write it."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, pool

from dbagent.postgres.connections import sqlalchemy_url
from dbagent.postgres.migrator import Migrator
from tests.alembic_projects import LINEAR, linear_project
from tests.servers import create_database, db_url, drop_database

pytestmark = pytest.mark.integration

FAILS = ("fail on purpose", 'op.execute("SELECT 1/0")', "pass")

# env.py as the fixture writes it (one outer begin_transaction(), Alembic's default), with
# transaction_per_migration=True, and one that opens the transaction itself (Alembic then leaves it alone).
ENV_VARIANTS = {
    "begin_transaction": lambda text: text,
    "transaction_per_migration": lambda text: text.replace(
        'version_table="app_versions",\n        )\n\n        with context.begin_transaction():',
        'version_table="app_versions",\n            transaction_per_migration=True,\n        )\n\n'
        "        with context.begin_transaction():"),
    "its own transaction": lambda text: text.replace(
        "    else:\n        context.configure(",
        '    else:\n        connectable.exec_driver_sql("SELECT 1")  # begins a transaction before configure\n'
        "        context.configure("),
}


@pytest.fixture
def db():
    name = f"dbagent_am_{uuid.uuid4().hex[:10]}"
    create_database(name)
    try:
        yield name
    finally:
        drop_database(name)


def project(tmp_path: Path, variant: str, steps: list[tuple[str, str, str]]) -> tuple[Path, list[str]]:
    location = tmp_path / "project"
    revisions = linear_project(location, steps=steps)
    env_py = location / "env.py"
    changed = ENV_VARIANTS[variant](env_py.read_text())
    assert variant == "begin_transaction" or changed != env_py.read_text(), "the fixture's env.py changed"
    env_py.write_text(changed)
    return location, revisions


def versions(name: str) -> list[str]:
    with psycopg.connect(db_url(name), autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('app_versions')").fetchone()[0] is None:
            return []
        return [r[0] for r in conn.execute("SELECT version_num FROM app_versions")]


@pytest.mark.parametrize("variant", list(ENV_VARIANTS))
def test_a_plan_runs_env_py_once_and_each_step_is_committed_before_the_next_starts(db, tmp_path, variant):
    location, revisions = project(tmp_path, variant, LINEAR)
    migrator = Migrator(location, db_url(db))
    runs = []
    run_env = migrator.script.run_env
    migrator.script.run_env = lambda: (runs.append(1), run_env())[1]
    seen: list[tuple[int, list[str]]] = []
    applied: list[str] = []
    engine = create_engine(sqlalchemy_url(db_url(db)), poolclass=pool.NullPool)
    with engine.connect() as conn:
        migrator.apply_many(
            conn, migrator.upgrade_plan(None),
            on_version_apply=lambda *, step, **_: applied.append(step.up_revision_id),
            before_step=lambda k: seen.append((k, versions(db))),  # what another session sees
        )
        assert not conn.in_transaction()
    engine.dispose()
    assert runs == [1]
    assert seen == [(k, [revisions[k - 1]] if k else []) for k in range(len(revisions) + 1)]
    assert applied == revisions and versions(db) == [revisions[-1]]


@pytest.mark.parametrize("variant", list(ENV_VARIANTS))
def test_a_failing_step_undoes_itself_alone_and_the_plan_stops_there(db, tmp_path, variant):
    steps = [*LINEAR[:2], FAILS, *LINEAR[2:]]
    location, revisions = project(tmp_path, variant, steps)
    migrator = Migrator(location, db_url(db))
    seen: list[int] = []
    engine = create_engine(sqlalchemy_url(db_url(db)), poolclass=pool.NullPool)
    with engine.connect() as conn:
        with pytest.raises(Exception, match="division by zero"):
            migrator.apply_many(conn, migrator.upgrade_plan(None), before_step=seen.append)
        conn.rollback()
        assert migrator.current(conn) == revisions[1]
    engine.dispose()
    assert seen == [0, 1, 2]
    assert versions(db) == [revisions[1]]
    with psycopg.connect(db_url(db), autocommit=True) as conn:  # the two steps before it stayed
        assert conn.execute("SELECT to_regclass('projects') IS NOT NULL").fetchone()[0]


def test_what_before_step_raises_ends_the_plan_before_that_step(db, tmp_path):
    location, revisions = project(tmp_path, "begin_transaction", LINEAR)
    migrator = Migrator(location, db_url(db))

    class Enough(Exception):
        pass

    def before_step(k: int) -> None:
        if k == 3:
            raise Enough

    engine = create_engine(sqlalchemy_url(db_url(db)), poolclass=pool.NullPool)
    with engine.connect() as conn:
        with pytest.raises(Enough):
            migrator.apply_many(conn, migrator.upgrade_plan(None), before_step=before_step)
        conn.rollback()
        assert versions(db) == [revisions[2]]
        # and the plan goes on from there in another run
        migrator.apply_many(conn, migrator.upgrade_plan(migrator.current(conn)))
    engine.dispose()
    assert versions(db) == [revisions[-1]]
    with psycopg.connect(db_url(db), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0


def test_a_worker_migrates_and_rolls_back_a_plan_in_one_alembic_run_each(env, tmp_path):
    """Through the worker: env.py runs online once to check the contract and once per plan, not once per step."""
    env.migrations = tmp_path / "project"
    revisions = linear_project(env.migrations)
    runs = tmp_path / "online-runs"
    env_py = env.migrations / "env.py"
    text = env_py.read_text()
    changed = text.replace("def run_migrations_online() -> None:\n",
                           "def run_migrations_online() -> None:\n"
                           f"    with open({str(runs)!r}, 'a') as f:\n        f.write('run\\n')\n", 1)
    assert changed != text
    env_py.write_text(changed)
    env.start_worker()
    run = env.cli("migrate", "--json")
    assert run.code == 0, run.stdout + run.stderr
    assert run.json()["revision_after"] == revisions[-1]
    assert runs.read_text().count("run") == 2  # the env.py check, and the plan of five steps
    back = env.cli("rollback", "3", "--json")
    assert back.code == 0, back.stdout + back.stderr
    assert runs.read_text().count("run") == 4
    assert env.sql("SELECT revision, direction, outcome FROM dbagent.changelog ORDER BY id") == [
        *((r, "up", "applied") for r in revisions), *((r, "down", "reverted") for r in reversed(revisions[2:]))
    ]
