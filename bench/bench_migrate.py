"""Benchmark: `dbagent migrate` (001 → 011, no backup) against plain `alembic upgrade head`,
and `dbagent status` through the queue against `alembic current`. Median of 5, on the same database.

Prints a table and writes bench/results/migrate.json. Needs the local PostgreSQL and Redis
(or DBAGENT_TEST_DATABASE_URL / DBAGENT_TEST_REDIS_URL). Run: make bench
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import REDIS_URL, create_database, delete_prefix, drop_database, new_env  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "5"))


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return elapsed


def run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")


def main() -> None:
    import redis

    tmp = Path(tempfile.mkdtemp(prefix="dbagent-bench-"))
    world = new_env(tmp)
    create_database(world.name)
    client = redis.Redis.from_url(REDIS_URL)
    alembic = [str(Path(sys.executable).parent / "alembic"), "-c", str(ROOT / "migrations" / "alembic.ini")]
    dbagent = [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(world.config)]
    plain_env = {**os.environ, "DATABASE_URL": world.url}
    env = world.environ()
    try:
        world.start_worker(log_name="bench-worker")
        run([*dbagent, "status", "--timeout", "60"], env)  # the worker is up

        alembic_up, dbagent_up, alembic_current, dbagent_status = [], [], [], []
        for _ in range(RUNS):
            alembic_up.append(timed([*alembic, "upgrade", "head"], plain_env))
            run([*alembic, "downgrade", "base"], plain_env)
            dbagent_up.append(timed([*dbagent, "migrate", "--no-backup"], env))
            run([*alembic, "downgrade", "base"], plain_env)
        run([*alembic, "upgrade", "head"], plain_env)
        for _ in range(RUNS):
            alembic_current.append(timed([*alembic, "current"], plain_env))
            dbagent_status.append(timed([*dbagent, "status"], env))
    finally:
        world.stop_workers()
        drop_database(world.name)
        delete_prefix(client, world.prefix)

    rows = [
        ("migrate 001→011", statistics.median(dbagent_up), statistics.median(alembic_up), 1.3),
        ("status (queue) vs alembic current", statistics.median(dbagent_status), statistics.median(alembic_current), 1.5),
    ]
    print(f"{'benchmark':<36} {'dbagent s':>10} {'alembic s':>10} {'ratio':>7} {'goal':>6}")
    results = []
    for name, ours, theirs, goal in rows:
        ratio = ours / theirs
        print(f"{name:<36} {ours:>10.3f} {theirs:>10.3f} {ratio:>6.2f}x {'≤' + str(goal) + 'x':>6} {'ok' if ratio <= goal else 'MISSED'}")
        results.append({"benchmark": name, "dbagent_s": ours, "alembic_s": theirs, "ratio": ratio, "goal": goal, "runs": RUNS})
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "migrate.json").write_text(json.dumps(results, indent=2))
    print(f"(median of {RUNS} runs each; written to {out / 'migrate.json'})")


if __name__ == "__main__":
    main()
