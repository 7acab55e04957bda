"""Rehearsal of the pending migrations on a scratch database: up, verify, down, compare, up again.

The scratch database is created on the target's server (with the target's
credentials), populated from the newest verified schema backup when there is
one (else left empty), and always dropped at the end. A downgrade must bring
the schema back exactly as it was before the step: every difference between
the two catalog snapshots is a finding naming the object.

The snapshot model and its comparison are pure (literal data in the unit
tests); the database side imports SQLAlchemy lazily, like ``dbagent.postgres.connections``.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbagent.core.errors import BadInput, OperationFailed
from dbagent.core.findings import Finding, Severity, status_of
from dbagent.postgres.connections import create_scratch_database, drop_scratch_database

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from dbagent.postgres.backups import Manifest
    from dbagent.postgres.migrator import Migrator, Step
    from dbagent.settings import DatabaseSettings

SCRATCH_PREFIX = "dbagent_rehearse_"
MAX_DIFFERENCES_SHOWN = 20  # per step; the rest are counted in one more finding
_DEFINITION_SHOWN_CHARS = 160

Progress = Callable[[str], None]

# -- the schema snapshot (pure) ---------------------------------------------------


@dataclass(frozen=True)
class SchemaObject:
    """One object of the schema as the catalogs describe it, normalised."""

    kind: str  # "table", "column", "index", "constraint", "function", "type", ...
    name: str  # qualified and quoted where needed: public.users, public.users.nickname
    definition: str = ""  # empty when the name says it all
    parent: str | None = None  # key of the relation a column, index, constraint or trigger belongs to

    @property
    def key(self) -> str:
        return f"{self.kind} {self.name}"

    def shown(self) -> str:
        definition = _shorten(self.definition)
        return f"{self.key} ({definition})" if definition else self.key


Snapshot = Mapping[str, SchemaObject]


def snapshot_of(objects: Iterator[SchemaObject] | list[SchemaObject]) -> dict[str, SchemaObject]:
    """A snapshot keyed by ``kind name``, definitions with their whitespace normalised."""
    normalised = (dataclasses.replace(o, definition=" ".join(o.definition.split())) for o in objects)
    return {o.key: o for o in normalised}


@dataclass(frozen=True)
class Difference:
    """An object present in only one snapshot, or defined differently in each."""

    before: SchemaObject | None
    after: SchemaObject | None

    @property
    def key(self) -> str:
        return (self.after or self.before).key  # type: ignore[union-attr]

    def describe(self, when: str) -> str:
        if self.before is None:
            return f"{self.after.shown()} is still there {when}"  # type: ignore[union-attr]
        if self.after is None:
            return f"{self.before.shown()} is missing {when}"
        return (
            f"{self.key} differs {when}: {_shorten(self.after.definition) or 'nothing'},"
            f" was {_shorten(self.before.definition) or 'nothing'}"
        )

    def fix(self) -> str:
        if self.before is None:
            return "downgrade() must drop what upgrade() created"
        if self.after is None:
            return "downgrade() must recreate what upgrade() dropped, and drop only what upgrade() created"
        return "downgrade() must restore the definition upgrade() changed"


def compare(before: Snapshot, after: Snapshot) -> list[Difference]:
    """Every difference, in key order; the columns, indexes… of a relation that is itself new or gone are implied."""
    added = {k for k in after if k not in before}
    removed = {k for k in before if k not in after}
    found = []
    for key in sorted(added | removed | {k for k in before.keys() & after.keys() if before[k] != after[k]}):
        old, new = before.get(key), after.get(key)
        if new is not None and old is None and new.parent in added:
            continue
        if old is not None and new is None and old.parent in removed:
            continue
        found.append(Difference(old, new))
    return found


def _shorten(text: str) -> str:
    return text if len(text) <= _DEFINITION_SHOWN_CHARS else text[: _DEFINITION_SHOWN_CHARS - 1] + "…"


# -- the outcome ------------------------------------------------------------------


@dataclass
class StepOutcome:
    revision: str
    description: str
    status: str  # "ok" | "failed" | "not rehearsed"
    duration_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Rehearsal:
    """What a rehearsal did and found."""

    database: str  # the scratch database (dropped by now)
    source: str  # "empty", or the path of the schema backup it started from
    revision_from: str | None
    steps: list[StepOutcome] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return status_of(self.findings) == "passed"

    def to_json(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "source": self.source,
            "revision_from": self.revision_from,
            "status": "passed" if self.ok else "failed",
            "steps": [s.to_json() for s in self.steps],
        }


# -- the catalogs ---------------------------------------------------------------------

# Schemas that are not the application's: the system's, and dbagent's own bookkeeping.
_USER_SCHEMA = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'dbagent') AND n.nspname NOT LIKE 'pg\\_%'"
_NOT_EXTENSION = (
    "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{catalog}'::regclass"
    " AND d.objid = {oid} AND d.deptype = 'e')"
)


def _relation_kind(c: str = "c") -> str:
    return (
        f"CASE {c}.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'partitioned table' WHEN 'v' THEN 'view'"
        " WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence' WHEN 'f' THEN 'foreign table'"
        " WHEN 'c' THEN 'type' END"
    )


def _relation_key(c: str = "c", n: str = "n") -> str:
    """SchemaObject.key of a relation, in SQL."""
    return f"{_relation_kind(c)} || ' ' || format('%I.%I', {n}.nspname, {c}.relname)"


_REL_KIND = _relation_kind()
_REL_NAME = "format('%I.%I', n.nspname, c.relname)"
_PARENT = _relation_key()
_USER_RELATION = (
    f"{_USER_SCHEMA} AND c.relname <> 'alembic_version'"
    f" AND {_NOT_EXTENSION.format(catalog='pg_class', oid='c.oid')}"
)

_CATALOG_QUERIES = [
    # schemas
    f"""SELECT 'schema', quote_ident(n.nspname), '', NULL FROM pg_namespace n
        WHERE {_USER_SCHEMA} AND {_NOT_EXTENSION.format(catalog='pg_namespace', oid='n.oid')}""",
    # extensions
    "SELECT 'extension', quote_ident(extname), 'version ' || extversion, NULL FROM pg_extension WHERE extname <> 'plpgsql'",
    # tables, views, sequences, composite types
    f"""SELECT {_REL_KIND}, {_REL_NAME}, concat_ws(' ',
            CASE WHEN c.relpersistence = 'u' THEN 'unlogged' END,
            CASE WHEN c.relrowsecurity THEN 'row level security' END,
            CASE WHEN c.relkind = 'c' THEN 'composite' END,
            CASE WHEN c.relkind = 'p' THEN 'partition by ' || pg_get_partkeydef(c.oid) END,
            CASE WHEN c.relispartition THEN 'partition ' || pg_get_expr(c.relpartbound, c.oid) END,
            CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid, true) END,
            (SELECT format('%s start %s increment %s min %s max %s cache %s%s', format_type(s.seqtypid, NULL),
                           s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache,
                           CASE WHEN s.seqcycle THEN ' cycle' ELSE '' END)
               FROM pg_sequence s WHERE s.seqrelid = c.oid)),
            -- a serial's or identity's sequence belongs to its table
            (SELECT {_relation_key('oc', 'on_')}
               FROM pg_depend d JOIN pg_class oc ON oc.oid = d.refobjid JOIN pg_namespace on_ ON on_.oid = oc.relnamespace
              WHERE c.relkind = 'S' AND d.classid = 'pg_class'::regclass AND d.objid = c.oid
                AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c') AND {_USER_RELATION}""",
    # grants on them
    f"""SELECT 'grants on', {_REL_NAME}, COALESCE(
            (SELECT string_agg(a::text, ', ' ORDER BY a::text) FROM unnest(c.relacl) a), 'the defaults'), {_PARENT}
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {_USER_RELATION}""",
    # columns: type, nullability, default, identity, generation
    f"""SELECT 'column', format('%I.%I.%I', n.nspname, c.relname, a.attname), concat_ws(' ',
            format_type(a.atttypid, a.atttypmod),
            CASE WHEN a.attnotnull THEN 'not null' END,
            CASE a.attidentity WHEN 'a' THEN 'generated always as identity'
                               WHEN 'd' THEN 'generated by default as identity' END,
            CASE WHEN a.attgenerated = 's' THEN 'generated always as (' || pg_get_expr(ad.adbin, ad.adrelid) || ') stored'
                 WHEN ad.adbin IS NOT NULL THEN 'default ' || pg_get_expr(ad.adbin, ad.adrelid) END,
            CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
                 THEN 'collate ' || a.attcollation::regcollation::text END), {_PARENT}
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
        WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c') AND {_USER_RELATION}""",
    # constraints of tables
    f"""SELECT 'constraint', format('%I.%I.%I', n.nspname, c.relname, con.conname),
            pg_get_constraintdef(con.oid, true), {_PARENT}
        FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_USER_RELATION}""",
    # indexes, except those a constraint owns (the constraint says it)
    f"""SELECT 'index', format('%I.%I', n.nspname, ic.relname),
            pg_get_indexdef(i.indexrelid) || CASE WHEN i.indisvalid THEN '' ELSE ' (invalid)' END, {_PARENT}
        FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_class c ON c.oid = i.indrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_USER_RELATION} AND NOT EXISTS (
            SELECT 1 FROM pg_constraint con WHERE con.conindid = i.indexrelid AND con.conrelid = i.indrelid
            AND con.contype IN ('p', 'u', 'x'))""",
    # triggers
    f"""SELECT 'trigger', format('%I.%I.%I', n.nspname, c.relname, tg.tgname),
            pg_get_triggerdef(tg.oid, true) || CASE WHEN tg.tgenabled = 'D' THEN ' (disabled)' ELSE '' END, {_PARENT}
        FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT tg.tgisinternal AND {_USER_RELATION}""",
    # row-level security policies
    f"""SELECT 'policy', format('%I.%I.%I', n.nspname, c.relname, pol.polname), concat_ws(' ',
            CASE WHEN pol.polpermissive THEN 'permissive' ELSE 'restrictive' END, 'for', pol.polcmd,
            'using (' || pg_get_expr(pol.polqual, pol.polrelid) || ')',
            'with check (' || pg_get_expr(pol.polwithcheck, pol.polrelid) || ')'), {_PARENT}
        FROM pg_policy pol JOIN pg_class c ON c.oid = pol.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_USER_RELATION}""",
    # functions and procedures (aggregates by signature only: pg_get_functiondef refuses them)
    f"""SELECT CASE p.prokind WHEN 'p' THEN 'procedure' WHEN 'a' THEN 'aggregate' ELSE 'function' END,
            format('%I.%I(%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)),
            CASE WHEN p.prokind <> 'a' THEN pg_get_functiondef(p.oid) ELSE '' END, NULL
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE {_USER_SCHEMA} AND {_NOT_EXTENSION.format(catalog='pg_proc', oid='p.oid')}""",
    # enum, domain and range types (composite types are relations, above)
    f"""SELECT 'type', format('%I.%I', n.nspname, t.typname), CASE t.typtype
            WHEN 'e' THEN 'enum (' || (SELECT string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)
                                       FROM pg_enum e WHERE e.enumtypid = t.oid) || ')'
            WHEN 'd' THEN concat_ws(' ', 'domain over', format_type(t.typbasetype, t.typtypmod),
                                    CASE WHEN t.typnotnull THEN 'not null' END, 'default ' || t.typdefault)
            WHEN 'r' THEN 'range over ' || (SELECT format_type(r.rngsubtype, NULL) FROM pg_range r WHERE r.rngtypid = t.oid)
            END, NULL
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE t.typtype IN ('e', 'd', 'r') AND {_USER_SCHEMA} AND {_NOT_EXTENSION.format(catalog='pg_type', oid='t.oid')}""",
    # constraints of domains
    f"""SELECT 'constraint', format('%I.%I.%I', n.nspname, t.typname, con.conname),
            pg_get_constraintdef(con.oid, true), 'type ' || format('%I.%I', n.nspname, t.typname)
        FROM pg_constraint con JOIN pg_type t ON t.oid = con.contypid JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE {_USER_SCHEMA}""",
]


