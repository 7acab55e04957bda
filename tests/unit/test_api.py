"""The HTTP API on fakeredis: a real Producer, with only its Celery publish replaced."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import pytest
from fastapi.testclient import TestClient

from dbagent.bus import keys
from dbagent.bus.eventlog import EventLog
from dbagent.bus.producer import Producer
from dbagent.core.commands import Command, check_command
from dbagent.core.errors import BadInput, ConfigError, OperationFailed
from dbagent.core.events import Event
from dbagent.interfaces.api import (
    MAX_BODY_BYTES,
    create_app,
    list_events,
    parse_listen,
    parse_tokens,
    submitted_key,
)
from dbagent.interfaces.slack import expected_signature
from dbagent.settings import Settings

TOKEN = "tok-ci-4f1d9a"
OTHER_TOKEN = "tok-deploy-77e0"
SIGNING_KEY = "unit-signing-key"
SLACK_SECRET = "slack-secret-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class RecordingProducer(Producer):
    """A real Producer (Redis reads, check(), signing) whose ``submit`` records the signed
    command instead of publishing it with Celery, which cannot talk to fakeredis."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[Command] = []

    def submit(self, command: Command) -> Command:
        signed = self.sign(command)
        self.sent.append(signed)
        return signed


@pytest.fixture
def settings(prefix) -> Settings:
    return Settings(
        redis={"prefix": prefix},
        databases={
            "staging": {"url": "postgresql://migrator:hunter2@db-staging/aegisx"},
            "production": {"url": "postgresql://migrator:hunter2@db1/aegisx"},
        },
        chatops={"permissions": {"U024BE7LH": ["rollback:staging", "status:*"], "UREADER": ["status:*"]}},
    )


@pytest.fixture
def secrets(monkeypatch):
    monkeypatch.setenv("DBAGENT_API_TOKENS", f"{TOKEN}=ci, {OTHER_TOKEN}=deploy-bot")
    monkeypatch.setenv("DBAGENT_SIGNING_KEY", SIGNING_KEY)
    monkeypatch.setenv("DBAGENT_SLACK_SIGNING_SECRET", SLACK_SECRET)


@pytest.fixture
def producer(settings, fake_redis) -> RecordingProducer:
    return RecordingProducer(settings, client=fake_redis)


@pytest.fixture
def client(secrets, settings, producer) -> TestClient:
    with TestClient(create_app(settings, producer)) as test_client:
        yield test_client


def publish(fake_redis, prefix, *events: Event) -> None:
    EventLog(fake_redis, prefix).publish(events)


# -- authentication ------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer "},
    ],
    ids=["none", "unknown", "longer", "basic", "no-scheme", "empty"],
)
def test_missing_or_unknown_token_is_401(client, producer, headers):
    for method, path, body in [
        ("POST", "/v1/commands", {"type": "status", "db": "staging"}),
        ("GET", "/v1/commands/abc", None),
        ("GET", "/v1/events", None),
        ("POST", "/v1/events/startup-failed", {"db": "staging"}),
    ]:
        response = client.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, path
        assert response.json() == {"error": "missing or unknown bearer token"}
        assert response.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in response.text and OTHER_TOKEN not in response.text
    assert producer.sent == []


def test_each_token_stands_for_its_actor(client, producer):
    client.post("/v1/commands", json={"type": "status", "db": "staging"}, headers=AUTH)
    client.post("/v1/commands", json={"type": "status", "db": "staging"}, headers={"Authorization": f"bearer {OTHER_TOKEN}"})
    assert [c.actor for c in producer.sent] == ["ci", "deploy-bot"]


def test_no_tokens_configured_is_503(monkeypatch, settings, producer):
    monkeypatch.setenv("DBAGENT_SIGNING_KEY", SIGNING_KEY)
    client = TestClient(create_app(settings, producer))
    response = client.post("/v1/commands", json={"type": "status", "db": "staging"}, headers=AUTH)
    assert response.status_code == 503
    assert "DBAGENT_API_TOKENS" in response.json()["error"]
    assert client.get("/v1/events", headers=AUTH).status_code == 503
    # the endpoints without a token still answer
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert producer.sent == []


