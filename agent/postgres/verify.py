"""Integrity checks of a database after (or apart from) a migration run.

``capture_baseline`` records, before a migrate's first step, what the checks
compare against: the constraints already NOT VALID, a catalog fingerprint of
every user table (so "the tables the run touched" are those new or changed),
and the row counts of the critical tables. ``run_checks`` then runs every
check, each in a read-only transaction of its own that is always rolled back:
verification never changes the database, and a check that fails, errs or times
out cannot poison the next one. A check that raises is a failed ``Check``.

The checks, by their stable names (``CHECK_NAMES``):

* ``revision`` — the database is at the expected revision;
* ``invalid_indexes`` — no index is INVALID;
* ``not_valid_constraints`` — no NOT VALID constraint left behind by the run
  (without a run to compare with: none at all);
* ``fk_orphans`` — no orphan rows for the foreign keys on, or referencing, a
  table the run touched, each scan bounded (``LIMIT 1``, ``fk_check_timeout``);
* ``health_checks`` — one check for all configured queries: each must return
  exactly one row whose first column is true within ``health_check_timeout``;
  the detail names every query that did not, and why;
* ``critical_tables`` — no critical table lost rows across the run, none is missing.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from psycopg import sql
from sqlalchemy import Connection

from dbagent.core.durations import postgres_interval
from dbagent.core.errors import OperationFailed, error_text
from dbagent.postgres.connections import rollback_quietly

if TYPE_CHECKING:
    from dbagent.settings import DatabaseSettings

log = logging.getLogger(__name__)

CHECK_NAMES = (
    "revision",
    "invalid_indexes",
    "not_valid_constraints",
    "fk_orphans",
    "health_checks",
    "critical_tables",
)
NO_RUN = "no run to compare with"

# dbagent's own bookkeeping (audit log, change log) is written during every
# run and is not part of the schema being migrated.
_OWN_SCHEMA = "dbagent"
_QUERY_SHOWN_CHARS = 120
_QUERY_CANCELED = "57014"


@dataclass(frozen=True)
class Check:
    """One verification check and what it found."""

    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Baseline:
    """The state a migrate run is judged against, read before its first step.

    ``tables`` maps every user table (``schema.table``, quoted where needed)
    to a fingerprint of its columns, constraints and indexes; ``row_counts``
    maps each configured critical table to its row count (None: it did not exist).
    """

    not_valid: frozenset[str] = frozenset()
    tables: Mapping[str, str] = field(default_factory=dict)
    row_counts: Mapping[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class ForeignKey:
    """A FOREIGN KEY constraint, as much of it as an orphan scan needs."""

    name: str  # schema.table.constraint, quoted where needed
    child: tuple[str, str]  # (schema, table), unquoted
    child_columns: tuple[str, ...]
    parent: tuple[str, str]
    parent_columns: tuple[str, ...]
    match_full: bool = False
    # Inheritance children do not share their parent's foreign keys: scan the
    # table itself only, unless it is partitioned (then its partitions are its rows).
    child_partitioned: bool = False
    parent_partitioned: bool = False
    # schema.table as PostgreSQL's format('%I.%I') writes them (default: joined as is).
    child_label: str = ""
    parent_label: str = ""

    @property
    def child_name(self) -> str:
        return self.child_label or ".".join(self.child)

    @property
    def parent_name(self) -> str:
        return self.parent_label or ".".join(self.parent)

    def orphan_query(self) -> sql.Composed:
        """A query that returns one row if some child row references no parent row."""
        if not self.child_columns or len(self.child_columns) != len(self.parent_columns):
            raise ValueError(
                f"foreign key {self.name}: {len(self.child_columns)} column(s) referencing {len(self.parent_columns)}"
            )
        child = [sql.SQL("c.{}").format(sql.Identifier(col)) for col in self.child_columns]
        parent = [sql.SQL("p.{}").format(sql.Identifier(col)) for col in self.parent_columns]
        if self.match_full:
            # MATCH FULL: a row is exempt only when every column is NULL.
            exempt = sql.SQL(" AND ").join(sql.SQL("{} IS NULL").format(col) for col in child)
            referencing = sql.SQL("NOT ({})").format(exempt)
        else:
            # MATCH SIMPLE: any NULL column exempts the row.
            referencing = sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(col) for col in child)
        matches = sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(p, c) for p, c in zip(parent, child, strict=True)
        )
        return sql.SQL(
            "SELECT 1 FROM {child_only}{child} AS c WHERE {referencing}"
            " AND NOT EXISTS (SELECT 1 FROM {parent_only}{parent} AS p WHERE {matches}) LIMIT 1"
        ).format(
            child_only=sql.SQL("" if self.child_partitioned else "ONLY "),
            child=sql.Identifier(*self.child),
            referencing=referencing,
            parent_only=sql.SQL("" if self.parent_partitioned else "ONLY "),
            parent=sql.Identifier(*self.parent),
            matches=matches,
        )

    def describe(self) -> str:
        child = ", ".join(self.child_columns)
        parent = ", ".join(self.parent_columns)
        return f"{self.name} ({self.child_name}({child}) → {self.parent_name}({parent}))"


# -- pure interpretation ------------------------------------------------------


def check_revision(current: str | None, expected: str | None) -> Check:
    shown = current or "base"
    wanted = expected or "base"
    if current == expected:
        return Check("revision", True, f"at {shown}, as expected")
    return Check("revision", False, f"expected revision {wanted}, found {shown}")


def invalid_indexes_check(names: Sequence[str]) -> Check:
    if names:
        return Check("invalid_indexes", False, f"invalid indexes: {', '.join(names)}")
    return Check("invalid_indexes", True, "no invalid indexes")


def not_valid_check(now: Iterable[str], baseline: Baseline | None) -> Check:
    """NOT VALID constraints present now; with a baseline, only those the run left behind fail."""
    present = sorted(set(now))
    if baseline is None:
        if present:
            return Check("not_valid_constraints", False, f"NOT VALID constraints: {', '.join(present)}")
        return Check("not_valid_constraints", True, "no NOT VALID constraints")
    left = [name for name in present if name not in baseline.not_valid]
    if left:
        return Check("not_valid_constraints", False, f"left NOT VALID by the run: {', '.join(left)}")
    before = len([name for name in present if name in baseline.not_valid])
    already = f" ({before} already NOT VALID before it)" if before else ""
    return Check("not_valid_constraints", True, f"no NOT VALID constraint left by the run{already}")


def touched_tables(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Tables new since the baseline, or whose columns, constraints or indexes changed."""
    return sorted(name for name, fingerprint in after.items() if before.get(name) != fingerprint)


