"""Backup schedules from configuration, as plain data (pure: no Celery, no clock)."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dbagent.settings import (
        Settings,  # the configuration, read by the caller: only its shape is used here
    )

_WEEKDAYS = {"mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "sun": 0}


@dataclass(frozen=True)
class ScheduleEntry:
    """One scheduled backup of one database."""

    name: str
    db: str
    mark: str  # daily | weekly | monthly | interval
    hour: int | None = None
    minute: int | None = None
    day_of_week: int | None = None  # cron numbering: 0 = Sunday
    day_of_month: int | None = None
    every_s: float | None = None
    prune: bool = True

    def slot(self, now: datetime) -> str:
        """Which run this is: the same for every beat that fires it, so a run happens once."""
        if self.every_s is not None:
            return str(math.floor(now.timestamp() / self.every_s))
        return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M")

    def next_slot(self, now: datetime) -> datetime:
        """When this entry fires next after ``now``: its backup command expires then (the next run replaces it)."""
        now = now.astimezone(UTC)
        if self.every_s is not None:
            return datetime.fromtimestamp((math.floor(now.timestamp() / self.every_s) + 1) * self.every_s, UTC)
        assert self.hour is not None and self.minute is not None
        day = now.replace(second=0, microsecond=0)
        for _ in range(400):  # at most a year and a bit of days to look through
            candidate = day.replace(hour=self.hour, minute=self.minute)
            weekday = (candidate.isoweekday() % 7)  # cron numbering: 0 = Sunday
            if candidate > now and (self.day_of_week is None or weekday == self.day_of_week) and (
                self.day_of_month is None or candidate.day == self.day_of_month
            ):
                return candidate
            day += timedelta(days=1)
        raise ValueError(f"schedule {self.name} never fires")

    def command_id(self, prefix: str, now: datetime) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dbagent:{prefix}:{self.db}:{self.name}:{self.slot(now)}"))


def _clock(text: str) -> tuple[str | None, int, int]:
    parts = text.split()
    day = parts[0] if len(parts) == 2 else None
    hour, minute = parts[-1].split(":")
    return day, int(hour), int(minute)


def entries(settings: Settings) -> list[ScheduleEntry]:
    found: list[ScheduleEntry] = []
    for db, database in sorted(settings.databases.items()):
        schedule = database.schedule
        if schedule.daily:
            _, hour, minute = _clock(schedule.daily)
            found.append(ScheduleEntry(f"{db}:daily", db, "daily", hour, minute, prune=schedule.prune))
        if schedule.weekly:
            day, hour, minute = _clock(schedule.weekly)
            weekday = _WEEKDAYS.get(day or "sun", 0)
            found.append(ScheduleEntry(f"{db}:weekly", db, "weekly", hour, minute, day_of_week=weekday, prune=schedule.prune))
        if schedule.monthly:
            day, hour, minute = _clock(schedule.monthly)
            found.append(
                ScheduleEntry(f"{db}:monthly", db, "monthly", hour, minute, day_of_month=int(day or 1), prune=schedule.prune)
            )
        if schedule.every:
            found.append(ScheduleEntry(f"{db}:every", db, "interval", every_s=schedule.every, prune=schedule.prune))
    return found
