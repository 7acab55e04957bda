"""Batched data migrations: backfill a large table in short, resumable batches.

One ``UPDATE`` over a large table holds row locks on every row it touched
until it commits, bloats the table in one go and, if it is interrupted, starts
over. ``backfill`` instead walks the table in key order (keyset pagination:
``WHERE key > last ORDER BY key LIMIT n``) and commits each batch on its own,
so the application only ever waits on one batch's rows::

    from alembic import op
    from dbagent.backfill import backfill

    def upgrade() -> None:
        backfill(op, "users", "display_name = coalesce(first_name, '') || ' ' || coalesce(last_name, '')",
                 where="display_name IS NULL")

Each batch is a single statement that updates the rows and the backfill's
progress row in ``dbagent.backfills`` together, so after a crash at any moment
the next run resumes right after the last committed batch and no row is
processed twice. A finished backfill run again does nothing.

Inside a migration, the batches run in an Alembic ``autocommit_block``: what
the step did before is committed first, and what it does after (and Alembic's
version bump) commits in a new transaction. That transaction also archives the
progress row, so a step that fails after its backfill reruns without redoing
it, while re-applying the migration after a downgrade backfills afresh. Put a
backfill in a migration of its own, or make the statements before it
idempotent: a rerun of the step runs them again.

Every batch runs under the session's ``lock_timeout`` and ``statement_timeout``
(a batch that times out waiting for a lock is retried with backoff). Defaults
come from ``config.attributes["dbagent.backfill"]`` (dbagent's worker fills it
from ``backfill_batch_size`` and ``backfill_pause`` and passes ``on_progress``);
with plain Alembic: batches of 1000, no pause, progress in the log.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from dbagent.core.errors import BadInput, OperationFailed
from dbagent.core.redact import redact
from dbagent.postgres import store

log = logging.getLogger(__name__)

ATTRIBUTES_KEY = "dbagent.backfill"
DEFAULT_BATCH_SIZE = 1000
DEFAULT_PAUSE_S = 0.0
LOCK_RETRIES = 5  # attempts of a batch that times out waiting for row or table locks
LOCK_RETRY_PAUSE_S = 0.5  # after the first; doubles, jittered 50-100 %
LOCK_NOT_AVAILABLE = "55P03"
LOG_EVERY_S = 10.0

OnProgress = Callable[[dict[str, Any]], None]


_RESOLVE = """
SELECT n.nspname, c.relname, c.reltuples, format_type(a.atttypid, a.atttypmod),
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indkey[0] = a.attnum)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = %(key)s AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.oid = to_regclass(%(table)s)
"""


# Per migration context: the step transaction the last backfill archived in, and what it archived.
_PENDING: weakref.WeakKeyDictionary[Any, tuple[Any, list[int]]] = weakref.WeakKeyDictionary()


@dataclass
class Progress:
    """Where a backfill stands; ``to_json`` is what ``on_progress`` receives."""

    name: str
    table: str
    last_key: str | None = None
    rows_done: int = 0  # rows the UPDATE changed (those matching ``where``)
    rows_scanned: int = 0  # keys paged through
    batches: int = 0
    finished: bool = False
    rows_estimate: int | None = None  # pg_class.reltuples, never count(*)
    resumed_after: str | None = None  # last_key when this run started
    rate: float | None = None  # rows scanned per second in this run
    eta_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "table": self.table,
            "rows_done": self.rows_done,
            "rows_scanned": self.rows_scanned,
            "rows_estimate": self.rows_estimate,
            "last_key": self.last_key,
            "resumed_after": self.resumed_after,
            "batches": self.batches,
            "rate": self.rate,
            "eta_s": self.eta_s,
            "finished": self.finished,
        }


def backfill(
    target: Any,
    table: str,
    set_: str,
    *,
    where: str | None = None,
    key: str = "id",
    name: str | None = None,
    batch_size: int | None = None,
    pause_s: float | None = None,
    on_progress: OnProgress | None = None,
) -> Progress:
    """Run ``UPDATE table SET set_ WHERE where`` in batches of ``batch_size`` rows in ``key`` order.

    ``target`` is Alembic's ``op`` (inside a migration) or a SQLAlchemy
    ``Connection`` not in a transaction (each batch is committed on it).
    ``table`` is ``name`` or ``schema.name``, ``key`` a column with an index
    (unique keys page exactly; duplicates of a key value on a batch boundary
    are all covered by that batch; rows whose key is NULL are left alone).
    ``set_`` and ``where`` are SQL fragments written as for ``UPDATE``, passed
    through verbatim. ``name`` identifies the backfill for resuming
    (default: derived from table, key, set and where). Arguments left as None
    come from the Alembic config attributes ``"dbagent.backfill"``
    (``batch_size``, ``pause_s``, ``on_progress``), else the defaults.
    """
    if isinstance(target, Connection):
        return _Backfill(target, None, table, set_, where, key, name, batch_size, pause_s, on_progress).run()
    context = target.get_context()
    attributes = (context.config.attributes if context.config is not None else {}).get(ATTRIBUTES_KEY) or {}
    batch_size = batch_size if batch_size is not None else attributes.get("batch_size")
    pause_s = pause_s if pause_s is not None else attributes.get("pause_s")
    on_progress = on_progress or attributes.get("on_progress")
    if context.as_sql:
        # Offline (--sql, migrate --dry-run): nothing can be paged; say what would run.
        context.impl.static_output(
            f"-- dbagent backfill {name or default_name(table, key, set_, where)!r}: in batches of"
            f" {batch_size or DEFAULT_BATCH_SIZE} rows by {key}, each committed on its own:"
        )
        statement = f"UPDATE {table} SET {set_}" + (f" WHERE {where}" if where else "")
        context.impl.static_output("--   " + " ".join(statement.split()))
        return Progress(name or default_name(table, key, set_, where), table)
    # Archiving commits with the end of the step: a rerun of a step that failed
    # after its backfills skips them, a later re-application starts afresh. An
    # autocommit block commits the step's work so far, so the archiving of
    # earlier backfills of the same step is undone until the step's last one.
    pending = _PENDING.get(context)
    earlier = pending[1] if pending and pending[0] is context.connection.get_transaction() else []
    if earlier:
        context.connection.exec_driver_sql(store.BACKFILL_UNARCHIVE, {"ids": earlier})
    with context.autocommit_block():
        job = _Backfill(context.connection, context, table, set_, where, key, name, batch_size, pause_s, on_progress)
        progress = job.run()
    ids = [*earlier, job.row_id]
    context.connection.exec_driver_sql(store.BACKFILL_ARCHIVE, {"ids": ids})
    _PENDING[context] = (context.connection.get_transaction(), ids)
    return progress


def default_name(table: str, key: str, set_: str, where: str | None) -> str:
    digest = hashlib.sha256("\0".join([table, key, set_, where or ""]).encode()).hexdigest()[:12]
    return f"{table}:{digest}"


def ensure_table(conn: Connection) -> None:
    """Create ``dbagent.backfills`` when it is missing (the caller commits)."""
    conn.exec_driver_sql(store.BACKFILLS_DDL)


def _is_lock_timeout(exc: BaseException) -> bool:
    return getattr(getattr(exc, "orig", None), "sqlstate", None) == LOCK_NOT_AVAILABLE


class _Backfill:
    def __init__(
        self,
        conn: Connection,
        context: Any,
        table: str,
        set_: str,
        where: str | None,
        key: str,
        name: str | None,
        batch_size: int | None,
        pause_s: float | None,
        on_progress: OnProgress | None,
    ) -> None:
        if not set_ or not set_.strip():
            raise BadInput("backfill: set_ is empty; write it as for UPDATE, e.g. \"col = expr\"")
        self.batch_size = int(batch_size if batch_size is not None else DEFAULT_BATCH_SIZE)
        self.pause_s = float(pause_s if pause_s is not None else DEFAULT_PAUSE_S)
        if self.batch_size < 1:
            raise BadInput(f"backfill: batch_size must be at least 1 (got {self.batch_size})")
        if self.pause_s < 0:
            raise BadInput(f"backfill: pause_s cannot be negative (got {self.pause_s})")
        self.conn = conn
        self.context = context
        self.table = table
        self.set_ = set_
        self.where = where
        self.key = key
        self.name = name or default_name(table, key, set_, where)
        self.on_progress = on_progress
        self.row_id: int | None = None
        self.logged_at = time.monotonic()

    def run(self) -> Progress:
        if self.context is None and self.conn.in_transaction():
            raise BadInput("backfill: commit or roll back the connection first: each batch commits on its own")
        ensure_table(self.conn)
        self._commit()
        quote = self.conn.dialect.identifier_preparer.quote_identifier
        schema, _, relname = self.table.rpartition(".")
        qualified = f"{quote(schema)}.{quote(relname)}" if schema else quote(relname)
        found = self.conn.exec_driver_sql(_RESOLVE, {"table": qualified, "key": self.key}).first()
        self._commit()
        if found is None:
            raise BadInput(f"backfill {self.name!r}: no table {self.table!r}")
        nspname, relname, reltuples, key_type, indexed = found
        if key_type is None:
            raise BadInput(f"backfill {self.name!r}: table {self.table!r} has no column {self.key!r}")
        if not indexed:
            log.warning("backfill %r: no index starts with %s.%s: every batch scans the table", self.name, self.table, self.key)
        statements = self._statements(f"{quote(nspname)}.{quote(relname)}", quote(self.key), key_type)

        if not self.conn.exec_driver_sql(store.BACKFILL_TRY_LOCK, {"name": self.name}).scalar():
            self._commit()
            raise OperationFailed(f"backfill {self.name!r} is running in another session")
        try:
            return self._batches(statements, reltuples)
        finally:
            self.conn.exec_driver_sql(store.BACKFILL_UNLOCK, {"name": self.name})
            self._commit()

    def _statements(self, table: str, key: str, key_type: str) -> tuple[str, str]:
        """The first batch's statement and every later one's (which starts after %(after)s)."""

        def fragment(sql: str) -> str:
            return sql.replace("%", "%%")  # the driver's paramstyle; the author wrote plain SQL

        common = {"key": key, "table": table, "limit": self.batch_size, "set_": fragment(self.set_),
                  "where": fragment(self.where) if self.where else "TRUE"}
        after = f"{key} > CAST(%(after)s AS {key_type})"
        first = store.BACKFILL_BATCH.format(after=f"WHERE {key} IS NOT NULL", after_and="", **common)
        later = store.BACKFILL_BATCH.format(after=f"WHERE {after}", after_and=f"{after} AND", **common)
        return first, later

    def _batches(self, statements: tuple[str, str], reltuples: float) -> Progress:
        row = self.conn.exec_driver_sql(store.BACKFILL_START, {"name": self.name, "table": self.table, "key": self.key}).one()
        self._commit()
        self.row_id, last_key, rows_done, rows_scanned, batches, finished = row
        progress = Progress(
            self.name, self.table, last_key, rows_done, rows_scanned, batches, finished,
            rows_estimate=int(reltuples) if reltuples is not None and reltuples > 0 else None,
            resumed_after=last_key,
        )
        if finished:
            log.info("backfill %r of %s finished earlier (%d rows): nothing to do", self.name, self.table, rows_done)
            return progress
        if last_key is not None:
            log.info("backfill %r of %s resumes after %s=%s (%d rows done)", self.name, self.table, self.key, last_key, rows_done)
        started, scanned_before = time.monotonic(), rows_scanned
        while not progress.finished:
            first, later = statements
            statement = first if progress.last_key is None else later
            result = self._batch(statement, progress.last_key)
            (progress.last_key, progress.rows_done, progress.rows_scanned, progress.batches, progress.finished) = result
            elapsed = time.monotonic() - started
            progress.rate = round((progress.rows_scanned - scanned_before) / elapsed, 1) if elapsed > 0 else None
            progress.eta_s = self._eta(progress)
            self._report(progress)
            if not progress.finished and self.pause_s:
                time.sleep(self.pause_s)
        return progress

    def _batch(self, statement: str, after: str | None) -> tuple:
        for attempt in range(1, LOCK_RETRIES + 1):
            try:
                row = self.conn.exec_driver_sql(statement, {"id": self.row_id, "after": after}).one()
                self._commit()
                return tuple(row)
            except Exception as exc:
                self._rollback()
                if _is_lock_timeout(exc) and attempt < LOCK_RETRIES:
                    pause = LOCK_RETRY_PAUSE_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
                    log.info("backfill %r: batch after %s waited too long for locks; retrying in %.1fs", self.name, after, pause)
                    time.sleep(pause)
                    continue
                raise OperationFailed(
                    f"backfill {self.name!r} of {self.table}: the batch after {self.key}={after} failed: {redact(exc)}"
                ) from exc
        raise AssertionError("unreachable")

    # Inside Alembic's autocommit block every statement has committed on its
    # own, and the block owns the SQLAlchemy transaction: leave it alone.
    def _commit(self) -> None:
        if self.context is None:
            self.conn.commit()

    def _rollback(self) -> None:
        if self.context is None:
            self.conn.rollback()

    @staticmethod
    def _eta(progress: Progress) -> float | None:
        if progress.finished:
            return 0.0
        if not progress.rate or progress.rows_estimate is None:
            return None
        return round(max(progress.rows_estimate - progress.rows_scanned, 0) / progress.rate, 1)

    def _report(self, progress: Progress) -> None:
        """Every batch to ``on_progress``; without one, a log line every LOG_EVERY_S and at the end."""
        if self.on_progress is not None:
            try:
                self.on_progress(progress.to_json())
            except Exception as exc:  # noqa: BLE001 - a lost report must not fail the migration
                log.warning("backfill %r: progress report failed: %s", self.name, redact(exc))
        elif progress.finished or time.monotonic() - self.logged_at >= LOG_EVERY_S:
            self.logged_at = time.monotonic()
            total = f"/~{progress.rows_estimate}" if progress.rows_estimate else ""
            log.info(
                "backfill %r of %s: %d rows scanned%s, %d updated, %d batches, last %s=%s%s",
                self.name, self.table, progress.rows_scanned, total, progress.rows_done, progress.batches,
                self.key, progress.last_key, " (finished)" if progress.finished else "",
            )
