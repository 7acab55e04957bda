"""agent/redact.py: no password survives redact(), everything else does."""

from __future__ import annotations

import pytest

from agent.redact import MASK, redact

CASES = [
    # (text, secret, expected output)
    ("postgresql://user:secret@host/db", "secret", "postgresql://user:***@host/db"),
    ("postgresql://migrator:s3cr3t@db1:5432/aegisx", "s3cr3t", "postgresql://migrator:***@db1:5432/aegisx"),
    ("redis://:secret@host:6379/0", "secret", "redis://:***@host:6379/0"),
    ("rediss://default:secret@cache.example.com:6380/1", "secret", "rediss://default:***@cache.example.com:6380/1"),
    ("postgresql+psycopg://u:p%40ss@h/db", "p%40ss", "postgresql+psycopg://u:***@h/db"),
    ("host=x password=secret user=y", "secret", "host=x password=*** user=y"),
    ("host=x password='sec ret' user=y", "sec ret", "host=x password=*** user=y"),
    ("PGPASSWORD=secret", "secret", "PGPASSWORD=***"),
    ("env PGPASSWORD=secret pg_dump -h db1", "secret", "env PGPASSWORD=*** pg_dump -h db1"),
    (
        "postgresql://u@h/db?password=secret&sslmode=require",
        "secret",
        "postgresql://u@h/db?password=***&sslmode=require",
    ),
    (
        "postgresql://u@h/db?sslmode=require&password=secret",
        "secret",
        "postgresql://u@h/db?sslmode=require&password=***",
    ),
]


@pytest.mark.parametrize(("text", "secret", "expected"), CASES)
def test_secret_is_masked_and_the_rest_kept(text, secret, expected):
    out = redact(text)

    assert secret not in out
    assert MASK in out
    assert out == expected


def test_user_and_host_are_kept():
    out = redact("could not connect to postgresql://migrator:hunter2@db1.internal:5432/aegisx: timeout")

    assert "hunter2" not in out
    assert "migrator" in out
    assert "db1.internal:5432/aegisx" in out
    assert out.startswith("could not connect to ") and out.endswith(": timeout")


def test_several_secrets_in_one_text():
    text = "primary postgresql://a:one@h1/db, cache redis://:two@h2:6379/0, libpq password=three"
    out = redact(text)

    for secret in ("one@", "two@", "three"):
        assert secret not in out
    assert out == "primary postgresql://a:***@h1/db, cache redis://:***@h2:6379/0, libpq password=***"


def test_keyword_is_case_insensitive():
    assert redact("Password=Secret1 user=x") == "Password=*** user=x"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "migration 003 applied in 1.2s",
        "postgresql://migrator@db1:5432/aegisx",
        "redis://127.0.0.1:6379/0",
        "host=db1 user=migrator dbname=aegisx",
        "https://example.com/path?q=1&page=2",
        "time 12:30:45 at host:5432",
    ],
)
def test_text_without_secrets_is_unchanged(text):
    assert redact(text) == text


def test_non_string_input_is_stringified():
    assert redact(ValueError("postgresql://u:pw@h/db")) == "postgresql://u:***@h/db"
    assert redact(42) == "42"


def test_redis_url_password_containing_at_sign_is_fully_masked():
    out = redact("redis://:p@ss@host:6379/0")

    assert "ss@" not in out
    assert out == "redis://:***@host:6379/0"
