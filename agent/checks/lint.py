"""Lint of risky operations in the SQL a migration's upgrade() emits.

The SQL is the one Alembic renders offline (``--sql``), parsed with pglast,
PostgreSQL's own parser, so what is checked is exactly what the server would
run. One rule per hazard; each finding says why the statement is dangerous and
gives the safe multi-step recipe (expand → backfill → contract).

``lint_sql`` is pure: literal SQL in, findings out, no database and no files.
``lint_migrations`` renders every revision of a script directory offline and
lints it; it reads files and drives Alembic but never connects to a database.

Objects created earlier in the same migration are exempt from the rules about
existing tables: an index, a constraint or a NOT NULL column on a table nobody
else can see yet blocks nobody. A rule is switched off for one migration by a
comment in its Python source naming the rule and the reason::

    # dbagent: allow drop-column -- the column has been unused since release 41
"""

from __future__ import annotations

import functools
import io
import re
import tokenize
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pglast import ast
from pglast.enums import (
    AlterTableType,
    ConstrType,
    NullTestType,
    ObjectType,
    TransactionStmtKind,
    VariableSetKind,
)
from pglast.parser import ParseError

from dbagent.core.findings import Finding, Severity, status_of
from dbagent.core.lockmodes import (
    ACCESS_EXCLUSIVE,
    LOCK_TABLE_MODES,
    alter_table_locks,
    parse_statements,
)

# Pure functions of a script's text or SQL, cached: a worker lints the same scripts migrate after migrate,
# and a migrate parses each step's SQL twice (lint, then the locks it takes). Sized for plans of thousands.
CACHE_SIZE = 4096

# Alembic's bookkeeping (CREATE TABLE / INSERT / UPDATE / DELETE / DROP of the
# version table) is never a finding.
VERSION_TABLE = "alembic_version"

STATEMENT_MAX_CHARS = 300

OFFLINE_URL = "postgresql://lint@localhost/lint"


@dataclass(frozen=True)
class Rule:
    """One hazard: its stable name, how bad it is, why it hurts, how to do it safely."""

    name: str
    severity: Severity
    why: str
    fix: str


_ERROR = Severity.ERROR
_WARNING = Severity.WARNING

