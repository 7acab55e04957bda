"""Alembic, driven through its API on one dedicated connection.

A plan runs in one Alembic run (env.py loaded once), each step in its own
transaction (``transaction_per_migration``), so a failure leaves the database
at the last completed revision; or, where env.py leaves that setting off
(Alembic's default), the whole plan in one transaction, as plain Alembic runs
it. Between two steps, once the first has
committed, dbagent gets control back (``apply_many``'s ``before_step``): it
publishes the step's events, checks for a stop, and looks at the locks the
next step needs.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationStep
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import Connection

from dbagent.core.errors import BadInput
from dbagent.postgres.connections import sqlalchemy_url

BASE = "base"
HEAD = "head"
HEADS = "heads"
SEPARATOR = ","
RENDERED_PLANS = 8  # offline SQL of the latest plans, kept by each Migrator  # between the heads of a database that is at several revisions


def state_text(heads: Any) -> str | None:
    """A set of heads as text: None for none (base), one id, or several sorted and joined by a comma."""
    return SEPARATOR.join(sorted(heads)) if heads else None

OnVersionApply = Callable[..., None]

# Alembic's offline output opens each migration with this comment.
# A merge runs "from a, b"; undoing one runs "to a, b".
_RUNNING = re.compile(r"^-- Running (?P<direction>upgrade|downgrade) (?P<from>.*?) -> (?P<to>.*?)\s*$")


@dataclass(frozen=True)
class Step:
    """One migration to apply (up) or revert (down)."""

    revision: str
    down_revision: str | None
    description: str
    direction: str  # "up" | "down"
    parents: tuple[str, ...] = ()  # every down_revision: two or more for a merge

    @property
    def destination(self) -> str:
        """Where this revision's line is once the step is done: the revision (up), its parents (down; a merge's
        both, joined). The database's whole state after a plan is ``Migrator.state_after``."""
        return self.revision if self.direction == "up" else (state_text(self.parents) or BASE)

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "description": self.description, "direction": self.direction}


@dataclass(frozen=True)
class EnvFacts:
    """What the project's env.py configures that dbagent must honour, read by running it offline."""

    version_table: str = "alembic_version"
    version_table_schema: str | None = None
    transaction_per_migration: bool = False
    error: str | None = None  # env.py could not run offline: the defaults stand

    @property
    def qualified_version_table(self) -> str:
        return f"{self.version_table_schema}.{self.version_table}" if self.version_table_schema else self.version_table


# What env.py's run_migrations_online() needs to run on dbagent's connection: Alembic's own
# recipe ("Sharing a Connection across one or more programmatic migration commands").
ENV_CONTRACT = """\
    connectable = config.attributes.get("connection", None)
    if connectable is None:  # run by plain alembic: its own engine, as before
        connectable = engine_from_config(
            config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
        )
        with connectable.connect() as connection:
            do_run_migrations(connection)
    else:  # run by dbagent: the connection holding the database's lock and timeouts
        do_run_migrations(connectable)"""


class ForeignConnection(BadInput):
    """env.py configured Alembic with a connection other than the one dbagent passed."""


def find_ini(location: Path) -> Path | None:
    """The project's alembic.ini: beside env.py or one level up, if its script_location is this directory."""
    for candidate in (location / "alembic.ini", location.parent / "alembic.ini"):
        if not candidate.is_file():
            continue
        try:
            configured = Config(str(candidate)).get_main_option("script_location")
        except Exception:  # noqa: BLE001 - an ini that does not parse is not this project's
            continue
        if configured and (candidate.parent / configured).resolve() == location.resolve():
            return candidate
    return None


def find_pyproject(location: Path) -> Path | None:
    """The project's pyproject.toml (``alembic init -t pyproject``): beside env.py or one level up, if its
    ``[tool.alembic]`` script_location is this directory."""
    for candidate in (location / "pyproject.toml", location.parent / "pyproject.toml"):
        if not candidate.is_file():
            continue
        try:
            configured = Config(toml_file=str(candidate)).get_alembic_option("script_location")
        except Exception:  # noqa: BLE001 - a pyproject.toml that does not parse, or has no [tool.alembic]
            continue
        if configured and (candidate.parent / configured).resolve() == location.resolve():
            return candidate
    return None


