"""Connections to Redis and PostgreSQL, with driver errors turned into dbagent's.

Every connection has a timeout, so an unreachable dependency is an
``Unavailable`` (exit 3) within seconds, never a hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import redis

from agent.errors import Unavailable
from agent.redact import redact
from agent.settings import DatabaseSettings, RedisSettings

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


@contextmanager
def pg_connection(db: DatabaseSettings, application_name: str = "dbagent") -> Iterator[Connection]:
    """A dedicated connection; an unreachable server is an Unavailable."""
    import sqlalchemy.exc

    engine = pg_engine(db, application_name)
    try:
        try:
            conn = engine.connect()
        except sqlalchemy.exc.OperationalError as exc:
            reason = redact(str(exc.orig) if exc.orig else exc).strip().splitlines()[0]
            raise Unavailable(f"cannot reach PostgreSQL at {display_url(db.url)}: {reason}") from None
        try:
            yield conn
        finally:
            conn.close()
    finally:
        engine.dispose()
