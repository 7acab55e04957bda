"""agent/core/retention.py: exact keep/delete sets for literal backup sets, with their reasons."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from dbagent.core.retention import BackupInfo, Decision, RetentionPolicy, apply_retention

ONLY_PRE_MIGRATION = {"daily": 0, "weekly": 0, "monthly": 0}


def at(text: str) -> datetime:
    """A UTC time from '2026-11-24T02:00' (seconds optional)."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def backup(
    path: str, created: str, type: str = "full", trigger: str = "schedule", verified: bool = True
) -> BackupInfo:
    return BackupInfo(path=path, type=type, trigger=trigger, created=at(created), verified=verified)


def run(backups: list[BackupInfo], now: str, **policy: object) -> dict[str, Decision]:
    """Apply retention and index the decisions by path (checking there is one per backup)."""
    decisions = apply_retention(backups, at(now), RetentionPolicy(**policy))
    assert sorted(d.backup.path for d in decisions) == sorted(b.path for b in backups)
    for d in decisions:
        assert d.reasons, d
        if not d.keep:
            assert len(d.reasons) == 1, d
    return {d.backup.path: d for d in decisions}


def kept(decisions: dict[str, Decision]) -> set[str]:
    return {path for path, d in decisions.items() if d.keep}


def deleted(decisions: dict[str, Decision]) -> set[str]:
    return {path for path, d in decisions.items() if not d.keep}


# 1. Several backups per day: daily keeps only the newest of each day.
def test_daily_keeps_only_the_newest_backup_of_each_day():
    backups = [
        backup("d23-1200", "2026-11-23T12:00"),
        backup("d24-0100", "2026-11-24T01:00"),
        backup("d24-1300", "2026-11-24T13:00"),
        backup("d24-2359", "2026-11-24T23:59:59"),
        backup("d25-0000", "2026-11-25T00:00"),
        backup("d25-1200", "2026-11-25T12:00"),
    ]
    out = run(backups, "2026-11-26T00:00", daily=2, weekly=0, monthly=0)

    assert kept(out) == {"d25-1200", "d24-2359"}
    assert deleted(out) == {"d25-0000", "d24-1300", "d24-0100", "d23-1200"}
    assert out["d25-1200"].reasons == ("daily 2026-11-25", "newest verified full backup")
    assert out["d24-2359"].reasons == ("daily 2026-11-24",)
    assert out["d24-0100"].reasons == ("schedule: not the newest of any kept day, week or month",)


# 2. Gaps: the count is of days that have backups, not of calendar days.
def test_daily_counts_days_that_have_backups_not_calendar_days():
    backups = [
        backup("day01", "2026-11-01T02:00"),
        backup("day05", "2026-11-05T02:00"),
        backup("day09", "2026-11-09T02:00"),
        backup("day10-early", "2026-11-10T02:00"),
        backup("day10-late", "2026-11-10T14:00"),
    ]
    out = run(backups, "2026-11-10T15:00", daily=3, weekly=0, monthly=0)

    assert kept(out) == {"day10-late", "day09", "day05"}
    assert deleted(out) == {"day10-early", "day01"}
    assert out["day05"].reasons == ("daily 2026-11-05",)


# 3. Weekly buckets are ISO weeks: Sunday and the next Monday are different weeks.
def test_weekly_splits_at_the_iso_week_boundary_sunday_to_monday():
    backups = [
        backup("sat-11-28", "2026-11-28T02:00"),  # 2026-W48
        backup("sun-11-29", "2026-11-29T23:00"),  # 2026-W48
        backup("mon-11-30", "2026-11-30T01:00"),  # 2026-W49
        backup("tue-12-01", "2026-12-01T02:00"),  # 2026-W49
    ]
    out = run(backups, "2026-12-01T12:00", daily=0, weekly=2, monthly=0)

    assert kept(out) == {"tue-12-01", "sun-11-29"}
    assert deleted(out) == {"mon-11-30", "sat-11-28"}
    assert out["tue-12-01"].reasons == ("weekly 2026-W49", "newest verified full backup")
    assert out["sun-11-29"].reasons == ("weekly 2026-W48",)


