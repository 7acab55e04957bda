"""Slack slash commands: signatures, the grammar and permissions, on literal data."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from dbagent.interfaces.slack import (
    MAX_TEXT_CHARS,
    USAGE,
    SignatureRejected,
    SlashCommand,
    UsageError,
    expected_signature,
    is_allowed,
    parse_form,
    parse_text,
    verify_signature,
)

# The example of Slack's documentation ("Verifying requests from Slack").
SLACK_SECRET = b"8f742231b10e8888abcd99yyyzzz85a5"
SLACK_TIMESTAMP = "1531420618"
SLACK_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
    b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
    b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
SLACK_SIGNATURE = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"

NOW = float(SLACK_TIMESTAMP)


def test_signature_matches_slacks_documented_example():
    assert expected_signature(SLACK_SECRET, SLACK_TIMESTAMP, SLACK_BODY) == SLACK_SIGNATURE
    verify_signature(SLACK_SECRET, timestamp=SLACK_TIMESTAMP, signature=SLACK_SIGNATURE, body=SLACK_BODY, now_s=NOW)


def test_signature_is_hmac_sha256_of_version_timestamp_and_body():
    body = b"user_id=U1&text=status"
    mac = hmac.new(b"s3cret", b"v0:1700000000:" + body, hashlib.sha256).hexdigest()
    verify_signature(b"s3cret", timestamp="1700000000", signature=f"v0={mac}", body=body, now_s=1_700_000_010)


@pytest.mark.parametrize(
    "secret, timestamp, signature, body, now_s, reason",
    [
        (b"another-secret", SLACK_TIMESTAMP, SLACK_SIGNATURE, SLACK_BODY, NOW, "does not match"),
        (SLACK_SECRET, SLACK_TIMESTAMP, SLACK_SIGNATURE, SLACK_BODY.replace(b"text=", b"text=rollback+prod+1"), NOW, "does not match"),
        (SLACK_SECRET, SLACK_TIMESTAMP, SLACK_SIGNATURE.replace("v0=a2", "v0=b2"), SLACK_BODY, NOW, "does not match"),
        (SLACK_SECRET, SLACK_TIMESTAMP, SLACK_SIGNATURE.removeprefix("v0="), SLACK_BODY, NOW, "does not match"),
        (SLACK_SECRET, SLACK_TIMESTAMP, "v0=ünïcode", SLACK_BODY, NOW, "does not match"),
        # signed for another moment: the timestamp is part of what is signed
        (SLACK_SECRET, str(int(NOW) + 1), SLACK_SIGNATURE, SLACK_BODY, NOW, "does not match"),
        (SLACK_SECRET, SLACK_TIMESTAMP, SLACK_SIGNATURE, SLACK_BODY, NOW + 301, "replay window"),
        (SLACK_SECRET, SLACK_TIMESTAMP, SLACK_SIGNATURE, SLACK_BODY, NOW - 301, "replay window"),
        (SLACK_SECRET, "yesterday", SLACK_SIGNATURE, SLACK_BODY, NOW, "not a number"),
        (SLACK_SECRET, None, SLACK_SIGNATURE, SLACK_BODY, NOW, "missing"),
        (SLACK_SECRET, SLACK_TIMESTAMP, None, SLACK_BODY, NOW, "missing"),
        (SLACK_SECRET, SLACK_TIMESTAMP, "", SLACK_BODY, NOW, "missing"),
    ],
    ids=[
        "wrong-secret", "tampered-body", "wrong-signature", "no-version-prefix", "non-ascii-signature",
        "other-timestamp", "too-old", "from-the-future", "timestamp-not-a-number", "no-timestamp",
        "no-signature", "empty-signature",
    ],
)
def test_signature_rejected(secret, timestamp, signature, body, now_s, reason):
    with pytest.raises(SignatureRejected, match=reason):
        verify_signature(secret, timestamp=timestamp, signature=signature, body=body, now_s=now_s)


@pytest.mark.parametrize("offset_s", [-300, -1, 0, 1, 300])
def test_signature_accepted_within_five_minutes(offset_s):
    verify_signature(
        SLACK_SECRET, timestamp=SLACK_TIMESTAMP, signature=SLACK_SIGNATURE, body=SLACK_BODY, now_s=NOW + offset_s
    )


def test_parse_form_takes_slacks_fields():
    form = parse_form(b"user_id=U024BE7LH&text=rollback+staging+1&command=%2Fdbagent&empty=")
    assert form == {"user_id": "U024BE7LH", "text": "rollback staging 1", "command": "/dbagent", "empty": ""}


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("", SlashCommand("help")),
        ("   ", SlashCommand("help")),
        ("help", SlashCommand("help")),
        ("status", SlashCommand("status", None)),
        ("status staging", SlashCommand("status", "staging")),
        ("STATUS staging", SlashCommand("status", "staging")),
        ("  rollback   staging  1 ", SlashCommand("rollback", "staging", {"steps": 1})),
        ("rollback production 3", SlashCommand("rollback", "production", {"steps": 3})),
        ("rollback staging to 008", SlashCommand("rollback", "staging", {"to": "008"})),
        ("rollback staging TO base", SlashCommand("rollback", "staging", {"to": "base"})),
        ("migrate staging", SlashCommand("migrate", "staging", {"to": None})),
        ("migrate staging to 010", SlashCommand("migrate", "staging", {"to": "010"})),
        ("verify staging", SlashCommand("verify", "staging")),
        ("history staging", SlashCommand("history", "staging")),
    ],
)
def test_parse_text(text, parsed):
    assert parse_text(text) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "drop staging",
        "help me",
        "status staging production",
        "rollback",
        "rollback staging",
        "rollback staging 0",
        "rollback staging -1",
        "rollback staging two",
        "rollback staging ²",  # '²'.isdigit() is true, and int('²') raises
        "rollback staging ١",  # an Arabic-Indic digit: not a number of steps either
        "rollback staging 1234567890",
        "rollback staging 1 2",
        "rollback staging to",
        "rollback staging from 008",
        "migrate",
        "migrate staging 010",
        "migrate staging to",
        "verify",
        "verify staging now",
        "history",
    ],
)
def test_parse_text_refuses_with_usage(text):
    with pytest.raises(UsageError) as caught:
        parse_text(text)
    assert caught.value.message == USAGE


PERMISSIONS = {
    "U024BE7LH": ["rollback:staging", "status:*"],
    "UADMIN": ["*:*"],
    "UPROD": ["*:prod-*"],
    "UTYPO": ["rollback", "*"],
    "UNONE": [],
}


@pytest.mark.parametrize(
    "user, verb, db, allowed",
    [
        ("U024BE7LH", "rollback", "staging", True),
        ("U024BE7LH", "rollback", "production", False),
        ("U024BE7LH", "migrate", "staging", False),
        ("U024BE7LH", "status", "production", True),
        ("U024BE7LH", "status", "staging", True),
        ("UADMIN", "rollback", "production", True),
        ("UPROD", "migrate", "prod-eu", True),
        ("UPROD", "migrate", "staging", False),
        # a wildcard never spans the colon
        ("UPROD", "migrate", "prod", False),
        # a pattern without a colon matches nothing: a typo denies
        ("UTYPO", "rollback", "staging", False),
        ("UNONE", "status", "staging", False),
        ("UNKNOWN", "status", "staging", False),
        # case-sensitive: Slack user ids and database names are matched exactly
        ("u024be7lh", "status", "staging", False),
        ("U024BE7LH", "rollback", "Staging", False),
    ],
)
def test_permission_matching(user, verb, db, allowed):
    assert is_allowed(PERMISSIONS, user, verb, db) is allowed


def test_parse_text_refuses_a_long_text_before_reading_it():
    with pytest.raises(UsageError) as caught:
        parse_text("status " + "x" * MAX_TEXT_CHARS)
    assert caught.value.message.startswith(f"That is {MAX_TEXT_CHARS + 7} characters long, the limit is {MAX_TEXT_CHARS}.")
    assert caught.value.message.endswith(USAGE)
    assert parse_text("status " + "x" * (MAX_TEXT_CHARS - 7)).db == "x" * (MAX_TEXT_CHARS - 7)
