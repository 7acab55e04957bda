"""Alembic environment of the AegisX platform schema.

Run by dbagent through Alembic's API, or by plain Alembic
(``alembic -c migrations/alembic.ini upgrade head`` with ``DATABASE_URL`` set).

dbagent hands over, in ``config.attributes``:

* ``connection``: the dedicated connection that holds the database's advisory
  lock; every statement of the run must go through it, so the lock and the
  ability to write are lost together;
* ``url``: the database URL, for offline (``--sql``) rendering;
* ``on_version_apply``: called once per applied step, inside the step's
  transaction, so dbagent's change log commits atomically with the step.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

config = context.config

if config.config_file_name is not None and not config.attributes.get("connection"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _sqlalchemy_url(url: str) -> str:
    """Select the psycopg 3 driver for a libpq-style ``postgresql://`` URL."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def _url() -> str:
    url = config.attributes.get("url") or os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("DATABASE_URL is not set: it names the database to migrate")
    return _sqlalchemy_url(url)


def _configure_options() -> dict:
    return {
        "transaction_per_migration": True,
        "target_metadata": None,
        "on_version_apply": config.attributes.get("on_version_apply"),
    }


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_configure_options(),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **_configure_options())
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, **_configure_options())
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
