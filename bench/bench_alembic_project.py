"""Benchmark (issue 11): dbagent on a 300-revision hash-id Alembic project (bench/make_hash_chain.py) against plain
Alembic on the same project and database. Interleaved runs, median of BENCH_RUNS (default 3):

- `dbagent migrate --no-backup` (every safety feature on: validation, checksums, lock pre-check, change log, events)
  vs `alembic upgrade head`; goal ≤ 1.2×
- `dbagent rollback --to base` vs `alembic downgrade base`
- `dbagent validate` vs `alembic upgrade head --sql`; goal: under 5 s

The generated env.py leaves `transaction_per_migration` off (Alembic's default): both run the plan in
one transaction. The same is measured with it on (each step its own transaction), on both sides.

Prints a table and writes bench/results/alembic_project.json. Needs the local PostgreSQL and Redis.
Run: make bench-alembic (BENCH_REVISIONS=N for another size)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import REDIS_URL, create_database, delete_prefix, drop_database, new_env  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
REVISIONS = int(os.environ.get("BENCH_REVISIONS", "300"))


def timed(cmd: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - started
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    import redis

    tmp = Path(tempfile.mkdtemp(prefix="dbagent-bench-alembic-"))
    world = new_env(tmp / "plan")  # the project as generated: env.py leaves transaction_per_migration off
    stepwise = new_env(tmp / "step")  # the same scripts with transaction_per_migration=True
    for w in (world, stepwise):
        w.tmp.mkdir(parents=True)
        create_database(w.name)
    project = tmp / "project"
    subprocess.run([sys.executable, str(ROOT / "bench" / "make_hash_chain.py"), str(project), "-n", str(REVISIONS),
                    "--quiet", "--url", world.url.replace("postgresql://", "postgresql+psycopg://")],
                   check=True, capture_output=True)
    world.migrations = project
    per_step = tmp / "project-per-step"
    shutil.copytree(project, per_step)
    env_py = (per_step / "env.py").read_text()
    (per_step / "env.py").write_text(env_py.replace('version_table="app_versions",', 'version_table="app_versions", transaction_per_migration=True,'))
    assert "transaction_per_migration=True" in (per_step / "env.py").read_text()
    ini = (per_step / "alembic.ini").read_text()
    ini = ini.replace(f"script_location = {project}\n", f"script_location = {per_step}\n")
    ini = ini.replace(world.url.replace("postgresql://", "postgresql+psycopg://"), stepwise.url.replace("postgresql://", "postgresql+psycopg://"))
    (per_step / "alembic.ini").write_text(ini)
    assert f"script_location = {per_step}\n" in ini and stepwise.name in ini
    stepwise.migrations = per_step
    client = redis.Redis.from_url(REDIS_URL)
    alembic = [str(Path(sys.executable).parent / "alembic"), "-c", str(project / "alembic.ini")]
    alembic_per_step = [str(Path(sys.executable).parent / "alembic"), "-c", str(per_step / "alembic.ini")]
    dbagent = [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(world.config)]
    dbagent_per_step = [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(stepwise.config)]
    env, env_per_step = world.environ(), stepwise.environ()
    times: dict[str, list[float]] = {k: [] for k in ("alembic up", "dbagent up", "alembic down", "dbagent down",
                                                      "alembic sql", "dbagent validate", "alembic per-step up",
                                                      "alembic per-step down", "dbagent per-step up",
                                                      "dbagent per-step down")}
    try:
        world.start_worker(log_name="bench-worker")
        stepwise.start_worker(log_name="bench-worker")
        timed([*dbagent, "status", "--timeout", "60"], env)  # the workers are up
        timed([*dbagent_per_step, "status", "--timeout", "60"], env_per_step)
        for _ in range(RUNS):
            times["alembic up"].append(timed([*alembic, "upgrade", "head"], env))
            times["alembic down"].append(timed([*alembic, "downgrade", "base"], env))
            times["dbagent up"].append(timed([*dbagent, "migrate", "--no-backup", "--json"], env))
            times["dbagent down"].append(timed([*dbagent, "rollback", "--to", "base", "--json"], env))
            times["alembic per-step up"].append(timed([*alembic_per_step, "upgrade", "head"], env_per_step))
            times["alembic per-step down"].append(timed([*alembic_per_step, "downgrade", "base"], env_per_step))
            times["dbagent per-step up"].append(timed([*dbagent_per_step, "migrate", "--no-backup", "--json"], env_per_step))
            times["dbagent per-step down"].append(timed([*dbagent_per_step, "rollback", "--to", "base", "--json"], env_per_step))
            times["alembic sql"].append(timed([*alembic, "upgrade", "head", "--sql"], env))
            # validate exits 1 on findings (the chain's index steps are not CONCURRENTLY): its time is what counts
            times["dbagent validate"].append(timed([*dbagent, "validate", "--json"], env, ok=(0, 1)))
    finally:
        for w in (world, stepwise):
            w.stop_workers()
            drop_database(w.name)
            delete_prefix(client, w.prefix)

    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        (f"migrate {REVISIONS} revisions", med["dbagent up"], med["alembic up"], "≤1.2x", med["dbagent up"] / med["alembic up"] <= 1.2),
        (f"rollback {REVISIONS} revisions", med["dbagent down"], med["alembic down"], "≤1.2x", med["dbagent down"] / med["alembic down"] <= 1.2),
        (f"validate {REVISIONS} revisions", med["dbagent validate"], med["alembic sql"], "<5 s", med["dbagent validate"] < 5),
        ("migrate, per-step txns", med["dbagent per-step up"], med["alembic per-step up"], "≤1.2x",
         med["dbagent per-step up"] / med["alembic per-step up"] <= 1.2),
        ("rollback, per-step txns", med["dbagent per-step down"], med["alembic per-step down"], "≤1.2x",
         med["dbagent per-step down"] / med["alembic per-step down"] <= 1.2),
    ]
    print(f"{'benchmark':<26} {'dbagent s':>10} {'alembic s':>10} {'ratio':>7} {'goal':>6}")
    results = []
    for name, ours, theirs, goal, met in rows:
        ratio = ours / theirs
        print(f"{name:<26} {ours:>10.3f} {theirs:>10.3f} {ratio:>6.2f}x {goal:>6} {'ok' if met else 'MISSED'}")
        per_rev = (ours - theirs) / REVISIONS * 1000
        results.append({"benchmark": name, "dbagent_s": ours, "alembic_s": theirs, "ratio": ratio, "goal": goal,
                        "met": met, "extra_ms_per_revision": per_rev, "runs": RUNS, "samples": times})
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "alembic_project.json").write_text(json.dumps(results, indent=2))
    print(f"(median of {RUNS} interleaved runs each; the alembic column of validate is `alembic upgrade head --sql`;"
          " 'per-step txns': the same project with transaction_per_migration=True in env.py, both sides;"
          f" written to {out / 'alembic_project.json'})")


if __name__ == "__main__":
    main()
