"""Benchmark: lint throughput, in statements per second (goal ≥ 5,000/s).

Lints one large generated script (50,000 statements by default, mixing every
rule's risky case, its safe twin and Alembic's bookkeeping, inside BEGIN/COMMIT
blocks) with ``dbagent.checks.lint.lint_sql``; median of 5 runs. Pure: no database.

Prints a table and writes bench/results/lint.json. Run: .venv/bin/python bench/bench_lint.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dbagent.checks.lint import lint_sql, parse_statements  # noqa: E402

STATEMENTS = int(os.environ.get("BENCH_STATEMENTS", "50000"))
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
GOAL_PER_S = 5000

# One block per round: a migration-sized mix of risky and safe statements, {n} keeps names distinct.
BLOCK = [
    "BEGIN",
    "SET LOCAL lock_timeout = '5s'",
    "CREATE TABLE t{n} (id bigint GENERATED ALWAYS AS IDENTITY, user_id uuid NOT NULL, total numeric,"
    " created_at timestamptz DEFAULT now() NOT NULL, CONSTRAINT pk_t{n} PRIMARY KEY (id))",
    "CREATE INDEX ix_t{n}_user_id ON t{n} (user_id)",
    "ALTER TABLE users ADD COLUMN c{n} text",
    "ALTER TABLE users ADD COLUMN d{n} text DEFAULT 'x' NOT NULL",
    "ALTER TABLE users ADD COLUMN e{n} uuid DEFAULT gen_random_uuid()",
    "ALTER TABLE users ADD COLUMN f{n} int NOT NULL",
    "ALTER TABLE users DROP COLUMN g{n}",
    "ALTER TABLE users RENAME COLUMN h{n} TO i{n}",
    "ALTER TABLE users ALTER COLUMN j{n} TYPE bigint",
    "ALTER TABLE users ALTER COLUMN k{n} SET NOT NULL",
    "ALTER TABLE orders ADD CONSTRAINT fk{n} FOREIGN KEY (user_id) REFERENCES users (id)",
    "ALTER TABLE orders ADD CONSTRAINT ck{n} CHECK (total >= 0) NOT VALID",
    "ALTER TABLE orders VALIDATE CONSTRAINT ck{n}",
    "ALTER TABLE users ADD CONSTRAINT uq{n} UNIQUE (email)",
    "CREATE INDEX ix_users_{n} ON users (email)",
    "CREATE INDEX CONCURRENTLY ix_orders_{n} ON orders (user_id)",
    "INSERT INTO roles (name, description) VALUES ('r{n}', 'Role {n}') ON CONFLICT (name) DO NOTHING",
    "UPDATE users SET status = 'active' WHERE status IS NULL AND id > {n}",
    "DELETE FROM user_sessions WHERE expires_at < now() - interval '{n} days'",
    "TRUNCATE staging_{n}",
    "DROP TABLE legacy_{n}",
    "ALTER TABLE legacy RENAME TO legacy_{n}",
    "UPDATE alembic_version SET version_num='{n}' WHERE alembic_version.version_num = 'x'",
    "COMMIT",
    "CREATE INDEX CONCURRENTLY ix_users_c{n} ON users (c{n})",
    "DROP INDEX CONCURRENTLY ix_users_old_{n}",
]


def script(statements: int) -> tuple[str, int]:
    lines: list[str] = []
    n = 0
    while len(lines) < statements:
        lines.extend(s.format(n=n) + ";" for s in BLOCK)
        n += 1
    lines = lines[:statements]
    return "\n".join(lines) + "\n", len(lines)


def main() -> None:
    sql, count = script(STATEMENTS)
    timings = []
    findings = []
    for _ in range(RUNS):
        parse_statements.cache_clear()  # every run parses: a migrate lints each script once
        started = time.perf_counter()
        findings = lint_sql(sql, revision="bench")
        timings.append(time.perf_counter() - started)
    median_s = statistics.median(timings)
    per_s = count / median_s
    by_rule = dict(sorted(Counter(f.rule for f in findings).items()))

    print(f"{'benchmark':<28} {'statements':>10} {'median s':>9} {'stmt/s':>9} {'goal':>8}")
    print(
        f"{'lint_sql (one script)':<28} {count:>10} {median_s:>9.3f} {per_s:>9.0f} {'≥' + str(GOAL_PER_S):>8} "
        f"{'ok' if per_s >= GOAL_PER_S else 'MISSED'}"
    )
    print(f"findings: {len(findings)} ({', '.join(f'{k} {v}' for k, v in by_rule.items())})")

    results = {
        "benchmark": "lint throughput",
        "statements": count,
        "runs": RUNS,
        "median_s": median_s,
        "statements_per_s": per_s,
        "goal_statements_per_s": GOAL_PER_S,
        "met": per_s >= GOAL_PER_S,
        "findings": len(findings),
        "findings_by_rule": by_rule,
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lint.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
