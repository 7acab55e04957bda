"""dbagent's own tables, in schema ``dbagent`` of each target database.

* ``commands``: every command id a worker has seen (at most once per id), its
  lifecycle state, plan and result (``dbagent.core.lifecycle``);
* ``audit_log``: the durable record of every event (the stream's source of truth);
  an entry the stream missed (Redis was down) is marked ``unpublished`` until
  the worker's relay re-publishes it;
* ``changelog``: one row per migration step applied or reverted;
* ``fencing_token``: the sequence issuing writer fencing tokens (monotonic
  across Redis restarts: the advisory lock, not Redis, is the authority);
* ``backfills``: the progress of each batched backfill (``dbagent.backfill``), created by the first one.

This module is the only one with SQL on the ``dbagent`` schema: the worker's, the agent's (the audit
sink's batches, the lookups of the rollback trigger, ``dbagent events``) and the backfills'.

All functions take the SQLAlchemy connection to write through, so a caller
can put them in the same transaction as the change they describe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from dbagent.core.commands import Command, CommandStatus
from dbagent.core.events import Event
from dbagent.core.lifecycle import TERMINAL, State, sources

SCHEMA = "dbagent"

# Bumped whenever DDL changes; kept as the schema's comment, so one catalog read tells whether to bootstrap.
SCHEMA_VERSION = "dbagent schema 5"

# A command's own advisory lock, held by the session executing it: free exactly when that session is gone.
COMMAND_LOCK = "hashtextextended('dbagent:command:' || %s, 0)"

# Serialises concurrent bootstraps of the schema (CREATE ... IF NOT EXISTS races on pg_type).
_BOOTSTRAP_LOCK = "hashtextextended('dbagent:bootstrap', 0)"

DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};

CREATE TABLE IF NOT EXISTS {SCHEMA}.commands (
    id           text PRIMARY KEY,
    type         text NOT NULL,
    db           text NOT NULL,
    args         jsonb NOT NULL DEFAULT '{{}}',
    actor        text,
    ticket       text,
    issued_at    timestamptz,
    received_at  timestamptz NOT NULL DEFAULT now(),
    status       text NOT NULL,
    worker       text,
    plan         jsonb,
    result       jsonb,
    started_at   timestamptz,
    finished_at  timestamptz
);

CREATE TABLE IF NOT EXISTS {SCHEMA}.audit_log (
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    id          text PRIMARY KEY,
    ts          timestamptz NOT NULL,
    type        text NOT NULL,
    db          text NOT NULL,
    command_id  text,
    actor       text,
    ticket      text,
    host        text,
    data        jsonb NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS audit_log_seq ON {SCHEMA}.audit_log (seq);

CREATE TABLE IF NOT EXISTS {SCHEMA}.changelog (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id   text,
    revision     text NOT NULL,
    description  text,
    direction    text NOT NULL CHECK (direction IN ('up', 'down')),
    actor        text,
    ticket       text,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    duration_ms  integer,
    outcome      text NOT NULL CHECK (outcome IN ('applied', 'reverted', 'failed')),
    error        text
);
-- sha256 of the script file an applied step ran (validate: applied-migration-changed)
ALTER TABLE {SCHEMA}.changelog ADD COLUMN IF NOT EXISTS checksum text;

-- when the result reached Redis (NULL: not yet; the worker's relay re-publishes it)
ALTER TABLE {SCHEMA}.commands ADD COLUMN IF NOT EXISTS published_at timestamptz;
CREATE INDEX IF NOT EXISTS commands_open ON {SCHEMA}.commands (received_at)
    WHERE status IN ('accepted', 'claimed', 'running');
CREATE INDEX IF NOT EXISTS commands_unpublished ON {SCHEMA}.commands (finished_at)
    WHERE published_at IS NULL AND finished_at IS NOT NULL;

ALTER TABLE {SCHEMA}.audit_log ADD COLUMN IF NOT EXISTS unpublished boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS audit_log_unpublished ON {SCHEMA}.audit_log (seq) WHERE unpublished;

CREATE SEQUENCE IF NOT EXISTS {SCHEMA}.fencing_token;

-- how many steps of the plan have committed, beside the plan (whose list of steps it would rewrite
-- at every step); read back as the plan's steps_done (_with_steps_done)
ALTER TABLE {SCHEMA}.commands ADD COLUMN IF NOT EXISTS steps_done integer;

-- The audit trail's readers, each with the index its query walks (recent_events, last_changing_migrate,
-- recorded_start): the newest entries, a command's own, the last run that changed something. At millions of
-- rows each is an index range read of what it returns (tests/integration/test_store_indexes.py, bench_audit).
CREATE INDEX IF NOT EXISTS audit_log_ts ON {SCHEMA}.audit_log (ts, seq);
CREATE INDEX IF NOT EXISTS audit_log_command_ts ON {SCHEMA}.audit_log (command_id, ts, seq);
DROP INDEX IF EXISTS {SCHEMA}.audit_log_command;
CREATE INDEX IF NOT EXISTS audit_log_completed_runs ON {SCHEMA}.audit_log (ts, seq) WHERE type = 'migration.completed';

COMMENT ON SCHEMA {SCHEMA} IS '{SCHEMA_VERSION}';
"""


