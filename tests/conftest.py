from __future__ import annotations

import pytest
import redis

from tests.servers import (
    REDIS_URL,
    Env,
    PrivateCluster,
    PrivateRedis,
    create_database,
    delete_prefix,
    drop_database,
    drop_least_privilege_env,
    new_env,
    new_least_privilege_env,
    setup_least_privilege,
)


@pytest.fixture
def redis_client():
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def env(tmp_path, redis_client) -> Env:
    """A fresh database and key prefix; workers started through it are stopped afterwards."""
    world = new_env(tmp_path)
    create_database(world.name)
    try:
        yield world
    finally:
        world.stop_workers()
        drop_database(world.name)
        delete_prefix(redis_client, world.prefix)


@pytest.fixture
def least_privilege_env(tmp_path, redis_client) -> Env:
    """Like ``env``, but dbagent connects as a non-superuser migration role owning the database (docs/least-privilege.md).

    ``env.sql`` runs as that role, ``env.admin_sql`` as the superuser; the roles are dropped afterwards with all they own.
    """
    world = new_least_privilege_env(tmp_path)
    try:
        setup_least_privilege(world)
        yield world
    finally:
        world.stop_workers()
        drop_least_privilege_env(world)
        delete_prefix(redis_client, world.prefix)


@pytest.fixture
def private_cluster():
    """A PostgreSQL server of the test's own, which the test may restart (never the shared one)."""
    cluster = PrivateCluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def private_redis():
    """A Redis server of the test's own, which the test may stop and start (never the shared one)."""
    server = PrivateRedis()
    try:
        yield server
    finally:
        server.destroy()