def test_tokens_env_name_comes_from_config(monkeypatch, prefix, producer):
    monkeypatch.setenv("DEPLOY_TOKENS", f"{TOKEN}=pipeline")
    settings = Settings(redis={"prefix": prefix}, databases={"staging": {"url": "postgresql://h/db"}},
                        api={"tokens_env": "DEPLOY_TOKENS"})
    client = TestClient(create_app(settings, RecordingProducer(settings, client=producer.redis)))
    assert client.get("/v1/events", headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("", {}),
        ("a=ci", {"a": "ci"}),
        (" a = ci , b=deploy-bot,", {"a": "ci", "b": "deploy-bot"}),
        ("YWJj==ci", {"YWJj=": "ci"}),  # base64 padding stays in the token
    ],
)
def test_parse_tokens(raw, expected):
    assert parse_tokens(raw, "DBAGENT_API_TOKENS") == expected


@pytest.mark.parametrize("raw, entry", [("secret-token", 1), ("a=ci,secret-token", 2), ("=ci", 1), ("a=", 1), ("a=ci,a=x", 2)])
def test_malformed_tokens_name_the_entry_not_the_token(raw, entry):
    with pytest.raises(ConfigError) as caught:
        parse_tokens(raw, "DBAGENT_API_TOKENS")
    assert f"entry {entry}" in caught.value.message
    assert "secret-token" not in caught.value.message


def test_malformed_tokens_stop_the_app_from_starting(monkeypatch, settings, producer):
    monkeypatch.setenv("DBAGENT_API_TOKENS", "just-a-token")
    with pytest.raises(ConfigError, match=r"\$DBAGENT_API_TOKENS: entry 1"):
        create_app(settings, producer)


# -- POST /v1/commands -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"type": "drop", "db": "staging"}, "unknown command type 'drop'"),
        ({"type": "rollback", "db": "staging", "args": {}}, "give either a number of steps or a target revision"),
        ({"type": "rollback", "db": "staging", "args": {"steps": 0}}, "steps: Input should be greater than or equal to 1"),
        ({"type": "migrate", "db": "staging", "args": {"force": True}}, "force: Extra inputs are not permitted"),
        ({"type": "status", "db": "nope"}, "unknown database 'nope' (configured: production, staging)"),
        ({"type": "status"}, 'several databases are configured (production, staging): give "db"'),
        ({"type": "status", "db": "staging", "id": "mine"}, "id: Extra inputs are not permitted"),
        ({"db": "staging"}, "type: Field required"),
        ({"type": "status", "db": "staging", "args": []}, "args: Input should be a valid dictionary"),
        ({"type": "status", "db": "staging", "actor": "x" * 300}, "actor: String should have at most 100 characters"),
    ],
)
def test_bad_command_is_422_with_the_reason(client, producer, body, reason):
    response = client.post("/v1/commands", json=body, headers=AUTH)
    assert response.status_code == 422
    assert set(response.json()) == {"error"}
    assert reason in response.json()["error"]
    assert producer.sent == []