def bootstrap(conn: Connection) -> None:
    """Create dbagent's schema and tables if they are missing, and commit."""
    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_BOOTSTRAP_LOCK})")
    conn.exec_driver_sql(DDL)
    conn.commit()


# The changelog as of the checksums (validate: applied-migration-changed); false before dbagent ran here.
_CHECKSUMS_KEPT = (
    f"EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('{SCHEMA}.changelog')"
    " AND attname = 'checksum' AND NOT attisdropped)"
)

# True when the schema is there at this version: the one test of "present" (here and in dbagent.reactor.audit).
SCHEMA_CURRENT = (
    f"SELECT coalesce(obj_description(to_regnamespace('{SCHEMA}'), 'pg_namespace') = '{SCHEMA_VERSION}', false)"
)


def ensure_schema(conn: Connection) -> None:
    """Bootstrap unless dbagent's schema is there at this version (one catalog query when it is)."""
    present = conn.exec_driver_sql(SCHEMA_CURRENT).scalar()
    conn.commit()
    if not present:
        bootstrap(conn)


def insert_event(conn: Connection, event: Event) -> None:
    """Write an event to the audit log; an id already there is left as it is."""
    conn.execute(
        text(
            f"INSERT INTO {SCHEMA}.audit_log (id, ts, type, db, command_id, actor, ticket, host, data)"
            " VALUES (:id, :ts, :type, :db, :command_id, :actor, :ticket, :host, CAST(:data AS jsonb))"
            " ON CONFLICT (id) DO NOTHING"
        ),
        {**event.model_dump(exclude={"data"}), "data": json.dumps(event.data, default=str)},
    )


def record_command(conn: Connection, command: Command, worker: str) -> bool:
    """Record a command id before acting on it; False when the id was seen before."""
    row = conn.execute(
        text(
            f"INSERT INTO {SCHEMA}.commands (id, type, db, args, actor, ticket, issued_at, status, worker)"
            " VALUES (:id, :type, :db, CAST(:args AS jsonb), :actor, :ticket, :issued_at, :status, :worker)"
            " ON CONFLICT (id) DO NOTHING RETURNING id"
        ),
        {
            "id": command.id,
            "type": str(command.type),
            "db": command.db,
            "args": json.dumps(command.args),
            "actor": command.actor,
            "ticket": command.ticket,
            "issued_at": command.issued_at,
            "status": CommandStatus.ACCEPTED.value,
            "worker": worker,
        },
    ).first()
    return row is not None


def command_row(conn: Connection, command_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        text(f"SELECT * FROM {SCHEMA}.commands WHERE id = :id"), {"id": command_id}
    ).mappings().first()
    return _with_steps_done(row) if row else None


