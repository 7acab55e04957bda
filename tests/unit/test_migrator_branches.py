"""agent/postgres/migrator.py on a branched and merged project made with Alembic's own commands (tests/fixtures/alembic_project):
plans checked against Alembic's own planner (``ScriptDirectory._upgrade_revs`` / ``_downgrade_revs``) over every
state the database can be in; no database is involved.

The fixture's graph: 00b6 → 38df → fb02, a branch point; one branch 6c76 → 826e, the other 1372 → e2cd; the
merge 5b39 of 826e and e2cd; then 8ebd → bdb2.
"""

from __future__ import annotations

import itertools
import warnings

import pytest

from dbagent.core.errors import BadInput
from dbagent.postgres.migrator import Migrator, Step, state_text
from tests.alembic_projects import FIXTURE

UNREACHABLE = "postgresql://u@127.0.0.1:1/x"


@pytest.fixture(scope="module")
def migrator() -> Migrator:
    return Migrator(FIXTURE, UNREACHABLE)


@pytest.fixture(scope="module")
def rev(migrator):
    ids = {r[:4]: r for r in migrator.order()}
    return lambda *short: ",".join(sorted(ids[s] for s in short))


def moves(steps: list[Step]) -> list[str]:
    return [("+" if s.direction == "up" else "-") + s.revision for s in steps]


def alembic_moves(steps) -> list[str]:
    return [("+" if s.is_upgrade else "-") + s.revision.revision for s in steps]


def every_state(migrator: Migrator) -> list[str | None]:
    """Every state a database can be in: the heads of each ancestor-closed set (from one or two revisions)."""
    order = migrator.order()
    states = {None}
    for picked in itertools.chain(itertools.combinations(order, 1), itertools.combinations(order, 2)):
        states.add(state_text(migrator.heads_of(migrator.ancestors(picked))))
    return sorted(states, key=lambda s: (s is not None, s or ""))


def test_the_graph_as_alembic_models_it(migrator, rev):
    assert migrator.heads() == (rev("bdb2"),) and migrator.head() == rev("bdb2")
    assert migrator.branch_points() == [rev("fb02")]
    assert len(every_state(migrator)) == 15  # base, each of the 10 revisions alone, and 4 pairs (one per branch)


def test_upgrade_plans_are_alembics_own_from_every_state_to_every_target(migrator):
    checked = 0
    for state in every_state(migrator):
        current = tuple(state.split(",")) if state else None
        for target in [*migrator.order(), "heads"]:
            try:
                expected = alembic_moves(migrator.script._upgrade_revs(target, current))
            except Exception:  # noqa: BLE001 - Alembic refuses (a target below the state): so do we
                with pytest.raises(BadInput):
                    migrator.upgrade_plan(state, target)
                continue
            if not expected and target != "heads" and target not in (current or ()):
                # Alembic answers "nothing to do" for a target already below the state; dbagent points to rollback.
                with pytest.raises(BadInput, match="use rollback --to"):
                    migrator.upgrade_plan(state, target)
                continue
            assert moves(migrator.upgrade_plan(state, target)) == expected, (state, target)
            checked += 1
    assert checked > 60


def test_migrate_to_a_branch_revision_leaves_the_database_at_two_heads_and_heads_finishes_it(migrator, rev):
    plan = migrator.upgrade_plan(rev("826e"), rev("e2cd"))
    assert moves(plan) == ["+" + rev("1372"), "+" + rev("e2cd")]
    both = migrator.state_after(rev("826e"), plan)
    assert both == rev("826e", "e2cd")
    assert moves(migrator.upgrade_plan(both)) == ["+" + rev(r) for r in ("5b39", "8ebd", "bdb2")]
    # A prefix names a revision, as in Alembic; a label@head and several heads joined by a comma work too.
    assert moves(migrator.upgrade_plan(None, "826e")) == moves(migrator.upgrade_plan(None, rev("826e")))
    assert migrator.resolve(f"{rev('826e')}, {rev('fb02')}") == (rev("826e"),)  # an ancestor adds nothing


def test_rollback_n_undoes_exactly_n_revisions_where_alembic_walks_and_across_a_merge(migrator, rev):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Alembic warns on -1 from several heads ("will be disallowed")
        for state in every_state(migrator):
            if state is None or "," in state:
                continue
            for n in range(1, len(migrator.applied(state)) + 1):
                try:
                    expected = alembic_moves(migrator.script._downgrade_revs(f"-{n}", (state,)))
                except Exception:  # noqa: BLE001 - Alembic's walk crosses a merge point: dbagent's rule below
                    continue
                assert moves(migrator.downgrade_plan(state, steps=n)) == expected, (state, n)
    # Across the merge, where Alembic's relative walk gives up: undoing 5b39 leaves both of its parents.
    plan = migrator.downgrade_plan(rev("8ebd"), steps=2)
    assert moves(plan) == ["-" + rev("8ebd"), "-" + rev("5b39")]
    assert migrator.state_after(rev("8ebd"), plan) == rev("826e", "e2cd")


def test_rollback_n_that_would_have_to_pick_a_branch_is_refused(migrator, rev):
    with pytest.raises(BadInput, match=r"rollback 3 is ambiguous: after 2 step\(s\) the database would be at 2 revisions"):
        migrator.downgrade_plan(rev("8ebd"), steps=3)
    with pytest.raises(BadInput, match="rollback 1 is ambiguous: after 0 step"):
        migrator.downgrade_plan(rev("826e", "e2cd"), steps=1)
    with pytest.raises(BadInput, match=r"cannot roll back 11 step\(s\): only 10 migration\(s\) are applied"):
        migrator.downgrade_plan(rev("bdb2"), steps=11)


