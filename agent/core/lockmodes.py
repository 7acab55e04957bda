"""PostgreSQL's table-level lock modes, and which one a DDL statement takes: the one table of it.

Both the lint (``dbagent.checks.lint``: what locks an existing table ACCESS EXCLUSIVE) and
the lock pre-check and retries (``dbagent.core.retries``: which tables a step will
lock, how strongly; ``dbagent.postgres.blocking``: who holds a conflicting lock now) read it here, so they
cannot disagree. Pure: the statements come parsed by pglast; no I/O.

The modes and their conflicts are PostgreSQL's ("Table-Level Locks"); the
ALTER TABLE subcommands below ACCESS EXCLUSIVE are those its ALTER TABLE page
lists (PostgreSQL 15): a statement takes the strongest lock of its subcommands.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pglast
from pglast import ast
from pglast.enums import AlterTableType, ConstrType

# Weakest first, spelled as pg_locks spells them.
ACCESS_SHARE = "AccessShareLock"
ROW_SHARE = "RowShareLock"
ROW_EXCLUSIVE = "RowExclusiveLock"
SHARE_UPDATE_EXCLUSIVE = "ShareUpdateExclusiveLock"
SHARE = "ShareLock"
SHARE_ROW_EXCLUSIVE = "ShareRowExclusiveLock"
EXCLUSIVE = "ExclusiveLock"
ACCESS_EXCLUSIVE = "AccessExclusiveLock"

MODES = [
    ACCESS_SHARE, ROW_SHARE, ROW_EXCLUSIVE, SHARE_UPDATE_EXCLUSIVE,
    SHARE, SHARE_ROW_EXCLUSIVE, EXCLUSIVE, ACCESS_EXCLUSIVE,
]

CONFLICTS: dict[str, frozenset[str]] = {
    ACCESS_SHARE: frozenset({ACCESS_EXCLUSIVE}),
    ROW_SHARE: frozenset({EXCLUSIVE, ACCESS_EXCLUSIVE}),
    ROW_EXCLUSIVE: frozenset({SHARE, SHARE_ROW_EXCLUSIVE, EXCLUSIVE, ACCESS_EXCLUSIVE}),
    SHARE_UPDATE_EXCLUSIVE: frozenset({SHARE_UPDATE_EXCLUSIVE, SHARE, SHARE_ROW_EXCLUSIVE, EXCLUSIVE, ACCESS_EXCLUSIVE}),
    SHARE: frozenset({ROW_EXCLUSIVE, SHARE_UPDATE_EXCLUSIVE, SHARE_ROW_EXCLUSIVE, EXCLUSIVE, ACCESS_EXCLUSIVE}),
    SHARE_ROW_EXCLUSIVE: frozenset({ROW_EXCLUSIVE, SHARE_UPDATE_EXCLUSIVE, SHARE, SHARE_ROW_EXCLUSIVE, EXCLUSIVE, ACCESS_EXCLUSIVE}),
    EXCLUSIVE: frozenset(MODES[1:]),
    ACCESS_EXCLUSIVE: frozenset(MODES),
}

# LOCK TABLE ... IN <mode> MODE, as pglast numbers the modes (1 = ACCESS SHARE; no mode: ACCESS EXCLUSIVE).
LOCK_TABLE_MODES = {i + 1: mode for i, mode in enumerate(MODES)}

# ALTER TABLE subcommands that take less than ACCESS EXCLUSIVE on the table altered.
_ALTER_SUBCOMMAND_LOCKS: dict[AlterTableType, str] = {
    AlterTableType.AT_ValidateConstraint: SHARE_UPDATE_EXCLUSIVE,
    AlterTableType.AT_SetStatistics: SHARE_UPDATE_EXCLUSIVE,
    AlterTableType.AT_ClusterOn: SHARE_UPDATE_EXCLUSIVE,
    AlterTableType.AT_DropCluster: SHARE_UPDATE_EXCLUSIVE,
    AlterTableType.AT_SetOptions: SHARE_UPDATE_EXCLUSIVE,  # ALTER COLUMN SET (n_distinct …)
    AlterTableType.AT_ResetOptions: SHARE_UPDATE_EXCLUSIVE,
    AlterTableType.AT_SetRelOptions: SHARE_UPDATE_EXCLUSIVE,  # SET (fillfactor, autovacuum_…, toast.…, parallel_workers)
    AlterTableType.AT_ResetRelOptions: SHARE_UPDATE_EXCLUSIVE,
    AlterTableType.AT_EnableTrig: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_EnableAlwaysTrig: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_EnableReplicaTrig: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_DisableTrig: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_EnableTrigAll: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_DisableTrigAll: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_EnableTrigUser: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_DisableTrigUser: SHARE_ROW_EXCLUSIVE,
    AlterTableType.AT_AttachPartition: SHARE_UPDATE_EXCLUSIVE,  # on the parent; the partition: ACCESS EXCLUSIVE
    AlterTableType.AT_DetachPartitionFinalize: SHARE_UPDATE_EXCLUSIVE,
}


def stronger(a: str | None, b: str) -> str:
    """The stronger of two modes (``a`` may be None: none yet)."""
    return b if a is None or MODES.index(b) > MODES.index(a) else a


def range_name(relation: ast.RangeVar | None) -> str | None:
    """``schema.table`` or ``table`` as written."""
    if relation is None or not relation.relname:
        return None
    return f"{relation.schemaname}.{relation.relname}" if relation.schemaname else relation.relname


@dataclass(frozen=True)
class AlterLocks:
    """What an ALTER TABLE locks: the table altered, and others (tables a foreign key references, SHARE ROW
    EXCLUSIVE; a partition attached or detached, ACCESS EXCLUSIVE)."""

    mode: str
    others: dict[str, str] = field(default_factory=dict)


def alter_table_locks(stmt: ast.AlterTableStmt) -> AlterLocks:
    """The locks an ALTER TABLE takes: the strongest of its subcommands' on the table, and on the others."""
    mode: str | None = None
    others: dict[str, str] = {}

    def other(name: str | None, wanted: str) -> None:
        if name:
            others[name] = stronger(others.get(name), wanted)

    for cmd in stmt.cmds or ():
        if not isinstance(cmd, ast.AlterTableCmd):
            continue
        sub = cmd.subtype
        constraint = cmd.def_ if isinstance(cmd.def_, ast.Constraint) else None
        if sub == AlterTableType.AT_AddConstraint and constraint is not None and constraint.contype == ConstrType.CONSTR_FOREIGN:
            other(range_name(constraint.pktable), SHARE_ROW_EXCLUSIVE)
            mode = stronger(mode, SHARE_ROW_EXCLUSIVE)
        elif sub in (AlterTableType.AT_AttachPartition, AlterTableType.AT_DetachPartition) and isinstance(cmd.def_, ast.PartitionCmd):
            other(range_name(cmd.def_.name), ACCESS_EXCLUSIVE)
            concurrent = sub == AlterTableType.AT_DetachPartition and bool(cmd.def_.concurrent)
            mode = stronger(mode, SHARE_UPDATE_EXCLUSIVE if sub == AlterTableType.AT_AttachPartition or concurrent
                            else ACCESS_EXCLUSIVE)
        elif sub in _ALTER_SUBCOMMAND_LOCKS:
            mode = stronger(mode, _ALTER_SUBCOMMAND_LOCKS[sub])
        else:
            if isinstance(cmd.def_, ast.ColumnDef):
                for c in cmd.def_.constraints or ():
                    if isinstance(c, ast.Constraint) and c.contype == ConstrType.CONSTR_FOREIGN:
                        other(range_name(c.pktable), SHARE_ROW_EXCLUSIVE)
            mode = ACCESS_EXCLUSIVE
    return AlterLocks(mode or ACCESS_EXCLUSIVE, others)


@functools.lru_cache(maxsize=4096)
def parse_statements(sql: str) -> tuple[ast.RawStmt, ...]:
    """pglast's parse of ``sql``, cached: a migrate lints each step's SQL and then reads the locks it takes.

    Callers must not modify the nodes. Raises ``pglast.parser.ParseError``.
    """
    return tuple(pglast.parse_sql(sql))
