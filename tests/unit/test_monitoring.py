"""Sentry events are scrubbed of secrets before they leave the host."""

from dbagent.monitoring import _before_send


def test_passwords_are_scrubbed_from_every_string_sentry_would_send():
    event = {
        "message": "cannot reach postgresql://migrator:S3cret@db1/aegisx",
        "exception": {"values": [{"value": "redis://:R3dis@cache:6379/0 refused"}]},
        "extra": {"dsn": ["host=db password=S3cret"]},
        "tags": {"db": "production"},
    }
    scrubbed = _before_send(event, {})
    text = repr(scrubbed)
    assert "S3cret" not in text and "R3dis" not in text
    assert scrubbed["tags"] == {"db": "production"}
    assert "postgresql://migrator:***@db1/aegisx" in scrubbed["message"]