def test_body_that_is_not_json_is_422(client):
    response = client.post("/v1/commands", content=b"{type: status", headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json() == {"error": "the request body is not valid JSON"}


def test_writer_command_without_signing_key_is_422(client, producer, monkeypatch):
    monkeypatch.delenv("DBAGENT_SIGNING_KEY")
    response = client.post("/v1/commands", json={"type": "migrate", "db": "staging"}, headers=AUTH)
    assert response.status_code == 422
    assert response.json() == {"error": "migrate needs a signed command: set the signing key in $DBAGENT_SIGNING_KEY"}
    assert producer.sent == []


def test_accepted_command_is_signed_queued_and_readable(client, producer, fake_redis, prefix):
    response = client.post(
        "/v1/commands",
        json={"type": "migrate", "db": "staging", "args": {"to": "010"}, "actor": "alice", "ticket": "CHG-42"},
        headers=AUTH,
    )
    assert response.status_code == 202
    command_id = response.json()["command_id"]
    assert response.json() == {"command_id": command_id}

    [sent] = producer.sent
    assert (sent.id, sent.type, sent.db, sent.args) == (command_id, "migrate", "staging", {"to": "010"})
    assert sent.actor == "ci for alice" and sent.ticket == "CHG-42"
    # signed with the deployment's key: a worker of staging would accept it
    check_command(sent, SIGNING_KEY.encode(), db="staging", now=datetime.now(UTC), max_age_s=60, max_skew_s=60)

    # not picked up yet: queued, not 404
    queued = client.get(f"/v1/commands/{command_id}", headers=AUTH)
    assert queued.status_code == 200
    assert queued.json() == {
        "command_id": command_id, "type": "migrate", "db": "staging", "status": "queued", "error": None, "events": [],
        # the expiry the producer signed: a migrate may wait a day for its worker
        "expires_at": sent.expires_at.isoformat().replace("+00:00", "Z"),
    }
    assert timedelta(hours=23) < sent.expires_at - sent.issued_at <= timedelta(hours=24)
    assert 0 < fake_redis.ttl(submitted_key(prefix, command_id)) <= keys.RESULT_TTL_S


def test_redis_down_is_503(client, producer, fake_server):
    fake_server.connected = False
    response = client.post("/v1/commands", json={"type": "status", "db": "staging"}, headers=AUTH)
    assert response.status_code == 503
    assert "cannot reach Redis" in response.json()["error"]
    assert producer.sent == []
    assert client.get("/v1/commands/abc", headers=AUTH).status_code == 503
    assert client.get("/v1/events", headers=AUTH).status_code == 503
    assert client.get("/healthz").status_code == 503


def test_failure_is_500_with_the_message_redacted(secrets, settings, fake_redis):
    class FailingProducer(RecordingProducer):
        def submit(self, command: Command) -> Command:
            raise OperationFailed("broker refused postgresql://migrator:hunter2@db1/aegisx")

    client = TestClient(create_app(settings, FailingProducer(settings, client=fake_redis)))
    response = client.post("/v1/commands", json={"type": "status", "db": "staging"}, headers=AUTH)
    assert response.status_code == 500
    assert response.json() == {"error": "broker refused postgresql://migrator:***@db1/aegisx"}


def test_unexpected_exception_is_500_without_details(secrets, settings, fake_redis):
    class BrokenProducer(RecordingProducer):
        def submit(self, command: Command) -> Command:
            raise RuntimeError(f"token {TOKEN} in a message")

    client = TestClient(create_app(settings, BrokenProducer(settings, client=fake_redis)), raise_server_exceptions=False)
    response = client.post("/v1/commands", json={"type": "status", "db": "staging"}, headers=AUTH)
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (see the API's log)"}


# -- GET /v1/commands/{id} -------------------------------------------------------------------


def test_result_with_its_events(client, fake_redis, prefix):
    result = {
        "command_id": "c-1", "type": "migrate", "db": "staging", "status": "succeeded", "error": None,
        "exit_code": 0, "revision_before": None, "revision_after": "011",
    }
    fake_redis.set(keys.result(prefix, "c-1"), json.dumps(result))
    started = Event(type="migration.started", db="staging", command_id="c-1", actor="ci")
    other = Event(type="migration.started", db="production", command_id="c-2", actor="ci")
    step = Event(type="migration.step", db="staging", command_id="c-1", actor="ci", data={"revision": "001"})
    publish(fake_redis, prefix, started, other, step)

    response = client.get("/v1/commands/c-1", headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert {k: v for k, v in body.items() if k != "events"} == result
    assert body["events"] == [started.to_json(), step.to_json()]


def test_submitted_command_shows_its_events_while_running_then_its_result(client, fake_redis, prefix):
    publish(fake_redis, prefix, *[Event(type="command.accepted", db="production", command_id=f"old-{n}") for n in range(5)])
    command_id = client.post("/v1/commands", json={"type": "status", "db": "staging"}, headers=AUTH).json()["command_id"]
    accepted = Event(type="command.accepted", db="staging", command_id=command_id, data={"worker": "w1"})
    publish(fake_redis, prefix, accepted)

    running = client.get(f"/v1/commands/{command_id}", headers=AUTH).json()
    assert running == {
        "command_id": command_id, "type": "status", "db": "staging", "status": "running", "error": None,
        "events": [accepted.to_json()],
    }

    fake_redis.set(keys.result(prefix, command_id), json.dumps({"command_id": command_id, "status": "succeeded"}))
    done = client.get(f"/v1/commands/{command_id}", headers=AUTH).json()
    assert done["status"] == "succeeded" and done["events"] == [accepted.to_json()]


def test_unknown_command_is_404(client, fake_redis, prefix):
    publish(fake_redis, prefix, Event(type="command.accepted", db="staging", command_id="someone-else"))
    response = client.get("/v1/commands/never-submitted", headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"error": "unknown command"}
    assert client.get("/v1/commands/" + "x" * 500, headers=AUTH).status_code == 404


# -- GET /v1/events -------------------------------------------------------------------------------


def test_events_newest_first_page_and_continuation(client, fake_redis, prefix):
    events = [Event(type="command.accepted", db="staging" if n % 2 else "production", command_id=f"c-{n}") for n in range(6)]
    publish(fake_redis, prefix, *events)
    stream_ids = [entry_id.decode() for entry_id, _ in fake_redis.xrange(keys.events(prefix))]

    everything = client.get("/v1/events", headers=AUTH).json()
    assert everything == {"events": [e.to_json() for e in events], "last_id": stream_ids[-1]}

    newest = client.get("/v1/events?limit=2", headers=AUTH).json()
    assert newest["events"] == [events[4].to_json(), events[5].to_json()]

    staging = client.get("/v1/events?db=staging", headers=AUTH).json()
    assert [e["command_id"] for e in staging["events"]] == ["c-1", "c-3", "c-5"]

    page = client.get(f"/v1/events?after={stream_ids[1]}&limit=3", headers=AUTH).json()
    assert [e["command_id"] for e in page["events"]] == ["c-2", "c-3", "c-4"]
    assert page["last_id"] == stream_ids[4]
    rest = client.get(f"/v1/events?after={page['last_id']}", headers=AUTH).json()
    assert [e["command_id"] for e in rest["events"]] == ["c-5"] and rest["last_id"] == stream_ids[5]

    from_start = client.get("/v1/events?after=0&db=production&limit=2", headers=AUTH).json()
    assert [e["command_id"] for e in from_start["events"]] == ["c-0", "c-2"]


def test_events_continuation_moves_past_other_databases(fake_redis, prefix):
    log = EventLog(fake_redis, prefix)
    log.publish([Event(type="command.accepted", db="production", command_id=f"c-{n}") for n in range(3)])
    last = fake_redis.xrevrange(keys.events(prefix), count=1)[0][0].decode()
    found, last_id = list_events(log, db="staging", after="0", limit=10)
    # nothing for staging, but the reader is told where the stream ends, so it never reads those again
    assert found == [] and last_id == last


def test_events_of_an_empty_stream(client):
    assert client.get("/v1/events", headers=AUTH).json() == {"events": [], "last_id": "0-0"}


@pytest.mark.parametrize(
    "query, reason",
    [
        ("db=nope", "unknown database 'nope'"),
        ("after=yesterday", "after must be a stream id"),
        ("limit=0", "limit: Input should be greater than or equal to 1"),
        ("limit=1001", "limit: Input should be less than or equal to 1000"),
    ],
)
def test_bad_events_query_is_422(client, query, reason):
    response = client.get(f"/v1/events?{query}", headers=AUTH)
    assert response.status_code == 422
    assert reason in response.json()["error"]


# -- POST /v1/events/startup-failed ------------------------------------------------------------------


def test_startup_failed_lands_in_the_stream(client, fake_redis, prefix):
    response = client.post(
        "/v1/events/startup-failed",
        json={"db": "production", "actor": "k8s", "ticket": "DEP-7",
              "detail": "boot failed: cannot connect to postgresql://app:s3cret@db1/aegisx"},
        headers=AUTH,
    )
    assert response.status_code == 202
    [(_, event)] = EventLog(fake_redis, prefix).read()
    assert response.json() == {"event_id": event.id}
    assert (event.type, event.db, event.actor, event.ticket, event.command_id) == (
        "app.startup_failed", "production", "ci for k8s", "DEP-7", None)
    assert event.data == {"detail": "boot failed: cannot connect to postgresql://app:***@db1/aegisx"}


def test_startup_failed_for_an_unknown_database_is_422(client, fake_redis, prefix):
    response = client.post("/v1/events/startup-failed", json={"db": "nope"}, headers=AUTH)
    assert response.status_code == 422
    assert "unknown database 'nope'" in response.json()["error"]
    assert fake_redis.xlen(keys.events(prefix)) == 0


# -- POST /v1/chatops/slack ------------------------------------------------------------------------------


def slack_request(client, fields: dict[str, str], *, secret: str = SLACK_SECRET, timestamp: int | None = None):
    body = urlencode({"command": "/dbagent", "team_id": "T1", "channel_id": "C1", **fields}).encode()
    sent_at = str(int(time.time()) if timestamp is None else timestamp)
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": sent_at,
        "X-Slack-Signature": expected_signature(secret.encode(), sent_at, body),
    }
    return client.post("/v1/chatops/slack", content=body, headers=headers)


def test_slack_rollback_from_an_allowed_user_is_queued(client, producer):
    response = slack_request(client, {"user_id": "U024BE7LH", "text": "rollback staging 1"})
    assert response.status_code == 200
    [sent] = producer.sent
    assert response.json() == {"response_type": "in_channel", "text": f"rollback of staging queued: command {sent.id}"}
    assert (sent.type, sent.db, sent.args, sent.actor) == ("rollback", "staging", {"steps": 1}, "slack:U024BE7LH")
    assert sent.signature
    assert client.get(f"/v1/commands/{sent.id}", headers=AUTH).json()["status"] == "queued"


def test_slack_status_without_database_needs_one_when_several(client, producer):
    response = slack_request(client, {"user_id": "UREADER", "text": "status"})
    assert response.json()["response_type"] == "ephemeral"
    assert "status <db>" in response.json()["text"]
    response = slack_request(client, {"user_id": "UREADER", "text": "status production"})
    assert response.json()["response_type"] == "in_channel"
    assert [(c.type, c.db) for c in producer.sent] == [("status", "production")]


@pytest.mark.parametrize(
    "user, text, says",
    [
        ("U024BE7LH", "rollback production 1", 'not allowed to rollback production (it needs "rollback:production"'),
        ("U024BE7LH", "migrate staging", "not allowed to migrate staging"),
        ("UREADER", "rollback staging to 008", "not allowed to rollback staging"),
        ("USTRANGER", "status staging", "not allowed to use dbagent"),
        ("U024BE7LH", "rollback nope 1", "unknown database 'nope'"),
        ("U024BE7LH", "drop staging", "usage:"),
        ("USTRANGER", "help", "rollback <db> <N>"),
    ],
)
def test_slack_refusals_are_ephemeral(client, producer, user, text, says):
    response = slack_request(client, {"user_id": user, "text": text})
    assert response.status_code == 200
    assert response.json()["response_type"] == "ephemeral"
    assert says in response.json()["text"]
    assert producer.sent == []


def test_slack_signature_is_checked(client, producer):
    wrong = slack_request(client, {"user_id": "U024BE7LH", "text": "rollback staging 1"}, secret="guessed")
    assert wrong.status_code == 401 and "signature does not match" in wrong.json()["error"]
    stale = slack_request(client, {"user_id": "U024BE7LH", "text": "rollback staging 1"}, timestamp=int(time.time()) - 600)
    assert stale.status_code == 401 and "replay window" in stale.json()["error"]
    unsigned = client.post("/v1/chatops/slack", content=b"user_id=U024BE7LH&text=rollback+staging+1",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert unsigned.status_code == 401
    assert SLACK_SECRET not in wrong.text + stale.text + unsigned.text
    assert producer.sent == []


def test_slack_request_replayed_within_the_window_is_refused(client, producer):
    body = urlencode({"user_id": "U024BE7LH", "text": "rollback staging 1"}).encode()
    sent_at = str(int(time.time()))
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": sent_at,
        "X-Slack-Signature": expected_signature(SLACK_SECRET.encode(), sent_at, body),
    }
    assert client.post("/v1/chatops/slack", content=body, headers=headers).json()["response_type"] == "in_channel"
    again = client.post("/v1/chatops/slack", content=body, headers=headers)
    assert again.status_code == 401 and "replayed" in again.json()["error"]
    assert len(producer.sent) == 1


def test_slack_without_a_signing_secret_is_503(monkeypatch, settings, producer):
    monkeypatch.setenv("DBAGENT_API_TOKENS", f"{TOKEN}=ci")
    client = TestClient(create_app(settings, producer))
    response = slack_request(client, {"user_id": "U024BE7LH", "text": "status staging"})
    assert response.status_code == 503
    assert "DBAGENT_SLACK_SIGNING_SECRET" in response.json()["error"]
    assert producer.sent == []


def test_slack_when_the_queue_is_down_says_so_ephemerally(secrets, settings, fake_redis):
    class DownProducer(RecordingProducer):
        def check(self) -> str:
            from dbagent.core.errors import Unavailable

            raise Unavailable("cannot reach Redis at redis://:pw@redis-host:6379/0")

    client = TestClient(create_app(settings, DownProducer(settings, client=fake_redis)))
    response = slack_request(client, {"user_id": "U024BE7LH", "text": "rollback staging 1"})
    assert response.json() == {
        "response_type": "ephemeral",
        "text": "Could not queue rollback of staging: the queue is unavailable, try again shortly.",
    }


def test_slack_when_redis_is_down_says_so_ephemerally(client, producer, fake_server):
    fake_server.connected = False
    response = slack_request(client, {"user_id": "U024BE7LH", "text": "rollback staging 1"})
    assert response.status_code == 200
    assert response.json() == {
        "response_type": "ephemeral",
        "text": "Could not handle this request: the queue is unavailable, try again shortly.",
    }
    assert producer.sent == []


# -- /healthz and /metrics ---------------------------------------------------------------------------------


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_metrics_count_commands_requests_and_the_stream(client, fake_redis, prefix):
    publish(fake_redis, prefix, Event(type="command.accepted", db="staging"), Event(type="lock.acquired", db="staging"))
    client.post("/v1/commands", json={"type": "status", "db": "staging"}, headers=AUTH)
    client.post("/v1/commands", json={"type": "status", "db": "staging"}, headers=AUTH)
    client.get("/v1/commands/some-id", headers=AUTH)
    client.get("/v1/events", headers={"Authorization": "Bearer wrong"})

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'dbagent_api_commands_accepted_total{db="staging",type="status"} 2.0' in text
    assert 'dbagent_api_http_requests_total{method="POST",route="/v1/commands",status="202"} 2.0' in text
    # by route template, never by raw path
    assert 'route="/v1/commands/{command_id}",status="404"' in text and "some-id" not in text
    assert 'route="/v1/events",status="401"' in text
    assert "dbagent_event_stream_length 2.0" in text


def test_metrics_registry_belongs_to_each_app(secrets, settings, producer):
    first, second = TestClient(create_app(settings, producer)), TestClient(create_app(settings, producer))
    first.post("/v1/commands", json={"type": "status", "db": "staging"}, headers=AUTH)
    assert "dbagent_api_commands_accepted_total{" in first.get("/metrics").text
    assert "dbagent_api_commands_accepted_total{" not in second.get("/metrics").text


@pytest.mark.parametrize(
    "listen, expected",
    [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("0.0.0.0:80", ("0.0.0.0", 80)), ("[::1]:8443", ("::1", 8443))],
)
def test_parse_listen(listen, expected):
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["8080", ":8080", "host:", "host:http", "host:70000"])
def test_parse_listen_refuses(listen):
    with pytest.raises(BadInput, match="host:port"):
        parse_listen(listen)


# -- hostile input: bounded, strictly typed, never a 5xx -------------------------------------------------


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"type": "rollback", "db": "staging", "args": {"steps": True}}, "steps: Input should be a valid integer"),
        ({"type": "rollback", "db": "staging", "args": {"steps": "2"}}, "steps: Input should be a valid integer"),
        ({"type": "rollback", "db": "staging", "args": {"steps": 10**30}}, "steps: Input should be less than or equal to 10000"),
        ({"type": "rollback", "db": "staging", "args": {"to": "base", "cause": {"run_command_id": "x"}}},
         "cause: only the agent sets it"),
        ({"type": "status", "db": "staging", "actor": "alice\n2025-01-01 INFO queued rollback of production"},
         "actor: must not contain control characters"),
        ({"type": "status", "db": "staging", "actor": "\x1b[2K\x1b[1Galice"}, "actor: must not contain control characters"),
        ({"type": "status", "db": "staging", "ticket": "CHG-1\nforged"}, "ticket: must not contain control characters"),
        ({"type": "status", "db": "staging", "ticket": "x" * 201}, "ticket: String should have at most 200 characters"),
        ({"type": "restore", "db": "staging", "args": {"path": "/b/" + "x" * 5000}}, "path: String should have at most 4096 characters"),
        ({"type": "x" * 101, "db": "staging"}, "type: String should have at most 100 characters"),
        ({"type": "status", "db": "staging\n"}, "db: must not contain control characters"),
    ],
)
def test_hostile_command_is_422_with_the_reason(client, producer, body, reason):
    response = client.post("/v1/commands", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert reason in response.json()["error"]
    assert producer.sent == []


def test_a_forged_log_line_in_the_actor_never_reaches_the_log(client, producer, caplog):
    caplog.set_level("INFO", logger="dbagent.interfaces.api")
    forged = "alice\n2025-01-01 12:00:00 INFO dbagent.interfaces.api: queued rollback of production for root"
    response = client.post("/v1/commands", json={"type": "status", "db": "staging", "actor": forged}, headers=AUTH)

    assert response.status_code == 422
    assert not [r for r in caplog.records if "\n" in r.getMessage() or "\x1b" in r.getMessage()]
    assert producer.sent == []


def test_log_lines_escape_what_a_request_brings(client, caplog):
    caplog.set_level("INFO", logger="dbagent.interfaces.api")
    body = urlencode({"user_id": "UX\n2025-01-01 INFO forged\x1b[31m", "text": "status staging"}).encode()
    sent_at = str(int(time.time()))
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": sent_at,
        "X-Slack-Signature": expected_signature(SLACK_SECRET.encode(), sent_at, body),
    }
    client.post("/v1/chatops/slack", content=body, headers=headers)
    replayed = client.post("/v1/chatops/slack", content=body, headers=headers)  # logged, with the user id

    assert replayed.status_code == 401
    [line] = [r.getMessage() for r in caplog.records if "replayed" in r.getMessage()]
    assert line == "refused a replayed Slack request from UX\\n2025-01-01 INFO forged\\x1b[31m"