_RULE_LIST = [
    Rule(
        "drop-column",
        _ERROR,
        "the application version still running during the deploy reads or writes the column and fails "
        "as soon as it is gone, the data cannot be brought back by downgrade(), and the ALTER TABLE "
        "takes an ACCESS EXCLUSIVE lock",
        "contract last: deploy code that no longer reads the column, then code that no longer writes it, "
        "and drop the column in a later release's migration (after a backup), under a lock_timeout",
    ),
    Rule(
        "drop-table",
        _ERROR,
        "code still running queries the table and fails, the rows are gone for good (downgrade() can "
        "recreate the table but not its data), and DROP TABLE takes an ACCESS EXCLUSIVE lock that queues "
        "behind every open transaction touching the table",
        "stop using the table in the application and deploy first; take a backup (or rename the table "
        "aside for a release); drop it in a later release's migration",
    ),
    Rule(
        "rename-column",
        _ERROR,
        "old and new application versions run side by side during a deploy, and whichever one uses the "
        "other name fails: a rename is instant but not backwards compatible",
        "expand → backfill → contract: add the new column, write both (dual-write in the application or "
        "a trigger), backfill old rows in batches, switch reads to the new column, and drop the old one "
        "in a later release",
    ),
    Rule(
        "rename-table",
        _ERROR,
        "old and new application versions run side by side during a deploy, and whichever one uses the "
        "other name fails; the rename also takes an ACCESS EXCLUSIVE lock",
        "expand → backfill → contract: create the new table (or rename it and leave an updatable view "
        "with the old name: CREATE VIEW old AS SELECT * FROM new), move the code to the new name, then "
        "drop the old table or the view in a later release",
    ),
    Rule(
        "change-column-type",
        _ERROR,
        "most type changes rewrite the whole table and rebuild its indexes under an ACCESS EXCLUSIVE "
        "lock, blocking reads and writes for the duration, and the old code may not handle the new type "
        "(a few changes are metadata-only, e.g. varchar(n) to text or to a larger n: allow those with a "
        "directive)",
        "expand → backfill → contract: add a column of the new type, dual-write, backfill in batches, "
        "switch reads to it, and drop the old column in a later release",
    ),
    Rule(
        "set-not-null",
        _ERROR,
        "SET NOT NULL scans every row of the table to check it while holding an ACCESS EXCLUSIVE lock, "
        "blocking reads and writes for the whole scan",
        "ADD CONSTRAINT c CHECK (col IS NOT NULL) NOT VALID; then, in a separate transaction, "
        "VALIDATE CONSTRAINT c (SHARE UPDATE EXCLUSIVE: reads and writes go on); then SET NOT NULL, "
        "which PostgreSQL 12+ proves from the validated check without a scan; then DROP CONSTRAINT c",
    ),
    Rule(
        "add-not-null-without-default",
        _ERROR,
        "adding a NOT NULL column without a default fails on a table that has rows (every existing row "
        "would be NULL), and application code that does not know the column yet can no longer insert",
        "add the column nullable (or with a constant default), deploy code that writes it, backfill "
        "existing rows in batches, then enforce NOT NULL with CHECK (col IS NOT NULL) NOT VALID → "
        "VALIDATE CONSTRAINT → SET NOT NULL",
    ),
    Rule(
        "volatile-default",
        _ERROR,
        "a volatile default (random(), gen_random_uuid(), clock_timestamp(), nextval(), a serial, "
        "identity or stored generated column, or an unknown function) is computed per row, so "
        "PostgreSQL rewrites the whole table under an ACCESS EXCLUSIVE lock; a constant, now() or "
        "CURRENT_TIMESTAMP is stored once in the catalog (PostgreSQL 11+) and is instant",
        "add the column without a default (or with a constant one), ALTER COLUMN … SET DEFAULT for new "
        "rows (instant), backfill existing rows in batches, then add NOT NULL with the CHECK … NOT VALID "
        "→ VALIDATE → SET NOT NULL recipe if needed",
    ),
    Rule(
        "index-not-concurrently",
        _ERROR,
        "CREATE INDEX holds a SHARE lock that blocks every INSERT, UPDATE and DELETE on the table until "
        "the index is built, and DROP INDEX takes an ACCESS EXCLUSIVE lock on the table",
        "use CREATE INDEX CONCURRENTLY / DROP INDEX CONCURRENTLY outside a transaction (Alembic: "
        "`with op.get_context().autocommit_block(): op.create_index(..., postgresql_concurrently=True)`); "
        "a failed concurrent build leaves an INVALID index: drop it and retry",
    ),
    Rule(
        "transaction-control",
        _ERROR,
        "a COMMIT, ROLLBACK or BEGIN inside a migration ends the step's transaction half-way: what ran before "
        "it is committed even if the rest fails, the version table no longer says where the database is, and "
        "a retry (after a lock timeout) applies the committed part twice",
        "let the step's own transaction hold all of it; for what cannot run in a transaction (CREATE INDEX "
        "CONCURRENTLY), use `with op.get_context().autocommit_block(): ...`, alone and idempotent",
    ),
    Rule(
        "concurrently-in-transaction",
        _ERROR,
        "CREATE INDEX CONCURRENTLY, DROP INDEX CONCURRENTLY and REINDEX CONCURRENTLY cannot run inside "
        "a transaction block: PostgreSQL rejects the statement and the migration fails",
        "run it in an autocommit block (`with op.get_context().autocommit_block(): ...`), alone, and make "
        "it idempotent (IF NOT EXISTS / IF EXISTS) since it is not rolled back with the rest of the step",
    ),
    Rule(
        "constraint-not-valid",
        _ERROR,
        "adding a FOREIGN KEY or CHECK constraint checks every existing row while holding a lock that "
        "blocks writes (ACCESS EXCLUSIVE for a CHECK; SHARE ROW EXCLUSIVE on both tables for a foreign "
        "key)",
        "ADD CONSTRAINT … NOT VALID (instant; new rows are checked from then on), then ALTER TABLE … "
        "VALIDATE CONSTRAINT … in a separate transaction, which scans under a SHARE UPDATE EXCLUSIVE "
        "lock that lets reads and writes go on; for a new column with REFERENCES or CHECK, add the "
        "column first and the constraint separately",
    ),
    Rule(
        "unique-without-index",
        _ERROR,
        "ADD CONSTRAINT … UNIQUE / PRIMARY KEY builds its index while holding an ACCESS EXCLUSIVE lock: "
        "reads and writes block for the whole build",
        "CREATE UNIQUE INDEX CONCURRENTLY first (outside a transaction), then ALTER TABLE … ADD "
        "CONSTRAINT … UNIQUE USING INDEX … (or PRIMARY KEY USING INDEX …), which is instant",
    ),
    Rule(
        "truncate",
        _ERROR,
        "TRUNCATE deletes every row irreversibly (downgrade() cannot restore them) and takes an ACCESS "
        "EXCLUSIVE lock",
        "do not empty tables in a schema migration: if the data is obsolete, stop using the table, take "
        "a backup and drop it in a later release, or delete in batches from an operational job",
    ),
    Rule(
        "data-change",
        _WARNING,
        "seed data and data transformations do not belong in schema migrations: they run under the "
        "migration's locks and timeouts, a large UPDATE or DELETE holds row locks and bloats the table, "
        "and they are hard to reverse",
        "keep reference data in the application's seeding or an idempotent job, and backfill large "
        "tables in batches from a separate job (expand → backfill → contract); if it must stay here, "
        "keep it small and idempotent (ON CONFLICT DO NOTHING) with a real downgrade()",
    ),
    Rule(
        "missing-lock-timeout",
        _ERROR,
        "a statement that needs an ACCESS EXCLUSIVE lock queues behind any long transaction, and every "
        "query on the table then queues behind it: without lock_timeout, a migration waiting for its "
        "lock takes the application down",
        "SET lock_timeout = '5s' (or SET LOCAL inside the transaction) before the first such statement "
        "and retry on timeout, or run the migration through dbagent, which sets lock_timeout per "
        "statement",
    ),
    Rule(
        "allow-without-reason",
        _ERROR,
        "an allow directive must say why the rule does not apply to this migration",
        "write it as `# dbagent: allow <rule> -- <reason>`",
    ),
    Rule(
        "allow-unknown-rule",
        _ERROR,
        "an allow directive names a rule that does not exist, so it switches nothing off",
        "name one of the lint rules: drop-column, drop-table, rename-column, rename-table, "
        "change-column-type, set-not-null, add-not-null-without-default, volatile-default, "
        "index-not-concurrently, concurrently-in-transaction, constraint-not-valid, "
        "unique-without-index, truncate, data-change, missing-lock-timeout",
    ),
    Rule(
        "parse-error",
        _ERROR,
        "PostgreSQL's parser rejects the SQL, so it cannot be linted (and would fail on the server)",
        "fix the SQL the migration emits; check it with `dbagent migrate --dry-run`",
    ),
    Rule(
        "render-failed",
        _ERROR,
        "the migration's SQL could not be rendered offline, so it cannot be linted or shown by a dry run "
        "(does upgrade() read from the database with op.get_bind()?)",
        "emit plain operations and SQL from upgrade(); move logic that needs to read data into a "
        "separate job",
    ),
]

