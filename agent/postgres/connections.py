"""Connections to Redis and PostgreSQL, with driver errors turned into dbagent's.

One way into PostgreSQL: a SQLAlchemy ``Connection`` (psycopg 3 underneath) from ``pg_connection`` or
``open_connection``, for the worker, the store, the checks, the agent and the CLI alike. Alembic runs on
SQLAlchemy, and the store must write in the transaction of the migration step it records, so anything else
would mean two kinds of connection on one session. Where psycopg's own API is the tool (``COPY`` in
``store.insert_events``), it is reached through that connection's ``driver_connection``. The one exception
is the lock sampler's thread (``blocking.BlockingMonitor``), a plain autocommit psycopg connection beside a
running step, which must not share the engine's transaction handling.

Every connection has a timeout, so an unreachable dependency is an
``Unavailable`` (exit 3) within seconds, never a hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import redis

from dbagent.core.durations import postgres_interval
from dbagent.core.errors import Unavailable
from dbagent.core.redact import redact
from dbagent.settings import DatabaseSettings, RedisSettings

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

# SQLAlchemy is imported inside the PostgreSQL helpers: producers (the CLI)
# only talk to Redis, and importing it would add a tenth of a second to every command.


def sqlalchemy_url(url: str) -> str:
    """Select the psycopg 3 driver for a libpq-style ``postgresql://`` URL."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def display_url(url: str) -> str:
    """The URL as it may be shown: password masked."""
    return redact(url)


def redis_client(settings: RedisSettings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.url,
        socket_connect_timeout=settings.connect_timeout,
        socket_timeout=max(settings.connect_timeout, 5.0),
        health_check_interval=30,
    )


def ping_redis(client: redis.Redis, settings: RedisSettings) -> None:
    try:
        client.ping()
    except redis.RedisError as exc:
        raise Unavailable(f"cannot reach Redis at {display_url(settings.url)}: {redact(exc)}") from None


def pg_engine(db: DatabaseSettings, application_name: str = "dbagent") -> Engine:
    """An engine without a pool: each connection is dedicated to one piece of work."""
    from sqlalchemy import create_engine, pool

    return create_engine(
        sqlalchemy_url(db.url),
        poolclass=pool.NullPool,
        connect_args={
            "connect_timeout": max(1, round(db.connect_timeout)),
            "application_name": application_name,
            # Notice a vanished server (or network) within about 25 s.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        },
    )


def open_connection(db: DatabaseSettings, application_name: str = "dbagent") -> Connection:
    """A dedicated connection the caller closes (a long-lived one: the audit sink's); unreachable: Unavailable."""
    import sqlalchemy.exc

    try:
        return pg_engine(db, application_name).connect()
    except sqlalchemy.exc.OperationalError as exc:
        reason = redact(str(exc.orig) if exc.orig else exc).strip().splitlines()[0]
        raise Unavailable(f"cannot reach PostgreSQL at {display_url(db.url)}: {reason}") from None


@contextmanager
def pg_connection(db: DatabaseSettings, application_name: str = "dbagent") -> Iterator[Connection]:
    """A dedicated connection for one piece of work, closed after it; an unreachable server is an Unavailable."""
    conn = open_connection(db, application_name)
    try:
        yield conn
    finally:
        conn.close()


def rollback_quietly(conn: Connection | None) -> None:
    """Roll back whatever is open; a connection already gone has nothing left to roll back."""
    if conn is None:
        return
    try:
        conn.rollback()
    except Exception:  # noqa: BLE001 - the connection is gone
        pass


# -- scratch databases (backup drills, migration rehearsals) --------------------


def with_database(url: str, database: str) -> str:
    """The same server and credentials, another database."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=database).render_as_string(hide_password=False)


@contextmanager
def maintenance_connection(db: DatabaseSettings, application_name: str) -> Iterator[Connection]:
    """An autocommit connection for CREATE/DROP DATABASE: to ``postgres``, else to the target itself."""
    import sqlalchemy.exc
    from sqlalchemy import create_engine, pool
    from sqlalchemy.engine import make_url

    target = make_url(sqlalchemy_url(db.url))
    reason = ""
    for database in dict.fromkeys(["postgres", target.database]):
        engine = create_engine(
            target.set(database=database),
            poolclass=pool.NullPool,
            isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": max(1, round(db.connect_timeout)), "application_name": application_name},
        )
        try:
            try:
                conn = engine.connect()
            except sqlalchemy.exc.OperationalError as exc:
                reason = redact(str(exc.orig) if exc.orig else exc).strip().splitlines()[0]
                continue
            try:
                yield conn
                return
            finally:
                conn.close()
        finally:
            engine.dispose()
    raise Unavailable(f"cannot reach PostgreSQL at {display_url(db.url)}: {reason}")


def create_scratch_database(db: DatabaseSettings, name: str, purpose: str) -> DatabaseSettings:
    """Create database ``name`` beside ``db``'s (same server, same role); returns its settings.

    The caller drops it with ``drop_scratch_database`` whatever happens. A
    server that refuses (no CREATEDB) is ``Unavailable``, naming ``purpose``.
    """
    import sqlalchemy.exc

    from dbagent.core.errors import error_text

    try:
        with maintenance_connection(db, f"dbagent {purpose}") as admin:
            admin.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sqlalchemy.exc.DBAPIError as exc:
        raise Unavailable(
            f"the server refused to create the scratch database {name} for the {purpose}: {error_text(exc, one_line=True)}"
            " (the role needs CREATEDB)"
        ) from None
    return db.model_copy(update={"url": with_database(db.url, name)})


def drop_scratch_database(db: DatabaseSettings, name: str, purpose: str) -> None:
    with maintenance_connection(db, f"dbagent {purpose}") as admin:
        admin.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def apply_timeouts(conn: Connection, db: DatabaseSettings) -> None:
    """Every statement of the session waits for locks and runs at most as long as configured."""
    settings = {"lock_timeout": postgres_interval(db.lock_timeout), "statement_timeout": postgres_interval(db.statement_timeout)}
    if conn.dialect.server_version_info >= (14,):
        # A statement keeps running after its client died unless the server
        # checks the socket; without this, a killed worker's long step would
        # hold the database's lock until the step finished on its own.
        settings["client_connection_check_interval"] = "1s"
    # One round trip for all of them; session-level (is_local false), like SET.
    conn.exec_driver_sql(
        "SELECT " + ", ".join("set_config(%s, %s, false)" for _ in settings),
        tuple(value for pair in settings.items() for value in pair),
    )
    conn.commit()