def _with_steps_done(row: Any) -> dict[str, Any]:
    """A commands row as callers know it: its ``steps_done`` column is the plan's ``steps_done``."""
    found = dict(row)
    done = found.pop("steps_done", None)
    if done is not None and found.get("plan") is not None:
        found["plan"] = {**found["plan"], "steps_done": done}
    return found


def _states(target: State) -> str:
    return ", ".join(f"'{state.value}'" for state in sorted(sources(target)))


def claim_command(conn: Connection, command_id: str, worker: str, plan: dict[str, Any]) -> bool:
    """Move an accepted command to claimed with its plan; False when another attempt already claimed it."""
    row = conn.execute(
        text(
            f"UPDATE {SCHEMA}.commands SET status = 'claimed', worker = :worker, plan = CAST(:plan AS jsonb),"
            f" started_at = now() WHERE id = :id AND status IN ({_states(State.CLAIMED)}) RETURNING id"
        ),
        {"id": command_id, "worker": worker, "plan": json.dumps(plan, default=str)},
    ).first()
    return row is not None


def _asynchronous_commit(conn: Connection) -> None:
    """This transaction's commit does not wait for the WAL flush: for records that only say where
    things are (a phase, a published mark), where losing the last one to a server crash misleads no one."""
    conn.exec_driver_sql("SET LOCAL synchronous_commit = off")


def update_plan(conn: Connection, command_id: str, changes: dict[str, Any], *, durable: bool = True) -> None:
    """Merge ``changes`` into a claimed command's plan; a phase past ``claimed`` makes it running.

    ``durable=False`` for a transaction of its own that records only the phase.
    """
    running = changes.get("phase") not in (None, "claimed")
    if not durable:
        _asynchronous_commit(conn)
    conn.execute(
        text(
            f"UPDATE {SCHEMA}.commands SET plan = coalesce(plan, '{{}}'::jsonb) || CAST(:changes AS jsonb),"
            f" status = CASE WHEN :running THEN 'running' ELSE status END,"
            f" steps_done = CASE WHEN :counted THEN CAST(:steps_done AS integer) ELSE steps_done END"
            f" WHERE id = :id AND status IN ({_states(State.RUNNING)})"
        ),
        {"id": command_id, "changes": json.dumps(changes, default=str), "running": running,
         "counted": "steps_done" in changes, "steps_done": changes.get("steps_done")},
    )


def finish_command(conn: Connection, command_id: str, status: str, result: dict[str, Any]) -> bool:
    """Record a command's terminal state and result; False when it had one already (never overwritten).

    It is marked published at once: the publisher un-marks it (``mark_unpublished_result``)
    when Redis refuses the result, so a healthy run costs no second write. (A worker dying
    between the two leaves it marked; its producer then reads the outcome from here.)
    """
    row = conn.execute(
        text(
            f"UPDATE {SCHEMA}.commands SET status = :status, result = CAST(:result AS jsonb),"
            f" finished_at = now(), published_at = now() WHERE id = :id AND status IN ({_states(State(status))})"
            " RETURNING id"
        ),
        {"id": command_id, "status": status, "result": json.dumps(result, default=str)},
    ).first()
    return row is not None


def mark_unpublished_result(conn: Connection, command_id: str) -> None:
    """Redis did not take the result: the relay publishes it once Redis is back."""
    conn.execute(text(f"UPDATE {SCHEMA}.commands SET published_at = NULL WHERE id = :id"), {"id": command_id})


def mark_published(conn: Connection, command_ids: list[str]) -> None:
    """Note that the results reached Redis (in a transaction of their own)."""
    _asynchronous_commit(conn)
    conn.execute(
        text(f"UPDATE {SCHEMA}.commands SET published_at = now() WHERE id = ANY(:ids) AND finished_at IS NOT NULL"),
        {"ids": command_ids},
    )