# 4. Monthly buckets split between Oct 31 and Nov 1.
def test_monthly_splits_at_the_month_boundary():
    backups = [
        backup("oct-30", "2026-10-30T02:00"),
        backup("oct-31", "2026-10-31T23:59:59"),
        backup("nov-01", "2026-11-01T00:00"),
        backup("nov-15", "2026-11-15T02:00"),
    ]
    out = run(backups, "2026-11-20T00:00", daily=0, weekly=0, monthly=2)

    assert kept(out) == {"nov-15", "oct-31"}
    assert deleted(out) == {"nov-01", "oct-30"}
    assert out["oct-31"].reasons == ("monthly 2026-10",)


def test_buckets_are_utc_whatever_the_offset_the_time_was_given_in():
    paris = timezone(timedelta(hours=1))
    local_november = BackupInfo(
        path="nov-01-paris", type="full", trigger="schedule",
        created=datetime(2026, 11, 1, 0, 30, tzinfo=paris), verified=False,
    )  # 2026-10-31T23:30Z: October in UTC
    backups = [local_november, backup("oct-31", "2026-10-31T12:00", verified=False),
               backup("nov-02", "2026-11-02T02:00", verified=False)]
    out = run(backups, "2026-11-03T00:00", daily=0, weekly=0, monthly=2)

    assert local_november.created == at("2026-10-31T23:30")
    assert kept(out) == {"nov-02", "nov-01-paris"}
    assert out["nov-01-paris"].reasons == ("monthly 2026-10",)
    assert deleted(out) == {"oct-31"}


# 5. Year boundary: Dec 31 and Jan 1 are different days and months...
def test_new_year_is_a_new_day_and_a_new_month():
    backups = [
        backup("dec31-1000", "2026-12-31T10:00"),
        backup("dec31-2300", "2026-12-31T23:00"),
        backup("jan01-0100", "2027-01-01T01:00"),
        backup("jan01-0500", "2027-01-01T05:00"),
    ]
    out = run(backups, "2027-01-01T06:00", daily=2, weekly=0, monthly=2)

    assert kept(out) == {"jan01-0500", "dec31-2300"}
    assert deleted(out) == {"jan01-0100", "dec31-1000"}
    assert out["jan01-0500"].reasons == (
        "daily 2027-01-01", "monthly 2027-01", "newest verified full backup",
    )
    assert out["dec31-2300"].reasons == ("daily 2026-12-31", "monthly 2026-12")


# ...but the same ISO week: Mon 2026-12-28 to Sun 2027-01-03 is 2026-W53.
def test_iso_week_spans_the_new_year():
    backups = [
        backup("sun-12-27", "2026-12-27T02:00"),  # 2026-W52
        backup("mon-12-28", "2026-12-28T02:00"),  # 2026-W53
        backup("thu-12-31", "2026-12-31T02:00"),  # 2026-W53
        backup("fri-01-01", "2027-01-01T02:00"),  # 2026-W53, although the calendar year is 2027
        backup("sun-01-03", "2027-01-03T02:00"),  # 2026-W53
        backup("mon-01-04", "2027-01-04T02:00"),  # 2027-W01
    ]
    out = run(backups, "2027-01-04T12:00", daily=0, weekly=2, monthly=0)

    assert kept(out) == {"mon-01-04", "sun-01-03"}
    assert deleted(out) == {"fri-01-01", "thu-12-31", "mon-12-28", "sun-12-27"}
    assert out["sun-01-03"].reasons == ("weekly 2026-W53",)
    assert out["mon-01-04"].reasons[0] == "weekly 2027-W01"


