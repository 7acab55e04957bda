"""Backups with pg_dump and restores with pg_restore: verified, private, never partial.

pg_dump writes the archive itself (no Python in the data path) to a hidden
temporary name in ``backup_dir``; only once it finished, was checksummed and
read back in full is it renamed into place and its manifest written beside it.
A backup is listed only when its manifest exists, so a failed or killed dump
is never mistaken for a backup. The password reaches pg_dump and pg_restore
through a private passfile, never their argv.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from dbagent.core.errors import BadInput, OperationFailed, Unavailable
from dbagent.core.redact import redact

if TYPE_CHECKING:
    from dbagent.core.lifecycle import StopRequest

T = TypeVar("T")

MANIFEST_SUFFIX = ".manifest.json"
PARTIAL_PREFIX = ".partial-"
SCHEMA_EXCLUDED = "dbagent"  # dbagent's own audit tables are never dumped nor restored over
PROGRESS_EVERY_S = 5.0
_CHUNK = 1 << 20


# The tables a backup holds, and those it cannot (bind :excluded to SCHEMA_EXCLUDED). Other
# sessions' temporary tables (the agent's audit_in, in its pg_temp_N) are no one's data and
# unreadable to anyone else: pg_dump never dumps them, so they are not listed at all. A table,
# sequence or materialized view the role may not SELECT, or in a schema it has no USAGE on, would
# fail pg_dump and the row count: ``unreadable`` says why, and the backup leaves it out.
TABLES_SQL = """
SELECT format('%I.%I', n.nspname, c.relname),
       c.relkind IN ('r', 'p') AND NOT c.relispartition AS counted,
       CASE
         WHEN NOT has_schema_privilege(n.oid, 'USAGE') THEN 'no USAGE on schema ' || quote_ident(n.nspname)
         WHEN c.relkind = 'S' AND NOT has_sequence_privilege(c.oid, 'SELECT') THEN 'no SELECT on the sequence'
         WHEN c.relkind <> 'S' AND NOT has_table_privilege(c.oid, 'SELECT') THEN 'no SELECT on the table'
         WHEN c.relrowsecurity AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE'))
              AND NOT (SELECT rolbypassrls OR rolsuper FROM pg_roles WHERE rolname = current_user)
           THEN 'row-level security hides rows from it'
       END AS unreadable
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm', 'S') AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', :excluded)
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
ORDER BY 1
"""


class BackupKind(StrEnum):
    FULL = "full"
    SCHEMA = "schema"
    DATA = "data"


class Trigger(StrEnum):
    MANUAL = "manual"
    PRE_MIGRATION = "pre-migration"
    SCHEDULE = "schedule"


class Skipped(BaseModel):
    """A table a backup left out (``pg_dump --exclude-table``), or an object a restore left as it was, and why."""

    table: str  # schema-qualified, quoted where PostgreSQL needs it; for a restore, the archive entry ("TABLE public.t")
    reason: str


class Manifest(BaseModel):
    """What a backup is, written beside it once it is complete."""

    version: int = 1
    file: str
    type: BackupKind
    format: str  # "custom" | "directory"
    compression: int | None
    sha256: str
    bytes: int
    files: dict[str, str] | None = None  # directory format: sha256 of each file
    database: str
    db: str
    server_version: str
    pg_dump_version: str
    revision: str | None
    started: datetime
    finished: datetime
    trigger: Trigger
    mark: str | None = None  # schedule: daily, weekly, monthly or interval
    command_id: str | None
    actor: str | None
    tables: dict[str, int] | None = None  # row counts in the dump's snapshot (not for schema backups)
    table_count: int
    skipped: list[Skipped] = []  # tables the role could not read: not in the archive, not counted
    verified: bool
    verified_at: datetime | None = None

    def path(self, backup_dir: str | Path) -> Path:
        return Path(backup_dir) / self.file

    def summary(self, backup_dir: str | Path) -> dict[str, Any]:
        return {
            "path": str(self.path(backup_dir)),
            "type": str(self.type),
            "trigger": str(self.trigger),
            "bytes": self.bytes,
            "created": self.finished.isoformat(),
            "revision": self.revision,
            "verified": self.verified,
            "sha256": self.sha256,
        }


# -- paths --------------------------------------------------------------------


def private_dir(path: str | Path) -> Path:
    """backup_dir, created 0700 if missing and tightened to 0700 if looser."""
    directory = Path(path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.geteuid():
        raise OperationFailed(f"{directory} is owned by uid {info.st_uid}, not by this worker (uid {os.geteuid()})")
    if stat.S_IMODE(info.st_mode) != 0o700:
        directory.chmod(0o700)
    return directory


def backup_name(db: str, kind: BackupKind, when: datetime) -> str:
    return f"{db}_backup_{kind}_{when.astimezone(UTC):%Y%m%d_%H%M%S}.dump"


def resolve_inside(backup_dir: str | Path, user_path: str) -> Path:
    """The backup a user named, refusing anything outside backup_dir (after .. and symlinks)."""
    root = Path(backup_dir).resolve()
    candidate = Path(user_path)
    if not candidate.is_absolute():
        candidate = root / candidate
    resolved = candidate.resolve()
    if resolved != root and root not in resolved.parents:
        raise BadInput(f"{user_path}: outside the backup directory {root}; only backups dbagent wrote can be restored")
    if resolved.parent != root:
        raise BadInput(f"{user_path}: not a backup in {root}")
    return resolved


def read_manifest(path: Path) -> Manifest:
    manifest_path = path.with_name(path.name + MANIFEST_SUFFIX)
    try:
        return Manifest.model_validate_json(manifest_path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: no manifest beside it ({manifest_path.name}): not a complete dbagent backup") from None
    except ValueError as exc:
        raise OperationFailed(f"{manifest_path}: unreadable manifest: {exc}") from None


def list_backups(backup_dir: str | Path) -> list[Manifest]:
    """Complete backups (manifest present and archive there), newest first by recorded time."""
    directory = Path(backup_dir)
    if not directory.is_dir():
        return []
    found = []
    for manifest_path in directory.glob(f"*{MANIFEST_SUFFIX}"):
        try:
            manifest = Manifest.model_validate_json(manifest_path.read_text())
        except (OSError, ValueError):
            continue
        if manifest.path(directory).exists():
            found.append(manifest)
    return sorted(found, key=lambda m: (m.finished, m.file), reverse=True)


def remove_stale_partials(backup_dir: Path) -> list[str]:
    """Remove temporary files left by a worker that died mid-dump."""
    removed = []
    for path in backup_dir.glob(f"{PARTIAL_PREFIX}*"):
        pid = path.name.removeprefix(PARTIAL_PREFIX).split("-", 1)[0]
        if pid.isdigit() and pid_alive(int(pid)):
            continue
        remove_path(path)
        removed.append(path.name)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -- libpq environment ----------------------------------------------------------

_ENV_OF = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
    "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY",
    "connect_timeout": "PGCONNECT_TIMEOUT", "options": "PGOPTIONS", "target_session_attrs": "PGTARGETSESSIONATTRS",
}


@contextmanager
def libpq_env(
    url: str, dbname: str | None = None, options: str | None = None, appname: str = "dbagent"
) -> Iterator[dict[str, str]]:
    """Environment for a libpq tool: connection from the URL, password in a private passfile."""
    from psycopg.conninfo import conninfo_to_dict

    params = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    password = params.pop("password", None)
    if dbname is not None:
        params["dbname"] = dbname
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") or k in ("PGPASSFILE",)}
    for key, value in params.items():
        if key in _ENV_OF:
            env[_ENV_OF[key]] = value
    if options:
        env["PGOPTIONS"] = options
    env["PGAPPNAME"] = appname
    passfile = None
    if password is not None:
        fd, passfile = tempfile.mkstemp(prefix="dbagent-pgpass-")
        with os.fdopen(fd, "w") as handle:  # mkstemp creates it 0600
            escaped = password.replace("\\", "\\\\").replace(":", "\\:")
            handle.write(f"*:*:*:*:{escaped}\n")
        env["PGPASSFILE"] = passfile
    try:
        yield env
    finally:
        if passfile:
            os.unlink(passfile)


def tool_version(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise Unavailable(f"{tool} is not on PATH: install the PostgreSQL client tools")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    return out.rsplit(" ", 1)[-1] if out else "unknown"


def major(version: str) -> int:
    match = re.match(r"(\d+)", version)
    return int(match.group(1)) if match else 0


# -- checksums and reading back -----------------------------------------------------


def checksum(path: Path) -> tuple[str, int, dict[str, str] | None]:
    """sha256 and size of an archive; for a directory archive, of every file in it too."""
    if path.is_dir():
        files: dict[str, str] = {}
        total = 0
        outer = hashlib.sha256()
        for member in sorted(p for p in path.rglob("*") if p.is_file()):
            digest, size = _sha256_file(member)
            name = str(member.relative_to(path))
            files[name] = digest
            total += size
            outer.update(f"{name}\0{digest}\n".encode())
        return outer.hexdigest(), total, files
    digest, size = _sha256_file(path)
    return digest, size, None


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _start_full_read(path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [tool_path("pg_restore"), "--file", os.devnull, str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish_full_read(path: Path, proc: subprocess.Popen) -> None:
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise OperationFailed(f"{path.name}: the archive does not read back in full: {first_line(stderr)}")


def full_read(path: Path) -> None:
    """Read the whole archive as pg_restore would (data included), writing nothing."""
    _finish_full_read(path, _start_full_read(path))


def checksum_and_read(path: Path) -> tuple[str, int, dict[str, str] | None]:
    """``checksum`` of a new archive while pg_restore reads it back in full beside it (``full_read``): the two
    reads of the file overlap, one hashing, the other decompressing. OperationFailed if it does not read back."""
    reader = _start_full_read(path)
    try:
        summed = checksum(path)
    except BaseException:
        _stop(reader)
        raise
    _finish_full_read(path, reader)
    return summed


def check_integrity(path: Path, manifest: Manifest, *, read_in_full: bool = True) -> None:
    """Checksum against the manifest, the pg_restore version, then (``read_in_full``) a full read: before anything
    is touched.

    The checksum and the full read run side by side (one hashes, pg_restore decompresses); the checksum's
    verdict comes first. A restore in one transaction skips the full read: the restore itself reads the whole
    archive, and an archive it cannot read fails it before it commits, so nothing changes
    (``restore_is_atomic``).
    """
    if not path.exists():
        raise BadInput(f"{path}: no such backup")
    local = tool_version("pg_restore")
    if major(manifest.pg_dump_version) > major(local):
        raise OperationFailed(
            f"{path.name} was written by pg_dump {manifest.pg_dump_version}; this pg_restore ({local}) cannot read it"
        )
    reader = _start_full_read(path) if read_in_full else None
    try:
        digest, size, _ = checksum(path)
    except BaseException:
        _stop(reader)
        raise
    if digest != manifest.sha256 or size != manifest.bytes:
        _stop(reader)
        raise OperationFailed(
            f"{path.name}: checksum mismatch: the manifest says sha256 {manifest.sha256} ({manifest.bytes} bytes),"
            f" the file has sha256 {digest} ({size} bytes); the backup is damaged and was not used"
        )
    if reader is not None:
        _finish_full_read(path, reader)


def _stop(reader: subprocess.Popen | None) -> None:
    if reader is not None:
        reader.kill()
        reader.wait()


def restore_is_atomic(manifest: Manifest, jobs: int) -> bool:
    """Whether pg_restore runs the restore in one transaction (``--single-transaction``): all of it or nothing.
    Not so for a directory archive restored with several jobs in parallel."""
    return not (manifest.format == "directory" and jobs > 1)


def tool_path(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise Unavailable(f"{name} is not on PATH: install the PostgreSQL client tools")
    return path


def first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return redact(lines[-1] if lines else "no message")


# -- running pg_dump / pg_restore ------------------------------------------------------


def _resolve_prctl() -> Callable[..., int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


# Resolved here, in the parent: after fork, the child only calls it.
_PRCTL = _resolve_prctl()
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """In the tool's process before exec: private files, and death with the worker.

    A pg_dump or pg_restore must never outlive the worker that holds the
    database's lock for it: a kill -9 of the worker alone (not its process
    group) would otherwise leave a restore running unguarded.
    """
    os.umask(0o077)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def run_tool(
    argv: list[str],
    env: dict[str, str],
    *,
    watch: Path | None = None,
    on_progress: Callable[[int, float], None] | None = None,
    during: Callable[[], T] | None = None,
    stop: StopRequest | None = None,
) -> T | None:
    """Run a libpq tool; its files are private whatever the umask. Raises OperationFailed with its error.

    ``during`` runs in this thread once the tool has started (its result is returned);
    ``on_progress(bytes of watch, seconds)`` is called every PROGRESS_EVERY_S while it runs.
    With ``stop``, a worker told to stop kills the tool once the stop grace is over.
    """
    started = time.monotonic()
    last = started
    outcome: T | None = None
    with tempfile.TemporaryFile(mode="w+") as errors:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=errors, preexec_fn=_child_setup)
        try:
            with stop.cancelling(proc.kill) if stop is not None else nullcontext():
                if during is not None:
                    outcome = during()
                while True:
                    try:
                        proc.wait(timeout=min(0.5, PROGRESS_EVERY_S))
                        break
                    except subprocess.TimeoutExpired:
                        now = time.monotonic()
                        if on_progress is not None and watch is not None and now - last >= PROGRESS_EVERY_S:
                            last = now
                            on_progress(size_of(watch), now - started)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        errors.seek(0)
        stderr = errors.read()
    if proc.returncode != 0:
        if stop is not None and stop.expired:
            raise OperationFailed(f"{Path(argv[0]).name} was stopped: {stop.reason}, and the stop grace ran out")
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        raise OperationFailed(f"{Path(argv[0]).name} failed ({how}): {first_line(stderr)}")
    return outcome


def size_of(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def dump_argv(
    kind: BackupKind,
    target: Path,
    *,
    jobs: int,
    compression: int | None,
    lock_wait_ms: int,
    snapshot: str | None,
    exclude_tables: Sequence[str] = (),
) -> list[str]:
    """pg_dump's argv; ``exclude_tables`` are ``format('%I.%I')`` names, which pg_dump reads as exact patterns."""
    argv = [tool_path("pg_dump"), "--no-password", f"--lock-wait-timeout={lock_wait_ms}", f"--exclude-schema={SCHEMA_EXCLUDED}"]
    argv += [f"--exclude-table={table}" for table in exclude_tables]
    if jobs > 1:
        argv += ["--format=directory", f"--jobs={jobs}"]
    else:
        argv += ["--format=custom"]
    if compression is not None:
        argv.append(f"--compress={compression}")
    if kind == BackupKind.SCHEMA:
        argv.append("--schema-only")
    elif kind == BackupKind.DATA:
        argv.append("--data-only")
    if snapshot:
        argv.append(f"--snapshot={snapshot}")
    argv += ["--file", str(target)]
    return argv


