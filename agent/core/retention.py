"""Retention: which backups to keep and which to delete, and why. Pure: no I/O, no clock.

``apply_retention(backups, now, policy)`` gives one decision per backup, newest
first by the ``created`` time recorded in its manifest (ties broken by path so
the answer never depends on input order); file names are never used to order.
All times are UTC: every day, ISO week and month is a UTC one.

The rules, by the backup's trigger:

- ``schedule``: grandfather-father-son, with the semantics of restic's
  ``forget --keep-daily/--keep-weekly/--keep-monthly``. Walking the backups
  newest first, each of the three rules independently keeps a backup when its
  bucket (UTC date ``%Y-%m-%d``, ISO week ``%G-W%V``, month ``%Y-%m``) differs
  from the last bucket that rule kept, until it has kept N buckets. Only
  periods that have backups count: ``daily=3`` over backups on days 1, 5, 9
  and 10 keeps days 10, 9 and 5. A count of 0 turns that rule off.
- ``pre-migration``: kept while at most ``pre_migration_days`` days old
  (exactly that old is still kept), deleted after.
- ``manual``: never deleted automatically, unless ``manual_days`` is set; then
  like pre-migration backups with that many days.

On top of the rules:

- Safety net: the newest verified backup of each type is never deleted, even
  when every rule has expired it.
- A backup created more than ``future_skew`` after ``now`` is from the future:
  kept, with a warning to check the clock, and left out of everything else
  (it takes no GFS slot and is not the safety net's newest verified backup).

Differences from restic:

- GFS runs per backup type: full, schema and data backups each get their own
  daily, weekly and monthly buckets, so a schema dump never takes the slot of
  a full one (restic groups snapshots by host and paths instead).
- Only scheduled backups take part in GFS; pre-migration and manual backups
  follow their own age rules, which restic does not have (the nearest is
  ``--keep-within``, but that is measured from the newest snapshot, not from
  now), and never take a GFS slot.
- Buckets are UTC, where restic uses the host's local time zone.
- restic (since 0.17) also keeps the oldest snapshot while a rule has count
  left ("oldest daily snapshot"); here a rule with count left just keeps fewer
  buckets, and the safety net is what guarantees something survives.
- No ``-1`` for "keep all" and no hourly, yearly, last or tag rules.
- The safety net and the handling of future-dated backups are dbagent's own:
  restic counts a future snapshot in its buckets like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_NOT_KEPT_BY_GFS = "schedule: not the newest of any kept day, week or month"

# Each GFS rule: the policy field with its count, and the bucket of a UTC time.
_GFS_RULES: tuple[tuple[str, Callable[[datetime], str]], ...] = (
    ("daily", lambda t: t.strftime("%Y-%m-%d")),
    ("weekly", lambda t: t.strftime("%G-W%V")),  # ISO year: 2027-01-01 is in 2026-W53
    ("monthly", lambda t: t.strftime("%Y-%m")),
)


class BackupInfo(BaseModel):
    """What retention needs to know of one complete backup, from its manifest."""

    model_config = ConfigDict(frozen=True)

    path: str
    type: Literal["full", "schema", "data"]
    trigger: Literal["manual", "pre-migration", "schedule"]
    created: datetime
    verified: bool

    @field_validator("created")
    @classmethod
    def _created_is_utc(cls, value: datetime) -> datetime:
        return _as_utc(value, "created")


class RetentionPolicy(BaseModel):
    """How long each kind of backup is kept; counts are periods that have backups."""

    model_config = ConfigDict(frozen=True)

    pre_migration_days: int = Field(30, ge=0)
    daily: int = Field(7, ge=0)
    weekly: int = Field(4, ge=0)
    monthly: int = Field(12, ge=0)
    manual_days: int | None = Field(None, ge=0)  # None: manual backups are never pruned
    future_skew: timedelta = timedelta(minutes=5)  # clock drift tolerated before "from the future"

    @field_validator("future_skew")
    @classmethod
    def _skew_not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("future_skew cannot be negative")
        return value


class Decision(BaseModel):
    """Keep or delete one backup: every rule that keeps it, or the one reason it goes."""

    model_config = ConfigDict(frozen=True)

    backup: BackupInfo
    keep: bool
    reasons: tuple[str, ...]
    warning: str | None = None


def apply_retention(
    backups: Iterable[BackupInfo], now: datetime, policy: RetentionPolicy
) -> list[Decision]:
    """Decide for every backup whether it is kept, newest first by created time."""
    now = _as_utc(now, "now")
    ordered = _newest_first(backups)
    future = [b.created > now + policy.future_skew for b in ordered]
    present = [i for i, b in enumerate(ordered) if not future[i]]

    kept_by: list[list[str]] = [[] for _ in ordered]
    for kind in ("full", "schema", "data"):
        of_kind = [i for i in present if ordered[i].type == kind]
        scheduled = [i for i in of_kind if ordered[i].trigger == "schedule"]
        for i, reasons in zip(scheduled, _gfs_reasons([ordered[i] for i in scheduled], policy)):
            kept_by[i].extend(reasons)
        newest_verified = next((i for i in of_kind if ordered[i].verified), None)
        if newest_verified is not None:
            kept_by[newest_verified].append(f"newest verified {kind} backup")

    decisions = []
    for i, backup in enumerate(ordered):
        if future[i]:
            decisions.append(_from_the_future(backup, now))
            continue
        keep_by_age, age_reason = _age_rule(backup, now, policy)
        reasons = ([age_reason] if keep_by_age else []) + kept_by[i]
        if reasons:
            decisions.append(Decision(backup=backup, keep=True, reasons=tuple(reasons)))
        else:
            decisions.append(Decision(backup=backup, keep=False, reasons=(age_reason,)))
    return decisions


def _as_utc(value: datetime, name: str) -> datetime:
    """The same instant in UTC; a naive datetime is refused, since its zone is a guess."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(UTC)