RULES: dict[str, Rule] = {rule.name: rule for rule in _RULE_LIST}

# The rules an allow directive may switch off: the hazards, not the lint's own checks.
HAZARD_RULES = (
    "drop-column",
    "drop-table",
    "rename-column",
    "rename-table",
    "change-column-type",
    "set-not-null",
    "add-not-null-without-default",
    "volatile-default",
    "index-not-concurrently",
    "concurrently-in-transaction",
    "constraint-not-valid",
    "unique-without-index",
    "truncate",
    "data-change",
    "missing-lock-timeout",
)
# Hazards found in a script's Python source rather than its SQL (an allow directive switches them off too).
SOURCE_RULES = ("transaction-control",)

_TRANSACTION_KINDS = frozenset({
    TransactionStmtKind.TRANS_STMT_BEGIN, TransactionStmtKind.TRANS_STMT_START, TransactionStmtKind.TRANS_STMT_COMMIT,
    TransactionStmtKind.TRANS_STMT_ROLLBACK, TransactionStmtKind.TRANS_STMT_PREPARE,
    TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED, TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED,
})
# Calls on a connection that end or open its transaction.
_TRANSACTION_CALLS = {"commit": "commit()", "rollback": "rollback()", "begin": "begin()"}
_EXECUTE_CALLS = {"execute", "exec_driver_sql"}


# A script none of whose words is one of these has no transaction control to find.
_TRANSACTION_WORDS = re.compile(r"\b(?:begin|start|commit|end|rollback|abort|prepare)\b", re.IGNORECASE)


def transaction_control(source: str) -> list[tuple[int, str]]:
    """(line, what) of each place a migration script controls its own transaction: an executed COMMIT,
    ROLLBACK, BEGIN, START TRANSACTION, END or PREPARE TRANSACTION literal, or ``.commit()`` / ``.rollback()``
    / ``.begin()`` on a connection. Pure: the source is parsed with ``ast``, its SQL literals with pglast."""
    return list(_transaction_control(source))


@functools.lru_cache(maxsize=CACHE_SIZE)
def _transaction_control(source: str) -> tuple[tuple[int, str], ...]:
    import ast as pyast

    if not _TRANSACTION_WORDS.search(source):
        return ()
    try:
        tree = pyast.parse(source)
    except SyntaxError:
        return ()
    found: list[tuple[int, str]] = []
    for node in pyast.walk(tree):
        if not isinstance(node, pyast.Call) or not isinstance(node.func, pyast.Attribute):
            continue
        name = node.func.attr
        if name in _TRANSACTION_CALLS and not node.args and not node.keywords:
            found.append((node.lineno, _TRANSACTION_CALLS[name]))
        elif name in _EXECUTE_CALLS and node.args:
            sql = _literal_sql(node.args[0])
            if sql is None:
                continue
            try:
                statements = parse_statements(sql)
            except ParseError:
                continue
            for raw in statements:
                if isinstance(raw.stmt, ast.TransactionStmt) and raw.stmt.kind in _TRANSACTION_KINDS:
                    found.append((node.lineno, sql.strip().split()[0].upper()))
    return tuple(sorted(found))


def _literal_sql(node: Any) -> str | None:
    """The SQL text of ``"…"``, ``text("…")`` or ``sa.text("…")``."""
    import ast as pyast

    if isinstance(node, pyast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, pyast.Call) and node.args and isinstance(node.args[0], pyast.Constant):
        func = node.func
        called = func.attr if isinstance(func, pyast.Attribute) else getattr(func, "id", None)
        if called == "text" and isinstance(node.args[0].value, str):
            return node.args[0].value
    return None


