"""Lock-timeout retries: a migration step waits politely for its table locks.

A DDL statement asks for an ACCESS EXCLUSIVE lock; while it waits in the lock
queue, every later query on the table (even a plain ``SELECT``) queues behind
it. So the application is stalled for as long as the migration waits. In the
spirit of GitLab's ``with_lock_retries``, dbagent bounds that wait:

* each attempt runs under a short ``lock_timeout`` (default 2 s, growing by
  ``lock_timeout_growth`` per attempt up to ``lock_timeout_max``); when it
  expires, the step's transaction rolls back, nothing is half-done, and the
  queue behind it drains at once;
* between attempts dbagent sleeps (jittered exponential backoff) and says who
  is in the way: a ``lock.waiting`` event names each blocking session's pid,
  query, state and transaction age;
* before an attempt it looks at ``pg_locks``: when a transaction that has
  already been open longer than ``lock_holder_grace`` (default 200 ms, far
  longer than an application's own transactions) holds a conflicting lock on
  a table the step is about to lock, asking would only queue the application
  behind it, so dbagent waits it out without joining the lock queue at all.
  The last attempt always asks.

Pure: ``RetryPolicy``, ``lock_targets`` and ``describe``; who holds the locks now is read by
``dbagent.postgres.blocking`` (``blockers``, ``contended``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from pglast import ast
from pglast.enums import ObjectType
from pglast.parser import ParseError

from dbagent.core.lockmodes import (  # noqa: F401 - ACCESS_SHARE … MODES are read from here by callers too
    ACCESS_EXCLUSIVE,
    ACCESS_SHARE,
    CONFLICTS,
    EXCLUSIVE,
    LOCK_TABLE_MODES,
    MODES,
    ROW_EXCLUSIVE,
    ROW_SHARE,
    SHARE,
    SHARE_ROW_EXCLUSIVE,
    SHARE_UPDATE_EXCLUSIVE,
    alter_table_locks,
    parse_statements,
    range_name,
    stronger,
)

LOCK_NOT_AVAILABLE = "55P03"

# The lock modes and which one each statement takes: dbagent.core.lockmodes, shared with the lint.


@dataclass(frozen=True)
class RetryPolicy:
    """How long each attempt may wait for its locks, how often, and how long to pause between."""

    lock_timeout_s: float = 2.0
    attempts: int = 10
    growth: float = 1.5
    max_lock_timeout_s: float = 10.0
    pause_s: float = 1.0
    max_pause_s: float = 30.0
    holder_grace_s: float = 0.2


    def lock_timeout(self, attempt: int) -> float:
        """The lock_timeout of attempt ``attempt`` (1-based): growing, capped."""
        grown = self.lock_timeout_s * self.growth ** (attempt - 1)
        return max(self.lock_timeout_s, min(grown, self.max_lock_timeout_s))

    def pause(self, attempt: int, rng: random.Random | None = None) -> float:
        """The sleep after failed attempt ``attempt``: exponential, capped, jittered (50–100 %)."""
        base = min(self.pause_s * 2 ** (attempt - 1), self.max_pause_s)
        return base * (rng or random).uniform(0.5, 1.0)


# -- which tables a step locks, and how strongly -------------------------------


def lock_targets(sql: str, version_table: str = "alembic_version") -> dict[str, str]:
    """The existing tables a step's SQL locks, each with the strongest mode asked for.

    Tables the same SQL creates are left out (nobody else can hold them), and so
    is Alembic's version table. Row-level DML (ROW EXCLUSIVE) is left out too:
    it conflicts only with other schema changes, not with the application.
    Raises ``ValueError`` for SQL pglast cannot parse.
    """
    try:
        statements = parse_statements(sql)
    except ParseError as exc:
        raise ValueError(str(exc)) from None
    created: set[str] = set()
    targets: dict[str, str] = {}

    def want(name: str | None, mode: str) -> None:
        if name and name not in created and name.rsplit(".", 1)[-1] != version_table:
            targets[name] = stronger(targets.get(name), mode)

    for raw in statements:
        stmt = raw.stmt
        if isinstance(stmt, ast.CreateStmt):
            name = range_name(stmt.relation)
            for element in stmt.tableElts or ():
                constraints = list(getattr(element, "constraints", None) or ())
                if isinstance(element, ast.Constraint):
                    constraints.append(element)
                for c in constraints:
                    if isinstance(c, ast.Constraint) and c.pktable is not None:
                        want(range_name(c.pktable), SHARE_ROW_EXCLUSIVE)
            if name:
                created.add(name)
        elif isinstance(stmt, ast.AlterTableStmt):
            locks = alter_table_locks(stmt)
            want(range_name(stmt.relation), locks.mode)
            for name, mode in locks.others.items():
                want(name, mode)
        elif isinstance(stmt, ast.IndexStmt):
            want(range_name(stmt.relation), SHARE_UPDATE_EXCLUSIVE if stmt.concurrent else SHARE)
        elif isinstance(stmt, ast.RenameStmt) and stmt.relation is not None:
            want(range_name(stmt.relation), ACCESS_EXCLUSIVE)
        elif isinstance(stmt, ast.DropStmt) and stmt.removeType == ObjectType.OBJECT_TABLE:
            for obj in stmt.objects or ():
                parts = [getattr(p, "sval", None) for p in obj]
                want(".".join(p for p in parts if p), ACCESS_EXCLUSIVE)
        elif isinstance(stmt, ast.TruncateStmt):
            for rel in stmt.relations or ():
                want(range_name(rel), ACCESS_EXCLUSIVE)
        elif isinstance(stmt, ast.LockStmt):
            for rel in stmt.relations or ():
                want(range_name(rel), LOCK_TABLE_MODES.get(stmt.mode, ACCESS_EXCLUSIVE))
        elif isinstance(stmt, ast.CreateTrigStmt):
            want(range_name(stmt.relation), SHARE_ROW_EXCLUSIVE)
    return targets


def is_lock_timeout(exc: BaseException) -> bool:
    """Did a statement give up waiting for a lock (SQLSTATE 55P03)?"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            return True
        current = getattr(current, "orig", None) or current.__cause__
    return False


def describe(found: list[dict[str, Any]]) -> str:
    """'pid 4242 (report-job, idle in transaction for 73s: SELECT ...)' for an error message."""
    if not found:
        return "a session that had already let go when dbagent looked"
    parts = []
    for b in found[:3]:
        who = b.get("application_name") or b.get("usename") or "?"
        parts.append(f"pid {b['pid']} ({who}, {b.get('state')}, transaction open {b['xact_age_s']:.0f}s: {b['query'][:80]})")
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return "; ".join(parts) + more
