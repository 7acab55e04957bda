"""agent/postgres/migrator.py: planning on the shipped scripts; no database is involved."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbagent.core.errors import BadInput
from dbagent.postgres.migrator import Migrator, Step

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
# Nothing listens on port 1: any attempt to connect would fail loudly.
UNREACHABLE = "postgresql://u@127.0.0.1:1/x"
ALL = [f"{n:03d}" for n in range(1, 12)]


@pytest.fixture(scope="module")
def migrator() -> Migrator:
    return Migrator(MIGRATIONS, UNREACHABLE)


def revs(steps: list[Step]) -> list[str]:
    return [s.revision for s in steps]


def test_not_a_script_directory(tmp_path):
    with pytest.raises(BadInput) as caught:
        Migrator(tmp_path, UNREACHABLE)

    assert caught.value.message == f"{tmp_path}: not an Alembic script directory (no env.py)"


def test_head(migrator):
    assert migrator.head() == "011"


def test_chain_is_oldest_first(migrator):
    assert [s.revision for s in migrator.chain()] == ALL


def test_upgrade_plan_from_base(migrator):
    plan = migrator.upgrade_plan(None)

    assert revs(plan) == ALL
    assert all(s.direction == "up" for s in plan)
    assert plan[0] == Step("001", None, "Create the roles, permissions and role_permissions tables.", "up")
    assert plan[0].destination == "001"
    assert [s.down_revision for s in plan] == [None] + ALL[:-1]


def test_upgrade_plan_from_009(migrator):
    plan = migrator.upgrade_plan("009")

    assert revs(plan) == ["010", "011"]
    assert [s.destination for s in plan] == ["010", "011"]


def test_upgrade_plan_to_a_target(migrator):
    assert revs(migrator.upgrade_plan("005", "007")) == ["006", "007"]
    assert revs(migrator.upgrade_plan("005", "head")) == ALL[5:]
    assert revs(migrator.upgrade_plan(None, "003")) == ["001", "002", "003"]


def test_upgrade_plan_at_head_is_empty(migrator):
    assert migrator.upgrade_plan("011") == []
    assert migrator.upgrade_plan("007", "007") == []


def test_upgrade_plan_to_an_older_revision_points_to_rollback(migrator):
    with pytest.raises(BadInput) as caught:
        migrator.upgrade_plan("011", "009")

    assert caught.value.message == "target 009 is older than the current revision 011: use rollback --to 009"
    assert caught.value.exit_code == 2


def test_upgrade_plan_unknown_target(migrator):
    with pytest.raises(BadInput) as caught:
        migrator.upgrade_plan("005", "999")

    assert caught.value.message == "unknown revision '999' (known: 001 … 011)"


def test_upgrade_plan_unknown_current(migrator):
    with pytest.raises(BadInput) as caught:
        migrator.upgrade_plan("999")

    assert "'999'" in caught.value.message
    assert "do not contain" in caught.value.message


def test_revision_lookup(migrator):
    assert migrator.revision("004").revision == "004"
    for bad in ("999", "base", "head"):
        with pytest.raises(BadInput, match=f"unknown revision '{bad}'"):
            migrator.revision(bad)


def test_downgrade_one_step(migrator):
    plan = migrator.downgrade_plan("011", steps=1)

    assert revs(plan) == ["011"]
    assert plan[0].direction == "down"
    assert plan[0].destination == "010"
    assert plan[0].to_json() == {
        "revision": "011",
        "description": "Grant the wildcard permission '*' to the admin role (data migration).",
        "direction": "down",
    }


def test_downgrade_several_steps_newest_first(migrator):
    plan = migrator.downgrade_plan("008", steps=3)

    assert revs(plan) == ["008", "007", "006"]
    assert [s.destination for s in plan] == ["007", "006", "005"]


def test_downgrade_more_steps_than_applied(migrator):
    with pytest.raises(BadInput) as caught:
        migrator.downgrade_plan("011", steps=12)

    assert "only 11" in caught.value.message
    assert caught.value.message == "cannot roll back 12 step(s): only 11 migration(s) are applied"


def test_downgrade_all_steps_ends_at_base(migrator):
    plan = migrator.downgrade_plan("011", steps=11)

    assert revs(plan) == ALL[::-1]
    assert plan[-1].destination == "base"


def test_downgrade_to_base(migrator):
    plan = migrator.downgrade_plan("011", to="base")

    assert revs(plan) == ALL[::-1]
    assert plan[-1].destination == "base"
    assert revs(migrator.downgrade_plan("011", to=None)) == ALL[::-1]


def test_downgrade_to_a_revision(migrator):
    plan = migrator.downgrade_plan("011", to="009")

    assert revs(plan) == ["011", "010"]
    assert plan[-1].destination == "009"
    assert migrator.downgrade_plan("009", to="009") == []


def test_downgrade_to_a_revision_above_current(migrator):
    with pytest.raises(BadInput) as caught:
        migrator.downgrade_plan("003", to="005")

    assert caught.value.message == "target 005 is not below the current revision 003: use migrate --to 005"


def test_downgrade_to_unknown_revision(migrator):
    with pytest.raises(BadInput, match="unknown revision '999'"):
        migrator.downgrade_plan("011", to="999")


def test_downgrade_from_base_has_nothing_to_undo(migrator):
    assert migrator.downgrade_plan(None, to="base") == []
    with pytest.raises(BadInput, match="only 0 migration"):
        migrator.downgrade_plan(None, steps=1)


def test_offline_sql_of_the_first_step(migrator):
    step = migrator.upgrade_plan(None)[0]

    sql = migrator.offline_sql(step)

    assert "CREATE TABLE roles" in sql
    assert "CREATE TABLE permissions" in sql
    assert "Running upgrade  -> 001" in sql
    assert "INSERT INTO alembic_version (version_num) VALUES ('001')" in sql
    assert sql.strip().startswith("BEGIN;")
    assert sql.strip().endswith("COMMIT;")
    assert "-> 002" not in sql


def test_offline_sql_renders_only_that_step(migrator):
    step = migrator.upgrade_plan("009")[0]  # 010

    sql = migrator.offline_sql(step)

    assert "Running upgrade 009 -> 010" in sql
    assert "Running upgrade 010 -> 011" not in sql
    assert "UPDATE alembic_version SET version_num='010' WHERE alembic_version.version_num = '009'" in sql


def test_offline_sql_of_a_down_step(migrator):
    step = migrator.downgrade_plan("011", steps=1)[0]

    sql = migrator.offline_sql(step)

    assert "Running downgrade 011 -> 010" in sql
    assert "DELETE FROM permissions WHERE name = '*'" in sql
    assert "UPDATE alembic_version SET version_num='010' WHERE alembic_version.version_num = '011'" in sql


def _statements(sql: str) -> list[str]:
    import pglast
    from pglast.stream import RawStream

    return [RawStream()(s.stmt) for s in pglast.parse_sql(sql)]


@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_plan_rendered_in_one_pass_splits_into_exactly_each_steps_own_sql(migrator, direction):
    plan = migrator.upgrade_plan(None) if direction == "up" else migrator.downgrade_plan("011", to="base")
    together = migrator.offline_sql_many(plan)
    assert list(together) == plan
    for step in plan:
        assert _statements(together[step]) == _statements(migrator.offline_sql(step)), step.revision
        assert f"-> {step.destination}" in together[step] or step.destination == "base"


def test_one_step_or_mixed_directions_render_step_by_step(migrator):
    up = migrator.upgrade_plan(None)[:1]
    assert migrator.offline_sql_many(up) == {up[0]: migrator.offline_sql(up[0])}


def test_the_projects_alembic_ini_and_env_py_settings_are_honoured_offline():
    """The fixture made by `alembic init`: its ini is read, its url never used, its version table honoured."""
    import logging

    from dbagent.postgres.migrator import Migrator
    from tests.alembic_projects import FIXTURE

    ours = logging.getLogger("dbagent.test")
    migrator = Migrator(FIXTURE, "postgresql://dbagent@db.example/app")
    assert migrator.ini == FIXTURE / "alembic.ini"
    facts = migrator.environment()
    assert facts.version_table == "app_versions" and facts.error is None
    # env.py's fileConfig() did not run: the worker's loggers stay enabled.
    assert not ours.disabled
    plan = migrator.upgrade_plan(None)
    [merge] = [s for s in plan if len(s.parents) > 1]
    sql = migrator.offline_sql(merge)
    # Rendered from both parents: the other branch's tables are not in the merge's SQL.
    assert "CREATE TABLE" not in sql and "app_versions" in sql