def report(findings: list[Finding]) -> dict[str, Any]:
    """The ``--json`` body: ``{"status", "findings": [...]}``."""
    return {"status": status_of(findings), "findings": [f.to_json() for f in findings]}


# -- allow directives ---------------------------------------------------------

_DIRECTIVE = re.compile(r"#\s*dbagent:\s*allow\b(?P<rest>.*)$")


def _comments(source: str) -> Iterator[str]:
    """The comments of a Python source; every line from a '#' on if it does not tokenize."""
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                yield token.string
    except (tokenize.TokenError, SyntaxError):
        for line in source.splitlines():
            if "#" in line:
                yield line[line.index("#") :]


def disabled_rules(source: str) -> dict[str, str]:
    """Rule → reason for every ``# dbagent: allow <rule>[, <rule>] -- <reason>`` in a script.

    A directive without a reason maps its rules to "": ``lint_sql`` reports it
    as ``allow-without-reason`` and keeps the rule switched on.
    """
    return dict(_disabled_rules(source))


@functools.lru_cache(maxsize=CACHE_SIZE)
def _disabled_rules(source: str) -> tuple[tuple[str, str], ...]:
    if "dbagent" not in source:  # no directive without its name
        return ()
    disabled: dict[str, str] = {}
    for comment in _comments(source):
        match = _DIRECTIVE.search(comment)
        if match is None:
            continue
        names, sep, reason = match["rest"].partition("--")
        reason = reason.strip() if sep else ""
        for name in re.split(r"[\s,]+", names.strip()):
            if name and (reason or name not in disabled):
                disabled[name] = reason
    return tuple(disabled.items())


# -- the statement walk -------------------------------------------------------

_SERIAL_TYPES = frozenset({"smallserial", "serial", "bigserial", "serial2", "serial4", "serial8"})

# Default expressions PostgreSQL 11+ evaluates once and stores in the catalog
# (non-volatile). Any other function call is treated as volatile: a false alarm
# costs an allow directive, a missed table rewrite costs an outage.
_NON_VOLATILE_FUNCTIONS = frozenset(
    {
        "now",
        "transaction_timestamp",
        "statement_timestamp",
        "current_timestamp",
        "current_date",
        "localtimestamp",
        "lower",
        "upper",
        "jsonb_build_object",
        "jsonb_build_array",
        "json_build_object",
        "json_build_array",
    }
)

_LEADING_COMMENTS = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)+", re.DOTALL)



def _name(parts: Any) -> str:
    """A possibly schema-qualified name from a list of String nodes; public is implied."""
    names = [p.sval for p in parts]
    if len(names) > 1 and names[-2] == "public":
        names = names[-1:]
    return ".".join(names[-2:])


def _table(relation: ast.RangeVar | None) -> str:
    if relation is None:
        return ""
    schema = relation.schemaname
    if schema is None or schema == "public":
        return relation.relname
    return f"{schema}.{relation.relname}"


def _named(name: str | None) -> str:
    return f" {name}" if name else ""


def _is_version_table(name: str, version_table: str = VERSION_TABLE) -> bool:
    return name == version_table or name.endswith("." + version_table)


def _children(node: ast.Node) -> Iterator[ast.Node]:
    for cls in type(node).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            value = getattr(node, slot, None)
            if isinstance(value, ast.Node):
                yield value
            elif isinstance(value, tuple | list):
                yield from (v for v in value if isinstance(v, ast.Node))


def _volatile(expr: ast.Node | None) -> bool:
    """Whether a default expression makes ADD COLUMN rewrite the table."""
    if expr is None or isinstance(expr, ast.A_Const | ast.SQLValueFunction):
        return False
    if isinstance(expr, ast.FuncCall):
        name = expr.funcname[-1].sval.lower()
        if name not in _NON_VOLATILE_FUNCTIONS:
            return True
    return any(_volatile(child) for child in _children(expr))


def _not_null_column(expr: ast.Node | None) -> str | None:
    """The column of a ``CHECK (col IS NOT NULL)`` expression, else None."""
    if (
        isinstance(expr, ast.NullTest)
        and expr.nulltesttype == NullTestType.IS_NOT_NULL
        and isinstance(expr.arg, ast.ColumnRef)
        and isinstance(expr.arg.fields[-1], ast.String)
    ):
        return expr.arg.fields[-1].sval
    return None


def _lock_timeout_value_enabled(stmt: ast.VariableSetStmt) -> bool:
    if stmt.kind != VariableSetKind.VAR_SET_VALUE or not stmt.args:
        return False
    value = stmt.args[0]
    if isinstance(value, ast.A_Const):
        const = value.val
        if isinstance(const, ast.Integer):
            return const.ival != 0
        if isinstance(const, ast.String):
            return re.fullmatch(r"\s*0+\s*[a-z]*\s*", const.sval) is None
    return True


