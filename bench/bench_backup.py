"""Benchmark: backups and restores of a database of at least 1 GB of realistic rows.

* `dbagent backup full` (through the queue; checksum, no full read) against raw `pg_dump -Fc`;
* `dbagent restore` (checksum first, then pg_restore, which reads the archive once) against raw
  `pg_restore --single-transaction --clean --if-exists` of the same archive;
* `-Fd -j2` against `-Fc` (raw pg_dump), the speed-up;
* verification (`dbagent backups verify`: checksum + full read) as a share of the dump time.

Prints a table and writes bench/results/backup.json. Run: make bench-backup
(BENCH_GB=0.2 for a quicker, smaller run; the figures in the notes use the default 1.0.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import redis  # noqa: E402

from tests.servers import REDIS_URL, create_database, delete_prefix, drop_database, new_env  # noqa: E402

TARGET_GB = float(os.environ.get("BENCH_GB", "1.0"))


def sh(cmd: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def fill(url: str) -> int:
    """Users, sessions, notifications and audit logs until the database holds TARGET_GB."""
    with psycopg.connect(url, autocommit=True) as conn:
        users = 200_000
        conn.execute(
            "INSERT INTO users (email, password_hash, first_name, last_name, display_name, locale, timezone)"
            " SELECT 'user' || g || '@example.com', md5(g::text) || md5((g * 7)::text), 'First' || g, 'Last' || g,"
            " 'User ' || g, 'en', 'Europe/Berlin' FROM generate_series(1, %s) g",
            (users,),
        )
        batch = 0
        while conn.execute("SELECT pg_database_size(current_database())").fetchone()[0] < TARGET_GB * 1024**3:
            batch += 1
            conn.execute(
                "WITH ids AS (SELECT array_agg(id) AS a FROM (SELECT id FROM users LIMIT 1000) s)"
                " INSERT INTO audit_logs (user_id, action, resource_type, resource_id, details, ip_address, created_at)"
                " SELECT ids.a[1 + g % 1000], (ARRAY['login','logout','update','delete','create'])[1 + (g % 5)],"
                " 'document', (g * 31)::text, jsonb_build_object('request_id', md5(g::text), 'path',"
                " '/api/v1/documents/' || g, 'status', 200 + (g % 3), 'agent',"
                " 'Mozilla/5.0 (X11; Linux x86_64) bench/' || (g % 97)),"
                " ('10.0.' || (g % 250) || '.' || (g % 200))::inet, now() - (g || ' seconds')::interval"
                " FROM generate_series(1, 500000) g, ids"
            )
            conn.execute(
                "WITH ids AS (SELECT array_agg(id) AS a FROM (SELECT id FROM users LIMIT 1000) s)"
                " INSERT INTO notifications (user_id, type, title, body, data)"
                " SELECT ids.a[1 + g % 1000], 'info', 'Notice ' || g, repeat('Lorem ipsum dolor sit amet. ', 4),"
                " jsonb_build_object('n', g) FROM generate_series(1, 100000) g, ids"
            )
        conn.execute("VACUUM ANALYZE")
        return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dbagent-bench-backup-"))
    world = new_env(tmp)
    world.extra_config = "verify_after_backup = false"
    create_database(world.name)
    client = redis.Redis.from_url(REDIS_URL)
    dbagent = [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(world.config)]
    env = world.environ()
    raw_env = {**os.environ, "PGDATABASE": world.name, "PGHOST": "127.0.0.1", "PGUSER": "postgres"}
    results: dict[str, float] = {}
    try:
        world.start_worker(log_name="bench-worker")
        sh([*dbagent, "migrate", "--no-backup"], env)
        print(f"filling {world.name} to {TARGET_GB} GB…", flush=True)
        results["database_bytes"] = fill(world.url)
        print(f"database size: {results['database_bytes'] / 1024**3:.2f} GiB", flush=True)

        raw_fc = tmp / "raw.dump"
        results["raw_pg_dump_Fc_s"] = sh(["pg_dump", "-Fc", "--exclude-schema=dbagent", "-f", str(raw_fc)], raw_env)
        print(f"raw pg_dump -Fc: {results['raw_pg_dump_Fc_s']:.1f}s", flush=True)
        results["dbagent_backup_s"] = sh([*dbagent, "backup", "full", "--json"], env)
        print(f"dbagent backup full: {results['dbagent_backup_s']:.1f}s", flush=True)
        listed = json.loads(subprocess.run([*dbagent, "backups", "list", "--json"], capture_output=True, text=True, env=env, cwd=ROOT).stdout)
        path = listed["backups"][0]["path"]
        results["archive_bytes"] = listed["backups"][0]["bytes"]
        results["dbagent_verify_s"] = sh([*dbagent, "backups", "verify", path, "--json"], env)
        print(f"dbagent backups verify: {results['dbagent_verify_s']:.1f}s", flush=True)

        raw_fd = tmp / "raw.dir"
        results["raw_pg_dump_Fd_j2_s"] = sh(["pg_dump", "-Fd", "-j", "2", "--exclude-schema=dbagent", "-f", str(raw_fd)], raw_env)
        print(f"raw pg_dump -Fd -j2: {results['raw_pg_dump_Fd_j2_s']:.1f}s", flush=True)
        shutil.rmtree(raw_fd)

        results["raw_pg_restore_s"] = sh(
            ["pg_restore", "--single-transaction", "--clean", "--if-exists", "--no-owner", "--exit-on-error",
             "--exclude-schema=dbagent", "-d", world.name, path], raw_env)
        print(f"raw pg_restore --single-transaction: {results['raw_pg_restore_s']:.1f}s", flush=True)
        results["dbagent_restore_s"] = sh([*dbagent, "restore", path, "--yes", "--json"], env)
        print(f"dbagent restore: {results['dbagent_restore_s']:.1f}s", flush=True)
    finally:
        world.stop_workers()
        drop_database(world.name)
        delete_prefix(client, world.prefix)
        shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("backup full vs pg_dump -Fc", results["dbagent_backup_s"], results["raw_pg_dump_Fc_s"], "≤1.05x"),
        ("restore vs pg_restore -1", results["dbagent_restore_s"], results["raw_pg_restore_s"], "≤1.05x"),
        ("pg_dump -Fd -j2 vs -Fc", results["raw_pg_dump_Fd_j2_s"], results["raw_pg_dump_Fc_s"], "speed-up"),
        ("verification vs dump time", results["dbagent_verify_s"], results["dbagent_backup_s"], "share"),
    ]
    print(f"\ndatabase {results['database_bytes'] / 1024**3:.2f} GiB, archive {results['archive_bytes'] / 1024**2:.0f} MiB")
    print(f"{'benchmark':<30} {'ours s':>8} {'baseline s':>11} {'ratio':>7}  goal")
    for name, ours, base, goal in rows:
        print(f"{name:<30} {ours:>8.1f} {base:>11.1f} {ours / base:>6.2f}x  {goal}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "backup.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