def take_snapshot(conn: Connection, version_table: str = "alembic_version") -> dict[str, SchemaObject]:
    """The schema of the database conn is on (without dbagent's schema and Alembic's version table), committed."""
    if conn.in_transaction():
        conn.commit()
    objects = []
    # Through SQLAlchemy first, so that it knows a transaction is open and rolls it back.
    conn.exec_driver_sql("SET TRANSACTION READ ONLY")
    # The raw cursor takes the queries verbatim (their '%' are format()'s, not placeholders).
    cursor = conn.connection.cursor()
    try:
        literal = "'" + version_table.replace("'", "''") + "'"
        for query in _CATALOG_QUERIES:
            cursor.execute(query.replace("'alembic_version'", literal))
            for kind, name, definition, parent in cursor.fetchall():
                objects.append(SchemaObject(kind, name, definition or "", parent))
    finally:
        cursor.close()
        conn.rollback()
    return snapshot_of(objects)


# -- the scratch database ---------------------------------------------------------------


def scratch_name(db_name: str) -> str:
    """``dbagent_rehearse_<db>_<random>``, within PostgreSQL's 63 bytes."""
    safe = "".join(ch if ch.isalnum() else "_" for ch in db_name.lower())[:32]
    return f"{SCRATCH_PREFIX}{safe}_{uuid.uuid4().hex[:8]}"


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C while the scratch database exists, so that it is dropped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- the rehearsal ----------------------------------------------------------------------


