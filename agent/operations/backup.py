"""The backup half of the runbook, as operations of a ``Run``: backup, restore, list, verify, prune."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, text

from dbagent.core.commands import BackupArgs, PruneArgs, RestoreArgs, VerifyBackupArgs
from dbagent.core.durations import postgres_interval
from dbagent.core.errors import BadInput, DbAgentError, OperationFailed
from dbagent.core.events import EventType
from dbagent.core.lifecycle import Phase, pause_point
from dbagent.core.redact import redact
from dbagent.postgres import backups as bk
from dbagent.postgres.backups import BackupKind, Manifest, Trigger
from dbagent.postgres.connections import (
    create_scratch_database,
    drop_scratch_database,
    pg_connection,
    rollback_quietly,
)

if TYPE_CHECKING:
    from dbagent.operations.context import Run


def _backup_dir(run: Run) -> Path:
    if not run.db.backup_dir:
        raise BadInput(f"no backup_dir is configured for database {run.db_name!r}")
    return bk.private_dir(run.db.backup_dir)


def _user_tables(conn: Connection) -> tuple[list[str], list[bk.Skipped]]:
    """The tables whose rows a backup counts, and what it must leave out because this role cannot read it."""
    role = str(conn.exec_driver_sql("SELECT current_user").scalar())
    tables: list[str] = []
    skipped: list[bk.Skipped] = []
    for name, counted, unreadable in conn.execute(text(bk.TABLES_SQL), {"excluded": bk.SCHEMA_EXCLUDED}):
        if unreadable:
            skipped.append(bk.Skipped(table=name, reason=f"not readable by {role}: {unreadable}"))
        elif counted:
            tables.append(name)
    return tables, skipped


def _count_rows(conn: Connection, tables: list[str], *, beside_pg_dump: bool = False) -> dict[str, int]:
    if beside_pg_dump:
        # One backend, no parallel workers: the counts share the machine with pg_dump, not race it.
        conn.exec_driver_sql("SET LOCAL max_parallel_workers_per_gather = 0")
    return {table: int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar() or 0) for table in tables}


def take_backup(run: Run, kind: BackupKind, trigger: Trigger, mark: str | None = None) -> Manifest:
    """pg_dump to a hidden name, checksum and read back, rename, then write the manifest."""
    directory = _backup_dir(run)
    bk.remove_stale_partials(directory)
    conn, command = run.conn, run.command
    started = datetime.now(UTC)
    name = bk.backup_name(run.db_name, kind, started)
    final = directory / name
    serial = 1
    while final.exists() or final.with_name(final.name + bk.MANIFEST_SUFFIX).exists():
        serial += 1
        final = directory / name.replace(".dump", f"_{serial}.dump")
    tmp = directory / f"{bk.PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # Persisted before pg_dump starts: whoever finds this command interrupted removes what it left.
    run.phase(Phase.BACKUP, backup={"path": str(final), "partial": str(tmp), "type": str(kind)})
    run.emit(EventType.BACKUP_STARTED, type=str(kind), trigger=str(trigger), path=str(final))
    clock = time.monotonic()
    try:
        pg_dump_version = bk.tool_version("pg_dump")
        server_version = str(conn.exec_driver_sql("SHOW server_version").scalar())
        revision = run.migrations().current(conn) if (Path(run.db.migrations) / "env.py").is_file() else None
        database = str(conn.exec_driver_sql("SELECT current_database()").scalar())
        conn.commit()
        # One snapshot for pg_dump and for the row counts the drill compares against.
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = str(conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar())
        tables, skipped = _user_tables(conn)
        argv = bk.dump_argv(
            kind,
            tmp,
            jobs=run.db.backup_jobs,
            compression=run.db.backup_compression,
            lock_wait_ms=round(run.db.backup_lock_wait_timeout * 1000),
            snapshot=snapshot,
            exclude_tables=[s.table for s in skipped],
        )
        def progress(size: int, elapsed_s: float) -> None:
            # Aside: this connection holds the snapshot transaction pg_dump reads.
            run.journal.emit_aside(
                EventType.BACKUP_PROGRESS, {"path": str(final), "bytes": size, "elapsed_ms": round(elapsed_s * 1000)}
            )

        def count_rows() -> dict[str, int] | None:
            # In the exported snapshot, while pg_dump reads the same one.
            counts = _count_rows(conn, tables, beside_pg_dump=True) if kind != BackupKind.SCHEMA else None
            pause_point("backup:dumping")
            return counts

        with bk.libpq_env(run.db.url, appname="dbagent pg_dump") as env:
            counts = bk.run_tool(argv, env, watch=tmp, on_progress=progress, during=count_rows, stop=run.stop)
        conn.commit()
        verified_at = None
        if run.db.verify_after_backup:
            digest, size, files = bk.checksum_and_read(tmp)
            verified_at = datetime.now(UTC)
        else:
            digest, size, files = bk.checksum(tmp)
        bk.finalize(tmp, final)
        pause_point("backup:renamed")
        manifest = Manifest(
            file=final.name,
            type=kind,
            format="directory" if run.db.backup_jobs > 1 else "custom",
            compression=run.db.backup_compression,
            sha256=digest,
            bytes=size,
            files=files,
            database=database,
            db=run.db_name,
            server_version=server_version,
            pg_dump_version=pg_dump_version,
            revision=revision,
            started=started,
            finished=datetime.now(UTC),
            trigger=trigger,
            mark=mark,
            command_id=command.id,
            actor=command.actor,
            tables=counts,
            table_count=len(tables),
            skipped=skipped,
            verified=verified_at is not None,
            verified_at=verified_at,
        )
        bk.write_manifest(final, manifest)
    except BaseException as exc:
        rollback_quietly(conn)
        bk.remove_path(tmp)
        if final.exists() and not final.with_name(final.name + bk.MANIFEST_SUFFIX).exists():
            bk.remove_path(final)
        if isinstance(exc, Exception):
            message = exc.message if isinstance(exc, DbAgentError) else redact(exc)
            run.emit(EventType.BACKUP_FAILED, type=str(kind), trigger=str(trigger), path=str(final), error=message,
                     **({"interrupted": True} if run.stop.is_set() else {}))
            if isinstance(exc, DbAgentError):
                raise
            raise OperationFailed(f"backup failed: {message}") from None
        raise
    run.emit(
        EventType.BACKUP_COMPLETED,
        type=str(kind),
        trigger=str(trigger),
        path=str(final),
        bytes=manifest.bytes,
        sha256=manifest.sha256,
        duration_ms=round((time.monotonic() - clock) * 1000),
        revision=manifest.revision,
        skipped=[s.model_dump() for s in manifest.skipped],
    )
    return manifest


def backup(run: Run) -> dict[str, Any]:
    args = run.command.parsed_args()
    assert isinstance(args, BackupArgs)
    manifest = take_backup(run, BackupKind(args.kind), Trigger(args.trigger), args.mark)
    result = {
        "path": str(manifest.path(run.db.backup_dir or "")),
        "bytes": manifest.bytes,
        "sha256": manifest.sha256,
        "skipped": [s.model_dump() for s in manifest.skipped],
        "backup": bk.manifest_json(manifest),
    }
    if args.prune:
        result["prune"] = _prune(run, dry_run=False)
    return result


def list_backups(run: Run) -> dict[str, Any]:
    directory = Path(run.db.backup_dir) if run.db.backup_dir else None
    if directory is None:
        raise BadInput(f"no backup_dir is configured for database {run.db_name!r}")
    return {"backups": [m.summary(directory) for m in bk.list_backups(directory)]}


def restore(run: Run) -> dict[str, Any]:
    args = run.command.parsed_args()
    assert isinstance(args, RestoreArgs)
    directory = _backup_dir(run)
    path = bk.resolve_inside(directory, args.path)
    manifest = bk.read_manifest(path)
    revision_before = run.migrations().current(run.conn)
    run.emit(EventType.RESTORE_STARTED, path=str(path), type=str(manifest.type), revision_before=revision_before,
             backup_revision=manifest.revision, sha256=manifest.sha256)
    clock = time.monotonic()
    try:
        run.phase(Phase.CHECK, path=str(path))
        # The checksum gates the restore; the archive is read in full once, by the restore itself when it is one
        # transaction (a damaged archive then fails it before it commits), or beforehand when it is not.
        atomic = bk.restore_is_atomic(manifest, args.jobs)
        bk.check_integrity(path, manifest, read_in_full=not atomic)
        database = str(run.conn.exec_driver_sql("SELECT current_database()").scalar())
        run.conn.commit()
        skipped: list[bk.Skipped] = []
        toc_file = None
        if manifest.type != BackupKind.DATA:
            toc, skipped = bk.owned_by_others(bk.restore_toc(path), _roles_not_mine(run.conn))
            if skipped:
                toc_file = _private_file(directory, toc)
        options = f"-c lock_timeout={postgres_interval(run.db.lock_timeout)}"
        run.phase(Phase.RESTORE)
        try:
            with bk.libpq_env(run.db.url, options=options, appname="dbagent pg_restore") as env:
                argv = bk.restore_argv(path, manifest, args.jobs, use_list=toc_file)
                argv[argv.index("--dbname") + 1] = database
                try:
                    bk.run_tool(argv, env, during=lambda: pause_point("restore:running"), stop=run.stop)
                except OperationFailed as exc:
                    if atomic:
                        exc.message += "; the restore ran in one transaction, so nothing was changed"
                        exc.args = (exc.message,)
                    raise
        finally:
            if toc_file is not None:
                toc_file.unlink(missing_ok=True)
    except (OperationFailed, BadInput) as exc:
        rollback_quietly(run.conn)
        after = _current_or_none(run)
        run.emit(EventType.RESTORE_FAILED, path=str(path), error=exc.message, revision_before=revision_before,
                 revision_after=after, **({"interrupted": True} if run.stop.is_set() else {}))
        exc.details.update(revision_before=revision_before, revision_after=after, path=str(path))
        raise
    revision_after = run.migrations().current(run.conn)
    left = [s.model_dump() for s in skipped]
    run.emit(EventType.RESTORE_COMPLETED, path=str(path), revision_before=revision_before,
             revision_after=revision_after, duration_ms=round((time.monotonic() - clock) * 1000), skipped=left)
    return {"path": str(path), "revision_before": revision_before, "revision_after": revision_after,
            "sha256": manifest.sha256, "skipped": left}


def _roles_not_mine(conn: Connection) -> list[str]:
    """Roles whose objects this one cannot drop or recreate (none for a superuser)."""
    rows = conn.exec_driver_sql("SELECT rolname FROM pg_roles WHERE NOT pg_has_role(current_user, oid, 'USAGE')").all()
    conn.commit()
    return [row[0] for row in rows]


def _private_file(directory: Path, content: str) -> Path:
    """A 0600 file in backup_dir, named as a partial so that a crash's leftover is cleaned up like one."""
    fd, name = tempfile.mkstemp(prefix=f"{bk.PARTIAL_PREFIX}{os.getpid()}-", suffix=".list", dir=directory)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    return Path(name)


