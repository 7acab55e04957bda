"""Lock impact, live: who is stuck behind a migration step, and what the step is stuck behind.

While a step runs, a sampler on its own connection looks at ``pg_locks`` (through
``pg_blocking_pids``) and ``pg_stat_activity`` twice a second. Once a session
has waited on the migration's session, or the migration's session on another,
longer than the threshold, a ``lock.blocking`` event names them, so operators
see the impact while it happens rather than in the application's error rate.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import psycopg

from dbagent.core.lockmodes import CONFLICTS
from dbagent.core.redact import redact, redact_query

if TYPE_CHECKING:
    from sqlalchemy import Connection

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 0.5

_BLOCKED_BY_US = """
SELECT a.pid, a.usename, a.application_name, left(a.query, 200) AS query,
       extract(epoch FROM now() - coalesce(a.state_change, a.query_start)) AS waited_s
FROM pg_stat_activity a
WHERE %(pid)s = ANY(pg_blocking_pids(a.pid))
"""
_WE_WAIT_ON = """
SELECT b.pid, b.usename, b.application_name, left(b.query, 200) AS query,
       extract(epoch FROM now() - coalesce(me.state_change, me.query_start)) AS waited_s,
       b.state, extract(epoch FROM now() - b.xact_start) AS their_xact_s
FROM pg_stat_activity me
JOIN LATERAL unnest(pg_blocking_pids(me.pid)) AS blocker(pid) ON true
JOIN pg_stat_activity b ON b.pid = blocker.pid
WHERE me.pid = %(pid)s
"""


class BlockingMonitor:
    """Samples lock waits around one backend (the migration's) while a step runs."""

    def __init__(self, url: str, pid: int, threshold_s: float, report: Callable[[dict[str, Any]], None]) -> None:
        self.url = url
        self.pid = pid
        self.threshold_s = threshold_s
        self.report = report
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: set[tuple[str, int]] = set()

    def __enter__(self) -> BlockingMonitor:
        self._thread = threading.Thread(target=self._run, name="lock-blocking-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=5, application_name="dbagent lock monitor") as conn:
                while not self._stop.wait(SAMPLE_EVERY_S):
                    self.sample(conn)
        except Exception as exc:  # the step goes on without live lock reports
            log.warning("lock monitor stopped: %s", redact(exc))

    def sample(self, conn: psycopg.Connection) -> None:
        params = {"pid": self.pid}
        blocked = [_row(conn, r) for r in conn.execute(_BLOCKED_BY_US, params).fetchall()]
        waiting_on = [_row(conn, r) for r in conn.execute(_WE_WAIT_ON, params).fetchall()]
        for direction, rows in (("blocking", blocked), ("waiting", waiting_on)):
            late = [r for r in rows if (r.get("waited_s") or 0) >= self.threshold_s]
            fresh = [r for r in late if (direction, r["pid"]) not in self._reported]
            if not fresh:
                continue
            self._reported.update((direction, r["pid"]) for r in fresh)
            self.report({
                "direction": direction,
                "migration_pid": self.pid,
                "sessions": json.loads(json.dumps(late, default=str)),
                "threshold_ms": round(self.threshold_s * 1000),
            })


def _row(conn: psycopg.Connection, values: tuple) -> dict[str, Any]:
    names = ("pid", "usename", "application_name", "query", "waited_s", "state", "their_xact_s")
    row = dict(zip(names, values, strict=False))
    # Another session's SQL, cut at 200 characters: ALTER ROLE ... PASSWORD '...', a dblink
    # connection string, half a literal. Its application_name is anyone's to set, too.
    for key in ("query", "application_name"):
        if row.get(key):
            row[key] = redact_query(row[key])
    for key in ("waited_s", "their_xact_s"):
        if row.get(key) is not None:
            row[key] = round(float(row[key]), 3)
    return row


# -- who holds the locks a step will ask for (the pre-check and the retries of dbagent.core.retries) --

# One round trip for all the step's tables: each with the modes that conflict with the one it will ask for.
_HOLDERS = """
SELECT t.name, l.pid, l.mode, a.application_name, a.usename, a.state, left(a.query, 200),
       extract(epoch FROM now() - a.xact_start), extract(epoch FROM now() - a.state_change)
FROM unnest(%(tables)s::text[], %(modes)s::text[]) AS t(name, conflicting)
JOIN pg_locks l ON l.locktype = 'relation' AND l.relation = to_regclass(t.name)
                AND l.mode = ANY(string_to_array(t.conflicting, ','))
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.granted AND l.pid <> pg_backend_pid()
"""


def blockers(conn: Connection, targets: dict[str, str], *, older_than_s: float = 0.0) -> list[dict[str, Any]]:
    """Sessions holding a lock that conflicts with one the step will ask for.

    Only sessions whose transaction has been open at least ``older_than_s``
    count. One entry per session, with the tables it holds; the oldest first.
    Reads on ``conn`` and commits.
    """
    found: dict[int, dict[str, Any]] = {}
    if not targets:
        return []
    tables = list(targets)
    params = {"tables": tables, "modes": [",".join(sorted(CONFLICTS[targets[t]])) for t in tables]}
    rows = conn.exec_driver_sql(_HOLDERS, params).all()
    conn.commit()
    for table, pid, held, app, user, state, query, xact_s, state_s in rows:
        age = float(xact_s) if xact_s is not None else 0.0
        if age < older_than_s:
            continue
        entry = found.setdefault(pid, {
            "pid": pid,
            "application_name": redact(app) if app else app,
            "usename": user,
            "state": state,
            "query": redact_query(query or ""),
            "xact_age_s": round(age, 3),
            "state_age_s": round(float(state_s), 3) if state_s is not None else None,
            "locks": [],
        })
        entry["locks"].append({"table": table, "mode": held, "conflicts_with": targets[table]})
    return sorted(found.values(), key=lambda b: -b["xact_age_s"])


def contended(conn: Connection, needs: Iterable[dict[str, str]]) -> set[str]:
    """The tables, of all those some steps will lock, that any other session holds in a conflicting mode now.

    One query for a whole plan (``needs``: each step's ``lock_targets``).
    A table not in the answer had no holder at all when this ran, so for the
    next ``holder_grace`` seconds no transaction holding it can be older than
    the grace: its steps need no ``blockers`` check of their own until then.
    Reads on ``conn`` and commits.
    """
    conflicting: dict[str, set[str]] = {}
    for targets in needs:
        for table, mode in targets.items():
            conflicting.setdefault(table, set()).update(CONFLICTS[mode])
    if not conflicting:
        return set()
    tables = list(conflicting)
    rows = conn.exec_driver_sql(_CONTENDED, {"tables": tables, "modes": [",".join(sorted(conflicting[t])) for t in tables]}).all()
    conn.commit()
    return {row[0] for row in rows}


# _HOLDERS without pg_stat_activity, whose snapshot costs more than the rest.
_CONTENDED = """
WITH wanted AS MATERIALIZED (
    SELECT t.name, to_regclass(t.name) AS relation, string_to_array(t.conflicting, ',') AS modes
    FROM unnest(%(tables)s::text[], %(modes)s::text[]) AS t(name, conflicting)
)
SELECT DISTINCT w.name
FROM wanted w JOIN pg_locks l ON l.locktype = 'relation' AND l.relation = w.relation AND l.mode = ANY(w.modes)
WHERE l.granted AND l.pid <> pg_backend_pid()
"""