def latest_schema_backup(backup_dir: str | Path | None) -> Manifest | None:
    """The newest verified schema backup in backup_dir (None when there is none, or it cannot be read here)."""
    from dbagent.postgres.backups import BackupKind, list_backups

    if not backup_dir:
        return None
    try:
        backups = list_backups(backup_dir)
    except OSError:
        return None
    return next((m for m in backups if m.type == BackupKind.SCHEMA and m.verified), None)


def rehearse(
    db_name: str,
    db: DatabaseSettings,
    *,
    from_empty: bool = False,
    on_progress: Progress | None = None,
) -> Rehearsal:
    """Rehearse every pending migration on a scratch database, created here and always dropped.

    Raises Unavailable when the server cannot be reached or refuses to create the database.
    """
    from dbagent.postgres.migrator import Migrator

    say = on_progress or (lambda line: None)
    migrator = Migrator(db.migrations, db.url)
    migrator.order()  # a graph Alembic cannot walk: its error before anything is created
    name = scratch_name(db_name)
    with _sigterm_interrupts():
        scratch = create_scratch_database(db, name, "rehearsal")
        try:
            return _rehearse_in(db, scratch, migrator, name, from_empty, say)
        finally:
            drop_scratch_database(db, name, "rehearsal")
            say(f"rehearse: dropped the scratch database {name}")