def version_directories(location: str | Path) -> tuple[list[Path], bool]:
    """Where the project keeps its revision files: ``version_locations`` from its alembic.ini or pyproject.toml
    (default ``versions/``), and whether subdirectories count (``recursive_version_locations``). Loads no script."""
    location = Path(location)
    pyproject = find_pyproject(location)
    ini = find_ini(location)
    if ini is None and pyproject is not None and (pyproject.parent / "alembic.ini").is_file():
        ini = pyproject.parent / "alembic.ini"
    try:
        cfg = Config(file_=str(ini) if ini else None, toml_file=str(pyproject) if pyproject else None)
        cfg.set_main_option("script_location", str(location))
        listed = cfg.get_version_locations_list()
        recursive = bool(cfg.get_alembic_boolean_option("recursive_version_locations"))
    except Exception:  # noqa: BLE001 - settings that do not parse: Alembic's loading says why
        return [location / "versions"], False
    return ([Path(p) for p in listed] if listed else [location / "versions"]), recursive


class Migrator:
    """The migration scripts of one database and the operations on them.

    The project's own alembic.ini (``find_ini``) and pyproject.toml
    ``[tool.alembic]`` (``find_pyproject``) are read for its settings
    (``file_template``, ``version_locations``, ``path_separator``…), with
    dbagent's URL as ``sqlalchemy.url``: the URL in the ini is never used.
    What env.py configures (the version table) is read by running it offline
    once (``environment``).
    """

    def __init__(self, script_location: str | Path, url: str) -> None:
        location = Path(script_location)
        if not (location / "env.py").is_file():
            raise BadInput(f"{location}: not an Alembic script directory (no env.py)")
        self.location = location
        self.url = url
        self.pyproject = find_pyproject(location)
        self.ini = find_ini(location)
        if self.ini is None and self.pyproject is not None and (self.pyproject.parent / "alembic.ini").is_file():
            self.ini = self.pyproject.parent / "alembic.ini"  # beside [tool.alembic]: logging and the (unused) URL
        self.script = ScriptDirectory.from_config(self._config())
        self._facts: EnvFacts | None = None
        self._order: list[str] | None = None
        self._rendered: dict[tuple[Any, ...], dict[Step, str]] = {}
        self._checksums: dict[str, str] = {}
        self._sources: dict[str, bytes] = {}

    def _config(self, output_buffer: io.StringIO | None = None) -> Config:
        cfg = Config(
            file_=str(self.ini) if self.ini else None,
            toml_file=str(self.pyproject) if self.pyproject else None,
            output_buffer=output_buffer,
        )
        if self.ini is not None:
            cfg.file_config  # noqa: B018 - the project's settings are read now…
            cfg.config_file_name = None  # …and env.py's fileConfig() then leaves the worker's logging alone
        cfg.set_main_option("script_location", str(self.location))
        cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(self.url).replace("%", "%%"))
        cfg.attributes["url"] = self.url
        return cfg

    def environment(self) -> EnvFacts:
        """The version table (and schema) env.py configures, read once by running it offline."""
        if self._facts is None:
            seen: dict[str, Any] = {}

            def fn(rev: Any, context: Any) -> Any:
                seen.update(
                    version_table=context.version_table,
                    version_table_schema=context.version_table_schema,
                    transaction_per_migration=bool(context._transaction_per_migration),
                )
                return []

            try:
                with EnvironmentContext(self._config(io.StringIO()), self.script, fn=fn, as_sql=True):
                    self.script.run_env()
                self._facts = EnvFacts(**seen) if seen else EnvFacts(error="env.py did not run the migrations offline")
            except BaseException as exc:  # noqa: BLE001 - env.py is the project's code; SystemExit included
                self._facts = EnvFacts(error=f"{type(exc).__name__}: {exc}")
        return self._facts

    # -- the revision graph -------------------------------------------------
    #
    # A database's state is the set of its current heads: one revision, or
    # several between a branch point and its merge. As text (events, results,
    # ``--to``) several heads are their ids, sorted, joined by a comma.

    def heads(self) -> tuple[str, ...]:
        """The scripts' heads, sorted."""
        return tuple(sorted(self.script.get_heads()))

    def head(self) -> str | None:
        """Where ``migrate`` goes by default: the one head, or every head joined (``state_text``)."""
        return state_text(self.heads())

    def branch_points(self) -> list[str]:
        """Revisions with more than one child, oldest first."""
        return [r for r in self.order() if len(self._node(r).nextrev) > 1]

    def order(self) -> list[str]:
        """Every revision, oldest first, in the order ``alembic upgrade heads`` applies them from base."""
        if self._order is None:
            self._order = [step.revision.revision for step in self.script._upgrade_revs("heads", None)]
        return self._order

    def chain(self) -> list[Script]:
        """Every revision, oldest first (``order``)."""
        return [self.revision(rev) for rev in self.order()]

    def _node(self, rev: str) -> Script:
        return self.script.revision_map.get_revision(rev)  # type: ignore[return-value]

    def revision(self, rev: str) -> Script:
        try:
            script = self.script.get_revision(rev)
        except (CommandError, RevisionError, ValueError):
            script = None
        if script is None or rev in (BASE, HEAD, HEADS):
            known = self.order()
            span = f"{known[0]} … {known[-1]}" if known else "none"
            raise BadInput(f"unknown revision {rev!r} (known: {span})")
        return script

    def source(self, rev: str) -> bytes:
        """The file defining ``rev``, read once per Migrator (a worker builds a new Migrator when a file changes
        where the project keeps its scripts)."""
        data = self._sources.get(rev)
        if data is None:
            data = self._sources[rev] = Path(self.revision(rev).path).read_bytes()
        return data

    def checksum(self, rev: str) -> str:
        """The sha256 of the file defining ``rev`` (``source``): what a step records as applied."""
        digest = self._checksums.get(rev)
        if digest is None:
            digest = self._checksums[rev] = hashlib.sha256(self.source(rev)).hexdigest()
        return digest

    def resolve(self, target: str | None) -> tuple[str, ...]:
        """The heads a target names: ``base``; ``head``/``heads``; a revision (a unique prefix of one, or
        ``label@head``); several revisions joined by commas. An ancestor of another named revision adds nothing."""
        if target in (None, BASE, ""):
            return ()
        if target in (HEAD, HEADS):
            return self.heads()
        named: list[str] = []
        for part in (p.strip() for p in target.split(SEPARATOR)):
            if re.fullmatch(r"[+-]\d+", part):
                raise BadInput(
                    f"{part!r}: a relative target is not a revision; name the revision (rollback N counts steps)"
                )
            if part.endswith(("@head", "@heads")):
                try:
                    found = self.script.revision_map.get_revisions(part)
                except (CommandError, RevisionError, ValueError) as exc:
                    raise BadInput(f"unknown target {part!r}: {exc}") from None
                named += [r.revision for r in found if r is not None]
            else:
                named.append(self.revision(part).revision)
        return self.heads_of(self.ancestors(named))

    def _known_id(self, part: str) -> bool:
        return part in self.script.revision_map._revision_map  # type: ignore[operator]

    def state(self, current: str | None) -> tuple[str, ...]:
        """The heads of a state read from the database, each checked against these migrations."""
        heads = tuple(p for p in (current or "").split(SEPARATOR) if p)
        unknown = [h for h in heads if not self._known_id(h)]
        if unknown:
            raise BadInput(
                f"the database is at revision {', '.join(repr(u) for u in unknown)}, which these migrations do not contain"
            )
        return heads

    def ancestors(self, revisions: Any) -> set[str]:
        """The revisions given and every revision they need (down_revision and depends_on), as ids."""
        found: set[str] = set()
        todo = [r for r in revisions if r]
        while todo:
            rev = todo.pop()
            if rev in found:
                continue
            found.add(rev)
            todo.extend(self._node(rev)._all_down_revisions)
        return found

    def heads_of(self, applied: set[str]) -> tuple[str, ...]:
        """The revisions of an applied set that no other applied revision builds on: what the version table holds."""
        return tuple(sorted(r for r in applied if not (self._node(r).nextrev & applied)))

    def applied(self, current: str | None) -> list[str]:
        """The revisions a database at ``current`` has applied, oldest first."""
        done = self.ancestors(self.state(current))
        return [r for r in self.order() if r in done]

    def state_after(self, current: str | None, plan: list[Step]) -> str | None:
        """The state (``state_text``) a database at ``current`` is in once ``plan`` ran."""
        done = self.ancestors(self.state(current))
        for step in plan:
            if step.direction == "up":
                done.add(step.revision)
            else:
                done.discard(step.revision)
        return state_text(self.heads_of(done))

    def describe_state(self, current: str | None) -> str:
        return current.replace(SEPARATOR, ", ") if current else BASE

    @staticmethod
    def describe(script: Script) -> str:
        return (script.doc or "").strip().splitlines()[0] if script.doc else ""

    def _step(self, rev: str, direction: str) -> Step:
        script = self.revision(rev)
        down = script.down_revision
        parents = tuple(down) if isinstance(down, tuple | list) else ((down,) if down else ())
        return Step(script.revision, parents[0] if parents else None, self.describe(script), direction, parents)

    def upgrade_plan(self, current: str | None, target: str | None = None) -> list[Step]:
        """The steps from current up to target (default: every head), oldest first, as ``alembic upgrade`` orders them.

        ``target`` is a revision on any branch, or several (``resolve``): what it
        needs and the database lacks is applied; what else is applied stays.
        """
        applied = self.ancestors(self.state(current))
        wanted = self.heads() if target in (None, HEAD, HEADS) else self.resolve(target)
        todo = self.ancestors(wanted) - applied
        if not todo:
            below = [w for w in wanted if w not in self.heads_of(applied)]
            if below:
                raise BadInput(
                    f"target {target} is older than the current revision {self.describe_state(current)}:"
                    f" use rollback --to {target}"
                )
            return []
        return [self._step(rev, "up") for rev in self.order() if rev in todo]

    def downgrade_plan(self, current: str | None, *, steps: int | None = None, to: str | None = None) -> list[Step]:
        """The steps from current down, newest first.

        ``steps``: the N most recently applied revisions, walking down from the
        one current head (across a merge: undoing a merge leaves its parents);
        refused where the walk would have to choose between several heads.
        ``to``: the database ends at exactly that state (``resolve``): what
        the target does not need is undone, other branches included.
        """
        applied = self.ancestors(self.state(current))
        if steps is not None:
            if steps > len(applied):
                raise BadInput(f"cannot roll back {steps} step(s): only {len(applied)} migration(s) are applied")
            left, undo = set(applied), []
            for _ in range(steps):
                heads = self.heads_of(left)
                if len(heads) > 1:
                    raise BadInput(
                        f"rollback {steps} is ambiguous: after {len(undo)} step(s) the database would be at"
                        f" {len(heads)} revisions ({', '.join(heads)}) and dbagent does not pick the branch to undo"
                        " next; name where to go: rollback --to REV (REV1,REV2 keeps several branches)"
                    )
                undo.append(heads[0])
                left.discard(heads[0])
        else:
            wanted = self.resolve(to)
            below = [w for w in wanted if w not in applied]
            if below:
                raise BadInput(
                    f"target {', '.join(below)} is not below the current revision {self.describe_state(current)}:"
                    f" use migrate --to {to}"
                )
            keep = self.ancestors(wanted)
            # In the order Alembic undoes them on its way to base from this state.
            everything = self.script._downgrade_revs(BASE, self.state(current) or None)
            undo = [s.revision.revision for s in everything if s.revision.revision not in keep]
        return [self._step(rev, "down") for rev in undo]

    def _migration_step(self, step: Step) -> Any:
        """Alembic's own step object for one revision: the version table is kept by Alembic, branches included."""
        script = self.revision(step.revision)
        if step.direction == "up":
            return MigrationStep.upgrade_from_script(self.script.revision_map, script)
        return MigrationStep.downgrade_from_script(self.script.revision_map, script)

    # -- the database -------------------------------------------------------

    def current(self, conn: Connection) -> str | None:
        """The state the database is at (``state_text``; None: base), read on conn from env.py's version table,
        committed."""
        facts = self.environment()
        context = MigrationContext.configure(
            conn, opts={"version_table": facts.version_table, "version_table_schema": facts.version_table_schema}
        )
        heads = context.get_current_heads()
        conn.commit()
        return state_text(heads)

    def apply(
        self,
        conn: Connection,
        step: Step,
        on_version_apply: OnVersionApply | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        """Run one step on conn, in its own transaction, committed when this returns."""
        self.apply_many(conn, [step], on_version_apply, attributes)

    def apply_many(
        self,
        conn: Connection,
        steps: list[Step],
        on_version_apply: OnVersionApply | None = None,
        attributes: dict[str, Any] | None = None,
        before_step: Callable[[int], None] | None = None,
        per_step: bool = True,
    ) -> None:
        """Run steps on conn in one Alembic run, each in its own transaction, all committed when this returns.

        ``on_version_apply`` is called inside each step's transaction, after
        its version-table update (its writes commit with the step).
        ``before_step(k)`` is called once ``steps[:k]`` have committed and
        before ``steps[k]`` starts, outside any transaction of Alembic's (it
        may read and commit on conn); ``before_step(len(steps))`` once the
        last has committed. Whatever it raises ends the run there, with
        ``steps[:k]`` applied. ``attributes`` are handed to the scripts as
        ``context.config.attributes`` (``"dbagent.backfill"``, read by
        ``dbagent.backfill``).

        ``per_step=False``: as env.py configures it (``transaction_per_migration``
        off, Alembic's default), the whole plan is one transaction: a failure
        undoes every step, and ``before_step`` is called inside that
        transaction (it must not commit; what it raises undoes the plan).
        """
        if not steps:
            return
        if not per_step and conn.in_transaction():
            conn.commit()  # what the caller set (lock_timeout) is the session's, apart from the plan's transaction
        cfg = self._config()
        cfg.attributes.update(attributes or {})
        cfg.attributes["connection"] = conn
        cfg.attributes["on_version_apply"] = on_version_apply
        last = steps[-1]
        destination = last.revision if last.direction == "up" else (last.down_revision or BASE)  # one id, for env.py
        migrations = [self._migration_step(s) for s in steps]

        def each(context: Any) -> Any:
            for k, migration in enumerate(migrations):
                if per_step and k and context._transaction is None and conn.in_transaction():
                    conn.commit()  # env.py began a transaction of its own, which Alembic leaves alone: the step ends
                if before_step is not None:
                    before_step(k)
                yield migration
            if per_step and context._transaction is None and conn.in_transaction():
                conn.commit()
            if before_step is not None:
                before_step(len(migrations))

        def fn(rev: Any, context: Any) -> Any:
            # Called by env.py's run_migrations(), before any migration runs.
            _check_connection(context, conn)
            if on_version_apply is not None and on_version_apply not in context.on_version_apply_callbacks:
                # env.py did not pass it on: the change log still commits inside the step.
                context.on_version_apply_callbacks = (*context.on_version_apply_callbacks, on_version_apply)
            if per_step:
                # One transaction per step: a step that fails undoes itself alone, and what the steps before it
                # did stays committed (and recorded).
                context._transaction_per_migration = True
            return each(context)

        with EnvironmentContext(cfg, self.script, fn=fn, destination_rev=destination):
            self.script.run_env()
        if conn.in_transaction():
            conn.commit()

    def check_environment(self, conn: Connection) -> bool:
        """Run env.py online on conn with nothing to migrate: ForeignConnection if it configures Alembic with a
        connection of its own; rolled back. What ``env validate`` and every writer check before the first step.

        Returns whether env.py runs each migration in its own transaction (``transaction_per_migration``, as
        configured online: the run that migrates), else one transaction for the whole plan.
        """
        cfg = self._config()
        cfg.attributes["connection"] = conn
        per_migration: list[bool] = []

        def fn(rev: Any, context: Any) -> Any:
            _check_connection(context, conn)
            per_migration.append(bool(context._transaction_per_migration))
            return []

        try:
            with EnvironmentContext(cfg, self.script, fn=fn, dont_mutate=True):
                self.script.run_env()
        finally:
            if conn.in_transaction():
                conn.rollback()
        return per_migration[0] if per_migration else True

    def offline_sql_many(self, steps: list[Step], start: str | None | bool = False) -> dict[Step, str]:
        """The offline SQL of steps of one direction, rendered in one pass and split per step.

        Rendering step by step loads the environment once per step; a plan of
        many steps renders once. Each part reads as ``offline_sql`` of its step.
        ``start``: the state the plan starts from (default: what the steps need).
        """
        key = (tuple(steps), start)
        rendered = self._rendered.pop(key, None)
        if rendered is None:
            rendered = self._offline_sql_many(steps, start)
        self._rendered[key] = rendered  # the latest plans (migrate, rollback, migrate…): a worker renders them again
        while len(self._rendered) > RENDERED_PLANS:
            del self._rendered[next(iter(self._rendered))]
        return dict(rendered)

    def _offline_sql_many(self, steps: list[Step], start: str | None | bool) -> dict[Step, str]:
        if len(steps) < 2 or len({s.direction for s in steps}) > 1:
            return {s: self.offline_sql(s) for s in steps}
        lines = self._render(steps, start).splitlines(keepends=True)
        starts: list[tuple[int, str]] = []
        for i, line in enumerate(lines):
            match = _RUNNING.match(line)
            if match:
                begin = i
                j = i - 1
                while j >= 0 and not lines[j].strip():
                    j -= 1
                if j >= 0 and lines[j].strip() == "BEGIN;":
                    begin = j
                revision = match["to"] if match["direction"] == "upgrade" else match["from"]
                starts.append((begin, revision))
        by_revision = {rev: "".join(lines[(0 if k == 0 else begin) : (starts[k + 1][0] if k + 1 < len(starts) else len(lines))])
                       for k, (begin, rev) in enumerate(starts)}
        if sorted(by_revision) != sorted(s.revision for s in steps):  # not the shape expected: render one by one
            return {s: self.offline_sql(s) for s in steps}
        return {s: by_revision[s.revision] for s in steps}

    def offline_sql(self, step: Step) -> str:
        """The SQL one step would run, rendered without touching the database."""
        return self._render([step], False)

    def _render(self, steps: list[Step], start: str | None | bool) -> str:
        """Alembic's offline SQL of exactly these steps, from ``start`` (False: the heads the steps need)."""
        if start is False:
            if steps[0].direction == "up":
                # A merge starts from all of its parents: from one alone, the other branch would render with it.
                before = self.ancestors(p for s in steps for p in s.parents) - {s.revision for s in steps}
            else:
                before = self.ancestors(s.revision for s in steps)
            heads: Any = self.heads_of(before)
        else:
            heads = self.state(start)  # type: ignore[arg-type]
        migrations = [self._migration_step(s) for s in steps]
        buffer = io.StringIO()

        def fn(rev: Any, context: Any) -> Any:
            return migrations

        with EnvironmentContext(
            self._config(buffer), self.script, fn=fn, as_sql=True, starting_rev=heads or None,
            destination_rev=steps[-1].revision,
        ):
            self.script.run_env()
        return buffer.getvalue()


def _check_connection(context: Any, conn: Connection) -> None:
    """Refuse, before any migration runs, an env.py that migrates on a connection other than dbagent's."""
    theirs = getattr(context, "connection", None)
    if theirs is conn:
        return
    same = False
    try:
        same = theirs is not None and theirs.connection.dbapi_connection is conn.connection.dbapi_connection
    except Exception:  # noqa: BLE001 - not a SQLAlchemy connection at all
        same = False
    if not same:
        raise ForeignConnection(
            "env.py ran the migrations on a connection of its own, not on the one dbagent passes in"
            ' config.attributes["connection"] (which holds the database\'s advisory lock, lock_timeout and'
            " statement_timeout): nothing was migrated. In env.py's run_migrations_online(), use it when it"
            " is there:\n" + ENV_CONTRACT
        )