def test_rollback_to_a_state_ends_exactly_there_and_reproduces_alembics_downgrade_when_named_whole(migrator):
    checked = 0
    for state in every_state(migrator):
        if state is None:
            continue
        current = tuple(state.split(","))
        for target in migrator.applied(state):
            alembic_plan = migrator.script._downgrade_revs(target, current)
            removed = {s.revision.revision for s in alembic_plan}
            left = state_text(migrator.heads_of(migrator.ancestors(current) - removed))
            # Named whole (every head Alembic leaves), dbagent takes Alembic's path.
            assert moves(migrator.downgrade_plan(state, to=left or "base")) == alembic_moves(alembic_plan), (state, target)
            # Named alone, the database ends at exactly that revision: other branches are undone too.
            plan = migrator.downgrade_plan(state, to=target)
            assert migrator.state_after(state, plan) == target, (state, target)
            checked += 1
    assert checked > 50


def test_a_rollback_target_not_applied_points_to_migrate(migrator, rev):
    with pytest.raises(BadInput, match="is not below the current revision .* use migrate --to"):
        migrator.downgrade_plan(rev("826e"), to=rev("e2cd"))
    with pytest.raises(BadInput, match="relative target is not a revision"):
        migrator.downgrade_plan(rev("826e"), to="-1")


def test_a_database_at_a_revision_the_scripts_lack_is_named(migrator, rev):
    with pytest.raises(BadInput, match="the database is at revision 'feedbeef', which these migrations do not contain"):
        migrator.upgrade_plan(f"{rev('826e')},feedbeef")


@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_branched_plan_rendered_in_one_pass_splits_into_each_steps_own_sql(migrator, direction):
    plan = migrator.upgrade_plan(None) if direction == "up" else migrator.downgrade_plan(migrator.head(), to="base")
    together = migrator.offline_sql_many(plan)
    assert list(together) == plan
    def statements(sql: str) -> list[str]:
        # The version table's own statement depends on the state rendered from (a branch's first step inserts
        # a row beside the other branch's, alone it updates its parent's): the script's statements do not.
        return [line for line in sql.splitlines() if line and line not in ("BEGIN;", "COMMIT;") and "app_versions" not in line]

    for step in plan:
        assert statements(together[step]) == statements(migrator.offline_sql(step)), step
        assert sum(line.startswith("-- Running") for line in together[step].splitlines()) == 1, step
    merge = next(s for s in plan if len(s.parents) > 1)
    assert ("CREATE" in together[merge] or "DROP" in together[merge]) is False  # the merge runs no DDL of a parent


def test_a_pyproject_toml_project_is_read_with_its_tool_alembic_settings(tmp_path):
    """``alembic init -t pyproject``: script_location, version_locations and file_template live in pyproject.toml."""
    from pathlib import Path

    from alembic import command
    from alembic.config import Config

    command.init(Config(str(tmp_path / "alembic.ini"), toml_file=str(tmp_path / "pyproject.toml")),
                 str(tmp_path / "alembic"), template="pyproject")
    pyproject = tmp_path / "pyproject.toml"
    (tmp_path / "revs").mkdir()
    pyproject.write_text(pyproject.read_text().replace(
        "[tool.alembic]\n",
        '[tool.alembic]\nversion_locations = ["%(here)s/revs"]\nfile_template = "%%(rev)s_rev_%%(slug)s"\n', 1))
    cfg = Config(str(tmp_path / "alembic.ini"), toml_file=str(pyproject))
    first = command.revision(cfg, message="one").revision
    second = command.revision(cfg, message="two").revision
    assert sorted(p.name for p in (tmp_path / "revs").glob("*.py")) == sorted([f"{first}_rev_one.py", f"{second}_rev_two.py"])

    migrator = Migrator(tmp_path / "alembic", UNREACHABLE)
    assert migrator.pyproject == pyproject
    assert migrator.order() == [first, second]  # found only through [tool.alembic] version_locations
    assert Path(migrator.revision(second).path).parent == tmp_path / "revs"
    # The structure checks read the same files (they are where [tool.alembic] says), and find the chain sound.
    from dbagent.checks import preflight
    from dbagent.checks.validate import load_sources

    assert sorted(name for name, _ in load_sources(tmp_path / "alembic")) == sorted(
        [f"{first}_rev_one.py", f"{second}_rev_two.py"])
    errors = {(f["revision"], f["rule"]) for f in preflight.findings(tmp_path / "alembic") if f["severity"] == "error"}
    assert errors == {(first, "downgrade"), (second, "downgrade")}, errors  # Alembic's empty template bodies: nothing else


def test_a_worker_sees_a_new_revision_where_the_project_keeps_its_scripts(tmp_path):
    """The worker's parsed scripts (context.cached_migrator) are read again when a file changes in the project's
    version_locations, not only in versions/: a revision added there is planned, not silently left out."""
    from alembic import command
    from alembic.config import Config

    from dbagent.operations.context import cached_migrator

    command.init(Config(str(tmp_path / "alembic.ini")), str(tmp_path / "alembic"), template="generic")
    ini = tmp_path / "alembic.ini"
    (tmp_path / "revs").mkdir()
    text = ini.read_text()
    assert "# version_locations = " in text
    ini.write_text(text.replace("# version_locations = ", "version_locations = %(here)s/revs\n# ", 1))
    cfg = Config(str(ini))
    first = command.revision(cfg, message="one").revision
    location = str(tmp_path / "alembic")
    assert cached_migrator(location, UNREACHABLE).order() == [first]
    second = command.revision(cfg, message="two").revision
    assert cached_migrator(location, UNREACHABLE).order() == [first, second]