def _rehearse_in(
    db: DatabaseSettings, created: DatabaseSettings, migrator: Migrator, name: str, from_empty: bool, say: Progress
) -> Rehearsal:
    from dbagent.postgres.connections import apply_timeouts, pg_connection
    from dbagent.postgres.migrator import Migrator

    scratch = created.model_copy(update={"health_checks": [], "critical_tables": []})
    rehearsal = Rehearsal(database=name, source="empty", revision_from=None)
    if not from_empty:
        _populate_from_backup(db, name, migrator, rehearsal)
    say(f"rehearse: scratch database {name}, from {_source_phrase(rehearsal)}")

    steps_migrator = Migrator(db.migrations, scratch.url)
    with pg_connection(scratch, application_name="dbagent rehearse") as conn:
        apply_timeouts(conn, scratch)
        if rehearsal.revision_from is not None:
            facts = steps_migrator.environment()
            table = ".".join(
                '"' + part.replace('"', '""') + '"' for part in (facts.version_table_schema, facts.version_table) if part
            )
            for head in steps_migrator.state(rehearsal.revision_from):  # several rows between a branch point and its merge
                conn.exec_driver_sql(f"INSERT INTO {table} (version_num) VALUES (%(rev)s)", {"rev": head})
            conn.commit()
        plan = steps_migrator.upgrade_plan(steps_migrator.current(conn))
        if not plan:
            say("rehearse: no pending migrations")
        for index, step in enumerate(plan):
            outcome = _rehearse_step(conn, steps_migrator, scratch, step, rehearsal)
            rehearsal.steps.append(outcome)
            say(f"rehearse {step.revision} {step.description.rstrip('.')}: {outcome.status} ({outcome.duration_ms} ms)")
            if outcome.status != "ok":
                rest = plan[index + 1 :]
                rehearsal.steps += [StepOutcome(s.revision, s.description, "not rehearsed") for s in rest]
                if rest:
                    say(f"rehearse: stopped; not rehearsed: {', '.join(s.revision for s in rest)}")
                break
    return rehearsal


def _source_phrase(rehearsal: Rehearsal) -> str:
    if rehearsal.source == "empty":
        return "an empty database"
    return f"schema backup {Path(rehearsal.source).name} (revision {rehearsal.revision_from or 'base'})"


