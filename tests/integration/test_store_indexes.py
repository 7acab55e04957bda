"""The audit trail's and the change log's readers walk an index, whatever the size of the tables.

``dbagent events`` (the newest entries, a command's own, those after a time), ``history`` (the newest change
-log rows), the agent's lookup of the last run that changed something and of where a run started: each
query, as the store sends it, is EXPLAINed over a few hundred thousand rows (statistics fresh, so the
planner sees a big table) and must read its rows through an index, neither scanning the table nor sorting
it. bench/bench_audit.py measures the same queries at ten million rows.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import text

from dbagent.postgres import store
from dbagent.postgres.connections import pg_connection
from dbagent.settings import DatabaseSettings

pytestmark = pytest.mark.integration

ROWS = 300_000
TYPES = ["command.accepted", "lock.acquired", "migration.started", "migration.step", "migration.completed",
         "verify.completed", "lock.released", "backup.started", "backup.completed", "status.completed"]


def fill(url: str, rows: int) -> None:
    """``rows`` audit entries over a year, ten per command, and as many change-log rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO dbagent.audit_log (id, ts, type, db, command_id, actor, data)"
            f" SELECT 'e' || g, timestamptz '2026-01-01' + g * interval '100 ms',"
            f" (%s::text[])[1 + g %% 10], 'test', 'c' || (g / 10), 'bench',"
            " jsonb_build_object('steps', g %% 3, 'revision_before', 'r' || g, 'revision_after', 'r' || (g + 1))"
            f" FROM generate_series(1, {rows}) g",
            (TYPES,),
        )
        conn.execute(
            f"INSERT INTO dbagent.changelog (command_id, revision, direction, actor, started_at, finished_at, outcome,"
            f" checksum) SELECT 'c' || g, 'r' || (g % 500), 'up', 'bench', now(), now(), 'applied', md5(g::text)"
            f" FROM generate_series(1, {rows}) g"
        )
        conn.execute("INSERT INTO dbagent.commands (id, type, db, status, plan) VALUES ('c42', 'migrate', 'test',"
                     " 'succeeded', '{}')")
        conn.execute("ANALYZE dbagent.audit_log")
        conn.execute("ANALYZE dbagent.changelog")


def plan_of(conn, query: str, params: dict) -> dict:
    row = conn.execute(text("EXPLAIN (FORMAT JSON) " + query), params).scalar()
    conn.rollback()
    return (row if isinstance(row, list) else json.loads(row))[0]["Plan"]


def nodes(plan: dict) -> list[dict]:
    return [plan, *(n for child in plan.get("Plans", []) for n in nodes(child))]


def whole_table_reads(plan: dict) -> list[str]:
    """Sequential scans of our tables, and sorts of more rows than the query returns."""
    found = []
    for node in nodes(plan):
        if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in ("audit_log", "changelog", "commands"):
            found.append(f"Seq Scan on {node['Relation Name']}")
        if node["Node Type"] in ("Sort", "Incremental Sort") and node.get("Plan Rows", 0) > 1000:
            found.append(f"Sort of {node['Plan Rows']} rows")
    return found


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    from tests.servers import create_database, db_url, drop_database

    name = f"dbagent_idx_{datetime.now(UTC):%H%M%S%f}"
    create_database(name)
    db = DatabaseSettings(url=db_url(name), migrations=str(tmp_path_factory.mktemp("m")))
    try:
        with pg_connection(db) as conn:
            store.ensure_schema(conn)
        fill(db_url(name), ROWS)
        with pg_connection(db) as conn:
            yield conn
    finally:
        drop_database(name)


MIDDLE = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=ROWS / 20)


@pytest.mark.parametrize("case, query, params", [
    ("events", store.recent_events_sql(of_command=False, after=False), {"limit": 50}),
    ("events of a command", store.recent_events_sql(of_command=True, after=False), {"command": "c4242", "limit": 50}),
    ("events after a time", store.recent_events_sql(of_command=False, after=True), {"after": MIDDLE, "limit": 50}),
    ("events of a command after a time", store.recent_events_sql(of_command=True, after=True),
     {"command": "c4242", "after": MIDDLE, "limit": 50}),
    ("the agent's last changing run", store.LAST_CHANGING_MIGRATE, {"ts": MIDDLE}),
    ("history", store.CHANGELOG_NEWEST, {"limit": 50}),
    ("where a run started", store.RECORDED_START, {"id": "c42"}),
])
def test_each_reader_walks_an_index(big, case, query, params):
    plan = plan_of(big, query, params)
    assert whole_table_reads(plan) == [], f"{case}: {json.dumps(plan)[:2000]}"
    assert any("Index" in n["Node Type"] for n in nodes(plan)), case


def test_the_check_sees_a_query_that_reads_the_whole_table(big):
    # Not an index in sight: the check above would say so.
    plan = plan_of(big, "SELECT * FROM dbagent.audit_log WHERE data->>'steps' = '2' ORDER BY actor LIMIT 5", {})
    assert whole_table_reads(plan)


def test_the_readers_answer_what_they_did_before(big):
    newest = store.recent_events(big, limit=3)
    assert [e["id"] for e in newest] == [f"e{ROWS - 2}", f"e{ROWS - 1}", f"e{ROWS}"]
    mine = store.recent_events(big, limit=100, command_id="c4242")
    assert [e["id"] for e in mine] == [f"e{n}" for n in range(42420, 42430)]
    after = store.recent_events(big, limit=5, after_ts=MIDDLE)
    assert [e["id"] for e in after] == [f"e{n}" for n in range(ROWS - 4, ROWS + 1)]
    last = store.last_changing_migrate(big, MIDDLE)
    # entries of type migration.completed are those with g % 10 == 4; steps = g % 3 > 0
    g = max(n for n in range(1, ROWS // 2 + 1) if n % 10 == 4 and n % 3 > 0)
    assert last["command_id"] == f"c{g // 10}" and last["revision_before"] == f"r{g}"
    assert [r["id"] for r in store.changelog(big, 2)] == [ROWS - 1, ROWS]
    big.rollback()
