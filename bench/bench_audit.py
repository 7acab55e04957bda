"""The audit trail's and the change log's readers at ten million rows: server time of each query.

Fills a scratch database with ``--rows`` audit entries (ten per command, a year of them) and as many
change-log rows, then times each reader as the store sends it (EXPLAIN ANALYZE's execution time, median of
``--runs``), with dbagent's indexes and, for comparison, without the ones schema 5 added. Goal (issue 13):
≤ 5 ms each. Prints a table; ``--json`` writes the figures too.

    .venv/bin/python bench/bench_audit.py [--rows 10000000] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dbagent.postgres import store  # noqa: E402
from dbagent.postgres.connections import pg_connection  # noqa: E402
from dbagent.settings import DatabaseSettings  # noqa: E402
from tests.integration.test_store_indexes import fill  # noqa: E402
from tests.servers import create_database, db_url, drop_database  # noqa: E402

GOAL_MS = 5.0
ADDED = ["audit_log_ts", "audit_log_command_ts", "audit_log_completed_runs"]


def queries(rows: int) -> list[tuple[str, str, dict]]:
    middle = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rows / 20)
    command = f"c{rows // 20}"
    return [
        ("events (newest 50)", store.recent_events_sql(of_command=False, after=False), {"limit": 50}),
        ("events --command", store.recent_events_sql(of_command=True, after=False), {"command": command, "limit": 50}),
        ("events after a time", store.recent_events_sql(of_command=False, after=True), {"after": middle, "limit": 50}),
        ("agent: last changing run", store.LAST_CHANGING_MIGRATE, {"ts": middle}),
        ("agent: where a run started", store.RECORDED_START, {"id": "c42"}),
        ("history (newest 50)", store.CHANGELOG_NEWEST, {"limit": 50}),
    ]


def server_ms(conn, query: str, params: dict, runs: int) -> float:
    times = []
    for _ in range(runs):
        plan = conn.execute(text("EXPLAIN (ANALYZE, FORMAT JSON) " + query), params).scalar()
        conn.rollback()
        plan = plan if isinstance(plan, list) else json.loads(plan)
        times.append(plan[0]["Execution Time"])
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    name = f"dbagent_bench_audit_{os.getpid()}"
    create_database(name)
    db = DatabaseSettings(url=db_url(name), migrations=str(ROOT / "migrations"))
    try:
        with pg_connection(db) as conn:
            store.ensure_schema(conn)
        started = time.monotonic()
        fill(db_url(name), args.rows)
        print(f"filled {args.rows:,} audit and change-log rows in {time.monotonic() - started:.0f} s", flush=True)
        results = []
        with pg_connection(db) as conn:
            for label, query, params in queries(args.rows):
                results.append({"query": label, "ms": server_ms(conn, query, params, args.runs)})
        with psycopg.connect(db_url(name), autocommit=True) as raw:
            for index in ADDED:
                raw.execute(f"DROP INDEX dbagent.{index}")
            raw.execute("CREATE INDEX audit_log_command ON dbagent.audit_log (command_id)")  # schema 4's
            raw.execute("ANALYZE dbagent.audit_log")
        with pg_connection(db) as conn:
            for result, (_, query, params) in zip(results, queries(args.rows), strict=True):
                result["ms_schema_4"] = server_ms(conn, query, params, max(1, args.runs // 2))
    finally:
        drop_database(name)

    print(f"\nserver time, median of {args.runs} (EXPLAIN ANALYZE), {args.rows:,} rows; goal ≤ {GOAL_MS:g} ms")
    print(f"| {'query':<28} | {'schema 5 (ms)':>13} | {'schema 4 (ms)':>13} | goal |")
    print(f"|{'-' * 30}|{'-' * 15}|{'-' * 15}|------|")
    for r in results:
        ok = "met" if r["ms"] <= GOAL_MS else "MISSED"
        print(f"| {r['query']:<28} | {r['ms']:>13.3f} | {r['ms_schema_4']:>13.1f} | {ok} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": args.rows, "goal_ms": GOAL_MS, "results": results}, indent=2))
    return 0 if all(r["ms"] <= GOAL_MS for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
