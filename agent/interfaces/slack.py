"""Slack slash commands: request signatures, the command grammar, and who may do what.

Pure: the caller passes the raw body, the headers' values and the clock; this
module does no I/O, so every rule here is tested with literal data.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import parse_qs

from dbagent.core.errors import BadInput

# Slack's advice: refuse requests whose timestamp is more than five minutes
# from now, so a captured request cannot be replayed later.
REPLAY_WINDOW_S = 5 * 60

SIGNATURE_VERSION = "v0"

# The longest slash command text read: the grammar's longest is a few names and a revision.
MAX_TEXT_CHARS = 1000
# A number of steps: ASCII digits ('²'.isdigit() is true and int() refuses it), a few of them.
_STEPS = re.compile(r"[0-9]{1,9}")

USAGE = "\n".join(
    [
        "usage:",
        "  status [db]              current revision, pending migrations, lock holder",
        "  migrate <db> [to <REV>]  backup, migrate (to head or REV), verify",
        "  rollback <db> <N>        undo the last N migrations",
        "  rollback <db> to <REV>   go back to revision REV (or base)",
        "  verify <db>              integrity checks",
        "  history <db>             the change log",
        "  help                     this text",
    ]
)


class SignatureRejected(BadInput):
    """Raised when a request's Slack signature is missing, does not match, or is
    outside the replay window."""


class UsageError(BadInput):
    """Raised when a slash command's text does not follow the grammar in USAGE."""


def expected_signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``v0=`` and the hex HMAC-SHA256 of ``v0:<timestamp>:<body>``, as Slack computes it."""
    base = f"{SIGNATURE_VERSION}:{timestamp}:".encode() + body
    return f"{SIGNATURE_VERSION}=" + hmac.new(secret, base, hashlib.sha256).hexdigest()


def verify_signature(
    secret: bytes, *, timestamp: str | None, signature: str | None, body: bytes, now_s: float
) -> None:
    """Raise SignatureRejected unless Slack signed this body within the replay window."""
    if not timestamp or not signature:
        raise SignatureRejected("missing X-Slack-Request-Timestamp or X-Slack-Signature header")
    try:
        sent_s = int(timestamp)
    except ValueError:
        raise SignatureRejected("X-Slack-Request-Timestamp is not a number of seconds") from None
    if abs(now_s - sent_s) > REPLAY_WINDOW_S:
        raise SignatureRejected(
            f"request timestamp is {now_s - sent_s:.0f}s from now, outside the {REPLAY_WINDOW_S}s replay window"
        )
    # Compare bytes: the header is untrusted input and may not even be ASCII.
    if not hmac.compare_digest(signature.encode(), expected_signature(secret, timestamp, body).encode()):
        raise SignatureRejected("signature does not match")


def parse_form(body: bytes) -> dict[str, str]:
    """The fields of an application/x-www-form-urlencoded body (first value of each)."""
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


@dataclass(frozen=True)
class SlashCommand:
    """What a slash command's text asks for: a command type, a database and its arguments."""

    verb: str
    db: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def is_help(self) -> bool:
        return self.verb == "help"


def parse_text(text: str) -> SlashCommand:
    """Parse ``rollback staging 1`` and friends; UsageError (whose message is USAGE) otherwise."""
    if len(text) > MAX_TEXT_CHARS:
        raise UsageError(f"That is {len(text)} characters long, the limit is {MAX_TEXT_CHARS}.\n{USAGE}")
    words = text.split()
    if not words:
        return SlashCommand("help")
    verb, rest = words[0].lower(), words[1:]
    if verb == "help" and not rest:
        return SlashCommand("help")
    if verb == "status" and len(rest) <= 1:
        return SlashCommand("status", rest[0] if rest else None)
    if verb in ("verify", "history") and len(rest) == 1:
        return SlashCommand(verb, rest[0])
    if verb == "migrate":
        if len(rest) == 1:
            return SlashCommand("migrate", rest[0], {"to": None})
        if len(rest) == 3 and rest[1].lower() == "to":
            return SlashCommand("migrate", rest[0], {"to": rest[2]})
    if verb == "rollback":
        if len(rest) == 2 and _STEPS.fullmatch(rest[1]) and int(rest[1]) >= 1:
            return SlashCommand("rollback", rest[0], {"steps": int(rest[1])})
        if len(rest) == 3 and rest[1].lower() == "to":
            return SlashCommand("rollback", rest[0], {"to": rest[2]})
    raise UsageError(USAGE)


def is_allowed(permissions: dict[str, list[str]], user_id: str, verb: str, db: str) -> bool:
    """Whether one of the user's ``command:database`` patterns allows ``verb`` on ``db``.

    Each half is matched on its own with ``*`` wildcards, case-sensitively, so a
    wildcard never spans the colon. A pattern without a colon matches nothing
    (write ``*:*`` for everything): a typo denies rather than grants.
    """
    for pattern in permissions.get(user_id, []):
        verb_pattern, colon, db_pattern = pattern.partition(":")
        if colon and fnmatchcase(verb, verb_pattern) and fnmatchcase(db, db_pattern):
            return True
    return False