def foreign_keys_to_scan(keys: Iterable[ForeignKey], touched: Iterable[str]) -> list[ForeignKey]:
    """The foreign keys on, or referencing, a touched table."""
    names = set(touched)
    return [fk for fk in keys if fk.child_name in names or fk.parent_name in names]


# What one orphan scan found (anything else: the error that stopped it).
ORPHANS = "orphans"
NO_ORPHANS = "no orphans"
TIMED_OUT = "timed out"


def fk_orphans_check(
    outcomes: Sequence[tuple[ForeignKey, str]], touched: Sequence[str], timeout_s: float
) -> Check:
    """``outcomes``: per scanned key, NO_ORPHANS, ORPHANS, or what stopped the scan."""
    if not touched:
        return Check("fk_orphans", True, "no table was touched by the run")
    if not outcomes:
        return Check("fk_orphans", True, f"no foreign keys on or to the {_plural(len(touched), 'table')} the run touched")
    problems = []
    for fk, outcome in outcomes:
        if outcome == NO_ORPHANS:
            continue
        if outcome == ORPHANS:
            problems.append(f"orphan rows for {fk.describe()}")
        elif outcome == TIMED_OUT:
            budget = _human_seconds(timeout_s)
            problems.append(f"could not finish scanning {fk.name} within {budget} (fk_check_timeout)")
        else:
            problems.append(f"could not scan {fk.name}: {outcome}")
    if problems:
        return Check("fk_orphans", False, "; ".join(problems))
    keys, tables = _plural(len(outcomes), "foreign key"), _plural(len(touched), "table")
    return Check("fk_orphans", True, f"no orphans for the {keys} on or to the {tables} the run touched")


def health_problem(columns: int | None, rows: Sequence[Sequence[Any]]) -> str | None:
    """Why a health check's result is not a pass (None: it passed).

    ``columns`` is how many columns the result has (None: the statement returned
    no result set); ``rows`` is at most the first two rows.
    """
    if columns is None:
        return "returned no result set (it must be a query returning true)"
    if not rows:
        return "returned no rows"
    if len(rows) > 1:
        return "returned more than one row"
    if columns == 0 or not rows[0]:
        return "returned no columns"
    value = rows[0][0]
    if value is None:
        return "returned NULL"
    if value is False:
        return "returned false"
    if value is not True:
        return f"returned {value!r} ({type(value).__name__}), not a boolean"
    return None