def unpublished_results(conn: Connection, newer_than_s: float, limit: int = 100) -> list[dict[str, Any]]:
    """Finished commands whose result never reached Redis (it was down), oldest first."""
    rows = conn.execute(
        text(
            f"SELECT id, status, result FROM {SCHEMA}.commands WHERE published_at IS NULL AND finished_at IS NOT NULL"
            " AND finished_at > now() - make_interval(secs => :age) ORDER BY finished_at LIMIT :limit"
        ),
        {"age": newer_than_s, "limit": limit},
    ).mappings()
    return [_with_steps_done(row) for row in rows]


def open_commands(conn: Connection) -> list[dict[str, Any]]:
    """Commands not yet terminal (accepted, claimed, running), oldest first."""
    rows = conn.execute(
        text(
            f"SELECT * FROM {SCHEMA}.commands WHERE status IN ('accepted', 'claimed', 'running') ORDER BY received_at"
        )
    ).mappings()
    return [_with_steps_done(row) for row in rows]


RECORDED_START = (
    f"SELECT c.plan, s.data FROM {SCHEMA}.commands c LEFT JOIN LATERAL (SELECT data FROM {SCHEMA}.audit_log"
    " WHERE command_id = c.id AND type = 'migration.started' ORDER BY ts, seq LIMIT 1) s ON true WHERE c.id = :id"
)


def recorded_start(conn: Connection, command_id: str) -> tuple[bool, str | None]:
    """Where a migrate run started, as recorded: (known, revision; None is base).

    From the plan persisted at its claim; for a run from before plans held it,
    from its ``migration.started`` event (written before its first step).
    """
    row = conn.execute(text(RECORDED_START), {"id": command_id}).first()
    if row is None:
        return False, None
    plan, started = row[0] or {}, row[1]
    if plan.get("revision_before_known"):
        return True, plan.get("revision_before")
    if started is not None and "revision_before" in started:
        return True, started["revision_before"]
    return False, None


def try_command_lock(conn: Connection, command_id: str) -> bool:
    """Take a command's own advisory lock (session level); False while a live session holds it."""
    return bool(
        conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({COMMAND_LOCK})", (command_id,)).scalar()
    )


def release_command_lock(conn: Connection, command_id: str) -> None:
    conn.exec_driver_sql(f"SELECT pg_advisory_unlock({COMMAND_LOCK})", (command_id,))


def command_outcome(conn: Connection, command_id: str) -> dict[str, Any] | None:
    """The result of a finished command, as its producer reads it; None while it is not finished."""
    row = conn.execute(
        text(f"SELECT status, result FROM {SCHEMA}.commands WHERE id = :id"), {"id": command_id}
    ).first()
    if row is None or row[0] not in {s.value for s in TERMINAL}:
        return None
    return row[1]


def mark_unpublished(conn: Connection, event_ids: list[str]) -> None:
    """Remember events the stream did not take, to publish them once Redis is back."""
    conn.execute(text(f"UPDATE {SCHEMA}.audit_log SET unpublished = true WHERE id = ANY(:ids)"), {"ids": event_ids})


def unpublished_events(conn: Connection, limit: int = 500) -> list[Event]:
    rows = conn.execute(
        text(
            f"SELECT id, ts, type, db, command_id, actor, ticket, host, data FROM {SCHEMA}.audit_log"
            " WHERE unpublished ORDER BY seq LIMIT :limit"
        ),
        {"limit": limit},
    ).all()
    return [
        Event(id=r[0], ts=r[1], type=r[2], db=r[3], command_id=r[4], actor=r[5], ticket=r[6], host=r[7] or "",
              data=r[8] or {})
        for r in rows
    ]


def mark_published_events(conn: Connection, event_ids: list[str]) -> None:
    conn.execute(text(f"UPDATE {SCHEMA}.audit_log SET unpublished = false WHERE id = ANY(:ids)"), {"ids": event_ids})


