"""The context an operation runs in: ``Run``, everything one command's execution works with.

The lifecycle (``dbagent.operations.lifecycle``) builds it on the worker; a test builds it without one
(``Run.for_test``: a real connection, any Redis client, fakeredis included). Every operation is a plain
function of a ``Run`` returning the command's result body.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Connection

from dbagent.bus.eventlog import EventLog
from dbagent.core.commands import (
    Command,
)
from dbagent.core.errors import (
    OperationFailed,
    Unavailable,
)
from dbagent.core.events import HOST, Event, EventType
from dbagent.core.lifecycle import STOP, Phase, StopRequest, pause_point
from dbagent.core.redact import redact
from dbagent.operations.journal import Journal, Presence
from dbagent.postgres import store
from dbagent.postgres.migrator import (
    Migrator,
    Step,
    find_ini,
    find_pyproject,
    version_directories,
)
from dbagent.settings import DatabaseSettings, Settings

log = logging.getLogger(__name__)


log = logging.getLogger(__name__)


def worker_name(db: str) -> str:
    return f"{db}@{HOST}:{os.getpid()}"


class Stopped(OperationFailed):
    """Raised when a worker told to stop ends its command before the next step (or lock, or retry)."""


@dataclass
class Run:
    """Everything one command's execution works with."""

    settings: Settings
    db_name: str
    db: DatabaseSettings
    command: Command
    conn: Connection
    journal: Journal
    redis: redis.Redis
    worker: str
    migrator: Migrator | None = None
    details: dict[str, Any] = field(default_factory=dict)
    stop: StopRequest = STOP
    presence: Presence | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    claimed: bool = False
    per_step: bool = True  # env.py's transaction_per_migration (read by _check_environment); else one for the plan
    _offline: dict[Step, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls, settings: Settings, db_name: str, command: Command, conn: Connection, client: redis.Redis, *,
        worker: str | None = None, stop: StopRequest = STOP, presence: Presence | None = None,
    ) -> Run:
        """A context for ``command`` on ``conn``: what the lifecycle builds, and what a test builds without a
        worker (any Redis client will do, fakeredis included; events go to the database's audit log and the
        stream). The caller has checked the command and holds whatever lock the operation needs."""
        db = settings.databases[db_name]
        journal = Journal(EventLog(client, settings.redis.prefix), settings.redis.prefix, db_name, command, db)
        journal.conn = conn
        return cls(settings, db_name, db, command, conn, journal, client, worker or worker_name(db_name),
                   stop=stop, presence=presence)

    def migrations(self) -> Migrator:
        if self.migrator is None:
            self.migrator = cached_migrator(self.db.migrations, self.db.url)
        return self.migrator

    def emit(self, type_: EventType, **data: Any) -> Event:
        return self.journal.emit(type_, **data)

    def phase(self, phase: Phase | None = None, *, persist: bool = True, soon: bool = False, **changes: Any) -> None:
        """Persist where a claimed command is, before it does it, for whoever finds it after a crash.

        ``persist=False``: only shown live (presence) and a pause point, not recorded; ``soon``: shown
        within ``journal.PUBLISH_EVERY_S``, coalesced with the updates that follow (``Presence.update``).
        """
        if phase is not None:
            changes["phase"] = phase.value
        if persist:
            self.plan.update(changes)
        if self.claimed and persist:
            command_id = self.command.id
            if not self.journal.record(
                lambda conn: store.update_plan(conn, command_id, changes, durable=False), what="the command's phase"
            ):
                raise Unavailable(f"could not record the phase of command {command_id} in PostgreSQL")
        if self.presence is not None and phase is not None:
            self.presence.update(soon=soon, phase=phase.value, step=changes.get("step"))
        if phase is not None:
            step = changes.get("step")
            pause_point(f"phase:{phase.value}" + (f":{step['number']}" if step else ""))

    def check_stop(self, before: str) -> None:
        if self.stop.is_set():
            raise Stopped(f"stopped before {before}: {self.stop.reason}", interrupted=True)

    def render_offline(self, plan: list[Step]) -> None:
        """Render a whole plan's offline SQL in one pass, for ``offline_sql`` to hand out."""
        try:
            self._offline.update(self.migrations().offline_sql_many([s for s in plan if s not in self._offline]))
        except Exception as exc:  # noqa: BLE001 - a script's own code may raise anything; step by step says which
            log.info("could not render the plan's SQL in one pass (%s); rendering step by step", redact(exc))

    def offline_sql(self, step: Step) -> str:
        """A step's SQL rendered offline, once per run (validation and the lock pre-check both read it)."""
        if step not in self._offline:
            self._offline[step] = self.migrations().offline_sql(step)
        return self._offline[step]


_migrators: dict[tuple[str, str], tuple[tuple, Migrator]] = {}


_migrators: dict[tuple[str, str], tuple[tuple, Migrator]] = {}
_migrators_lock = threading.Lock()


def cached_migrator(location: str, url: str) -> Migrator:
    """The scripts of a directory, parsed again only when a file in it changed."""
    root = Path(location)
    # The scripts where the project keeps them, and what configures them (env.py's version table, the
    # project's alembic.ini or pyproject.toml).
    directories, recursive = version_directories(root)
    scripts = [p for d in directories for p in (d.rglob("*.py") if recursive else d.glob("*.py"))]
    settings = (root / "env.py", find_ini(root), find_pyproject(root))
    files = [*scripts, *(f for f in settings if f is not None and f.is_file())]
    stamp = tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    with _migrators_lock:
        cached = _migrators.get((location, url))
        if cached is None or cached[0] != stamp:
            cached = (stamp, Migrator(location, url))
            _migrators[(location, url)] = cached
        return cached[1]


def base_result(command_id: str | None, type_: str | None, db: str) -> dict[str, Any]:
    return {"command_id": command_id, "type": type_, "db": db, "status": None, "error": None, "exit_code": None}


def current_revision(run: Run) -> str | None:
    """The database's revision as the operation starts: read at claim, under the lock, when it was claimed."""
    if run.claimed and run.plan.get("revision_before_known"):
        return run.plan.get("revision_before")
    return run.migrations().current(run.conn)


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
