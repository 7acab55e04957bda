"""The HTTP API under generated input: whatever a client sends, the answer is never a 5xx.

Schemathesis drives every operation of the app's own OpenAPI schema in process
(fakeredis, a real Producer whose Celery publish is recorded), with valid and
invalid data; Hypothesis drives what the schema cannot describe: a command's
arguments per type, and Slack's signed form bodies. Examples are few enough that
the module runs in well under a minute; a failure prints the example that found it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from unittest import mock
from urllib.parse import urlencode

import fakeredis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbagent.core.commands import ARGS, CommandType
from dbagent.interfaces.api import create_app
from dbagent.interfaces.slack import expected_signature
from dbagent.settings import Settings
from tests.unit.test_api import AUTH, SLACK_SECRET, RecordingProducer

# Nothing listens on port 1: a read that falls back to PostgreSQL is refused at once.
UNREACHABLE = "postgresql://migrator:hunter2@127.0.0.1:1/aegisx"

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples each run: a failure here is not a flake
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def build_app():
    """One app for the module, on a fakeredis of its own (schemathesis reads its schema at import)."""
    settings_ = Settings(
        redis={"prefix": f"fuzz-{uuid.uuid4().hex[:12]}"},
        databases={"staging": {"url": UNREACHABLE}, "production": {"url": UNREACHABLE}},
        chatops={"permissions": {"U024BE7LH": ["*:staging"], "UREADER": ["status:*"]}},
    )
    producer = RecordingProducer(settings_, client=fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    secrets = {
        "DBAGENT_API_TOKENS": f"{AUTH['Authorization'].removeprefix('Bearer ')}=ci",
        "DBAGENT_SIGNING_KEY": "unit-signing-key",
        "DBAGENT_SLACK_SIGNING_SECRET": SLACK_SECRET,
    }
    with mock.patch.dict(os.environ, secrets):  # read once, when the app is created
        return create_app(settings_, producer)


APP = build_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture
def app():
    return APP


def no_server_error(response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"


@schema.parametrize()
@FUZZ
def test_no_operation_answers_a_5xx(case):
    # The generated Authorization header would only ever be refused (401): the token is ours.
    headers = {name: value for name, value in (case.headers or {}).items() if name.lower() != "authorization"}
    case.headers = {**headers, **AUTH}
    no_server_error(case.call())


# -- what the schema leaves open -------------------------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
TYPES = [t.value for t in CommandType]


@st.composite
def commands(draw):
    """A body for POST /v1/commands: a known type with its own argument names, any values (or a stray name)."""
    type_ = draw(st.sampled_from([*TYPES, "drop"]))
    names = [*ARGS[CommandType(type_)].model_fields, "cause"] if type_ != "drop" else ["x"]
    args = draw(st.dictionaries(st.sampled_from(names) | st.text(max_size=8), JSON_VALUES, max_size=4))
    body = {"type": type_, "db": draw(st.sampled_from(["staging", "production", "nope"]) | st.text(max_size=20)), "args": args}
    for field in ("actor", "ticket"):
        if draw(st.booleans()):
            body[field] = draw(st.text(max_size=250))
    return body


@given(body=commands())
@FUZZ
def test_any_command_body_is_queued_or_refused_with_a_reason(app, body):
    with TestClient(app) as client:
        response = client.post("/v1/commands", content=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"})
    no_server_error(response)
    assert response.status_code in (202, 422), response.text
    if response.status_code == 422:
        assert response.json()["error"]


@given(body=st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode))
@FUZZ
def test_any_bytes_as_a_command_body_are_refused_not_a_crash(app, body):
    with TestClient(app) as client:
        response = client.post("/v1/commands", content=body, headers={**AUTH, "Content-Type": "application/json"})
    no_server_error(response)


# Digits that are not ASCII: str.isdigit() and \d say yes to them, int() and Redis say no.
ODD_DIGITS = st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=3)
NUMBERS = st.integers(0, 2**70).map(str) | ODD_DIGITS | st.sampled_from(["0", "-1", "1e3", " 1", "1\n"])
SLACK_WORD = (
    st.sampled_from(["staging", "production", "nope", "to", "base", "\x1b[2J", "x" * 300])
    | NUMBERS | st.text(max_size=12)
)
SLACK_TEXT = st.one_of(
    st.text(max_size=200),
    st.builds(
        lambda verb, words: " ".join([verb, *words]),
        st.sampled_from(["rollback", "migrate", "status", "verify", "history", "help", "drop"]),
        st.lists(SLACK_WORD, max_size=3),
    ),
    st.builds(lambda n: f"rollback staging {n}", NUMBERS),
)


@given(user=st.sampled_from(["U024BE7LH", "UREADER", "USTRANGER"]) | st.text(max_size=30), text=SLACK_TEXT)
@FUZZ
def test_any_signed_slash_command_gets_an_answer_not_a_crash(app, user, text):
    # a trigger id of its own: the same body signed in the same second would be a replay
    body = urlencode({"command": "/dbagent", "trigger_id": uuid.uuid4().hex, "user_id": user, "text": text}).encode()
    sent_at = str(int(time.time()))
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": sent_at,
        "X-Slack-Signature": expected_signature(SLACK_SECRET.encode(), sent_at, body),
    }
    with TestClient(app) as client:
        response = client.post("/v1/chatops/slack", content=body, headers=headers)
    no_server_error(response)
    assert response.status_code == 200 and response.json()["response_type"] in ("ephemeral", "in_channel"), response.text


STREAM_IDS = st.one_of(
    st.text(max_size=45),
    st.builds(lambda ms, seq, tail: f"{ms}-{seq}{tail}", NUMBERS, NUMBERS, st.sampled_from(["", "\n", "-0"])),
    NUMBERS,
    st.just(f"{2**64 - 1}-{2**64 - 1}"),
)


@given(after=STREAM_IDS, db=st.none() | st.sampled_from(["staging"]) | st.text(max_size=20))
@FUZZ
def test_any_events_query_is_answered_or_refused(app, after, db):
    with TestClient(app) as client:
        response = client.get("/v1/events", params={"after": after, **({"db": db} if db is not None else {})}, headers=AUTH)
    no_server_error(response)
    assert response.status_code in (200, 422), response.text