def test_a_body_over_the_limit_is_413_by_its_content_length(client, producer, fake_redis):
    body = json.dumps({"type": "status", "db": "staging", "ticket": "x" * (MAX_BODY_BYTES + 1)}).encode()
    response = client.post("/v1/commands", content=body, headers={**AUTH, "Content-Type": "application/json"})

    assert response.status_code == 413
    assert response.json() == {"error": f"request body too large ({len(body)} bytes): the limit is {MAX_BODY_BYTES} bytes"}
    assert producer.sent == [] and fake_redis.keys("*") == []


@pytest.mark.parametrize(("length", "status"), [("9" * 30, 413), (str(2**70), 413), ("12abc", 400), ("-1", 400)])
def test_a_content_length_too_large_or_not_a_number_is_refused(client, producer, length, status):
    response = client.post("/v1/commands", content=b"{}", headers={**AUTH, "Content-Type": "application/json", "Content-Length": length})
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    assert producer.sent == []


@pytest.mark.parametrize(
    "body",
    [b"[" * 60_000, b'{"type": "status", "db": "staging", "args": {"limit": ' + b"9" * 5000 + b"}}"],
    ids=["nested too deep", "a 5000-digit number"],
)
def test_a_body_json_cannot_read_is_422_in_the_apis_shape(client, producer, body):
    response = client.post("/v1/commands", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json() == {"error": "the request body is not valid JSON (too deeply nested, or a number too long)"}
    assert producer.sent == []


def test_unknown_routes_and_methods_answer_in_the_apis_shape(client):
    assert client.get("/v2/nothing").json() == {"error": "Not Found"}
    assert client.put("/healthz").status_code == 405 and client.put("/healthz").json() == {"error": "Method Not Allowed"}


def test_a_body_streamed_past_the_limit_without_a_length_is_413(client, producer):
    def chunks():  # chunked transfer encoding: no Content-Length
        for _ in range(100):
            yield b" " * 1024

    response = client.post("/v1/commands", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})

    assert response.status_code == 413
    assert response.json() == {"error": f"request body too large (more than {MAX_BODY_BYTES} bytes): the limit is {MAX_BODY_BYTES} bytes"}
    assert producer.sent == []