def next_fencing_token(conn: Connection) -> int:
    """A fencing token larger than every one issued before on this database, Redis restarts or not."""
    return int(conn.exec_driver_sql(f"SELECT nextval('{SCHEMA}.fencing_token')").scalar() or 0)


_CHANGELOG_COLUMNS = (
    "command_id, revision, description, direction, actor, ticket, started_at, finished_at, duration_ms, outcome,"
    " error, checksum"
)
_CHANGELOG_INSERT = (
    f"INSERT INTO {SCHEMA}.changelog ({_CHANGELOG_COLUMNS})"
    f" VALUES ({', '.join(':' + column.strip() for column in _CHANGELOG_COLUMNS.split(','))})"
)


def changelog_row(
    command: Command,
    revision: str,
    description: str | None,
    direction: str,
    started_at: datetime,
    finished_at: datetime | None,
    outcome: str,
    error: str | None,
    checksum: str | None,
) -> dict[str, Any]:
    duration_ms = (
        round((finished_at - started_at).total_seconds() * 1000) if finished_at is not None else None
    )
    return {
        "command_id": command.id,
        "revision": revision,
        "description": description,
        "direction": direction,
        "actor": command.actor,
        "ticket": command.ticket,
        "started_at": started_at,
        "finished_at": finished_at,
        "checksum": checksum,
        "duration_ms": duration_ms,
        "outcome": outcome,
        "error": error,
    }


def insert_changelog(conn: Connection, row: dict[str, Any]) -> None:
    """One change-log row (``changelog_row``), in the caller's transaction."""
    conn.execute(text(_CHANGELOG_INSERT), row)


_EVENT_COLUMNS = "id, ts, type, db, command_id, actor, ticket, host, data"

# Built once: a plan of many steps runs it once per step (or once per batch of them). The rows come as one
# jsonb array each, in order ("ord": the change log's ids and the audit log's seq follow the plan).
_RECORD_STEPS = text(
    f"WITH logged AS (INSERT INTO {SCHEMA}.changelog ({_CHANGELOG_COLUMNS}) SELECT {_CHANGELOG_COLUMNS}"
    " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(ord integer, command_id text, revision text, description text,"
    " direction text, actor text, ticket text, started_at timestamptz, finished_at timestamptz, duration_ms integer,"
    " outcome text, error text, checksum text) ORDER BY ord),"
    f" planned AS (UPDATE {SCHEMA}.commands SET steps_done = CAST(:steps_done AS integer), status = 'running'"
    f" WHERE id = :plan_of AND status IN ({_states(State.RUNNING)}))"
    f" INSERT INTO {SCHEMA}.audit_log ({_EVENT_COLUMNS}) SELECT {_EVENT_COLUMNS}"
    " FROM jsonb_to_recordset(CAST(:events AS jsonb)) AS e(ord integer, id text, ts timestamptz, type text, db text,"
    " command_id text, actor text, ticket text, host text, data jsonb) ORDER BY ord ON CONFLICT (id) DO NOTHING"
)


@dataclass(frozen=True)
class StepRecord:
    """What one applied step leaves: its change-log row and its event (``record_steps``)."""

    row: dict[str, Any]
    event: Event


def step_record(
    *,
    command: Command,
    revision: str,
    description: str | None,
    direction: str,
    started_at: datetime,
    finished_at: datetime,
    outcome: str,
    checksum: str | None,
    event: Event,
) -> StepRecord:
    return StepRecord(changelog_row(command, revision, description, direction, started_at, finished_at, outcome, None,
                                     checksum), event)


def record_steps(conn: Connection, records: list[StepRecord], *, command_id: str, steps_done: int | None) -> None:
    """What applied steps leave, inside the transaction they ran in, in one statement: their change-log rows and
    events in the audit log, in order, and the claimed command's ``steps_done`` (None: not claimed)."""
    if not records:
        return
    rows = [{"ord": i, **r.row} for i, r in enumerate(records)]
    events = [{"ord": i, **r.event.model_dump(exclude={"data"}), "data": r.event.data} for i, r in enumerate(records)]
    conn.execute(
        _RECORD_STEPS,
        {
            "rows": json.dumps(rows, default=str),
            "events": json.dumps(events, default=str),
            "steps_done": steps_done,
            "plan_of": command_id if steps_done is not None else None,
        },
    )