def health_checks_check(outcomes: Sequence[tuple[str, str | None]]) -> Check:
    """``outcomes``: per configured query, in order, None (passed) or its problem."""
    if not outcomes:
        return Check("health_checks", True, "no health checks configured")
    failed = [
        f"[{number}] {_shown_query(query)}: {problem}"
        for number, (query, problem) in enumerate(outcomes, start=1)
        if problem is not None
    ]
    if failed:
        return Check("health_checks", False, f"{len(failed)} of {len(outcomes)} failed: " + "; ".join(failed))
    return Check("health_checks", True, f"all {len(outcomes)} returned true")


def critical_tables_check(
    tables: Sequence[str], before: Mapping[str, int | None] | None, after: Mapping[str, int | str | None]
) -> Check:
    """Row counts must not drop across the run; a missing table fails.

    ``after`` maps each table to its count, None (it does not exist) or the
    error that prevented counting it. Without ``before`` (no run to compare
    with), only missing tables and errors fail.
    """
    if not tables:
        return Check("critical_tables", True, "no critical tables configured")
    problems, fine = [], []
    for table in tables:
        now = after.get(table)
        had = before.get(table) if before is not None else None
        if isinstance(now, str):
            problems.append(f"{table}: could not count its rows: {now}")
        elif now is None:
            was = f" (it had {_plural(had, 'row')} before the run)" if had is not None else ""
            problems.append(f"{table} does not exist{was}")
        elif before is None:
            continue
        elif had is None:
            fine.append(f"{table} new, {_plural(now, 'row')}")
        elif now < had:
            problems.append(f"{table} lost rows: {had} before the run, {now} after")
        else:
            fine.append(f"{table} {had} → {now}")
    if problems:
        return Check("critical_tables", False, "; ".join(problems))
    if before is None:
        return Check("critical_tables", True, NO_RUN)
    return Check("critical_tables", True, "row counts kept: " + ", ".join(fine))


def summary(checks: list[Check]) -> str:
    failed = [c for c in checks if not c.ok]
    if not failed:
        return f"all {len(checks)} checks passed"
    return "; ".join(f"{c.name}: {c.detail}" for c in failed)


def is_timeout(exc: BaseException) -> bool:
    """Whether a driver error is PostgreSQL cancelling a statement over statement_timeout."""
    orig = getattr(exc, "orig", None) or exc
    return getattr(orig, "sqlstate", None) == _QUERY_CANCELED and "statement timeout" in str(orig)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _human_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def _shown_query(query: str) -> str:
    flat = " ".join(query.split())
    return flat if len(flat) <= _QUERY_SHOWN_CHARS else flat[: _QUERY_SHOWN_CHARS - 1] + "…"


# -- the database -------------------------------------------------------------

_NOT_VALID_SQL = """
SELECT CASE WHEN k.conrelid <> 0 THEN format('%I.%I.%I', rn.nspname, r.relname, k.conname)
            ELSE format('%I.%I.%I', tn.nspname, t.typname, k.conname) END
FROM pg_constraint k
LEFT JOIN pg_class r ON r.oid = k.conrelid LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace
LEFT JOIN pg_type t ON t.oid = k.contypid LEFT JOIN pg_namespace tn ON tn.oid = t.typnamespace
WHERE NOT k.convalidated
ORDER BY 1
"""

_INVALID_INDEXES_SQL = """
SELECT format('%I.%I', n.nspname, c.relname) FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT i.indisvalid ORDER BY 1
"""

# One text per user table describing its columns (name, type, nullability,
# default), constraints and indexes; hashed client-side into its fingerprint.
_TABLE_SHAPES_SQL = """
SELECT format('%I.%I', n.nspname, c.relname),
  concat_ws(E'\\n',
    'columns', (SELECT string_agg(concat_ws(' ', a.attnum, quote_ident(a.attname), format_type(a.atttypid, a.atttypmod),
                                            CASE WHEN a.attnotnull THEN 'NOT NULL' ELSE 'NULL' END,
                                            'DEFAULT ' || pg_get_expr(d.adbin, d.adrelid)), E'\\n' ORDER BY a.attnum)
                FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
    'constraints', (SELECT string_agg(concat_ws(' ', quote_ident(k.conname), pg_get_constraintdef(k.oid),
                                                CASE WHEN k.convalidated THEN 'VALID' ELSE 'NOT VALID' END), E'\\n' ORDER BY k.conname)
                    FROM pg_constraint k WHERE k.conrelid = c.oid),
    'indexes', (SELECT string_agg(concat_ws(' ', pg_get_indexdef(i.indexrelid),
                                            CASE WHEN i.indisvalid THEN 'VALID' ELSE 'INVALID' END), E'\\n' ORDER BY ic.relname)
                FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = c.oid))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
  AND n.nspname <> '""" + _OWN_SCHEMA + """'
"""

