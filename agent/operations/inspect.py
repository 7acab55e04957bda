"""The read-only operations: ``status``, ``history`` and ``verify`` (the verification checks, also run
after every migrate and rollback by ``verify_run``)."""

from __future__ import annotations

import logging
from typing import Any

from alembic.util import CommandError

from dbagent.bus import keys
from dbagent.bus.lease import read_lease
from dbagent.core.commands import (
    HistoryArgs,
    VerifyArgs,
)
from dbagent.core.errors import (
    BadInput,
    OperationFailed,
)
from dbagent.core.events import EventType
from dbagent.operations.context import Run, json_row
from dbagent.postgres import store
from dbagent.postgres.backups import list_backups
from dbagent.postgres.locks import holder_backend
from dbagent.postgres.migrator import (
    SEPARATOR,
    state_text,
)
from dbagent.postgres.verify import Baseline, run_checks, summary

log = logging.getLogger(__name__)


def status(run: Run) -> dict[str, Any]:
    migrator = run.migrations()
    current = migrator.current(run.conn)
    try:
        head, heads, branch_points = migrator.head(), list(migrator.heads()), migrator.branch_points()
        pending = [s.to_json() for s in migrator.upgrade_plan(current)]
        problem = None
    except (BadInput, CommandError) as exc:  # the database's state, or the scripts, are not what Alembic can plan
        head, heads, branch_points, pending = None, [], [], []
        problem = exc.message if isinstance(exc, BadInput) else f"Alembic cannot plan these migrations: {exc}"
    lease = read_lease(run.redis, keys.lease(run.settings.redis.prefix, run.db_name))
    session = holder_backend(run.conn)
    last_backups = {}
    if run.db.backup_dir:
        for manifest in list_backups(run.db.backup_dir):
            last_backups.setdefault(str(manifest.type), manifest.summary(run.db.backup_dir))
    return {
        "last_backups": last_backups,
        "current": current,
        "current_heads": current.split(SEPARATOR) if current else [],
        "head": head,
        "heads": heads,
        "branch_points": branch_points,
        "pending": pending,
        "lock": {"lease": lease, "session": session} if lease or session else None,
        "problem": problem,
    }


def history(run: Run) -> dict[str, Any]:
    args = run.command.parsed_args()
    assert isinstance(args, HistoryArgs)
    rows = store.changelog(run.conn, args.limit)
    run.conn.commit()
    return {"entries": [json_row(row) for row in rows]}


def verify(run: Run) -> dict[str, Any]:
    args = run.command.parsed_args()
    assert isinstance(args, VerifyArgs)
    migrator = run.migrations()
    expected = migrator.head() if args.expect in (None, "head", "heads") else state_text(migrator.resolve(args.expect))
    return verify_run(run, expected)


def verify_run(
    run: Run, expected: str | None, baseline: Baseline | None = None, run_facts: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run every check; ``baseline`` and ``run_facts`` (revision_before, run_command_id, backup) come from a migrate."""
    current = run.migrations().current(run.conn)
    checks = run_checks(run.conn, current, expected, run.db, baseline)
    body = {"revision": current, "expected": expected, **(run_facts or {}), "checks": [c.to_json() for c in checks]}
    if all(c.ok for c in checks):
        run.emit(EventType.VERIFY_COMPLETED, **body)
        return {"verify": body}
    run.emit(EventType.VERIFY_FAILED, **body)
    raise OperationFailed(f"verification failed: {summary(checks)}", verify=body)