class _Linter:
    """Walks the statements of one migration in order, keeping the state the rules need."""

    def __init__(
        self, sql: str, revision: str | None, file: str | None, runner_sets_lock_timeout: bool,
        version_table: str = VERSION_TABLE,
    ) -> None:
        self.sql = sql
        self.version_table = version_table  # Alembic's own writes to it are not the migration's
        self.revision = revision
        self.file = file
        self.runner_sets_lock_timeout = runner_sets_lock_timeout
        self.findings: list[Finding] = []
        self.new_tables: set[str] = set()
        self.index_table: dict[str, str] = {}
        self.in_transaction = False
        self.session_lock_timeout = False
        self.local_lock_timeout = False
        self.lock_timeout_reported = False
        self.pending_not_null_checks: dict[tuple[str, str], str] = {}
        self.proven_not_null: set[tuple[str, str]] = set()
        self.raw: ast.RawStmt | None = None
        self.handlers: dict[type, Callable[[Any], None]] = {
            ast.TransactionStmt: self.transaction,
            ast.VariableSetStmt: self.variable_set,
            ast.CreateStmt: self.create_table,
            ast.CreateTableAsStmt: self.create_table_as,
            ast.IndexStmt: self.create_index,
            ast.DropStmt: self.drop,
            ast.RenameStmt: self.rename,
            ast.AlterTableStmt: self.alter_table,
            ast.TruncateStmt: self.truncate,
            ast.InsertStmt: self.data_change,
            ast.UpdateStmt: self.data_change,
            ast.DeleteStmt: self.data_change,
            ast.MergeStmt: self.data_change,
            ast.SelectStmt: self.select,
            ast.ReindexStmt: self.reindex,
            ast.LockStmt: self.lock,
            ast.ClusterStmt: self.cluster,
            ast.VacuumStmt: self.vacuum,
        }

    def run(self, statements: tuple[ast.RawStmt, ...]) -> list[Finding]:
        handlers = self.handlers
        for raw in statements:
            handler = handlers.get(type(raw.stmt))
            if handler is not None:
                self.raw = raw
                handler(raw.stmt)
        return self.findings

    # -- reporting --

    def statement_text(self) -> str:
        raw = self.raw
        if raw is None:
            return ""
        start = raw.stmt_location or 0
        text = self.sql[start : start + raw.stmt_len] if raw.stmt_len else self.sql[start:]
        # Older parsers start a statement at the comments that precede it.
        text = _LEADING_COMMENTS.sub("", text)
        text = " ".join(text.split()).rstrip(";")
        if len(text) > STATEMENT_MAX_CHARS:
            text = text[: STATEMENT_MAX_CHARS - 1] + "…"
        return text

    def report(self, rule_name: str, detail: str) -> None:
        rule = RULES[rule_name]
        self.findings.append(
            Finding(
                revision=self.revision,
                rule=rule.name,
                severity=rule.severity,
                message=f"{detail}: {rule.why}",
                statement=self.statement_text(),
                fix=rule.fix,
                file=self.file,
            )
        )

    def access_exclusive(self, what: str) -> None:
        """An existing table is locked ACCESS EXCLUSIVE: the application's queries queue behind it."""
        if self.runner_sets_lock_timeout or self.lock_timeout_reported:
            return
        if self.session_lock_timeout or self.local_lock_timeout:
            return
        self.lock_timeout_reported = True
        self.report(
            "missing-lock-timeout", f"{what} takes an ACCESS EXCLUSIVE lock and no lock_timeout is set"
        )

    def is_new(self, table: str) -> bool:
        return table in self.new_tables

    # -- statements --

    def transaction(self, stmt: ast.TransactionStmt) -> None:
        kind = stmt.kind
        if kind in (TransactionStmtKind.TRANS_STMT_BEGIN, TransactionStmtKind.TRANS_STMT_START):
            self.in_transaction = True
        elif kind in (
            TransactionStmtKind.TRANS_STMT_COMMIT,
            TransactionStmtKind.TRANS_STMT_ROLLBACK,
            TransactionStmtKind.TRANS_STMT_PREPARE,
        ):
            self.in_transaction = False
            self.local_lock_timeout = False

    def variable_set(self, stmt: ast.VariableSetStmt) -> None:
        if stmt.kind == VariableSetKind.VAR_RESET_ALL:
            self.session_lock_timeout = self.local_lock_timeout = False
            return
        if (stmt.name or "").lower() != "lock_timeout":
            return
        enabled = _lock_timeout_value_enabled(stmt)
        if stmt.is_local:
            # SET LOCAL outside a transaction block has no effect.
            self.local_lock_timeout = enabled and self.in_transaction
        else:
            self.session_lock_timeout = enabled
            self.local_lock_timeout = False

    def create_table(self, stmt: ast.CreateStmt) -> None:
        table = _table(stmt.relation)
        # IF NOT EXISTS may find the table already there, full of rows: not new.
        if not stmt.if_not_exists and not _is_version_table(table, self.version_table):
            self.new_tables.add(table)

    def create_table_as(self, stmt: ast.CreateTableAsStmt) -> None:
        if not stmt.if_not_exists and stmt.into is not None:
            self.new_tables.add(_table(stmt.into.rel))

    def create_index(self, stmt: ast.IndexStmt) -> None:
        table = _table(stmt.relation)
        if stmt.idxname:
            schema = stmt.relation.schemaname
            index = stmt.idxname if schema in (None, "public") else f"{schema}.{stmt.idxname}"
            self.index_table[index] = table
        if stmt.concurrent:
            if self.in_transaction:
                self.report(
                    "concurrently-in-transaction",
                    f"CREATE INDEX CONCURRENTLY{_named(stmt.idxname)} on {table}"
                    " runs inside a transaction block",
                )
        elif not self.is_new(table):
            unique = "UNIQUE " if stmt.unique else ""
            self.report(
                "index-not-concurrently",
                f"CREATE {unique}INDEX{_named(stmt.idxname)} on existing table {table} without CONCURRENTLY",
            )

    def drop(self, stmt: ast.DropStmt) -> None:
        kind = stmt.removeType
        if kind == ObjectType.OBJECT_INDEX:
            names = [_name(obj) for obj in stmt.objects]
            if stmt.concurrent:
                if self.in_transaction:
                    self.report(
                        "concurrently-in-transaction",
                        f"DROP INDEX CONCURRENTLY {', '.join(names)} runs inside a transaction block",
                    )
                return
            existing = [n for n in names if not self.is_new(self.index_table.get(n, ""))]
            if existing:
                self.report(
                    "index-not-concurrently",
                    f"DROP INDEX {', '.join(existing)} without CONCURRENTLY locks its table ACCESS EXCLUSIVE",
                )
                self.access_exclusive(f"DROP INDEX {', '.join(existing)}")
        elif kind == ObjectType.OBJECT_TABLE:
            names = [_name(obj) for obj in stmt.objects]
            existing = [n for n in names if not self.is_new(n) and not _is_version_table(n, self.version_table)]
            self.new_tables.difference_update(names)
            if existing:
                self.report("drop-table", f"drops table {', '.join(existing)}")
                self.access_exclusive(f"DROP TABLE {', '.join(existing)}")

    def rename(self, stmt: ast.RenameStmt) -> None:
        kind = stmt.renameType
        if kind == ObjectType.OBJECT_COLUMN and stmt.relationType == ObjectType.OBJECT_TABLE:
            table = _table(stmt.relation)
            if not self.is_new(table):
                self.report("rename-column", f"renames column {table}.{stmt.subname} to {stmt.newname}")
                self.access_exclusive(f"renaming column {table}.{stmt.subname}")
        elif kind == ObjectType.OBJECT_TABLE:
            table = _table(stmt.relation)
            schema = stmt.relation.schemaname
            renamed = stmt.newname if schema in (None, "public") else f"{schema}.{stmt.newname}"
            if self.is_new(table):
                self.new_tables.discard(table)
                self.new_tables.add(renamed)
            else:
                self.report("rename-table", f"renames table {table} to {stmt.newname}")
                self.access_exclusive(f"renaming table {table}")

    def alter_table(self, stmt: ast.AlterTableStmt) -> None:
        if stmt.objtype != ObjectType.OBJECT_TABLE:
            return
        table = _table(stmt.relation)
        if self.is_new(table):
            return
        for cmd in stmt.cmds:
            subtype = cmd.subtype
            if subtype == AlterTableType.AT_AddColumn:
                self.add_column(table, cmd.def_)
            elif subtype == AlterTableType.AT_DropColumn:
                self.report("drop-column", f"drops column {table}.{cmd.name}")
            elif subtype == AlterTableType.AT_AlterColumnType:
                self.report("change-column-type", f"changes the type of column {table}.{cmd.name}")
            elif subtype == AlterTableType.AT_SetNotNull:
                if (table, cmd.name) not in self.proven_not_null:
                    self.report("set-not-null", f"sets NOT NULL on existing column {table}.{cmd.name}")
            elif subtype == AlterTableType.AT_AddConstraint:
                self.add_constraint(table, cmd.def_)
            elif subtype == AlterTableType.AT_ValidateConstraint:
                column = self.pending_not_null_checks.pop((table, cmd.name), None)
                if column is not None:
                    self.proven_not_null.add((table, column))
        if alter_table_locks(stmt).mode == ACCESS_EXCLUSIVE:  # the strongest of its subcommands (dbagent.core.lockmodes)
            self.access_exclusive(f"ALTER TABLE {table}")

    def add_column(self, table: str, column: ast.ColumnDef) -> None:
        where = f"{table}.{column.colname}"
        not_null = bool(column.is_not_null)
        default: ast.Constraint | None = None
        rewrite: str | None = None
        type_name = column.typeName.names[-1].sval.lower() if column.typeName is not None else ""
        if type_name in _SERIAL_TYPES:
            rewrite = f"a {type_name} (nextval() default)"
        for constraint in column.constraints or ():
            contype = constraint.contype
            if contype == ConstrType.CONSTR_NOTNULL:
                not_null = True
            elif contype == ConstrType.CONSTR_DEFAULT:
                default = constraint
            elif contype == ConstrType.CONSTR_IDENTITY:
                rewrite = "an identity"
            elif contype == ConstrType.CONSTR_GENERATED:
                rewrite = "a stored generated"
            elif contype in (ConstrType.CONSTR_FOREIGN, ConstrType.CONSTR_CHECK):
                if not constraint.skip_validation:
                    kind = "REFERENCES" if contype == ConstrType.CONSTR_FOREIGN else "CHECK"
                    self.report(
                        "constraint-not-valid", f"adds column {where} with an inline {kind} constraint"
                    )
            elif contype in (ConstrType.CONSTR_PRIMARY, ConstrType.CONSTR_UNIQUE):
                kind = "PRIMARY KEY" if contype == ConstrType.CONSTR_PRIMARY else "UNIQUE"
                self.report("unique-without-index", f"adds column {where} with an inline {kind} constraint")
        if rewrite is None and default is not None and _volatile(default.raw_expr):
            rewrite = "a volatile default"
        if rewrite is not None:
            self.report(
                "volatile-default", f"adds column {where} with {rewrite}, rewriting existing table {table}"
            )
        elif not_null and default is None:
            self.report("add-not-null-without-default", f"adds NOT NULL column {where} without a default")

    def add_constraint(self, table: str, constraint: ast.Constraint) -> None:
        contype = constraint.contype
        name = constraint.conname or ""
        if contype in (ConstrType.CONSTR_FOREIGN, ConstrType.CONSTR_CHECK):
            column = _not_null_column(constraint.raw_expr) if contype == ConstrType.CONSTR_CHECK else None
            if constraint.skip_validation:
                if column is not None and name:
                    self.pending_not_null_checks[(table, name)] = column
                return
            if column is not None:
                self.proven_not_null.add((table, column))
            kind = "FOREIGN KEY" if contype == ConstrType.CONSTR_FOREIGN else "CHECK"
            self.report(
                "constraint-not-valid",
                f"adds {kind} constraint{_named(name)} to existing table {table} without NOT VALID",
            )
        elif contype in (ConstrType.CONSTR_PRIMARY, ConstrType.CONSTR_UNIQUE) and not constraint.indexname:
            kind = "PRIMARY KEY" if contype == ConstrType.CONSTR_PRIMARY else "UNIQUE"
            self.report(
                "unique-without-index",
                f"adds {kind} constraint{_named(name)} to existing table {table} without USING INDEX",
            )

    def truncate(self, stmt: ast.TruncateStmt) -> None:
        existing = [t for t in (_table(r) for r in stmt.relations) if not self.is_new(t)]
        if existing:
            self.report("truncate", f"truncates {', '.join(existing)}")
            self.access_exclusive(f"TRUNCATE {', '.join(existing)}")

    def data_change(self, stmt: Any) -> None:
        table = _table(stmt.relation)
        if _is_version_table(table, self.version_table):
            return
        verb = type(stmt).__name__.removesuffix("Stmt").upper()
        self.report("data-change", f"{verb} on {table} changes data")

    def select(self, stmt: ast.SelectStmt) -> None:
        if stmt.withClause is None:
            return
        for cte in stmt.withClause.ctes:
            query = cte.ctequery
            if isinstance(query, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt | ast.MergeStmt):
                self.data_change(query)
                return

    def reindex(self, stmt: ast.ReindexStmt) -> None:
        concurrent = any(p.defname == "concurrently" for p in stmt.params or ())
        if concurrent and self.in_transaction:
            self.report("concurrently-in-transaction", "REINDEX CONCURRENTLY runs inside a transaction block")

    def lock(self, stmt: ast.LockStmt) -> None:
        if LOCK_TABLE_MODES.get(stmt.mode, ACCESS_EXCLUSIVE) == ACCESS_EXCLUSIVE:
            existing = [t for t in (_table(r) for r in stmt.relations) if not self.is_new(t)]
            if existing:
                self.access_exclusive(f"LOCK TABLE {', '.join(existing)}")

    def cluster(self, stmt: ast.ClusterStmt) -> None:
        if stmt.relation is not None and not self.is_new(_table(stmt.relation)):
            self.access_exclusive(f"CLUSTER {_table(stmt.relation)}")

    def vacuum(self, stmt: ast.VacuumStmt) -> None:
        full = any(o.defname == "full" for o in stmt.options or ())
        if full:
            tables = [_table(r.relation) for r in stmt.rels or ()]
            if not tables or any(not self.is_new(t) for t in tables):
                self.access_exclusive(f"VACUUM FULL {', '.join(tables)}".rstrip())


