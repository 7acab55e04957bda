"""agent/postgres/store.py on real PostgreSQL: a schema left by an earlier version is brought up to date, and a
plan's ``steps_done`` lives in its own column, so a step's record never rewrites the plan's list of steps."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import create_engine, pool

from dbagent.core.commands import Command, CommandType, utcnow
from dbagent.core.events import Event, EventType
from dbagent.postgres import store
from dbagent.postgres.connections import sqlalchemy_url
from tests.servers import create_database, db_url, drop_database

pytestmark = pytest.mark.integration


@pytest.fixture
def conn():
    name = f"dbagent_st_{uuid.uuid4().hex[:10]}"
    create_database(name)
    engine = create_engine(sqlalchemy_url(db_url(name)), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()
        drop_database(name)


def test_a_schema_of_the_previous_version_gets_the_steps_done_column(conn):
    store.ensure_schema(conn)
    conn.exec_driver_sql(f"ALTER TABLE {store.SCHEMA}.commands DROP COLUMN steps_done")
    conn.exec_driver_sql(f"COMMENT ON SCHEMA {store.SCHEMA} IS 'dbagent schema 3'")
    conn.commit()
    assert not conn.exec_driver_sql(store.SCHEMA_CURRENT).scalar()
    conn.commit()

    store.ensure_schema(conn)

    assert conn.exec_driver_sql(store.SCHEMA_CURRENT).scalar()
    assert conn.exec_driver_sql(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = %s AND table_name = 'commands'"
        " AND column_name = 'steps_done'", (store.SCHEMA,)
    ).scalar() == 1


def test_each_step_counts_itself_done_without_rewriting_the_plan(conn):
    store.ensure_schema(conn)
    command = Command(type=CommandType.MIGRATE, db="test", args={}, actor="t")
    steps = [{"revision": f"{i:012x}", "direction": "up"} for i in range(300)]
    assert store.record_command(conn, command, "w")
    assert store.claim_command(conn, command.id, "w", {"type": "migrate", "phase": "claimed"})
    store.update_plan(conn, command.id, {"phase": "validation", "steps": steps})
    store.update_plan(conn, command.id, {"phase": "steps", "steps_done": 0})
    conn.commit()
    for number in (1, 2):
        event = Event(type=EventType.MIGRATION_STEP, db="test", command_id=command.id, data={"number": number})
        record = store.step_record(command=command, revision=steps[number - 1]["revision"], description=None,
                                   direction="up", started_at=utcnow(), finished_at=utcnow(), outcome="applied",
                                   checksum=None, event=event)
        store.record_steps(conn, [record], command_id=command.id, steps_done=number)
        conn.commit()

    row = store.command_row(conn, command.id)
    assert row["status"] == "running"
    assert row["plan"]["steps_done"] == 2 and row["plan"]["steps"] == steps and row["plan"]["phase"] == "steps"
    assert "steps_done" not in row  # callers see the plan's steps_done, as before
    assert [r["plan"]["steps_done"] for r in store.open_commands(conn) if r["id"] == command.id] == [2]
    # The plan itself (300 steps) was written by the phases, not by each step:
    assert conn.exec_driver_sql(
        f"SELECT plan->>'steps_done', steps_done FROM {store.SCHEMA}.commands WHERE id = %s", (command.id,)
    ).one() == ("0", 2)
    conn.commit()

    store.update_plan(conn, command.id, {"phase": "steps", "steps_done": 0})  # a phase that resets the count
    conn.commit()
    assert store.command_row(conn, command.id)["plan"]["steps_done"] == 0


def test_the_records_of_many_steps_go_in_together_in_plan_order(conn):
    store.ensure_schema(conn)
    command = Command(type=CommandType.MIGRATE, db="test", args={}, actor="t", ticket="CHG-7")
    assert store.record_command(conn, command, "w")
    assert store.claim_command(conn, command.id, "w", {"type": "migrate", "phase": "claimed"})
    conn.commit()
    revisions = [f"{i:012x}" for i in range(40, 0, -1)]  # ids that do not sort in plan order
    records = [
        store.step_record(
            command=command, revision=rev, description=f"step {n}", direction="up", started_at=utcnow(),
            finished_at=utcnow(), outcome="applied", checksum="c" * 64,
            event=Event(type=EventType.MIGRATION_STEP, db="test", command_id=command.id, actor="t",
                        data={"number": n, "revision": rev, "nested": {"a": [1, None]}}),
        )
        for n, rev in enumerate(revisions, 1)
    ]

    store.record_steps(conn, records, command_id=command.id, steps_done=len(records))
    conn.commit()

    logged = conn.exec_driver_sql(
        f"SELECT revision, description, outcome, checksum, ticket, actor FROM {store.SCHEMA}.changelog"
        " WHERE command_id = %s ORDER BY id", (command.id,)).all()
    assert [tuple(r) for r in logged] == [(rev, f"step {n}", "applied", "c" * 64, "CHG-7", "t")
                                          for n, rev in enumerate(revisions, 1)]
    events = conn.exec_driver_sql(
        f"SELECT id, type, data FROM {store.SCHEMA}.audit_log WHERE command_id = %s ORDER BY seq", (command.id,)).all()
    assert [(i, t, d) for i, t, d in events] == [(r.event.id, "migration.step", r.event.data) for r in records]
    assert store.command_row(conn, command.id)["plan"]["steps_done"] == len(records)
    # Written again (a relay, a retry): the events are not duplicated.
    store.record_steps(conn, records[:1], command_id=command.id, steps_done=None)
    conn.commit()
    assert conn.exec_driver_sql(f"SELECT count(*) FROM {store.SCHEMA}.audit_log WHERE command_id = %s",
                                (command.id,)).scalar() == len(records)
