"""Benchmark recovery from a kill -9 mid-step: until the database is usable and the waiting CLI answered.

Each of 20 rounds: a migrate whose step sleeps in PostgreSQL (its transaction
open, a table created in it) is waited on by a CLI; the worker's process group
is killed with SIGKILL mid-step and started again at once (as systemd's
``Restart=always`` would). Timed from the kill:

* **database usable**: the dead session is gone, the writer lock is free and
  no command of the database is left unfinished;
* **CLI answered**: the waiting ``dbagent migrate`` exits with the interrupted
  command's result (it is reported by the restarted worker).

Worker start-up (Python, Celery) is part of the second figure: it is what a
restart costs. Prints p50 / p99 / max and writes bench/results/recovery.json.
Run: make bench-recovery
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from tests.faults.test_crash_matrix import STEP  # noqa: E402
from tests.servers import (  # noqa: E402
    REDIS_URL,
    copy_migrations,
    create_database,
    delete_prefix,
    drop_database,
    new_env,
)

KILLS = 20


def _until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dbagent-bench-recovery-"))
    world = new_env(tmp)
    world.migrations = copy_migrations(tmp, {"012_slow.py": STEP.format(rev="012", down="011")})
    world.extra_config = '\n[worker]\nrelay_interval = "1s"\n'
    create_database(world.name)
    client = redis.Redis.from_url(REDIS_URL)
    usable: list[float] = []
    answered: list[float] = []
    try:
        worker = world.start_worker(log_name="bench-worker", SLOW_STEP="012")
        subprocess.run([sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(world.config), "migrate", "--to", "011",
                        "--no-backup"], check=True, capture_output=True, env=world.environ(), cwd=ROOT)

        def sleeping() -> bool:
            return bool(world.sql("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(%%' AND state = 'active'"))

        def usable_now() -> bool:
            return not world.sql(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " UNION ALL SELECT 1 FROM dbagent.commands WHERE status IN ('accepted', 'claimed', 'running')"
                " UNION ALL SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(%%'"
            )

        for round_ in range(KILLS):
            waiting = subprocess.Popen(
                [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(world.config), "migrate", "--no-backup", "--json",
                 "--timeout", "120"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=world.environ(), cwd=ROOT,
            )
            _until(sleeping, 60, "the slow step")
            killed = time.monotonic()
            world.kill_worker(worker, signal.SIGKILL)
            worker = world.start_worker(log_name=f"bench-worker-{round_}", SLOW_STEP="012")
            _until(usable_now, 60, "the database to be usable")
            usable.append(time.monotonic() - killed)
            out, err = waiting.communicate(timeout=120)
            answered.append(time.monotonic() - killed)
            result = json.loads(out.strip().splitlines()[-1])
            if not result.get("interrupted") or world.revision() != "011":
                raise SystemExit(f"round {round_}: unexpected outcome {result} at {world.revision()}")
    finally:
        world.stop_workers()
        drop_database(world.name)
        delete_prefix(client, world.prefix)

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    print(f"{'recovery after kill -9 mid-step (' + str(KILLS) + ' kills)':<44} {'p50':>8} {'p99':>8} {'max':>8}")
    for name, values in (("database usable", usable), ("CLI answered (worker restarted)", answered)):
        print(f"{name:<44} {statistics.median(values):>7.2f}s {pct(values, 0.99):>7.2f}s {max(values):>7.2f}s")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "recovery.json").write_text(json.dumps({
        "kills": KILLS,
        "usable_p50_s": statistics.median(usable), "usable_p99_s": pct(usable, 0.99), "usable_all_s": usable,
        "answered_p50_s": statistics.median(answered), "answered_p99_s": pct(answered, 0.99), "answered_all_s": answered,
    }, indent=2))


if __name__ == "__main__":
    main()
