"""Benchmark the agent: failure-to-rollback reaction time, and audit sink throughput.

* Reaction time: 50 `migration.failed` events, one at a time, each answered by the agent
  with a rollback that a real worker takes: time from the failure's XADD until the
  worker's `command.accepted` of that rollback is on the stream. p50 / p99 (goal p99 ≤ 1 s).
  (The failures are synthetic: the worker then refuses each rollback, its run not being
  recorded in the database; what is timed is the agent and the queue.)
* Audit throughput: 100,000 events persisted by the audit sink into `dbagent.audit_log`
  (consumer group, batches, idempotent inserts), against raw XADD of the same events on
  the same Redis (goal ≥ 20,000 events/s).

Prints a table and writes bench/results/agent.json. Run: make bench-agent
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from dbagent.bus.consumer import ConsumerOptions, GroupConsumer  # noqa: E402
from dbagent.bus.eventlog import EventLog  # noqa: E402
from dbagent.core.events import Event, EventType  # noqa: E402
from dbagent.core.rollback import plan_rollback  # noqa: E402
from dbagent.reactor.audit import AuditSink  # noqa: E402
from dbagent.settings import load_settings  # noqa: E402
from tests.servers import REDIS_URL, create_database, delete_prefix, drop_database, new_env  # noqa: E402

FAILURES = 50
EVENTS = 100_000


def reaction_times(world, client) -> list[float]:
    stream = f"{world.prefix}:events"
    log = EventLog(client, world.prefix)
    times = []
    for _ in range(FAILURES):
        failure = Event(type=EventType.MIGRATION_FAILED, db="test", command_id=str(uuid.uuid4()), actor="bench",
                        data={"revision_before": "010", "revision_before_known": True, "revision_after": "011",
                              "error": "synthetic"})
        rollback_id = plan_rollback(failure).command_id.encode()
        last = log.last_id()
        started = time.perf_counter()
        log.publish([failure])
        while True:
            response = client.xread({stream: last}, block=2000, count=100)
            if not response:
                if time.perf_counter() - started > 30:
                    raise SystemExit("no rollback taken by the worker within 30 s")
                continue
            for entry_id, fields in response[0][1]:
                last = entry_id
                if fields.get(b"type") == b"command.accepted" and fields.get(b"command_id") == rollback_id:
                    times.append(time.perf_counter() - started)
                    break
            else:
                continue
            break
    return times


def audit_throughput(world, client) -> tuple[float, float]:
    settings = load_settings(world.config)
    prefix = f"{world.prefix}-audit"
    stream = f"{prefix}:events"
    events = [Event(type="bench.event", db="test", command_id=str(i), data={"n": i, "payload": "x" * 64}) for i in range(EVENTS)]
    fields = [e.to_fields() for e in events]
    started = time.perf_counter()
    for chunk in range(0, EVENTS, 1000):
        pipe = client.pipeline(transaction=False)
        for body in fields[chunk : chunk + 1000]:
            pipe.xadd(stream, body)
        pipe.execute()
    xadd_rate = EVENTS / (time.perf_counter() - started)

    sink = AuditSink(settings)
    consumer = GroupConsumer(client, stream, "audit", "bench", sink, f"{stream}:dead", ConsumerOptions(block_ms=10, count=2000))
    consumer.ensure_group()
    started = time.perf_counter()
    done = 0
    while done < EVENTS:
        done += consumer.run_once()
    sink_rate = EVENTS / (time.perf_counter() - started)
    sink.close()
    delete_prefix(client, prefix)
    return xadd_rate, sink_rate


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dbagent-bench-agent-"))
    world = new_env(tmp)
    create_database(world.name)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        world.start_worker(log_name="bench-worker")
        world.start_agent(log_name="bench-agent")
        env = world.environ()
        import subprocess

        subprocess.run([sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(world.config), "migrate", "--no-backup"],
                       check=True, capture_output=True, env=env, cwd=ROOT)
        times = reaction_times(world, client)
        xadd_rate, sink_rate = audit_throughput(world, client)
    finally:
        world.stop_workers()
        drop_database(world.name)
        delete_prefix(client, world.prefix)
    times.sort()
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    print(f"{'benchmark':<44} {'value':>12}  goal")
    print(f"{'reaction migration.failed → rollback taken p50':<44} {p50 * 1000:>9.0f} ms")
    print(f"{'reaction migration.failed → rollback taken p99':<44} {p99 * 1000:>9.0f} ms  ≤ 1000 ms {'ok' if p99 <= 1 else 'MISSED'}")
    print(f"{'raw XADD':<44} {xadd_rate:>9.0f} /s")
    print(f"{'audit sink persisted':<44} {sink_rate:>9.0f} /s  ≥ 20000 /s {'ok' if sink_rate >= 20000 else 'MISSED'}")
    print(f"(reaction over {FAILURES} failures; throughput over {EVENTS} events)")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "agent.json").write_text(json.dumps(
        {"reaction_p50_s": p50, "reaction_p99_s": p99, "reaction_all_s": times, "xadd_per_s": xadd_rate, "sink_per_s": sink_rate}, indent=2))


if __name__ == "__main__":
    main()