def _current_or_none(run: Run) -> str | None:
    try:
        return run.migrations().current(run.conn)
    except Exception:
        rollback_quietly(run.conn)
        return None


def verify_backup(run: Run) -> dict[str, Any]:
    args = run.command.parsed_args()
    assert isinstance(args, VerifyBackupArgs)
    directory = _backup_dir(run)
    if args.path:
        manifests = [bk.read_manifest(bk.resolve_inside(directory, args.path))]
    else:
        manifests = bk.list_backups(directory)[:1]
        if not manifests:
            raise BadInput(f"no backups in {directory}")
    reports = []
    failures = []
    for manifest in manifests:
        path = manifest.path(directory)
        report: dict[str, Any] = {"path": str(path), "checksum": None, "full_read": None, "drill": None}
        try:
            bk.check_integrity(path, manifest)
            report["checksum"] = report["full_read"] = "ok"
            if not manifest.verified:
                bk.write_manifest(path, manifest.model_copy(update={"verified": True, "verified_at": datetime.now(UTC)}))
            if args.drill:
                report["drill"] = _drill(run, path, manifest)
        except OperationFailed as exc:
            report["error"] = exc.message
            failures.append(exc.message)
        reports.append(report)
        run.emit(EventType.BACKUP_VERIFIED, **report, ok="error" not in report)
    if failures:
        raise OperationFailed("; ".join(failures), backups=reports)
    return {"backups": reports}


