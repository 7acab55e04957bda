"""The worker's boundary (dbagent.worker.intake.inspect): only a well-formed, signed call of the one task passes."""

from __future__ import annotations

import base64
import json

import pytest

from dbagent.core.commands import CommandType
from dbagent.worker.intake import MAX_MESSAGE_BYTES, Poison, excerpt, inspect, task_payload
from tests.messages import call, command_message, envelope

KEY = "unit-key"


def good() -> dict:
    return command_message(CommandType.MIGRATE, key=KEY, to="head")


def test_a_producers_message_passes_whole_and_celery_gets_it_rebuilt_from_what_was_checked():
    message = good()
    raw = envelope(call(message), headers={"timelimit": "soon", "origin": "x" * 10_000, "argsrepr": "\x1b[2J"})
    checked, tag = inspect(raw, key=KEY.encode())
    assert checked == message and tag == json.loads(raw)["properties"]["delivery_tag"]
    payload = task_payload(checked, tag, "dbagent.test")
    assert payload["headers"]["id"] == message["id"] and payload["headers"]["timelimit"] == [None, None]
    assert payload["headers"]["origin"] == "dbagent" and payload["headers"]["argsrepr"] == ""
    assert payload["properties"]["delivery_info"] == {"exchange": "", "routing_key": "dbagent.test"}
    assert json.loads(base64.b64decode(payload["body"]))[0] == [message]
    # What is rebuilt passes again (a redelivery after a crash goes through the same check).
    assert inspect(json.dumps(payload).encode(), key=KEY.encode()) == (message, tag)


def test_an_unsigned_reader_passes_when_no_key_is_configured_and_a_writer_does_not():
    reader = command_message(CommandType.STATUS, signature=None)
    assert inspect(envelope(call(reader)), key=None)[0] == reader
    writer = command_message(CommandType.MIGRATE, signature=None, to="head")
    with pytest.raises(Poison, match="no signing key"):
        inspect(envelope(call(writer)), key=None)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"body": "eyJ', "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b'"hello"', "JSON str, not an object"),
        (b"[1, 2]", "JSON list, not an object"),
        (envelope(None, raw_body="!!! not base64 !!!"), "not base64-encoded JSON"),
        (envelope(None, raw_body=base64.b64encode(b"{nope").decode()), "not base64-encoded JSON"),
        (envelope("just a string"), "not a task call"),
        (envelope([[], {}, {}]), "0 positional"),
        (envelope(call(good()), task="celery.backend_cleanup"), "for task celery.backend_cleanup"),
        (envelope(call(good()), drop=("properties",)), "no properties"),
        (envelope(call(good()), drop=("headers",)), "no headers"),
        (envelope(call(good(), "extra")), "2 positional"),
        (envelope([[good()], {"x": 1}, {}]), "1 keyword"),
        (envelope(call("not a dict")), "not one command"),
        (envelope(call(good()), headers={"eta": "2030-01-01T00:00:00"}), "'eta' header"),
        (envelope(call(good()), headers={"compression": "application/x-gzip"}), "'compression' header"),
        (envelope([[good()], {}, {"callbacks": [{"task": "x"}]}]), "chains other work"),
        (envelope(call(good()), task_id="another-id"), "task id and command id differ"),
        (envelope(call(command_message(CommandType.MIGRATE, signature="0" * 64, to="head"))), "forged or altered"),
        (envelope(call(command_message(CommandType.MIGRATE, signature=None, to="head"))), "not signed"),
        (envelope(call({**good(), "type": "drop_everything"})), "malformed command"),
        (envelope(call({**good(), "surprise": 1})), "malformed command"),
    ],
)
def test_poison_is_named(raw, reason):
    with pytest.raises(Poison, match=reason.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        inspect(raw, key=KEY.encode())


def test_size_is_checked_before_anything_is_decoded():
    huge = b"{" + b" " * MAX_MESSAGE_BYTES + b"}"
    with pytest.raises(Poison, match="over the limit"):
        inspect(huge, key=KEY.encode())
    big_field = envelope(call(command_message(CommandType.STATUS, key=KEY, marker="x" * MAX_MESSAGE_BYTES)))
    with pytest.raises(Poison, match="over the limit"):
        inspect(big_field, key=KEY.encode())


def test_the_poisons_command_is_kept_for_its_producer_when_it_got_that_far():
    forged = command_message(CommandType.ROLLBACK, steps=1)
    with pytest.raises(Poison) as caught:
        inspect(envelope(call(forged)), key=KEY.encode())
    assert caught.value.message == forged


def test_an_excerpt_is_bounded_escaped_and_masked():
    assert len(excerpt("x" * 10_000_000)) <= 121
    line = excerpt("actor\nFAKE LOG LINE \x1b[31mred\x1b[0m")
    assert "\n" not in line and "\x1b" not in line and "\\n" in line and "\\x1b" in line
    assert "hunter2" not in excerpt("postgresql://app:hunter2@db/app")
    assert excerpt(b"\xff\xfebytes").endswith("bytes")


def test_a_worker_reads_its_queue_through_the_guarded_transport_and_a_rediss_broker_checks_certificates():
    import ssl

    from dbagent.bus.queue import celery_config
    from dbagent.settings import Settings
    from dbagent.worker.app import create_app
    from dbagent.worker.intake import TRANSPORT, GuardedTransport

    settings = Settings.model_validate({"databases": {"test": {"url": "postgresql://x@h/d", "migrations": "m"}}})
    app = create_app(settings, "test")
    assert app.conf.broker_transport == TRANSPORT
    assert app.connection_for_read().get_transport_cls() is GuardedTransport
    assert "ssl_cert_reqs" not in str(celery_config(settings).get("broker_use_ssl"))
    secure = Settings.model_validate({"redis": {"url": "rediss://redis.example:6380/0"}})
    assert celery_config(secure)["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
