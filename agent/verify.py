"""Integrity checks of a database after (or apart from) a migration run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, text


@dataclass(frozen=True)
class Check:
    """One verification check and what it found."""

    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_revision(current: str | None, expected: str | None) -> Check:
    shown = current or "base"
    wanted = expected or "base"
    if current == expected:
        return Check("revision", True, f"at {shown}, as expected")
    return Check("revision", False, f"expected revision {wanted}, found {shown}")


def check_invalid_indexes(conn: Connection) -> Check:
    """Indexes left INVALID (typically by a failed CREATE INDEX CONCURRENTLY)."""
    names = [
        row[0]
        for row in conn.execute(
            text(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE NOT i.indisvalid ORDER BY 1"
            )
        )
    ]
    conn.commit()
    if names:
        return Check("invalid_indexes", False, f"invalid indexes: {', '.join(names)}")
    return Check("invalid_indexes", True, "no invalid indexes")


def run_checks(conn: Connection, current: str | None, expected: str | None) -> list[Check]:
    return [check_revision(current, expected), check_invalid_indexes(conn)]


def summary(checks: list[Check]) -> str:
    failed = [c for c in checks if not c.ok]
    if not failed:
        return f"all {len(checks)} checks passed"
    return "; ".join(f"{c.name}: {c.detail}" for c in failed)