def applied_checksums(conn: Connection) -> dict[str, dict[str, Any]]:
    """Per revision, the checksum recorded when it was last applied (and when, by whom); {} before dbagent ran here."""
    if not conn.exec_driver_sql(f"SELECT {_CHECKSUMS_KEPT}").scalar():
        return {}
    rows = conn.execute(
        text(
            f"SELECT DISTINCT ON (revision) revision, checksum, finished_at, actor FROM {SCHEMA}.changelog"
            " WHERE direction = 'up' AND outcome = 'applied' ORDER BY revision, id DESC"
        )
    ).mappings()
    return {row["revision"]: dict(row) for row in rows}


CHANGELOG_NEWEST = f"SELECT * FROM (SELECT * FROM {SCHEMA}.changelog ORDER BY id DESC LIMIT :limit) newest ORDER BY id"


def changelog(conn: Connection, limit: int) -> list[dict[str, Any]]:
    """The newest change-log entries, oldest first."""
    rows = conn.execute(text(CHANGELOG_NEWEST), {"limit": limit}).mappings()
    return [_with_steps_done(row) for row in rows]


# -- the audit trail as the agent writes and reads it --------------------------------

# A batch goes in by COPY into a session-private staging table, then one idempotent INSERT.
_AUDIT_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS audit_in (id text, ts timestamptz, type text, db text, command_id text,"
    " actor text, ticket text, host text, data jsonb) ON COMMIT DELETE ROWS"
)
_AUDIT_MERGE = (
    f"INSERT INTO {SCHEMA}.audit_log ({_EVENT_COLUMNS}) SELECT {_EVENT_COLUMNS} FROM audit_in"
    " ON CONFLICT (id) DO NOTHING"
)


def insert_events(conn: Connection, events: list[Event]) -> None:
    """Write a batch of events to the audit log (ids already there are left as they are); does not commit.

    COPY through the driver's own connection: a thousand events cost one round trip, not a thousand.
    """
    conn.exec_driver_sql(_AUDIT_STAGING)  # through SQLAlchemy first: it begins the transaction commit() ends
    with conn.connection.driver_connection.cursor() as cur, cur.copy(f"COPY audit_in ({_EVENT_COLUMNS}) FROM STDIN") as copy:
        for e in events:
            copy.write_row((e.id, e.ts, e.type, e.db, e.command_id, e.actor, e.ticket, e.host,
                            json.dumps(e.data, default=str)))
    conn.exec_driver_sql(_AUDIT_MERGE)


def recent_events_sql(*, of_command: bool, after: bool) -> str:
    """The query of ``recent_events``: one per filter, so that each walks its index (``ts`` or ``command_id, ts``)."""
    where = " AND ".join([*(["command_id = :command"] if of_command else []), *(["ts > :after"] if after else [])])
    return (
        f"SELECT {_EVENT_COLUMNS} FROM ("
        f" SELECT * FROM {SCHEMA}.audit_log{' WHERE ' + where if where else ''}"
        " ORDER BY ts DESC, seq DESC LIMIT :limit) newest ORDER BY ts, seq"
    )


def recent_events(
    conn: Connection, *, limit: int, command_id: str | None = None, after_ts: datetime | None = None
) -> list[dict[str, Any]]:
    """The newest ``limit`` audit entries (of one command, after a time), oldest first; [] without the schema."""
    if conn.exec_driver_sql(f"SELECT to_regclass('{SCHEMA}.audit_log')").scalar() is None:
        return []
    query = recent_events_sql(of_command=command_id is not None, after=after_ts is not None)
    rows = conn.execute(text(query), {"command": command_id, "after": after_ts, "limit": limit}).mappings().all()
    return [dict(r) for r in rows]