# 6. From the future: kept with a warning, and takes no daily slot.
def test_future_backup_is_kept_with_a_warning_and_takes_no_daily_slot():
    backups = [
        backup("future", "2026-12-01T00:00"),
        backup("d25", "2026-11-25T02:00"),
        backup("d24", "2026-11-24T02:00"),
        backup("d23", "2026-11-23T02:00"),
    ]
    out = run(backups, "2026-11-25T12:00", daily=2, weekly=0, monthly=0)

    assert kept(out) == {"future", "d25", "d24"}
    assert deleted(out) == {"d23"}
    assert out["future"].reasons == (
        "from the future (created 2026-12-01T00:00:00Z): kept, check the clock",
    )
    assert out["future"].warning is not None and "2026-12-01T00:00:00Z" in out["future"].warning
    # The safety net is not fooled by the future backup either.
    assert out["d25"].reasons == ("daily 2026-11-25", "newest verified full backup")
    assert all(out[p].warning is None for p in ("d25", "d24", "d23"))


def test_clock_skew_within_future_skew_is_not_the_future():
    backups = [
        backup("ahead-4min", "2026-11-25T12:04"),
        backup("ahead-6min", "2026-11-25T12:06"),
        backup("d24", "2026-11-24T02:00"),
    ]
    out = run(backups, "2026-11-25T12:00", daily=1, weekly=0, monthly=0)

    assert kept(out) == {"ahead-6min", "ahead-4min"}
    assert deleted(out) == {"d24"}
    assert out["ahead-4min"].warning is None
    assert out["ahead-4min"].reasons == ("daily 2026-11-25", "newest verified full backup")
    assert out["ahead-6min"].warning is not None


# 7. Everything expired: only the newest verified backup survives.
def test_everything_expired_keeps_only_the_newest_verified_backup():
    backups = [
        backup("pre-old", "2026-09-01T00:00", trigger="pre-migration"),
        backup("pre-newest", "2026-10-01T00:00", trigger="pre-migration"),
        backup("sched-old", "2026-09-15T02:00"),
        backup("sched-newer", "2026-09-20T02:00"),
    ]
    out = run(backups, "2026-11-25T00:00", pre_migration_days=30, **ONLY_PRE_MIGRATION)

    assert kept(out) == {"pre-newest"}
    assert deleted(out) == {"pre-old", "sched-old", "sched-newer"}
    assert out["pre-newest"].reasons == ("newest verified full backup",)
    assert out["pre-old"].reasons == ("pre-migration, 85 days old (kept 30 days)",)


def test_everything_expired_and_newest_unverified_keeps_the_newest_verified_older_one():
    backups = [
        backup("pre-old", "2026-09-01T00:00", trigger="pre-migration", verified=True),
        backup("pre-mid", "2026-09-10T00:00", trigger="pre-migration", verified=True),
        backup("pre-newest", "2026-10-01T00:00", trigger="pre-migration", verified=False),
    ]
    out = run(backups, "2026-11-25T00:00", pre_migration_days=30, **ONLY_PRE_MIGRATION)

    assert kept(out) == {"pre-mid"}
    assert deleted(out) == {"pre-old", "pre-newest"}
    assert out["pre-mid"].reasons == ("newest verified full backup",)


def test_everything_expired_and_nothing_verified_deletes_everything():
    backups = [
        backup("pre-old", "2026-09-01T00:00", trigger="pre-migration", verified=False),
        backup("sched", "2026-09-15T02:00", verified=False),
    ]
    out = run(backups, "2026-11-25T00:00", pre_migration_days=30, **ONLY_PRE_MIGRATION)

    assert kept(out) == set()
    assert deleted(out) == {"pre-old", "sched"}
    assert out["sched"].reasons == ("schedule: not the newest of any kept day, week or month",)


def test_safety_net_is_per_type():
    backups = [
        backup("full-old", "2026-09-01T00:00", type="full", trigger="pre-migration"),
        backup("schema-old", "2026-08-01T00:00", type="schema", trigger="pre-migration"),
        backup("schema-older", "2026-07-01T00:00", type="schema", trigger="pre-migration"),
        backup("data-unverified", "2026-09-01T00:00", type="data", trigger="pre-migration",
               verified=False),
    ]
    out = run(backups, "2026-11-25T00:00", **ONLY_PRE_MIGRATION)

    assert kept(out) == {"full-old", "schema-old"}
    assert deleted(out) == {"schema-older", "data-unverified"}
    assert out["schema-old"].reasons == ("newest verified schema backup",)


