"""Alembic, driven through its API on one dedicated connection, one step at a time.

Each step runs in its own transaction (``transaction_per_migration``), so a
failure leaves the database at the last completed revision. Running steps one
by one lets dbagent publish a step's event only once its transaction committed.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection

from agent.connections import sqlalchemy_url
from agent.errors import BadInput

BASE = "base"
HEAD = "head"

OnVersionApply = Callable[..., None]

# Alembic's offline output opens each migration with this comment.
_RUNNING = re.compile(r"^-- Running (?P<direction>upgrade|downgrade) (?P<from>\S*) -> (?P<to>\S*)\s*$")


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
        """The revision the database is at once the step is done."""
        return self.revision if self.direction == "up" else (self.down_revision or BASE)

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


class Migrator:
    """The migration scripts of one database and the operations on them.

    The project's own alembic.ini (``find_ini``) is read for its settings
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
        self.ini = find_ini(location)
        self.script = ScriptDirectory.from_config(self._config())
        self._facts: EnvFacts | None = None

    def _config(self, output_buffer: io.StringIO | None = None) -> Config:
        cfg = Config(file_=str(self.ini) if self.ini else None, output_buffer=output_buffer)
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

    def head(self) -> str | None:
        heads = self.script.get_heads()
        if len(heads) > 1:
            raise BadInput(f"the migrations have several heads ({', '.join(sorted(heads))}): merge them first")
        return heads[0] if heads else None

    def chain(self) -> list[Script]:
        """Every revision, oldest first."""
        return list(reversed(list(self.script.walk_revisions(BASE, HEAD))))

    def revision(self, rev: str) -> Script:
        try:
            script = self.script.get_revision(rev)
        except CommandError:
            script = None
        if script is None or rev in (BASE, HEAD):
            known = [s.revision for s in self.chain()]
            span = f"{known[0]} … {known[-1]}" if known else "none"
            raise BadInput(f"unknown revision {rev!r} (known: {span})")
        return script

    @staticmethod
    def describe(script: Script) -> str:
        return (script.doc or "").strip().splitlines()[0] if script.doc else ""

    def _step(self, script: Script, direction: str) -> Step:
        down = script.down_revision
        parents = tuple(down) if isinstance(down, tuple | list) else ((down,) if down else ())
        return Step(script.revision, parents[0] if parents else None, self.describe(script), direction, parents)

    def upgrade_plan(self, current: str | None, target: str | None = None) -> list[Step]:
        """The steps from current up to target (default: head), oldest first."""
        target = self.head() if target in (None, HEAD) else self.revision(target).revision
        if target is None:
            return []
        order = [s.revision for s in self.chain()]
        if current is not None and current not in order:
            raise BadInput(f"the database is at revision {current!r}, which these migrations do not contain")
        at = order.index(current) + 1 if current is not None else 0
        end = order.index(target) + 1
        if end < at:
            raise BadInput(
                f"target {target} is older than the current revision {current}: use rollback --to {target}"
            )
        return [self._step(self.revision(rev), "up") for rev in order[at:end]]

    def downgrade_plan(self, current: str | None, *, steps: int | None = None, to: str | None = None) -> list[Step]:
        """The steps from current down to a target, newest first."""
        order = [s.revision for s in self.chain()]
        if current is None:
            applied: list[str] = []
        elif current not in order:
            raise BadInput(f"the database is at revision {current!r}, which these migrations do not contain")
        else:
            applied = order[: order.index(current) + 1]
        if steps is not None:
            if steps > len(applied):
                raise BadInput(
                    f"cannot roll back {steps} step(s): only {len(applied)} migration(s) are applied"
                )
            undo = applied[len(applied) - steps :]
        else:
            if to in (None, BASE):
                undo = applied
            else:
                target = self.revision(to).revision
                if target not in applied:
                    raise BadInput(
                        f"target {target} is not below the current revision {current}: use migrate --to {target}"
                    )
                undo = applied[applied.index(target) + 1 :]
        return [self._step(self.revision(rev), "down") for rev in reversed(undo)]

    # -- the database -------------------------------------------------------

    def current(self, conn: Connection) -> str | None:
        """The revision the database is at (None: base), read on conn from env.py's version table, committed."""
        facts = self.environment()
        context = MigrationContext.configure(
            conn, opts={"version_table": facts.version_table, "version_table_schema": facts.version_table_schema}
        )
        heads = context.get_current_heads()
        conn.commit()
        if len(heads) > 1:
            raise BadInput(f"the database has several current revisions: {', '.join(heads)}")
        return heads[0] if heads else None

    def apply(
        self,
        conn: Connection,
        step: Step,
        on_version_apply: OnVersionApply | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        """Run one step on conn, in its own transaction, committed when this returns.

        ``attributes`` are handed to the scripts as ``context.config.attributes``
        (for instance ``"dbagent.backfill"``, read by ``agent.backfill``).
        """
        cfg = self._config()
        cfg.attributes.update(attributes or {})
        cfg.attributes["connection"] = conn
        cfg.attributes["on_version_apply"] = on_version_apply
        destination = step.destination

        def fn(rev: Any, context: Any) -> Any:
            # Called by env.py's run_migrations(), before any migration runs.
            _check_connection(context, conn)
            if on_version_apply is not None and on_version_apply not in context.on_version_apply_callbacks:
                # env.py did not pass it on: the change log still commits inside the step.
                context.on_version_apply_callbacks = (*context.on_version_apply_callbacks, on_version_apply)
            if step.direction == "up":
                return self.script._upgrade_revs(destination, rev)
            return self.script._downgrade_revs(destination, rev)

        with EnvironmentContext(cfg, self.script, fn=fn, destination_rev=destination):
            self.script.run_env()
        if conn.in_transaction():
            conn.commit()

    def check_environment(self, conn: Connection) -> None:
        """Run env.py online on conn with nothing to migrate: ForeignConnection if it configures Alembic with a
        connection of its own; committed. What ``env validate`` and every writer check before the first step."""
        cfg = self._config()
        cfg.attributes["connection"] = conn

        def fn(rev: Any, context: Any) -> Any:
            _check_connection(context, conn)
            return []

        try:
            with EnvironmentContext(cfg, self.script, fn=fn, dont_mutate=True):
                self.script.run_env()
        finally:
            if conn.in_transaction():
                conn.rollback()

    def offline_sql_many(self, steps: list[Step]) -> dict[Step, str]:
        """The offline SQL of consecutive steps (one direction), rendered in one pass and split per step.

        Rendering step by step loads the environment once per step; a plan of
        many steps renders once. Each part reads as ``offline_sql`` of its step.
        """
        if len(steps) < 2 or len({s.direction for s in steps}) > 1:
            return {s: self.offline_sql(s) for s in steps}
        first, last = steps[0], steps[-1]
        combined = Step(last.revision, first.down_revision, "", "up") if first.direction == "up" else Step(
            first.revision, last.down_revision, "", "down"
        )
        lines = self.offline_sql(combined).splitlines(keepends=True)
        starts: list[tuple[int, str]] = []
        for i, line in enumerate(lines):
            match = _RUNNING.match(line)
            if match:
                start = i
                j = i - 1
                while j >= 0 and not lines[j].strip():
                    j -= 1
                if j >= 0 and lines[j].strip() == "BEGIN;":
                    start = j
                revision = match["to"] if match["direction"] == "upgrade" else match["from"]
                starts.append((start, revision))
        by_revision = {rev: "".join(lines[(0 if k == 0 else start) : (starts[k + 1][0] if k + 1 < len(starts) else len(lines))])
                       for k, (start, rev) in enumerate(starts)}
        if sorted(by_revision) != sorted(s.revision for s in steps):  # not the shape expected: render one by one
            return {s: self.offline_sql(s) for s in steps}
        return {s: by_revision[s.revision] for s in steps}

    def offline_sql(self, step: Step) -> str:
        """The SQL one step would run, rendered without touching the database."""
        buffer = io.StringIO()
        cfg = self._config(buffer)
        if step.direction == "up":
            # A merge starts from all of its parents: from one alone, the other branch would render with it.
            start: Any = step.parents if len(step.parents) > 1 else step.down_revision
            destination = step.revision

            def fn(rev: Any, context: Any) -> Any:
                return self.script._upgrade_revs(destination, rev)
        else:
            start, destination = step.revision, step.destination

            def fn(rev: Any, context: Any) -> Any:
                return self.script._downgrade_revs(destination, rev)

        with EnvironmentContext(
            cfg, self.script, fn=fn, as_sql=True, starting_rev=start, destination_rev=destination
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
