"""Everything dbagent checks about the migration scripts before it runs them.

Three kinds of finding, in the ``--json`` shape of ``dbagent validate``
(``revision``, ``rule``, ``severity``, ``message``, ``statement``, ``fix``, ``file``):

* structure (``dbagent.checks.validate``): naming, revision ids, one linear chain, a real downgrade();
* the lint of the SQL each upgrade() emits (``dbagent.checks.lint``, pglast);
* checksums: the sha256 of every applied script is kept in ``dbagent.changelog``;
  a script edited after it was applied is ``applied-migration-changed``, like
  Flyway's validate: the database no longer matches what the file says it ran.

``dbagent validate`` shows them all. Before every migrate the worker runs them
too: an ``error`` stops the migration unless ``--allow RULE`` names its rule.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbagent.core.errors import BadInput, DbAgentError, error_text
from dbagent.core.findings import Finding, Severity, is_error, status_of
from dbagent.postgres.migrator import Migrator, Step

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from dbagent.settings import DatabaseSettings

CHANGED = "applied-migration-changed"

CHANGED_FIX = (
    "put the file back as it was when it was applied (git log -p on it shows the edit) and make the change in "
    "a new migration; a migrate that must go ahead anyway takes --allow applied-migration-changed, recorded in "
    "the audit trail"
)


def file_checksum(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def script_checksum(migrator: Migrator, revision: str) -> str:
    """The sha256 of the file that defines ``revision`` (``Migrator.checksum``: read once per Migrator)."""
    return migrator.checksum(revision)


def finding(revision: str | None, rule: str, severity: str, message: str, *, statement: str | None = None,
             fix: str | None = None, file: str | None = None) -> dict[str, Any]:
    """A ``Finding`` in its JSON shape, the one the verdict, ``validate --json`` and the events carry."""
    return Finding(revision, rule, Severity(severity), message, statement=statement, fix=fix, file=file).to_json()


def checksum_findings(migrator: Migrator, current: str | None, recorded: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """An error for every applied revision whose file no longer has the checksum recorded when it ran.

    Revisions applied before dbagent kept checksums (or by plain Alembic) have
    none recorded and are not judged.
    """
    if current is None:
        return []
    try:
        applied = migrator.applied(current)
    except BadInput:  # the database is at a revision these scripts lack: the plan says so
        return []
    findings = []
    for revision in applied:
        row = recorded.get(revision) or {}
        if not row.get("checksum"):
            continue
        path = Path(migrator.revision(revision).path)
        now = file_checksum(path)
        if now != row["checksum"]:
            when = f" on {row['finished_at']:%Y-%m-%d %H:%M} UTC" if row.get("finished_at") else ""
            who = f" by {row['actor']}" if row.get("actor") else ""
            findings.append(finding(
                revision, CHANGED, "error",
                f"{path.name} was edited after it was applied{when}{who}"
                f" (sha256 then {row['checksum'][:12]}…, now {now[:12]}…): the database ran the old version, so the"
                " file no longer describes it, and its downgrade() may not undo what was really done",
                fix=CHANGED_FIX, file=path.name,
            ))
    return findings


# The rules of dbagent.checks.validate: an error among them means the lint and the rest cannot run.
STRUCTURAL_RULES = frozenset({
    "syntax", "naming", "revision-id", "downgrade", "duplicate-revision", "sequence", "chain", "single-head", "empty",
})
# Errors that leave no revision graph to walk: no rehearsal then.
GRAPH_RULES = frozenset({"syntax", "duplicate-revision", "chain", "single-head", "lint-skipped"})


def known_rules() -> set[str]:
    from dbagent.checks.lint import RULES

    return set(RULES) | STRUCTURAL_RULES | {CHANGED, "lint-skipped"}


def check_allow(rules: Iterable[str]) -> list[str]:
    """The ``--allow`` rule names, checked: a typo must not silently allow nothing."""
    names = sorted({r.strip() for r in rules if r.strip()})
    unknown = [r for r in names if r not in known_rules()]
    if unknown:
        raise BadInput(f"--allow: unknown rule(s) {', '.join(unknown)} (known: {', '.join(sorted(known_rules()))})")
    return names


def findings(
    location: str | Path,
    *,
    naming: str = "auto",
    migrator: Migrator | None = None,
    current: str | None = None,
    recorded: dict[str, dict[str, Any]] | None = None,
    lint_only: Collection[str] | None = None,
    render: Callable[[Step], str] | None = None,
    lint_from: str | None = None,
    sources: list[tuple[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Every finding about the scripts in ``location`` (``sources``: those scripts already read).

    ``recorded`` (from ``store.applied_checksums``) with ``current`` enables the
    checksum check; ``lint_only`` restricts the lint to those revisions (a
    migrate lints what it is about to apply: the rest ran already); ``render``
    gives a step's offline SQL (a caller that needs it too renders it once).
    ``lint_from`` (a baseline, ``reviewed``): that revision and its ancestors
    are not linted and their per-script rules are not applied; the graph rules
    and the checksums still cover them.
    """
    from dbagent.checks.lint import lint_migrations
    from dbagent.checks.validate import check_sources, load_sources

    structural = check_sources(sources if sources is not None else load_sources(location), naming)
    out = [f.to_json() for f in structural]
    # Each part on its own: a structural error in one script hides neither the lint of the others
    # nor its own; only what cannot be read at all (a graph Alembic refuses) stops a part, said so.
    try:
        migrator = migrator or Migrator(location, "postgresql://validate@localhost/validate")
    except Exception as exc:  # noqa: BLE001 - Alembic refuses the scripts: nothing more can be rendered
        out.append(finding(None, "lint-skipped", "error", f"the scripts cannot be loaded by Alembic: {error_text(exc)}"))
        return out
    if lint_from is not None:
        baseline = reviewed(migrator, lint_from)
        out = [f for f in out if f["rule"] in GRAPH_RULES or f["revision"] not in baseline]
        lint_only = [r for r in (migrator.order() if lint_only is None else lint_only) if r not in baseline]
    try:
        out += [f.to_json() for f in lint_migrations(location, only=lint_only, migrator=migrator, render=render)]
    except Exception as exc:  # noqa: BLE001 - a graph the plan cannot walk (several heads)
        out.append(finding(None, "lint-skipped", "error", f"the SQL of the scripts was not linted: {error_text(exc)}"))
    if recorded is not None:
        try:
            out += checksum_findings(migrator, current, recorded)
        except Exception as exc:  # noqa: BLE001
            out.append(finding(None, "checksums-unchecked", "warning", f"checksums not checked: {error_text(exc)}"))
    return out