# -- entry points ---------------------------------------------------------------


def _directive_findings(
    disabled: dict[str, str], revision: str | None, file: str | None
) -> list[Finding]:
    findings = []
    for name, reason in disabled.items():
        statement = f"# dbagent: allow {name}" + (f" -- {reason}" if reason else "")
        if name not in HAZARD_RULES and name not in SOURCE_RULES:
            rule = RULES["allow-unknown-rule"]
            message = f"allow directive names unknown rule {name!r}: {rule.why}"
        elif not reason.strip():
            rule = RULES["allow-without-reason"]
            message = f"allow directive for {name} has no reason: {rule.why}"
        else:
            continue
        findings.append(Finding(revision, rule.name, rule.severity, message, statement, rule.fix, file))
    return findings


def lint_sql(
    sql: str,
    *,
    revision: str | None,
    runner_sets_lock_timeout: bool = True,
    disabled: dict[str, str] | None = None,
    file: str | None = None,
    version_table: str = VERSION_TABLE,
) -> list[Finding]:
    """Every risky statement in the SQL of one migration, in statement order.

    ``disabled`` maps rule names to the reason they do not apply (see
    ``disabled_rules``); a rule with an empty reason stays on and the directive
    is reported. ``runner_sets_lock_timeout`` says whether the runner (dbagent)
    puts every statement under a lock_timeout, in which case the SQL need not.
    """
    return list(_lint_sql(sql, revision, runner_sets_lock_timeout, tuple((disabled or {}).items()), file, version_table))