def _drill(run: Run, path: Path, manifest: Manifest) -> dict[str, Any]:
    """Restore into a scratch database (created and dropped here) and compare with the manifest."""
    scratch = f"dbagent_drill_{uuid.uuid4().hex[:12]}"
    drill_db = create_scratch_database(run.db, scratch, "drill")
    try:
        with bk.libpq_env(run.db.url, dbname=scratch, appname="dbagent drill") as env:
            argv = [bk.tool_path("pg_restore"), "--no-password", "--exit-on-error", "--no-owner",
                    "--single-transaction", "--dbname", scratch, str(path)]
            bk.run_tool(argv, env)
        with pg_connection(drill_db, application_name="dbagent drill") as scratch_conn:
            tables, _ = _user_tables(scratch_conn)  # the drill's own database: all of it is the role's
            counts = _count_rows(scratch_conn, tables)
        problems = []
        if len(tables) != manifest.table_count:
            problems.append(f"{len(tables)} tables restored, the manifest says {manifest.table_count}")
        if manifest.tables is not None and manifest.type == BackupKind.FULL:
            for table, rows in manifest.tables.items():
                if counts.get(table) != rows:
                    problems.append(f"{table}: {counts.get(table)} rows restored, {rows} at backup time")
        if problems:
            raise OperationFailed(f"{path.name}: drill found differences: " + "; ".join(problems[:10]))
        return {"database": scratch, "tables": len(tables), "rows": sum(counts.values()), "status": "ok"}
    finally:
        drop_scratch_database(run.db, scratch, "drill")