def reviewed(migrator: Migrator, lint_from: str) -> set[str]:
    """The revisions a ``lint_from`` baseline takes as reviewed: it and its ancestors. BadInput if unknown."""
    try:
        return migrator.ancestors(migrator.resolve(lint_from))
    except BadInput as exc:
        raise BadInput(f"lint_from = {lint_from!r}: {exc.message}") from None


@dataclass
class Verdict:
    """What the findings come to: what stops a migrate, what --allow let through (and, from ``validate``, the
    naming convention judged by, the lint baseline, and the rehearsal's report when one ran)."""

    findings: list[dict[str, Any]]
    allow: list[str] = field(default_factory=list)
    naming: str | None = None
    lint_from: str | None = None
    rehearsal: dict[str, Any] | None = None

    @property
    def blocking(self) -> list[dict[str, Any]]:
        return [f for f in self.findings if is_error(f) and f["rule"] not in self.allow]

    @property
    def allowed(self) -> list[dict[str, Any]]:
        return [f for f in self.findings if is_error(f) and f["rule"] in self.allow]

    def summary(self) -> str:
        return "; ".join(f"{f.get('revision') or '-'} [{f['rule']}] {f['message'].split(':')[0]}" for f in self.blocking[:5])

    def to_json(self) -> dict[str, Any]:
        return {
            "status": status_of(self.blocking),
            "findings": self.findings,
            "allowed": [f"{f.get('revision')}:{f['rule']}" for f in self.allowed],
            "allow": self.allow,
        }


