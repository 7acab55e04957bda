"""Keep secrets out of what dbagent prints, logs and publishes.

What is redacted is often untrusted and large (an API request, another
session's query from ``pg_stat_activity``), so every pattern here runs in time
linear in the text: each can start only where its first token starts (a
lookbehind, a keyword), and every repetition is possessive, so a failed match
never re-scans what it consumed. ``tests/unit/test_redact.py`` holds them to it
on 200,000-character adversarial inputs.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@host -> scheme://user:***@host (any scheme: postgresql, redis, rediss…)
# The secret runs to the authority's last '@' (redis-py accepts an unescaped '@' in it). A scheme
# starts only where no scheme character precedes it, so a long run of them is tried once, not at
# each of its positions; the secret's backtracking to its last '@' stays inside one authority.
_URL_PASSWORD = re.compile(
    r"(?P<head>(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*+://[^:/?#@\s]*+:)(?P<secret>[^/?#\s]*)(?P<tail>@)"
)
# The same at the very end of a text that was cut short (a query read with left(query, n)): the
# '@' is gone, and what follows the user is masked unless it is a port.
_CUT_URL_PASSWORD = re.compile(
    r"(?P<head>(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*+://[^:/?#@\s\[]++:)(?P<secret>(?![0-9]*+\Z)[^/?#\s@]++)\Z"
)

# A quoted value runs to its closing quote: one followed by a separator or the end. A doubled ''
# (SQL) or an escaped \' (libpq, E'...') is part of the value, and so is a quote followed by
# anything but a separator (a value quoted inside a SQL literal: ''secret''); an unterminated
# value (a cut text) runs to the end, so half a secret is masked too.
_SINGLE_QUOTED = r"'(?:[^'\\]++|''|\\[\s\S]?|'(?![\s&;),]|\Z))*+'?"
_DOUBLE_QUOTED = r'"(?:[^"\\]++|\\[\s\S]?)*+"?'

# libpq keyword form and environment-style assignments: password=secret, PGPASSWORD=secret;
# in SQL too (dblink_connect('host=x password=secret'), CONNECTION '... password=...').
_KEYWORD_PASSWORD = re.compile(
    r"(?P<head>\b(?:password|passwd|pgpassword|sslpassword)\s*+=\s*+)"
    rf"(?P<secret>{_SINGLE_QUOTED}|{_DOUBLE_QUOTED}|[^\s&;'\")]++)",
    re.IGNORECASE,
)
# ?password=secret in a URL's query
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<secret>[^&\s]++)", re.IGNORECASE)

# SQL: a PASSWORD keyword followed by a literal. ALTER/CREATE ROLE|USER ... [ENCRYPTED] PASSWORD '...',
# CREATE|ALTER USER MAPPING / SERVER ... OPTIONS ([ADD|SET] password '...'). The literal: standard
# ('it''s'), escape (E'it\'s': backslashes count everywhere, so a literal is never cut short
# when standard_conforming_strings is off), Unicode (U&'...'), or dollar-quoted ($$...$$,
# $tag$...$tag$, a tag as long as an identifier); unterminated, it runs to the end of the text.
_SQL_STRING = rf"(?:[EeNn]|[Uu]&)?{_SINGLE_QUOTED}"
_DOLLAR_STRING = r"\$(?P<tag>(?:[^\W\d]\w{0,62})?)\$(?:[^$]++|\$(?!(?P=tag)\$))*+(?:\$(?P=tag)\$)?"
_SQL_PASSWORD = re.compile(
    rf"(?P<head>\bpassword\s*+)(?P<secret>{_SQL_STRING}|{_DOLLAR_STRING}|\$(?=[^\W\d])[\s\S]*+)",
    re.IGNORECASE,
)

# Cheap tests that let a text without any of these words skip the patterns altogether.
_MARKERS = ("://", "passw")


def redact(text: object) -> str:
    """The text with every password it contains replaced by ``***``."""
    value = str(text)
    folded = value.lower()
    if not any(marker in folded for marker in _MARKERS):
        return value
    if "://" in value:
        value = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", value)
    if "passw" in folded:
        value = _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", value)
        value = _SQL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", value)
        value = _KEYWORD_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", value)
    return value


def redact_query(query: object) -> str:
    """Another session's SQL (``pg_stat_activity.query``) with its secrets masked.

    Such a query may be cut short (PostgreSQL keeps ``track_activity_query_size``
    bytes of it; dbagent reads a prefix), so besides what ``redact`` masks, a
    URL's credentials cut off before their ``@`` are masked too.
    """
    value = redact(query)
    if "://" in value:
        value = _CUT_URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", value)
    return value


# C0 controls, DEL, C1 controls (NEL among them), the Unicode line and paragraph separators and
# the bidirectional overrides: what can end a log line early, or make it read as something else.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """The text on one line, control characters shown as escapes (``\\n``, ``\\x1b``): safe in a log line."""
    value = str(text)
    return _CONTROL.sub(_escape_control, value)


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
    if named:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def has_control(text: str) -> bool:
    """Whether the text holds a character ``printable`` would escape."""
    return _CONTROL.search(text) is not None
