"""Which plans in one transaction write their steps' records together (agent/operations/steps.py ``may_commit_midway``):
only those none of whose scripts may commit before it ends. Scripts made with ``alembic revision``; no database."""

from __future__ import annotations

import pytest

from dbagent.operations.steps import may_commit_midway
from dbagent.postgres.migrator import Migrator
from tests.alembic_projects import linear_project

UNREACHABLE = "postgresql://u@127.0.0.1:1/x"

BODIES = {
    "plain DDL": ('op.add_column("t", sa.Column("c", sa.Text()))', False),
    "autocommit block": ('with op.get_context().autocommit_block():\n        op.execute("CREATE INDEX CONCURRENTLY i ON t (c)")', True),
    "backfill": ('from dbagent.backfill import backfill; backfill("t", set_="c = 1", where="c IS NULL")', True),
    "COMMIT": ('op.execute("COMMIT")', True),
    "connection commit": ("op.get_bind().commit()", True),
    "the word in a string": ('op.execute("COMMENT ON TABLE t IS \'commit log\'")', False),
}


@pytest.mark.parametrize("case", list(BODIES))
def test_a_script_that_may_commit_midway_is_told_apart(tmp_path, case):
    body, commits = BODIES[case]
    (revision,) = linear_project(tmp_path / "project", steps=[(case, body, "pass")])
    migrator = Migrator(tmp_path / "project", UNREACHABLE)
    (step,) = migrator.upgrade_plan(None)
    assert step.revision == revision
    assert may_commit_midway(migrator, step) is commits