def validate(
    db: DatabaseSettings,
    *,
    allow: Iterable[str] = (),
    migrator: Migrator | None = None,
    conn: Connection | None = None,
    current: str | None = None,
    lint_only: Collection[str] | None = None,
    render: Callable[[Step], str] | None = None,
    lint_all: bool = False,
    rehearse_as: str | None = None,
    from_empty: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> Verdict:
    """The one validation of a database's scripts: ``dbagent validate`` and the worker before every migrate.

    The structure checks, the lint (of ``lint_only`` when given: a migrate lints what it is about to apply;
    from the database's ``lint_from`` baseline on unless ``lint_all``) and the checksums of the applied scripts.
    The worker passes its locked connection (``conn``) and the revision it read (``current``); without one the
    checksums are read on a connection of their own, and a database that cannot be read is a warning,
    ``checksums-unchecked``. ``rehearse_as`` (the database's name) rehearses the pending migrations on a
    scratch database too (``dbagent.checks.rehearse``), when the revision graph can be walked.
    BadInput for an unknown ``--allow`` rule or a ``lint_from`` that names no revision.
    """
    from dbagent.checks.validate import AUTO, detect_naming, load_sources

    allowed = check_allow(allow)
    sources = load_sources(db.migrations)
    naming = db.naming if db.naming != AUTO else detect_naming(sources)
    unchecked = None
    if conn is not None:
        recorded = store_checksums(conn)
    else:
        if migrator is None:
            # One parse of the scripts for the checksums and the lint; scripts Alembic refuses are said by both.
            try:
                migrator = Migrator(db.migrations, db.url)
            except Exception:  # noqa: BLE001 - a script's own code may raise anything
                migrator = None
        current, recorded, unchecked = _read_applied(db, migrator)
    lint_from = None if lint_all else db.lint_from
    found = findings(db.migrations, naming=naming, migrator=migrator, current=current, recorded=recorded,
                     lint_only=lint_only, render=render, lint_from=lint_from, sources=sources)
    if unchecked:
        found.append(finding(None, "checksums-unchecked", "warning", unchecked))
    rehearsal = None
    if rehearse_as is not None:
        # The rehearsal applies the scripts: it needs a graph Alembic can walk, nothing more.
        if any(f["rule"] in GRAPH_RULES and is_error(f) for f in found):
            found.append(finding(None, "rehearsal-skipped", "warning",
                                 "the rehearsal needs a revision graph Alembic can walk: fix the errors above first"))
        else:
            from dbagent.checks.rehearse import rehearse

            outcome = rehearse(rehearse_as, db, from_empty=from_empty, on_progress=on_progress)
            found += [f.to_json() for f in outcome.findings]
            rehearsal = outcome.to_json()
    return Verdict(found, allowed, naming=naming, lint_from=lint_from, rehearsal=rehearsal)


def store_checksums(conn: Connection) -> dict[str, dict[str, Any]]:
    from dbagent.postgres import store

    recorded = store.applied_checksums(conn)
    conn.commit()
    return recorded


def _read_applied(
    db: DatabaseSettings, migrator: Migrator | None
) -> tuple[str | None, dict[str, dict[str, Any]] | None, str | None]:
    """(current revision, recorded checksums, why they could not be read) on a connection of its own."""
    from sqlalchemy.exc import SQLAlchemyError

    from dbagent.postgres.connections import pg_connection

    if migrator is None:
        try:
            migrator = Migrator(db.migrations, db.url)
        except Exception as exc:  # noqa: BLE001 - scripts Alembic cannot load: the structure check says why
            return None, None, ("checksums of applied migrations not checked: Alembic cannot load the scripts"
                                f" ({type(exc).__name__})")
    try:
        with pg_connection(db, application_name="dbagent validate") as conn:
            current = migrator.current(conn)
            recorded = store_checksums(conn)
            return current, recorded, None
    except DbAgentError as exc:
        return None, None, f"checksums of applied migrations not checked: {exc.message}"
    except SQLAlchemyError as exc:
        return None, None, f"checksums of applied migrations not checked: {error_text(exc, one_line=True)}"