@functools.lru_cache(maxsize=CACHE_SIZE)
def _lint_sql(
    sql: str,
    revision: str | None,
    runner_sets_lock_timeout: bool,
    disabled_items: tuple[tuple[str, str], ...],
    file: str | None,
    version_table: str,
) -> tuple[Finding, ...]:
    disabled = dict(disabled_items)
    findings = _directive_findings(disabled, revision, file)
    off = {name for name, reason in disabled.items() if reason.strip()}
    try:
        statements = parse_statements(sql)
    except ParseError as exc:
        rule = RULES["parse-error"]
        findings.append(
            Finding(
                revision,
                rule.name,
                rule.severity,
                f"{exc}: {rule.why}",
                sql.strip()[:STATEMENT_MAX_CHARS],
                rule.fix,
                file,
            )
        )
        return tuple(findings)
    linter = _Linter(sql, revision, file, runner_sets_lock_timeout, version_table)
    findings.extend(f for f in linter.run(statements) if f.rule not in off)
    return tuple(findings)


def _rendered_in_one_pass(migrator: Any, steps: list[Any]) -> Callable[[Any], str]:
    """Each step's offline SQL from one offline run of the whole chain (as ``alembic upgrade head --sql``),
    not one run of env.py per step; a step it could not split off, or a chain a script breaks, is rendered on
    its own (where a failing script is named)."""
    rendered: dict[Any, str] = {}
    if len(steps) > 1:
        try:
            chain = migrator.upgrade_plan(None)
            rendered = migrator.offline_sql_many(chain)
        except Exception:  # noqa: BLE001 - a script's own code may raise anything; step by step says which
            rendered = {}
    return lambda step: rendered[step] if step in rendered else migrator.offline_sql(step)


