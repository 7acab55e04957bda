"""Batched data migrations (dbagent.backfill) on real PostgreSQL: batches, resume after kill -9, no-ops."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, pool

from dbagent.backfill import backfill
from dbagent.core.errors import BadInput, OperationFailed
from dbagent.settings import DatabaseSettings
from tests.servers import ROOT, copy_migrations, create_database, db_url, drop_database

pytestmark = pytest.mark.integration

# Runs the migrations in a child process, printing every progress report as a JSON line.
UPGRADE = """
import json, sys
from alembic import command
from alembic.config import Config
cfg = Config()
cfg.set_main_option("script_location", sys.argv[1])
cfg.attributes["url"] = sys.argv[2]
cfg.attributes["dbagent.backfill"] = {
    "batch_size": int(sys.argv[3]),
    "pause_s": 0.0,
    "on_progress": lambda p: print(json.dumps(p), flush=True),
}
command.upgrade(cfg, "head")
"""


def migration(revision: str, down: str | None, body: str, downgrade: str = "pass") -> str:
    return f'''"""{revision}"""
from alembic import op

from dbagent.backfill import backfill

revision = "{revision}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
{body}


def downgrade() -> None:
    {downgrade}
'''


@pytest.fixture
def db():
    name = f"dbagent_bf_{uuid.uuid4().hex[:10]}"
    create_database(name)
    try:
        yield name
    finally:
        drop_database(name)


def sql(name: str, query: str, *params) -> list[tuple]:
    with psycopg.connect(db_url(name), autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


def engine(name: str):
    return create_engine("postgresql+psycopg://" + db_url(name).split("://", 1)[1], poolclass=pool.NullPool)


def alembic_config(name: str, location: Path, attributes: dict | None = None, buffer: io.StringIO | None = None) -> Config:
    cfg = Config(output_buffer=buffer)
    cfg.set_main_option("script_location", str(location))
    cfg.attributes["url"] = db_url(name)
    if attributes is not None:
        cfg.attributes["dbagent.backfill"] = attributes
    return cfg


def scripts(tmp: Path, extra: dict[str, str]) -> Path:
    """Our env.py (transaction per migration) with only the given scripts."""
    return copy_migrations(tmp, extra=extra, upto=0)


def wait_for_sessions_to_end(name: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while sql(name, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")[0][0]:
        assert time.monotonic() < deadline, "the killed backfill's session did not end"
        time.sleep(0.05)


def test_a_backfill_of_a_million_rows_killed_half_way_resumes_and_finishes(db, tmp_path):
    rows = 1_000_000
    sql(db, "CREATE TABLE items (id bigint PRIMARY KEY, counter integer NOT NULL DEFAULT 0)")
    sql(db, f"INSERT INTO items (id) SELECT g FROM generate_series(1, {rows}) g")
    sql(db, "ANALYZE items")
    body = '    backfill(op, "items", "counter = counter + 1", name="items-counter")'
    location = scripts(tmp_path, {"b01_backfill.py": migration("b01", None, body)})
    args = [sys.executable, "-c", UPGRADE, str(location), db_url(db), "20000"]
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}

    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ, cwd=ROOT, start_new_session=True)
    started = time.monotonic()
    try:
        while True:
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() - started < 60, "the backfill did not get half-way"
            done = sql(db, "SELECT rows_done FROM dbagent.backfills WHERE name = 'items-counter'") if sql(
                db, "SELECT to_regclass('dbagent.backfills')")[0][0] else []
            if done and done[0][0] >= rows // 2:
                break
            time.sleep(0.02)
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    wait_for_sessions_to_end(db)

    saved_key, saved_done, finished = sql(
        db, "SELECT last_key, rows_done, finished_at IS NOT NULL FROM dbagent.backfills WHERE name = 'items-counter'")[0]
    assert not finished and rows // 2 <= saved_done < rows
    # every batch committed with its progress row, nothing else: exactly rows up to the saved key were counted
    assert sql(db, "SELECT count(*), min(id), max(id) FROM items WHERE counter = 1") == [(saved_done, 1, int(saved_key))]
    assert sql(db, "SELECT count(*) FROM items WHERE counter > 1") == [(0,)]
    assert sql(db, "SELECT to_regclass('public.alembic_version') IS NULL OR NOT EXISTS (SELECT 1 FROM alembic_version)") == [(True,)]

    second = subprocess.run(args, capture_output=True, text=True, env=environ, cwd=ROOT, timeout=120)
    assert second.returncode == 0, second.stderr
    reports = [json.loads(line) for line in second.stdout.splitlines()]
    assert reports[0]["resumed_after"] == saved_key
    assert int(reports[0]["last_key"]) == int(saved_key) + 20000  # the first batch of the rerun starts after it
    assert reports[0]["rows_done"] == saved_done + 20000
    assert reports[-1]["finished"] and reports[-1]["rows_done"] == rows and reports[-1]["eta_s"] == 0
    assert all(r["rows_estimate"] == rows for r in reports)

    assert sql(db, "SELECT counter, count(*) FROM items GROUP BY counter") == [(1, rows)]  # each row exactly once
    assert sql(db, "SELECT version_num FROM alembic_version") == [("b01",)]
    assert sql(db, "SELECT rows_done, runs, finished_at IS NOT NULL, archived_at IS NOT NULL FROM dbagent.backfills") == [
        (rows, 2, True, True)
    ]
    print(f"\n1M-row backfill killed at {saved_done} rows, resumed and finished; total {time.monotonic() - started:.1f}s")


def test_where_filters_the_rows_and_author_sql_is_passed_through_verbatim(db):
    sql(db, "CREATE TABLE users (id integer PRIMARY KEY, first_name text, last_name text, display_name text)")
    sql(db, "INSERT INTO users SELECT g, 'f' || g, 'l' || g, CASE WHEN g % 3 = 0 THEN 'kept' END FROM generate_series(1, 2500) g")
    with engine(db).connect() as conn:
        progress = backfill(
            conn, "public.users",
            "display_name = first_name || ' ' || last_name || ' 100% :done'",
            where="display_name IS NULL AND first_name LIKE 'f%'",
            batch_size=400,
        )
    assert progress.finished and progress.rows_done == 2500 - 833 and progress.rows_scanned == 2500
    assert progress.batches == 7  # 6 full batches and one short one
    assert sql(db, "SELECT count(*) FROM users WHERE display_name = 'kept'") == [(833,)]
    assert sql(db, "SELECT display_name FROM users WHERE id = 1") == [("f1 l1 100% :done",)]
    assert sql(db, "SELECT count(*) FROM users WHERE display_name IS NULL") == [(0,)]


def test_a_finished_backfill_run_again_is_a_no_op(db):
    sql(db, "CREATE TABLE items (id bigint PRIMARY KEY, counter integer NOT NULL DEFAULT 0)")
    sql(db, "INSERT INTO items (id) SELECT generate_series(1, 3000)")
    with engine(db).connect() as conn:
        done = backfill(conn, "items", "counter = counter + 1", batch_size=1000)
        again = backfill(conn, "items", "counter = counter + 1", batch_size=1000)
    assert done.finished and done.rows_done == 3000
    assert again.finished and again.resumed_after == "3000" and again.batches == done.batches
    assert sql(db, "SELECT counter, count(*) FROM items GROUP BY counter") == [(1, 3000)]
    assert sql(db, "SELECT runs, rows_done FROM dbagent.backfills") == [(2, 3000)]


def test_progress_reports_rise_batch_by_batch_with_the_configured_batch_size(db, tmp_path):
    sql(db, "CREATE TABLE items (id bigint PRIMARY KEY, counter integer NOT NULL DEFAULT 0)")
    sql(db, "INSERT INTO items (id) SELECT generate_series(1, 5000)")
    sql(db, "ANALYZE items")
    location = scripts(tmp_path, {"b01_backfill.py": migration("b01", None, '    backfill(op, "items", "counter = counter + 1")')})
    reports: list[dict] = []
    command.upgrade(alembic_config(db, location, {"batch_size": 1200, "pause_s": 0.01, "on_progress": reports.append}), "head")
    assert [r["rows_done"] for r in reports] == [1200, 2400, 3600, 4800, 5000]
    assert [r["batches"] for r in reports] == [1, 2, 3, 4, 5]
    assert [r["last_key"] for r in reports] == ["1200", "2400", "3600", "4800", "5000"]
    assert [r["finished"] for r in reports] == [False] * 4 + [True]
    assert all(r["rows_estimate"] == 5000 and r["table"] == "items" and r["name"].startswith("items:") for r in reports)
    assert reports[1]["rate"] > 0 and reports[1]["eta_s"] is not None
    assert sql(db, "SELECT counter, count(*) FROM items GROUP BY counter") == [(1, 5000)]


def test_plain_alembic_uses_the_defaults_and_logs_progress(db, tmp_path, caplog):
    sql(db, "CREATE TABLE items (id bigint PRIMARY KEY, counter integer NOT NULL DEFAULT 0)")
    sql(db, "INSERT INTO items (id) SELECT generate_series(1, 2500)")
    location = scripts(tmp_path, {"b01_backfill.py": migration("b01", None, '    backfill(op, "items", "counter = counter + 1")')})
    with caplog.at_level("INFO", logger="dbagent.backfill"):
        command.upgrade(alembic_config(db, location), "head")
    assert sql(db, "SELECT batches, rows_done FROM dbagent.backfills") == [(3, 2500)]  # batches of 1000
    assert any("2500 updated, 3 batches" in r.getMessage() and "(finished)" in r.getMessage() for r in caplog.records)


def test_a_step_failing_after_its_backfill_reruns_without_redoing_it_and_reapplying_backfills_afresh(db, tmp_path):
    sql(db, "CREATE TABLE items (id bigint PRIMARY KEY, counter integer NOT NULL DEFAULT 0)")
    sql(db, "CREATE TABLE gate (ok boolean)")
    sql(db, "INSERT INTO items (id) SELECT generate_series(1, 2000)")
    body = (
        '    backfill(op, "items", "counter = counter + 1", name="count")\n'
        '    backfill(op, "items", "counter = counter + 10", name="count-tens")\n'
        '    op.execute("SELECT 1 / (SELECT count(*) FROM gate)::int")  # fails until gate has a row'
    )
    location = scripts(tmp_path, {"b01_backfill.py": migration("b01", None, body)})
    cfg = alembic_config(db, location, {"batch_size": 500})
    with pytest.raises(Exception, match="division by zero"):
        command.upgrade(cfg, "head")
    assert sql(db, "SELECT counter, count(*) FROM items GROUP BY counter") == [(11, 2000)]  # committed batch by batch
    assert sql(db, "SELECT name, finished_at IS NOT NULL, archived_at FROM dbagent.backfills ORDER BY id") == [
        ("count", True, None), ("count-tens", True, None)
    ]

    sql(db, "INSERT INTO gate VALUES (true)")
    command.upgrade(cfg, "head")
    assert sql(db, "SELECT counter, count(*) FROM items GROUP BY counter") == [(11, 2000)]  # not again
    assert sql(db, "SELECT version_num FROM alembic_version") == [("b01",)]
    assert sql(db, "SELECT runs, archived_at IS NOT NULL FROM dbagent.backfills ORDER BY id") == [(2, True), (2, True)]

    command.downgrade(cfg, "base")
    command.upgrade(cfg, "head")
    assert sql(db, "SELECT counter, count(*) FROM items GROUP BY counter") == [(22, 2000)]  # a new application, new backfills
    assert sql(db, "SELECT runs, archived_at IS NOT NULL FROM dbagent.backfills ORDER BY id") == [
        (2, True), (2, True), (1, True), (1, True)
    ]


def test_backfills_of_consecutive_steps_in_one_run_are_each_archived_with_their_own_step(db, tmp_path):
    sql(db, "CREATE TABLE items (id bigint PRIMARY KEY, counter integer NOT NULL DEFAULT 0)")
    sql(db, "INSERT INTO items (id) SELECT generate_series(1, 1500)")
    location = scripts(tmp_path, {
        "b01_ones.py": migration("b01", None, '    backfill(op, "items", "counter = counter + 1", name="ones")'),
        "b02_tens.py": migration("b02", "b01", '    backfill(op, "items", "counter = counter + 10", name="tens")\n'
                                               '    op.execute("SELECT 1 / (SELECT count(*) FROM items WHERE counter = 11)::int")'),
    })
    reports: list[dict] = []
    command.upgrade(alembic_config(db, location, {"batch_size": 700, "on_progress": reports.append}), "head")
    assert [(r["name"], r["rows_done"]) for r in reports] == [
        ("ones", 700), ("ones", 1400), ("ones", 1500), ("tens", 700), ("tens", 1400), ("tens", 1500)
    ]
    assert sql(db, "SELECT counter, count(*) FROM items GROUP BY counter") == [(11, 1500)]
    assert sql(db, "SELECT name, finished_at IS NOT NULL, archived_at IS NOT NULL FROM dbagent.backfills ORDER BY id") == [
        ("ones", True, True), ("tens", True, True)
    ]


def test_a_failing_progress_callback_does_not_stop_the_backfill_and_null_keys_are_skipped(db, caplog):
    sql(db, "CREATE TABLE things (k integer UNIQUE, counter integer NOT NULL DEFAULT 0)")
    sql(db, "INSERT INTO things (k) SELECT CASE WHEN g % 100 = 0 THEN NULL ELSE g END FROM generate_series(1, 1000) g")

    def broken(report: dict) -> None:
        raise ConnectionError("redis is down")

    with engine(db).connect() as conn:
        progress = backfill(conn, "things", "counter = counter + 1", key="k", batch_size=300, on_progress=broken)
    assert progress.finished and progress.rows_done == 990 and progress.last_key == "999"
    assert sql(db, "SELECT k IS NULL, counter, count(*) FROM things GROUP BY 1, 2 ORDER BY 1") == [(False, 1, 990), (True, 0, 10)]
    assert any("progress report failed: redis is down" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("key_type,key_values", [
    ("uuid", "gen_random_uuid()"),
    ("text", "'k' || lpad(g::text, 3, '0') || md5(g::text)"),
])
def test_non_integer_keys_page_in_their_own_order(db, key_type, key_values):
    sql(db, f"CREATE TABLE things (k {key_type} PRIMARY KEY, counter integer NOT NULL DEFAULT 0)")
    sql(db, f"INSERT INTO things (k) SELECT {key_values} FROM generate_series(1, 1234) g")
    with engine(db).connect() as conn:
        progress = backfill(conn, "things", "counter = counter + 1", key="k", batch_size=100)
    assert progress.finished and progress.rows_done == 1234 and progress.batches == 13
    assert progress.last_key == sql(db, "SELECT max(k::text) FROM things" if key_type == "uuid" else "SELECT max(k) FROM things")[0][0]
    assert sql(db, "SELECT counter, count(*) FROM things GROUP BY counter") == [(1, 1234)]


def test_a_batch_waiting_on_a_locked_row_is_retried_under_the_sessions_lock_timeout(db):
    sql(db, "CREATE TABLE items (id bigint PRIMARY KEY, counter integer NOT NULL DEFAULT 0)")
    sql(db, "INSERT INTO items (id) SELECT generate_series(1, 300)")
    holder = psycopg.connect(db_url(db))
    holder.execute("SELECT * FROM items WHERE id = 150 FOR UPDATE")
    threading.Timer(1.0, holder.commit).start()
    try:
        with engine(db).connect() as conn:
            conn.exec_driver_sql("SET lock_timeout = '200ms'")
            conn.commit()
            progress = backfill(conn, "items", "counter = counter + 1", batch_size=100)
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "200ms"  # the session's own, untouched
            conn.rollback()
    finally:
        holder.close()
    assert progress.finished and progress.rows_done == 300
    assert sql(db, "SELECT counter, count(*) FROM items GROUP BY counter") == [(1, 300)]


def test_one_session_at_a_time_runs_a_backfill_and_bad_input_is_named(db):
    sql(db, "CREATE TABLE items (id bigint PRIMARY KEY, counter integer NOT NULL DEFAULT 0)")
    with engine(db).connect() as conn:
        with psycopg.connect(db_url(db), autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(hashtextextended('dbagent:backfill:' || 'busy', 0))")
            with pytest.raises(OperationFailed, match="'busy' is running in another session"):
                backfill(conn, "items", "counter = 1", name="busy")
        with pytest.raises(BadInput, match="no table 'nope'"):
            backfill(conn, "nope", "counter = 1")
        with pytest.raises(BadInput, match="has no column 'uid'"):
            backfill(conn, "items", "counter = 1", key="uid")
        conn.exec_driver_sql("SELECT 1")
        with pytest.raises(BadInput, match="commit or roll back"):
            backfill(conn, "items", "counter = 1")


def test_offline_sql_says_what_the_backfill_would_do(db, tmp_path):
    location = scripts(tmp_path, {"b01_backfill.py": migration("b01", None, '    backfill(op, "items", "counter = counter + 1", where="counter = 0")')})
    buffer = io.StringIO()
    command.upgrade(alembic_config(db, location, {"batch_size": 5000}, buffer), "head", sql=True)
    out = buffer.getvalue()
    assert "-- dbagent backfill 'items:" in out and "in batches of 5000 rows by id" in out
    assert "--   UPDATE items SET counter = counter + 1 WHERE counter = 0" in out
    assert sql(db, "SELECT to_regclass('dbagent.backfills')") == [(None,)]


def test_a_migration_with_a_backfill_runs_through_dbagent_migrate(env, redis_client):
    body = (
        '    op.execute("CREATE TABLE IF NOT EXISTS big (id bigint PRIMARY KEY, counter integer NOT NULL DEFAULT 0)")\n'
        '    op.execute("INSERT INTO big (id) SELECT generate_series(1, 5000) ON CONFLICT DO NOTHING")\n'
        '    backfill(op, "big", "counter = counter + 1", name="big")'
    )
    env.migrations = copy_migrations(env.tmp, extra={"012_backfill.py": migration("012", "011", body, 'op.execute("DROP TABLE big")')})
    env.extra_config = "pre_migration_backup = false\nbackfill_batch_size = 800\n"
    env.start_worker()
    run = env.cli("migrate", "--json")
    assert run.code == 0, run.stderr
    assert run.json()["revision_after"] == "012"
    assert env.sql("SELECT counter, count(*) FROM big GROUP BY counter") == [(1, 5000)]
    assert env.sql("SELECT rows_done, finished_at IS NOT NULL, archived_at IS NOT NULL FROM dbagent.backfills") == [(5000, True, True)]
    # The worker hands the database's backfill_batch_size to the helper and reports progress as events.
    assert env.sql("SELECT batches FROM dbagent.backfills") == [(7,)]  # ceil(5000 / 800)
    progress = [e for e in env.stream_events(redis_client) if e["type"] == "backfill.progress"]
    assert progress and progress[-1]["data"]["finished"] is True and progress[-1]["data"]["rows_done"] == 5000
    assert progress[-1]["command_id"] == run.json()["command_id"]


def test_backfill_settings_have_defaults_and_take_durations():
    db = DatabaseSettings(url="postgresql://x@h/d")
    assert (db.backfill_batch_size, db.backfill_pause) == (1000, 0.0)
    tuned = DatabaseSettings(url="postgresql://x@h/d", backfill_batch_size=5000, backfill_pause="250ms")
    assert (tuned.backfill_batch_size, tuned.backfill_pause) == (5000, 0.25)
    with pytest.raises(ValueError):
        DatabaseSettings(url="postgresql://x@h/d", backfill_batch_size=0)