def restore_argv(path: Path, manifest: Manifest, jobs: int, use_list: Path | None = None) -> list[str]:
    argv = [tool_path("pg_restore"), "--no-password", "--exit-on-error", "--no-owner", f"--exclude-schema={SCHEMA_EXCLUDED}"]
    if use_list is not None:
        argv.append(f"--use-list={use_list}")
    if manifest.type == BackupKind.DATA:
        argv.append("--data-only")
    else:
        argv += ["--clean", "--if-exists"]
    if restore_is_atomic(manifest, jobs):
        argv.append("--single-transaction")
    else:
        argv.append(f"--jobs={jobs}")  # parallel: not atomic (documented)
    argv += ["--dbname", "", str(path)]
    return argv


def owned_by_others(toc: str, others: Collection[str]) -> tuple[str, list[Skipped]]:
    """An archive's table of contents (``pg_restore --list``) without the entries owned by ``others``, and those entries.

    A role may drop and recreate only what it owns: restoring with --clean over
    an object of another role's would fail the whole restore. Each entry's owner
    is the last field of its line (nothing after it when it has none); its
    dependants (data, ACL, constraints, defaults) carry the same owner.
    """
    kept: list[str] = []
    skipped: list[Skipped] = []
    for line in toc.splitlines():
        owner = next((o for o in others if line.endswith(" " + o)), None) if not line.startswith(";") else None
        if owner is None:
            kept.append(line)
            continue
        entry = line.split(" ", 3)[3].removesuffix(" " + owner) if line.count(" ") >= 3 else line
        skipped.append(Skipped(table=_toc_entry_name(entry), reason=f"owned by {owner}: left as it is"))
    return "\n".join(kept) + "\n", skipped