_FOREIGN_KEYS_SQL = """
SELECT format('%I.%I.%I', cn.nspname, cc.relname, k.conname),
  format('%I.%I', cn.nspname, cc.relname), format('%I.%I', pn.nspname, pc.relname),
  cn.nspname, cc.relname, cc.relkind = 'p',
  ARRAY(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY AS u(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.attnum ORDER BY u.ord),
  pn.nspname, pc.relname, pc.relkind = 'p',
  ARRAY(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY AS u(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.attnum ORDER BY u.ord),
  k.confmatchtype = 'f'
FROM pg_constraint k
JOIN pg_class cc ON cc.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
JOIN pg_class pc ON pc.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
WHERE k.contype = 'f' AND k.conparentid = 0
ORDER BY 1
"""

_RESOLVE_TABLE_SQL = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%s)
"""


def _finish_open_transaction(conn: Connection) -> None:
    if conn.in_transaction():
        conn.commit()


@contextmanager
def _read_only(conn: Connection, timeout_s: float | None = None) -> Iterator[Any]:
    """A read-only transaction of its own on conn (a psycopg cursor), always rolled back."""
    _finish_open_transaction(conn)
    try:
        # Through SQLAlchemy, so that it knows a transaction is open and rolls it back.
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")
        # The raw cursor takes SQL verbatim: a configured query's '%' or ':name' stays as written.
        cursor = conn.connection.cursor()
        try:
            if timeout_s is not None:
                cursor.execute(f"SET LOCAL statement_timeout = '{postgres_interval(timeout_s)}'")
            yield cursor
        finally:
            cursor.close()
    finally:
        rollback_quietly(conn)


def _guarded(conn: Connection, name: str, check: Callable[[], Check]) -> Check:
    """Run one check; whatever it raises is that check failing, never the next one's problem."""
    try:
        return check()
    except Exception as exc:
        log.warning("verification check %s could not run: %s", name, error_text(exc, one_line=True))
        return Check(name, False, f"the check could not run: {error_text(exc, one_line=True)}")
    finally:
        rollback_quietly(conn)


def _not_valid_constraints(cursor: Any) -> list[str]:
    cursor.execute(_NOT_VALID_SQL)
    return [row[0] for row in cursor.fetchall()]


def _table_fingerprints(cursor: Any) -> dict[str, str]:
    cursor.execute(_TABLE_SHAPES_SQL)
    return {name: hashlib.sha256((shape or "").encode()).hexdigest() for name, shape in cursor.fetchall()}


def _foreign_keys(cursor: Any) -> list[ForeignKey]:
    cursor.execute(_FOREIGN_KEYS_SQL)
    return [
        ForeignKey(
            name=name,
            child=(child_schema, child_table),
            child_columns=tuple(child_columns),
            parent=(parent_schema, parent_table),
            parent_columns=tuple(parent_columns),
            match_full=bool(match_full),
            child_partitioned=bool(child_partitioned),
            parent_partitioned=bool(parent_partitioned),
            child_label=child_label,
            parent_label=parent_label,
        )
        for (
            name, child_label, parent_label, child_schema, child_table, child_partitioned, child_columns,
            parent_schema, parent_table, parent_partitioned, parent_columns, match_full,
        ) in cursor.fetchall()
    ]


def _count_rows(cursor: Any, table: str) -> int | None:
    """Exact row count of a configured table name (resolved as PostgreSQL would); None: no such table."""
    cursor.execute(_RESOLVE_TABLE_SQL, (table,))
    row = cursor.fetchone()
    if row is None:
        return None
    cursor.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*row)))
    return int(cursor.fetchone()[0])


def capture_baseline(conn: Connection, db: DatabaseSettings) -> Baseline:
    """What the checks after a run compare against; read in one short read-only transaction.

    Row counts run under the session's statement_timeout. Raises OperationFailed
    when the baseline cannot be read: nothing has been changed yet.
    """
    _finish_open_transaction(conn)
    try:
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cursor = conn.connection.cursor()
        try:
            not_valid = frozenset(_not_valid_constraints(cursor))
            tables = _table_fingerprints(cursor)
            counts = {table: _count_rows(cursor, table) for table in db.critical_tables}
        finally:
            cursor.close()
        conn.commit()
    except Exception as exc:
        rollback_quietly(conn)
        raise OperationFailed(
            f"could not read the state to verify the run against, so nothing was migrated: {error_text(exc, one_line=True)}"
        ) from None
    return Baseline(not_valid=not_valid, tables=tables, row_counts=counts)


