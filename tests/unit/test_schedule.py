"""agent/core/schedule.py: when each scheduled backup fires next (its command expires then)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dbagent.core.schedule import ScheduleEntry

NOW = datetime(2026, 12, 1, 2, 30, tzinfo=UTC)  # a Tuesday


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (ScheduleEntry("db:daily", "db", "daily", hour=2, minute=0), datetime(2026, 12, 2, 2, 0, tzinfo=UTC)),
        (ScheduleEntry("db:daily", "db", "daily", hour=3, minute=15), datetime(2026, 12, 1, 3, 15, tzinfo=UTC)),
        (ScheduleEntry("db:weekly", "db", "weekly", hour=3, minute=0, day_of_week=0), datetime(2026, 12, 6, 3, 0, tzinfo=UTC)),
        (ScheduleEntry("db:monthly", "db", "monthly", hour=4, minute=0, day_of_month=1), datetime(2026, 12, 1, 4, 0, tzinfo=UTC)),
        (ScheduleEntry("db:monthly", "db", "monthly", hour=2, minute=0, day_of_month=1), datetime(2027, 1, 1, 2, 0, tzinfo=UTC)),
        (ScheduleEntry("db:monthly", "db", "monthly", hour=4, minute=0, day_of_month=31), datetime(2026, 12, 31, 4, 0, tzinfo=UTC)),
        (ScheduleEntry("db:every", "db", "interval", every_s=6 * 3600), datetime(2026, 12, 1, 6, 0, tzinfo=UTC)),
    ],
)
def test_next_slot(entry, expected):
    assert entry.next_slot(NOW) == expected


def test_a_run_at_its_own_slot_expires_at_the_following_one():
    daily = ScheduleEntry("db:daily", "db", "daily", hour=2, minute=30)
    assert daily.next_slot(NOW) == datetime(2026, 12, 2, 2, 30, tzinfo=UTC)