_TOC_DESCS = ("MATERIALIZED VIEW DATA", "SEQUENCE OWNED BY", "FK CONSTRAINT", "TABLE DATA", "SEQUENCE SET",
              "DEFAULT ACL", "MATERIALIZED VIEW", "FOREIGN TABLE", "CHECK CONSTRAINT", "LARGE OBJECT", "SECURITY LABEL")


def _toc_entry_name(entry: str) -> str:
    """``desc schema name`` of a TOC entry as a person reads it: ``TABLE public.t``, ``ACL on TABLE public.t``."""
    desc = next((d for d in _TOC_DESCS if entry.startswith(d + " ")), entry.split(" ", 1)[0])
    schema, _, name = entry[len(desc) + 1 :].partition(" ")
    if desc in ("ACL", "COMMENT", "SECURITY LABEL") and " " in name:
        kind, _, target = name.partition(" ")
        return f"{desc} on {kind} {target if schema == '-' else schema + '.' + target}"
    return f"{desc} {name if schema == '-' else schema + '.' + name}"


def restore_toc(path: Path) -> str:
    """The archive's table of contents, as ``pg_restore --list`` prints it."""
    proc = subprocess.run([tool_path("pg_restore"), "--list", str(path)], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise OperationFailed(f"{path.name}: pg_restore cannot list the archive: {first_line(proc.stderr)}")
    return proc.stdout


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write the manifest atomically (temp + rename), 0600."""
    target = path.with_name(path.name + MANIFEST_SUFFIX)
    fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX + f"{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(manifest.model_dump_json(indent=2))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        # A full disk (or a stop) while writing: no half-written temp file is left behind.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalize(tmp: Path, final: Path) -> None:
    """Make a finished archive durable and give it its real name."""
    members = [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else [tmp]
    for member in members:
        member.chmod(0o600)
        with open(member, "rb") as handle:
            os.fsync(handle.fileno())
    if tmp.is_dir():
        tmp.chmod(0o700)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def delete_backup(backup_dir: Path, manifest: Manifest) -> None:
    """Remove a backup: the manifest first, so a half-deleted backup is never listed."""
    path = manifest.path(backup_dir)
    path.with_name(path.name + MANIFEST_SUFFIX).unlink(missing_ok=True)
    remove_path(path)


def manifest_json(manifest: Manifest) -> dict[str, Any]:
    return json.loads(manifest.model_dump_json())
