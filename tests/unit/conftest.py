"""Shared fixtures of the unit tests: no servers, fakeredis only."""

from __future__ import annotations

import os
import uuid

import fakeredis
import pytest


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """No DBAGENT_* variable of the developer's shell leaks into a unit test."""
    for name in list(os.environ):
        if name.upper().startswith("DBAGENT_"):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    """A Redis server of this test alone."""
    return fakeredis.FakeServer()


@pytest.fixture
def fake_redis(fake_server) -> fakeredis.FakeRedis:
    client = fakeredis.FakeRedis(server=fake_server)
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix unique to this test."""
    return f"unit-{uuid.uuid4().hex[:12]}"
