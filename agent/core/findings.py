"""What a check found: the one ``Finding`` type of the structure checks, the lint, the checksums and the
rehearsal, and the one way to say whether a set of findings passed (``status_of``).

``Finding.to_json`` is the shape ``dbagent validate --json`` prints and the ``validation.*`` events carry
(``revision``, ``rule``, ``severity``, ``message``, ``statement``, ``fix``, ``file``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

PASSED = "passed"
FAILED = "failed"


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    """One thing a check found in one migration (``revision`` None: about the scripts as a whole)."""

    revision: str | None
    rule: str
    severity: Severity
    message: str
    statement: str | None = None  # the SQL statement it is about (the lint)
    fix: str | None = None        # what to do about it
    file: str | None = None       # the script's file name

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "rule": self.rule,
            "severity": str(self.severity),
            "message": self.message,
            "statement": self.statement,
            "fix": self.fix,
            "file": self.file,
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Finding:
        return cls(body.get("revision"), body["rule"], Severity(body["severity"]), body["message"],
                   statement=body.get("statement"), fix=body.get("fix"), file=body.get("file"))


def is_error(finding: Finding | Mapping[str, Any]) -> bool:
    severity = finding["severity"] if isinstance(finding, Mapping) else finding.severity
    return severity == Severity.ERROR


def status_of(findings: Iterable[Finding | Mapping[str, Any]]) -> str:
    """``failed`` when any finding is an error, else ``passed`` (findings as objects or in their JSON shape)."""
    return FAILED if any(is_error(f) for f in findings) else PASSED