def lint_migrations(
    script_location: str | Path,
    url: str = OFFLINE_URL,
    *,
    runner_sets_lock_timeout: bool = True,
    only: Collection[str] | None = None,
    migrator: Any = None,
    render: Callable[[Any], str] | None = None,
) -> list[Finding]:
    """Lint the upgrade() SQL of every revision (or those in ``only``) of a script directory, oldest first.

    Each revision is rendered offline (``url`` only picks the dialect; nothing
    connects) and linted on its own, with the allow directives of its file.
    """
    from dbagent.postgres.migrator import Migrator  # Alembic stays out of the pure core's imports.

    migrator = migrator or Migrator(script_location, url)
    steps = [s for s in migrator.upgrade_plan(None) if only is None or s.revision in only]
    render = render or _rendered_in_one_pass(migrator, steps)
    version_table = migrator.environment().version_table
    findings: list[Finding] = []
    for step in steps:
        path = Path(migrator.revision(step.revision).path)
        source = path.read_text(encoding="utf-8")
        disabled = disabled_rules(source)
        try:
            sql = render(step)
        except Exception as exc:  # noqa: BLE001 - a script's own code may raise anything
            rule = RULES["render-failed"]
            findings.append(
                Finding(
                    step.revision,
                    rule.name,
                    rule.severity,
                    f"{type(exc).__name__}: {exc}: {rule.why}",
                    "",
                    rule.fix,
                    path.name,
                )
            )
            continue
        findings.extend(
            lint_sql(
                sql,
                revision=step.revision,
                runner_sets_lock_timeout=runner_sets_lock_timeout,
                disabled=disabled,
                file=path.name,
                version_table=version_table,
            )
        )
        if "transaction-control" not in {name for name, reason in disabled.items() if reason.strip()}:
            rule = RULES["transaction-control"]
            findings.extend(
                Finding(step.revision, rule.name, rule.severity, f"{what} at line {line}: {rule.why}", what, rule.fix,
                            path.name)
                for line, what in transaction_control(source)
            )
    return findings
