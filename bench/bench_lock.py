"""Benchmark: the application's latency while a blocking migration step is held up by a long transaction.

An application load runs on `users` at a fixed rate (pgbench-style: 80 % reads by
key, 20 % updates of one row, each query timed from the moment it was due, so a
stall counts for every query it delays). A report opens a transaction that holds
ACCESS SHARE on `users` for HOLD_S seconds; one second in, a migration adds a
column to `users` (it needs ACCESS EXCLUSIVE). Three runs, same load, same report:

* baseline: no migration;
* dbagent:  `dbagent migrate` through a worker (lock_timeout, retries, waiting out old transactions);
* alembic:  plain `alembic upgrade head`, whose ALTER TABLE queues behind the report
  and everyone else queues behind it.

Prints p50 / p99 / max of the application's queries for each, and whether dbagent's
p99 stays within 2x the baseline. Writes bench/results/lock.json. Run: make bench-lock
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import (  # noqa: E402
    ADD_USERS_NICKNAME,
    REDIS_URL,
    copy_migrations,
    create_database,
    delete_prefix,
    drop_database,
    new_env,
)

RATE = float(os.environ.get("BENCH_RATE", "200"))  # application queries per second
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "4"))
DURATION_S = float(os.environ.get("BENCH_DURATION", "16"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))  # runs of each scenario; the median run (by p99) is shown
HOLD_FROM_S, HOLD_S, MIGRATE_AT_S = 2.0, 8.0, 3.0
USERS = 20_000

class Load:
    """CONNECTIONS sessions sharing one fixed-rate schedule; latency = finish - when the query was due."""

    def __init__(self, url: str, ids: list[str]) -> None:
        self.url = url
        self.ids = ids
        self.latencies: list[float] = []
        self.timeline: list[tuple[float, float]] = []  # (seconds into the run, latency)
        self.errors = 0
        self._lock = threading.Lock()
        self._next = 0
        self._start = 0.0
        self._stop_at = 0.0

    def _due(self) -> float | None:
        with self._lock:
            due = self._start + self._next / RATE
            self._next += 1
        return None if due >= self._stop_at else due

    def _session(self, seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(self.url, autocommit=True, application_name="bench app") as conn:
            while (due := self._due()) is not None:
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                user = rng.choice(self.ids)
                try:
                    if rng.random() < 0.8:
                        conn.execute("SELECT id, email, status FROM users WHERE id = %s", (user,)).fetchone()
                    else:
                        conn.execute("UPDATE users SET last_login_at = now() WHERE id = %s", (user,))
                except psycopg.Error:
                    self.errors += 1
                    continue
                latency = time.monotonic() - due
                with self._lock:
                    self.latencies.append(latency)
                    self.timeline.append((due - self._start, latency))

    def run(self, duration_s: float) -> threading.Thread:
        self._start = time.monotonic() + 0.2
        self._stop_at = self._start + duration_s
        threads = [threading.Thread(target=self._session, args=(i,), daemon=True) for i in range(CONNECTIONS)]
        for t in threads:
            t.start()

        def join() -> None:
            for t in threads:
                t.join()

        waiter = threading.Thread(target=join, daemon=True)
        waiter.start()
        return waiter


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def scenario(url: str, ids: list[str], migrate: list[str] | None, env: dict[str, str]) -> dict:
    load = Load(url, ids)
    done = load.run(DURATION_S)
    t0 = time.monotonic()
    time.sleep(HOLD_FROM_S)
    report = psycopg.connect(url, application_name="bench long report")
    report.execute("SELECT count(*) FROM users").fetchone()  # ACCESS SHARE until the transaction ends
    migration: subprocess.Popen | None = None
    migrate_started = 0.0
    time.sleep(MIGRATE_AT_S - HOLD_FROM_S)
    if migrate is not None:
        migrate_started = time.monotonic()
        migration = subprocess.Popen(migrate, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    time.sleep(HOLD_FROM_S + HOLD_S - (time.monotonic() - t0))
    report.rollback()
    report.close()
    migrate_s = None
    if migration is not None:
        out, err = migration.communicate(timeout=300)
        if migration.returncode != 0:
            raise SystemExit(f"{' '.join(migrate)} failed ({migration.returncode}):\n{err}")
        migrate_s = time.monotonic() - migrate_started
    done.join()
    lat = load.latencies
    if os.environ.get("BENCH_DEBUG"):
        slow = sorted(load.timeline, key=lambda x: -x[1])[:40]
        print(sorted((round(t, 2), round(l * 1000, 1)) for t, l in slow))
    return {
        "queries": len(lat),
        "errors": load.errors,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": max(lat) * 1000,
        "mean_ms": statistics.fmean(lat) * 1000,
        "migration_s": migrate_s,
    }


def main() -> None:
    import redis

    tmp = Path(tempfile.mkdtemp(prefix="dbagent-bench-lock-"))
    world = new_env(tmp)
    world.migrations = copy_migrations(tmp, {"012_add_users_nickname.py": ADD_USERS_NICKNAME})
    world.lock_timeout = "2s"  # the shipped default, as in production
    create_database(world.name)
    client = redis.Redis.from_url(REDIS_URL)
    alembic = [str(Path(sys.executable).parent / "alembic"), "-c", str(world.migrations / "alembic.ini")]
    dbagent = [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(world.config)]
    plain_env = {**os.environ, "DATABASE_URL": world.url}
    env = world.environ()
    results: dict[str, dict] = {}
    try:
        subprocess.run([*alembic, "upgrade", "011"], check=True, capture_output=True, env=plain_env, cwd=ROOT)
        with psycopg.connect(world.url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO users (email, password_hash) SELECT 'user' || g || '@example.com', 'x'"
                " FROM generate_series(1, %s) g", (USERS,)
            )
            conn.execute("ANALYZE users")
            ids = [str(r[0]) for r in conn.execute("SELECT id FROM users").fetchall()]
        world.start_worker(log_name="bench-worker")
        subprocess.run([*dbagent, "status", "--timeout", "60"], check=True, capture_output=True, env=env, cwd=ROOT)

        print(f"load: {RATE:.0f} queries/s on {CONNECTIONS} connections for {DURATION_S:.0f}s; a report holds"
              f" ACCESS SHARE on users from {HOLD_FROM_S:.0f}s to {HOLD_FROM_S + HOLD_S:.0f}s; migration at {MIGRATE_AT_S:.0f}s")
        runs: dict[str, list[dict]] = {"baseline": [], "dbagent": [], "alembic": []}
        for _ in range(REPEAT):
            runs["baseline"].append(scenario(world.url, ids, None, env))
            runs["dbagent"].append(scenario(world.url, ids, [*dbagent, "migrate", "--no-backup", "--json"], env))
            subprocess.run([*alembic, "downgrade", "011"], check=True, capture_output=True, env=plain_env, cwd=ROOT)
            runs["alembic"].append(scenario(world.url, ids, [*alembic, "upgrade", "head"], plain_env))
            subprocess.run([*alembic, "downgrade", "011"], check=True, capture_output=True, env=plain_env, cwd=ROOT)
        for name, each in runs.items():
            ranked = sorted(each, key=lambda r: r["p99_ms"])
            results[name] = {**ranked[len(ranked) // 2], "p99_ms_runs": [round(r["p99_ms"], 2) for r in each]}
    finally:
        world.stop_workers()
        drop_database(world.name)
        delete_prefix(client, world.prefix)

    print(f"median of {REPEAT} run(s) each, by p99")
    print(f"{'run':<10} {'queries':>8} {'p50 ms':>8} {'p99 ms':>9} {'max ms':>9} {'migration s':>12}  p99 of every run")
    for name, r in results.items():
        took = f"{r['migration_s']:.1f}" if r["migration_s"] is not None else "-"
        print(f"{name:<10} {r['queries']:>8} {r['p50_ms']:>8.2f} {r['p99_ms']:>9.2f} {r['max_ms']:>9.1f} {took:>12}"
              f"  {', '.join(f'{v:g}' for v in r['p99_ms_runs'])}")
    ratio = results["dbagent"]["p99_ms"] / results["baseline"]["p99_ms"]
    alembic_ratio = results["alembic"]["p99_ms"] / results["baseline"]["p99_ms"]
    print(f"p99 with dbagent: {ratio:.2f}x the baseline (goal ≤ 2x: {'ok' if ratio <= 2 else 'MISSED'});"
          f" with plain Alembic: {alembic_ratio:.0f}x")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lock.json").write_text(json.dumps({**results, "p99_ratio_dbagent": ratio, "p99_ratio_alembic": alembic_ratio}, indent=2))
    print(f"(written to {out / 'lock.json'})")


if __name__ == "__main__":
    main()