def check_invalid_indexes(conn: Connection) -> Check:
    """Indexes left INVALID (typically by a failed CREATE INDEX CONCURRENTLY)."""
    with _read_only(conn) as cursor:
        cursor.execute(_INVALID_INDEXES_SQL)
        return invalid_indexes_check([row[0] for row in cursor.fetchall()])


def check_not_valid_constraints(conn: Connection, baseline: Baseline | None) -> Check:
    with _read_only(conn) as cursor:
        return not_valid_check(_not_valid_constraints(cursor), baseline)


def check_fk_orphans(conn: Connection, baseline: Baseline | None, timeout_s: float) -> Check:
    """Orphan rows for the foreign keys on or to the tables the run touched; one bounded scan each."""
    if baseline is None:
        return Check("fk_orphans", True, NO_RUN)
    with _read_only(conn) as cursor:
        touched = touched_tables(baseline.tables, _table_fingerprints(cursor))
        keys = foreign_keys_to_scan(_foreign_keys(cursor), touched)
    outcomes = [(fk, _scan_for_orphans(conn, fk, timeout_s)) for fk in keys]
    return fk_orphans_check(outcomes, touched, timeout_s)


def _scan_for_orphans(conn: Connection, fk: ForeignKey, timeout_s: float) -> str:
    try:
        with _read_only(conn, timeout_s) as cursor:
            cursor.execute(fk.orphan_query())
            return ORPHANS if cursor.fetchone() is not None else NO_ORPHANS
    except Exception as exc:
        return TIMED_OUT if is_timeout(exc) else error_text(exc, one_line=True)


def check_health(conn: Connection, queries: Sequence[str], timeout_s: float) -> Check:
    return health_checks_check([(query, _run_health_query(conn, query, timeout_s)) for query in queries])


def _run_health_query(conn: Connection, query: str, timeout_s: float) -> str | None:
    try:
        with _read_only(conn, timeout_s) as cursor:
            cursor.execute(query)
            if cursor.description is None:
                return health_problem(None, [])
            return health_problem(len(cursor.description), cursor.fetchmany(2))
    except Exception as exc:
        if is_timeout(exc):
            return f"timed out after {_human_seconds(timeout_s)} (health_check_timeout)"
        return f"failed: {error_text(exc, one_line=True)}"


def check_critical_tables(conn: Connection, tables: Sequence[str], baseline: Baseline | None) -> Check:
    after: dict[str, int | str | None] = {}
    for table in tables:
        try:
            with _read_only(conn) as cursor:
                if baseline is None:
                    # No run to compare with: only whether the table is there.
                    cursor.execute(_RESOLVE_TABLE_SQL, (table,))
                    after[table] = 0 if cursor.fetchone() is not None else None
                else:
                    after[table] = _count_rows(cursor, table)
        except Exception as exc:
            after[table] = error_text(exc, one_line=True)
    return critical_tables_check(tables, baseline.row_counts if baseline is not None else None, after)


def run_checks(
    conn: Connection,
    current: str | None,
    expected: str | None,
    db: DatabaseSettings | None = None,
    baseline: Baseline | None = None,
) -> list[Check]:
    """Every check, in CHECK_NAMES order; ``baseline`` (from before a run) enables the run-relative ones."""
    _finish_open_transaction(conn)
    health = list(db.health_checks) if db is not None else []
    critical = list(db.critical_tables) if db is not None else []
    health_timeout_s = db.health_check_timeout if db is not None else 5.0
    fk_timeout_s = db.fk_check_timeout if db is not None else 30.0
    return [
        check_revision(current, expected),
        _guarded(conn, "invalid_indexes", lambda: check_invalid_indexes(conn)),
        _guarded(conn, "not_valid_constraints", lambda: check_not_valid_constraints(conn, baseline)),
        _guarded(conn, "fk_orphans", lambda: check_fk_orphans(conn, baseline, fk_timeout_s)),
        _guarded(conn, "health_checks", lambda: check_health(conn, health, health_timeout_s)),
        _guarded(conn, "critical_tables", lambda: check_critical_tables(conn, critical, baseline)),
    ]