# 8. Pre-migration boundary: exactly 30 days old is kept, one second more is not.
def test_pre_migration_boundary_is_inclusive_to_the_second():
    backups = [
        backup("exactly-30d", "2026-10-31T12:00:00", trigger="pre-migration", verified=False),
        backup("30d-and-1s", "2026-10-31T11:59:59", trigger="pre-migration", verified=False),
        backup("31d", "2026-10-30T12:00:00", trigger="pre-migration", verified=False),
        backup("3d", "2026-11-27T12:00:00", trigger="pre-migration", verified=False),
    ]
    out = run(backups, "2026-11-30T12:00:00", pre_migration_days=30)

    assert kept(out) == {"exactly-30d", "3d"}
    assert deleted(out) == {"30d-and-1s", "31d"}
    assert out["3d"].reasons == ("pre-migration, 3 days old (kept 30 days)",)
    assert out["exactly-30d"].reasons == ("pre-migration, 30 days old (kept 30 days)",)
    assert out["30d-and-1s"].reasons == ("pre-migration, more than 30 days old (kept 30 days)",)
    assert out["31d"].reasons == ("pre-migration, 31 days old (kept 30 days)",)


# 9. Order and "newest" come from created, never from the file name.
def test_created_time_not_file_name_decides_which_is_newest():
    backups = [
        backup("full-2026-11-24.dump", "2026-11-20T02:00", verified=False),
        backup("full-2026-11-20.dump", "2026-11-24T02:00", verified=False),
        backup("full-2026-11-22.dump", "2026-11-22T02:00", verified=False),
        backup("zzz-oldest-name-last.dump", "2026-11-23T02:00", verified=False),
    ]
    policy = RetentionPolicy(daily=2, weekly=0, monthly=0)
    decisions = apply_retention(backups, at("2026-11-25T00:00"), policy)

    assert [d.backup.path for d in decisions] == [
        "full-2026-11-20.dump",
        "zzz-oldest-name-last.dump",
        "full-2026-11-22.dump",
        "full-2026-11-24.dump",
    ]
    kept_paths = {d.backup.path for d in decisions if d.keep}
    assert kept_paths == {"full-2026-11-20.dump", "zzz-oldest-name-last.dump"}


def test_equal_created_times_are_ordered_by_path_whatever_the_input_order():
    a = backup("a.dump", "2026-11-24T02:00", verified=False)
    b = backup("b.dump", "2026-11-24T02:00", verified=False)
    policy = RetentionPolicy(daily=1, weekly=0, monthly=0)

    for given in ([a, b], [b, a]):
        decisions = apply_retention(given, at("2026-11-25T00:00"), policy)
        assert [(d.backup.path, d.keep) for d in decisions] == [("a.dump", True), ("b.dump", False)]


# 10. Mixed types: each type has its own GFS buckets; other triggers take no slot.
def test_each_type_has_its_own_daily_slot():
    backups = [
        backup("full-d24", "2026-11-24T02:00", type="full", verified=False),
        backup("schema-d24", "2026-11-24T03:00", type="schema", verified=False),
        backup("data-d24", "2026-11-24T04:00", type="data", verified=False),
        backup("full-d23", "2026-11-23T02:00", type="full", verified=False),
        backup("schema-d23", "2026-11-23T03:00", type="schema", verified=False),
        backup("pre-full-d25", "2026-11-25T01:00", type="full", trigger="pre-migration",
               verified=False),
    ]
    out = run(backups, "2026-11-25T12:00", daily=1, weekly=0, monthly=0)

    assert kept(out) == {"full-d24", "schema-d24", "data-d24", "pre-full-d25"}
    assert deleted(out) == {"full-d23", "schema-d23"}
    assert out["full-d24"].reasons == ("daily 2026-11-24",)
    assert out["schema-d24"].reasons == ("daily 2026-11-24",)
    assert out["pre-full-d25"].reasons == ("pre-migration, 0 days old (kept 30 days)",)