def _newest_first(backups: Iterable[BackupInfo]) -> list[BackupInfo]:
    """Backups by created time, newest first; equal times by path, for a stable answer."""
    by_path = sorted(backups, key=lambda b: b.path)
    return sorted(by_path, key=lambda b: b.created, reverse=True)  # stable: keeps path order


def _gfs_reasons(scheduled: Sequence[BackupInfo], policy: RetentionPolicy) -> list[list[str]]:
    """The GFS rules that keep each of one type's scheduled backups (given newest first)."""
    reasons: list[list[str]] = [[] for _ in scheduled]
    for rule, bucket_of in _GFS_RULES:
        left: int = getattr(policy, rule)
        last_kept: str | None = None
        for i, backup in enumerate(scheduled):
            if left == 0:
                break
            bucket = bucket_of(backup.created)
            if bucket != last_kept:
                reasons[i].append(f"{rule} {bucket}")
                last_kept = bucket
                left -= 1
    return reasons


def _age_rule(backup: BackupInfo, now: datetime, policy: RetentionPolicy) -> tuple[bool, str]:
    """Whether the backup's trigger keeps it by age, and the reason either way."""
    if backup.trigger == "schedule":
        return False, _NOT_KEPT_BY_GFS
    days = policy.pre_migration_days if backup.trigger == "pre-migration" else policy.manual_days
    if days is None:
        return True, "manual: never pruned automatically (manual_days not set)"
    age = max(now - backup.created, timedelta(0))  # within the clock skew counts as new
    limit = timedelta(days=days)
    if age <= limit:
        return True, f"{backup.trigger}, {_days(age.days)} old (kept {_days(days)})"
    # Past the limit by less than a day would otherwise read "30 days old (kept 30 days)".
    old = _days(age.days) if age.days > days else f"more than {_days(days)}"
    return False, f"{backup.trigger}, {old} old (kept {_days(days)})"


def _from_the_future(backup: BackupInfo, now: datetime) -> Decision:
    """Keep a backup dated after now, and say that a clock is wrong somewhere."""
    created = _iso(backup.created)
    return Decision(
        backup=backup,
        keep=True,
        reasons=(f"from the future (created {created}): kept, check the clock",),
        warning=(
            f"{backup.path} was created {created}, after now ({_iso(now)}): "
            "the clock of this host or of the one that took it is wrong"
        ),
    )


def _days(n: int) -> str:
    """A count of days, as a reason says it."""
    return f"{n} day" if n == 1 else f"{n} days"


def _iso(t: datetime) -> str:
    """A UTC time as reasons print it: 2026-12-01T00:00:00Z."""
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")