LAST_CHANGING_MIGRATE = (
    "SELECT c.command_id, c.data->>'revision_before' AS revision_before, s.data->'backup' AS backup,"
    " c.data->>'revision_after' AS revision_after"
    f" FROM {SCHEMA}.audit_log c"
    f" LEFT JOIN LATERAL (SELECT data FROM {SCHEMA}.audit_log WHERE command_id = c.command_id"
    " AND type = 'migration.started' ORDER BY ts, seq LIMIT 1) s ON true"
    " WHERE c.type = 'migration.completed' AND (c.data->>'steps')::int > 0 AND c.ts <= :ts"
    " ORDER BY c.ts DESC, c.seq DESC LIMIT 1"
)


def last_changing_migrate(conn: Connection, not_after: datetime) -> dict[str, Any] | None:
    """The last migrate run that changed something, at or before ``not_after``: its command, revisions, backup."""
    row = conn.execute(text(LAST_CHANGING_MIGRATE), {"ts": not_after}).mappings().first()
    return dict(row) if row is not None else None


# -- batched backfills (dbagent.backfill, inside migration scripts) --------------------

BACKFILLS_DDL = """
SELECT pg_advisory_xact_lock(hashtextextended('dbagent:bootstrap', 0));
CREATE SCHEMA IF NOT EXISTS dbagent;
CREATE TABLE IF NOT EXISTS dbagent.backfills (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text NOT NULL,
    table_name    text NOT NULL,
    key_column    text NOT NULL,
    last_key      text,
    rows_done     bigint NOT NULL DEFAULT 0,
    rows_scanned  bigint NOT NULL DEFAULT 0,
    batches       bigint NOT NULL DEFAULT 0,
    runs          integer NOT NULL DEFAULT 1,
    started_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    archived_at   timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS backfills_current ON dbagent.backfills (name) WHERE archived_at IS NULL;
"""

BACKFILL_START = """
INSERT INTO dbagent.backfills (name, table_name, key_column) VALUES (%(name)s, %(table)s, %(key)s)
ON CONFLICT (name) WHERE archived_at IS NULL
DO UPDATE SET runs = dbagent.backfills.runs + 1, updated_at = now()
RETURNING id, last_key, rows_done, rows_scanned, batches, finished_at IS NOT NULL
"""

# One statement per batch: the rows and the progress row change together or not at all.
BACKFILL_BATCH = """
WITH span AS (
    SELECT {key} AS dbagent_key FROM {table} {after} ORDER BY {key} LIMIT {limit}
), bound AS (
    SELECT (SELECT dbagent_key FROM span ORDER BY dbagent_key DESC NULLS LAST LIMIT 1) AS hi,
           (SELECT count(*) FROM span) AS scanned
), changed AS (
    UPDATE {table} SET {set_}
    WHERE {after_and} {key} <= (SELECT hi FROM bound) AND ({where})
    RETURNING 1
)
UPDATE dbagent.backfills SET
    last_key = coalesce((SELECT hi FROM bound)::text, last_key),
    rows_done = rows_done + (SELECT count(*) FROM changed),
    rows_scanned = rows_scanned + (SELECT scanned FROM bound),
    batches = batches + 1,
    updated_at = clock_timestamp(),
    finished_at = CASE WHEN (SELECT scanned FROM bound) < {limit} THEN clock_timestamp() END
WHERE id = %(id)s
RETURNING last_key, rows_done, rows_scanned, batches, finished_at IS NOT NULL
"""

BACKFILL_ARCHIVE = "UPDATE dbagent.backfills SET archived_at = now() WHERE id = ANY(%(ids)s)"

BACKFILL_UNARCHIVE = "UPDATE dbagent.backfills SET archived_at = NULL WHERE id = ANY(%(ids)s)"

BACKFILL_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('dbagent:backfill:' || %(name)s, 0))"

BACKFILL_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('dbagent:backfill:' || %(name)s, 0))"