def test_manual_backups_are_kept_unless_manual_days_is_set():
    backups = [
        backup("manual-old", "2025-01-01T00:00", trigger="manual", verified=False),
        backup("manual-new", "2026-11-20T00:00", trigger="manual", verified=False),
        backup("sched", "2026-11-24T02:00", verified=False),
    ]
    never = run(backups, "2026-11-25T00:00", daily=1, weekly=0, monthly=0)
    assert kept(never) == {"manual-old", "manual-new", "sched"}
    assert never["manual-old"].reasons == (
        "manual: never pruned automatically (manual_days not set)",
    )
    assert never["sched"].reasons == ("daily 2026-11-24",)  # manual backups take no GFS slot

    limited = run(backups, "2026-11-25T00:00", daily=1, weekly=0, monthly=0, manual_days=10)
    assert kept(limited) == {"manual-new", "sched"}
    assert deleted(limited) == {"manual-old"}
    assert limited["manual-new"].reasons == ("manual, 5 days old (kept 10 days)",)
    assert limited["manual-old"].reasons == ("manual, 693 days old (kept 10 days)",)


# 11. A realistic year: one full backup every day at 02:00 UTC for 400 days, policy 7/4/12.
def test_400_days_of_daily_backups_with_the_default_policy():
    last = date(2026, 11, 25)  # a Wednesday
    days = [last - timedelta(days=n) for n in range(400)]
    backups = [
        BackupInfo(path=f"full-{d:%Y%m%d}.dump", type="full", trigger="schedule",
                   created=datetime(d.year, d.month, d.day, 2, tzinfo=UTC), verified=True)
        for d in days
    ]
    decisions = apply_retention(backups, datetime(2026, 11, 25, 12, tzinfo=UTC), RetentionPolicy())

    # Independently: one backup a day, so the newest of a period is the one on its latest date.
    def newest_of_periods(period, count):
        latest: dict[object, date] = {}
        for d in days:
            latest[period(d)] = max(latest.get(period(d), d), d)
        return {latest[p] for p in sorted(latest, reverse=True)[:count]}

    expected_days = (
        newest_of_periods(lambda d: d, 7)
        | newest_of_periods(lambda d: d.isocalendar()[:2], 4)
        | newest_of_periods(lambda d: (d.year, d.month), 12)
    )
    expected = {f"full-{d:%Y%m%d}.dump" for d in expected_days}
    kept_paths = {d.backup.path for d in decisions if d.keep}

    assert len(decisions) == 400
    assert kept_paths == expected
    # 7 days (Nov 19-25), 2 more weeks (Nov 15, Nov 8), 11 more month ends (Dec 2025 - Oct 2026).
    assert len(kept_paths) == 20
    assert {"full-20261108.dump", "full-20261115.dump", "full-20251231.dump"} <= kept_paths
    assert "full-20251130.dump" not in kept_paths
    assert all(d.reasons for d in decisions if d.keep)
    newest_first = sorted((b.created for b in backups), reverse=True)
    assert [d.backup.created for d in decisions] == newest_first


# 12. A naive datetime is refused: its zone would be a guess.
def test_naive_created_is_rejected():
    with pytest.raises(ValueError, match="timezone-aware"):
        BackupInfo(path="x", type="full", trigger="schedule", created=datetime(2026, 11, 24, 2),
                   verified=True)


def test_naive_now_is_rejected():
    with pytest.raises(ValueError, match="timezone-aware"):
        apply_retention([backup("x", "2026-11-24T02:00")], datetime(2026, 11, 25),
                        RetentionPolicy())


@pytest.mark.parametrize(
    "field", ["pre_migration_days", "daily", "weekly", "monthly", "manual_days"]
)
def test_negative_policy_counts_are_rejected(field):
    with pytest.raises(ValueError):
        RetentionPolicy(**{field: -1})


def test_no_backups_no_decisions():
    assert apply_retention([], at("2026-11-25T00:00"), RetentionPolicy()) == []
