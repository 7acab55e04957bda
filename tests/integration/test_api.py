"""The HTTP API in-process, against real PostgreSQL, Redis and a worker subprocess."""

from __future__ import annotations

import time
from urllib.parse import urlencode

import pytest
from fastapi.testclient import TestClient

from dbagent.interfaces.api import create_app
from dbagent.interfaces.slack import expected_signature
from dbagent.settings import load_settings
from tests.servers import SIGNING_KEY

pytestmark = pytest.mark.integration

TOKEN = "integration-api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SLACK_SECRET = "integration-slack-secret"


@pytest.fixture
def api(env, monkeypatch) -> TestClient:
    """The API of the test's deployment; its worker uses the same signing key."""
    env.extra_config = '[chatops.permissions]\nUOPS = ["rollback:test", "status:*"]\nUREADER = ["status:*"]\n'
    monkeypatch.setenv("DBAGENT_API_TOKENS", f"{TOKEN}=deploy-bot")
    monkeypatch.setenv("DBAGENT_SIGNING_KEY", SIGNING_KEY)
    monkeypatch.setenv("DBAGENT_SLACK_SIGNING_SECRET", SLACK_SECRET)
    with TestClient(create_app(load_settings(env.config))) as client:
        yield client


def wait_for_outcome(api: TestClient, command_id: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    seen = set()
    while True:
        response = api.get(f"/v1/commands/{command_id}", headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        seen.add(body["status"])
        if body["status"] in ("succeeded", "failed", "rejected"):
            body["seen"] = seen
            return body
        assert time.monotonic() < deadline, f"no outcome after {timeout_s}s: {body}"
        time.sleep(0.2)


def slack(api: TestClient, user: str, text: str):
    body = urlencode({"command": "/dbagent", "user_id": user, "text": text}).encode()
    sent_at = str(int(time.time()))
    return api.post("/v1/chatops/slack", content=body, headers={
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": sent_at,
        "X-Slack-Signature": expected_signature(SLACK_SECRET.encode(), sent_at, body),
    })


def test_migrate_through_the_api(env, api):
    accepted = api.post(
        "/v1/commands",
        json={"type": "migrate", "db": "test", "args": {}, "actor": "release-7", "ticket": "CHG-42"},
        headers=AUTH,
    )
    assert accepted.status_code == 202, accepted.text
    command_id = accepted.json()["command_id"]

    # no worker yet: the command waits on its queue, and the API says so
    queued = api.get(f"/v1/commands/{command_id}", headers=AUTH).json()
    assert queued["status"] == "queued" and queued["type"] == "migrate" and queued["db"] == "test"

    env.start_worker()
    result = wait_for_outcome(api, command_id)
    assert result["status"] == "succeeded", result
    assert result["command_id"] == command_id and result["error"] is None
    assert result["revision_before"] is None and result["revision_after"] == "011"
    assert env.revision() == "011"

    steps = [e for e in result["events"] if e["type"] == "migration.step"]
    assert [e["data"]["revision"] for e in steps] == [f"{n:03d}" for n in range(1, 12)]
    assert all(e["command_id"] == command_id and e["actor"] == "deploy-bot for release-7" for e in result["events"])
    assert all(e["ticket"] == "CHG-42" for e in result["events"])
    types = [e["type"] for e in result["events"]]
    assert types.index("command.accepted") < types.index("migration.started") < types.index("migration.completed")

    # the audit trail holds the same events, and its last_id lets a reader continue from there
    trail = api.get("/v1/events?db=test&limit=1000", headers=AUTH).json()
    assert [e["id"] for e in trail["events"] if e["command_id"] == command_id] == [e["id"] for e in result["events"]]
    assert api.get(f"/v1/events?after={trail['last_id']}", headers=AUTH).json()["events"] == []

    metrics = api.get("/metrics").text
    assert 'dbagent_api_commands_accepted_total{db="test",type="migrate"} 1.0' in metrics


def test_slack_rollback_lands_the_database_one_step_back(env, api):
    env.start_worker()
    migrated = api.post("/v1/commands", json={"type": "migrate", "db": "test"}, headers=AUTH).json()["command_id"]
    assert wait_for_outcome(api, migrated)["revision_after"] == "011"

    refused = slack(api, "UREADER", "rollback test 1")
    assert refused.status_code == 200 and refused.json()["response_type"] == "ephemeral"
    assert "not allowed to rollback test" in refused.json()["text"]

    answer = slack(api, "UOPS", "rollback test 1")
    assert answer.status_code == 200
    assert answer.json()["response_type"] == "in_channel"
    text = answer.json()["text"]
    assert text.startswith("rollback of test queued: command ")
    command_id = text.rsplit(" ", 1)[-1]

    result = wait_for_outcome(api, command_id)
    assert result["status"] == "succeeded", result
    assert result["revision_before"] == "011" and result["revision_after"] == "010"
    assert env.revision() == "010"
    assert {e["actor"] for e in result["events"]} == {"slack:UOPS"}
    assert env.sql("SELECT count(*) FROM permissions WHERE name = '*'")[0][0] == 0
    # only the allowed user's rollback ran
    assert env.sql("SELECT count(*) FROM dbagent.commands WHERE type = 'rollback'")[0][0] == 1


def test_startup_failed_reaches_the_stream(env, api, redis_client):
    response = api.post("/v1/events/startup-failed", json={"db": "test", "detail": "readiness probe failed"}, headers=AUTH)
    assert response.status_code == 202
    [event] = env.stream_events(redis_client)
    assert event["id"] == response.json()["event_id"]
    assert (event["type"], event["db"], event["actor"]) == ("app.startup_failed", "test", "deploy-bot")
    assert event["data"] == {"detail": "readiness probe failed"}
    assert api.get("/healthz").json() == {"status": "ok"}


def test_a_command_the_worker_refuses_is_reported_rejected_by_the_api(env, api):
    """The worker's refusal goes under the digest of the message the API sent (not over result:<id>)."""
    env.start_worker(DBAGENT_SIGNING_KEY="the-worker-has-another-key")
    accepted = api.post("/v1/commands", json={"type": "status", "db": "test", "args": {}}, headers=AUTH)
    assert accepted.status_code == 202, accepted.text
    result = wait_for_outcome(api, accepted.json()["command_id"])
    assert result["status"] == "rejected", result
    assert "signature does not match" in result["error"]