def test_a_body_within_the_limit_streamed_in_chunks_is_read_whole(client, producer):
    body = json.dumps({"type": "status", "db": "staging", "ticket": "CHG-1"}).encode()

    response = client.post("/v1/commands", content=iter([body[:10], body[10:]]), headers={**AUTH, "Content-Type": "application/json"})

    assert response.status_code == 202
    assert [(c.type, c.ticket) for c in producer.sent] == [("status", "CHG-1")]


def test_a_slack_body_over_the_limit_is_413(client, producer):
    response = slack_request(client, {"user_id": "U024BE7LH", "text": "status staging", "padding": "x" * MAX_BODY_BYTES})
    assert response.status_code == 413
    assert producer.sent == []


def test_a_long_value_in_an_error_does_not_hold_up_the_api(client):
    # What froze the API: an error message quoting a 60,000-character value went through
    # redaction that was quadratic in it (6 s; 200,000 characters took 57 s). Linear now, it
    # takes milliseconds: 1 s is a complexity bound with a wide margin, not a benchmark.
    started = time.monotonic()
    response = client.get("/v1/events", params={"db": "a" * 60_000}, headers=AUTH)
    took_s = time.monotonic() - started

    assert response.status_code == 422 and "unknown database 'aaaa" in response.json()["error"]
    assert took_s < 1.0
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "after",
    [
        "١٢٣",  # Unicode digits: \d matches them, Redis does not
        "²",
        "1700000000000-0\n",
        "99999999999999999999999-0",
        "18446744073709551616-0",  # 2**64
        "1-18446744073709551616",
        "1-",
        "-1",
        "1-2-3",
        "+",
    ],
)
def test_a_malformed_stream_id_is_422_not_503(client, after):
    response = client.get("/v1/events", params={"after": after}, headers=AUTH)
    assert response.status_code == 422, response.text
    assert "after must be a stream id" in response.json()["error"]