def _populate_from_backup(db: DatabaseSettings, name: str, migrator: Migrator, rehearsal: Rehearsal) -> None:
    """Restore the newest verified schema backup into the scratch database; a backup that cannot serve is a warning."""
    from dbagent.postgres import backups as bk

    manifest = latest_schema_backup(db.backup_dir)
    if manifest is None:
        return
    path = manifest.path(db.backup_dir or "")
    try:
        try:
            migrator.state(manifest.revision)
        except BadInput as exc:
            raise OperationFailed(f"it is at revision {manifest.revision!r}, which these migrations do not contain") from exc
        bk.check_integrity(path, manifest)
        with bk.libpq_env(db.url, dbname=name, appname="dbagent rehearse") as env:
            argv = bk.restore_argv(path, manifest, 1)
            argv[argv.index("--dbname") + 1] = name
            bk.run_tool(argv, env)
    except OperationFailed as exc:
        rehearsal.findings.append(
            Finding(
                None, "rehearsal-backup-unusable", Severity.WARNING,
                f"schema backup {path.name} cannot seed the rehearsal, which starts from an empty database: {exc.message}",
            )
        )
        return
    rehearsal.source = str(path)
    rehearsal.revision_from = manifest.revision


def _rehearse_step(
    conn: Connection, migrator: Migrator, scratch: DatabaseSettings, step: Step, rehearsal: Rehearsal
) -> StepOutcome:
    """Up, verify, down, compare, up again; the findings go into the rehearsal."""
    from dbagent.postgres.verify import capture_baseline, run_checks

    started = time.monotonic()
    file = _file_of(migrator, step.revision)
    outcome = StepOutcome(step.revision, step.description, "failed")

    def finding(rule: str, message: str, fix: str | None = None) -> None:
        rehearsal.findings.append(Finding(step.revision, rule, Severity.ERROR, message, fix=fix, file=file))

    def done() -> StepOutcome:
        outcome.duration_ms = round((time.monotonic() - started) * 1000)
        return outcome

    version_table = migrator.environment().version_table
    before_state = migrator.current(conn)
    before = take_snapshot(conn, version_table)
    baseline = capture_baseline(conn, scratch)
    error = _apply(conn, migrator, step)
    if error:
        finding("rehearsal-upgrade-failed", f"upgrade to {step.revision} failed: {error}")
        return done()
    current = migrator.current(conn)
    expected = migrator.state_after(before_state, [step])
    failed_checks = [c for c in run_checks(conn, current, expected, scratch, baseline) if not c.ok]
    for check in failed_checks:
        finding("rehearsal-verify-failed", f"after upgrade to {step.revision}, check {check.name} failed: {check.detail}")

    down = dataclasses.replace(step, direction="down")
    error = _apply(conn, migrator, down)
    if error:
        finding("rehearsal-downgrade-failed", f"downgrade of {step.revision} failed: {error}",
                "downgrade() must reverse upgrade() on the schema upgrade() leaves")
        return done()
    differences = compare(before, take_snapshot(conn, version_table))
    when = f"after downgrade of {step.revision}"
    for difference in differences[:MAX_DIFFERENCES_SHOWN]:
        finding("rehearsal-downgrade-mismatch", difference.describe(when), difference.fix())
    if len(differences) > MAX_DIFFERENCES_SHOWN:
        finding("rehearsal-downgrade-mismatch",
                f"and {len(differences) - MAX_DIFFERENCES_SHOWN} more difference(s) {when}")
    if differences:
        return done()

    error = _apply(conn, migrator, step)
    if error:
        finding("rehearsal-upgrade-failed", f"upgrade to {step.revision} failed the second time, after its downgrade: {error}",
                "upgrade() must run again once downgrade() has reversed it")
        return done()
    outcome.status = "failed" if failed_checks else "ok"
    return done()


def _apply(conn: Connection, migrator: Migrator, step: Step) -> str | None:
    """Run one step; the server's (or the script's) error as one line, None when it went through."""
    from dbagent.core.errors import error_text

    try:
        migrator.apply(conn, step)
    except Exception as exc:  # a script can raise anything: each is this step failing
        try:
            conn.rollback()
        except Exception:
            pass
        return error_text(exc, one_line=True)
    return None


def _file_of(migrator: Migrator, revision: str) -> str | None:
    path = getattr(migrator.revision(revision), "path", None)
    return Path(path).name if path else None