def prune(run: Run) -> dict[str, Any]:
    args = run.command.parsed_args()
    assert isinstance(args, PruneArgs)
    return _prune(run, dry_run=args.dry_run)


def _prune(run: Run, *, dry_run: bool) -> dict[str, Any]:
    from dbagent.core.retention import BackupInfo, RetentionPolicy, apply_retention

    directory = _backup_dir(run)
    manifests = {m.file: m for m in bk.list_backups(directory)}
    policy = RetentionPolicy(
        pre_migration_days=run.settings.retention.pre_migration_days,
        daily=run.settings.retention.daily,
        weekly=run.settings.retention.weekly,
        monthly=run.settings.retention.monthly,
    )
    infos = [
        BackupInfo(path=m.file, type=str(m.type), trigger=str(m.trigger), created=m.finished, verified=m.verified)
        for m in manifests.values()
    ]
    decisions = apply_retention(infos, datetime.now(UTC), policy)
    report = []
    deleted = 0
    if not dry_run:
        run.phase(Phase.PRUNE)
    for decision in decisions:
        entry = {
            "path": str(directory / decision.backup.path),
            "keep": decision.keep,
            "reasons": list(decision.reasons),
            "warning": decision.warning,
        }
        if not decision.keep and not dry_run:
            run.check_stop(f"deleting {decision.backup.path}")
            bk.delete_backup(directory, manifests[decision.backup.path])
            deleted += 1
            pause_point(f"prune:deleted:{deleted}")
        report.append(entry)
    kept = sum(1 for d in decisions if d.keep)
    if not dry_run:
        run.emit(EventType.PRUNE_COMPLETED, kept=kept, deleted=deleted,
                 deleted_paths=[e["path"] for e in report if not e["keep"]])
    return {"dry_run": dry_run, "kept": kept, "deleted": 0 if dry_run else deleted,
            "would_delete": sum(1 for d in decisions if not d.keep), "decisions": report}