def test_the_largest_stream_id_has_nothing_after_it(client, fake_redis, prefix):
    publish(fake_redis, prefix, Event(type="lock.acquired", db="staging"))
    largest = f"{2**64 - 1}-{2**64 - 1}"

    response = client.get("/v1/events", params={"after": largest}, headers=AUTH)

    assert response.status_code == 200
    assert response.json() == {"events": [], "last_id": largest}
    assert client.get("/v1/events", params={"after": f"{2**64 - 1}"}, headers=AUTH).json()["events"] == []


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"db": "staging", "actor": "app\nforged"}, "actor: must not contain control characters"),
        ({"db": "staging", "ticket": "\x1b[2J"}, "ticket: must not contain control characters"),
        ({"db": "staging", "detail": "boom\x1b[2J"}, "detail: must not contain control characters other than newlines"),
        ({"db": "staging", "detail": "x" * 4001}, "detail: String should have at most 4000 characters"),
    ],
)
def test_hostile_startup_failed_report_is_422(client, fake_redis, prefix, body, reason):
    response = client.post("/v1/events/startup-failed", json=body, headers=AUTH)
    assert response.status_code == 422
    assert reason in response.json()["error"]
    assert EventLog(fake_redis, prefix).tail(10) == []


def test_a_startup_failed_detail_may_span_lines(client, fake_redis, prefix):
    response = client.post("/v1/events/startup-failed", json={"db": "staging", "detail": "boom\n\tat main()"}, headers=AUTH)
    assert response.status_code == 202
    [(_, event)] = EventLog(fake_redis, prefix).tail(10)
    assert event.data["detail"] == "boom\n\tat main()"


@pytest.mark.parametrize("text", ["rollback staging ²", "rollback staging ١", "rollback staging 99999999999"])
def test_slack_rollback_with_a_number_that_is_not_one_is_a_usage_reply(client, producer, text):
    response = slack_request(client, {"user_id": "U024BE7LH", "text": text})
    assert response.status_code == 200
    assert response.json()["response_type"] == "ephemeral"
    assert "rollback <db> <N>" in response.json()["text"]
    assert producer.sent == []


@pytest.mark.parametrize(
    "text, says",
    [
        ("rollback staging 20000", "steps: Input should be less than or equal to 10000"),
        ("rollback staging to " + "x" * 300, "to: String should have at most 200 characters"),
        ("rollback staging to 008\x1b[2J", "to: must not contain control characters"),
        ("status " + "x" * 2000, "the limit is 1000"),
    ],
)
def test_slack_out_of_bounds_is_an_ephemeral_reason(client, producer, text, says):
    response = slack_request(client, {"user_id": "U024BE7LH", "text": text})
    assert response.status_code == 200
    assert response.json()["response_type"] == "ephemeral"
    assert says in response.json()["text"]
    assert producer.sent == []
