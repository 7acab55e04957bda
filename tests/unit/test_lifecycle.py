"""agent/core/lifecycle.py: the command state machine, interrupted reports, stopping; and what the agent does with them."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from dbagent.core import lifecycle
from dbagent.core.commands import CommandStatus, CommandType
from dbagent.core.events import Event, EventType
from dbagent.core.lifecycle import (
    CRASH_LEAVES,
    PHASES,
    Phase,
    State,
    StopRequest,
    interrupted_report,
)
from dbagent.core.rollback import NoRollback, RollbackPlan, decide


def test_terminal_states_have_no_way_out_and_every_live_state_can_end():
    for terminal in lifecycle.TERMINAL:
        assert not lifecycle.TRANSITIONS.get(terminal)
        for other in State:
            assert not lifecycle.can_move(terminal, other)
    for live in (State.ACCEPTED, State.CLAIMED, State.RUNNING):
        assert lifecycle.TERMINAL <= lifecycle.TRANSITIONS[live]


def test_claim_only_from_accepted_and_running_only_once_claimed():
    assert lifecycle.sources(State.CLAIMED) == {State.ACCEPTED}
    assert lifecycle.sources(State.RUNNING) == {State.CLAIMED, State.RUNNING}
    assert not lifecycle.can_move(State.ACCEPTED, State.RUNNING)
    assert lifecycle.sources(State.INTERRUPTED) == {State.ACCEPTED, State.CLAIMED, State.RUNNING}


def test_every_phase_of_every_writer_says_what_a_crash_leaves():
    for type_, phases in PHASES.items():
        assert phases[0] == Phase.CLAIMED, type_
        for phase in phases:
            assert CRASH_LEAVES[phase]


@pytest.mark.parametrize(
    ("type_", "event"),
    [
        (CommandType.MIGRATE, EventType.MIGRATION_FAILED),
        (CommandType.ROLLBACK, EventType.ROLLBACK_FAILED),
        (CommandType.BACKUP, EventType.BACKUP_FAILED),
        (CommandType.RESTORE, EventType.RESTORE_FAILED),
        (CommandType.PRUNE, EventType.PRUNE_FAILED),
        (CommandType.STATUS, EventType.COMMAND_FAILED),
        ("a-type-from-a-newer-worker", EventType.COMMAND_FAILED),
    ],
)
def test_an_interrupted_command_fails_as_its_own_kind(type_, event):
    report = interrupted_report(
        type_, State.RUNNING, lifecycle.initial_plan(type_, "011", True) | {"phase": "claimed"},
        revision_now="011", revision_now_known=True, reason="the worker died",
    )
    assert report.event == event
    assert report.data["interrupted"] is True and report.result["interrupted"] is True
    assert report.result["status"] == "failed" and report.result["exit_code"] == 1


def test_a_backup_killed_mid_dump_is_a_backup_failure_never_a_migration_failure():
    plan = lifecycle.initial_plan(CommandType.BACKUP, "011", True) | {
        "phase": "backup", "backup": {"path": "/b/x.dump", "partial": "/b/.partial-1-ab"},
    }
    report = interrupted_report(CommandType.BACKUP, State.RUNNING, plan, revision_now="011", revision_now_known=True,
                                reason="the worker running it (w) is gone")
    assert report.event == EventType.BACKUP_FAILED
    assert report.data["phase"] == "backup" and report.data["backup"]["path"] == "/b/x.dump"
    assert "unfinished backup file was removed" in report.data["error"]


def test_the_revision_before_is_only_ever_the_persisted_one():
    # a plan from before plans held it (the old claim stored only the args)
    old = interrupted_report(CommandType.MIGRATE, State.RUNNING, {"args": {}}, revision_now="011",
                             revision_now_known=True, reason="gone")
    assert old.data["revision_before"] is None and old.data["revision_before_known"] is False
    started_at_base = interrupted_report(
        CommandType.MIGRATE, State.RUNNING, lifecycle.initial_plan(CommandType.MIGRATE, None, True),
        revision_now="003", revision_now_known=True, reason="gone",
    )
    assert started_at_base.data["revision_before"] is None and started_at_base.data["revision_before_known"] is True


def test_the_report_names_the_step_and_what_it_left():
    plan = lifecycle.initial_plan(CommandType.MIGRATE, "011", True) | {
        "phase": "step", "target": "013", "step": {"number": 2, "of": 2, "revision": "013", "direction": "up"},
    }
    report = interrupted_report(CommandType.MIGRATE, State.RUNNING, plan, revision_now="012", revision_now_known=True,
                                reason="the worker running it (w@h:1) is gone")
    error = report.data["error"]
    assert error.startswith("interrupted during step 2/2 (013): the worker running it (w@h:1) is gone;")
    assert "rolled back with its session" in error and error.endswith("the database is at revision 012")
    assert report.data["target"] == "013" and report.data["revision_after"] == "012"
    assert report.result["revision_before"] == "011"


def test_a_command_only_accepted_never_claimed_changed_nothing():
    report = interrupted_report(CommandType.MIGRATE, State.ACCEPTED, None, revision_now="011",
                                revision_now_known=True, reason="gone")
    assert report.data["phase"] == "accepted" and report.data["claimed"] is False
    assert "nothing was changed" in report.data["error"]


def _failed(type_: str = "migration.failed", command_id: str = "run-1", **data) -> Event:
    return Event(type=type_, db="production", command_id=command_id, data=data, ts=datetime(2026, 1, 1, tzinfo=UTC))


def test_the_agent_rolls_back_an_interrupted_migrate_to_its_recorded_start_and_no_further():
    decision = decide(_failed(interrupted=True, revision_before="011", revision_before_known=True, revision_after="012",
                              phase="between_steps", claimed=True))
    assert isinstance(decision, RollbackPlan)
    assert decision.target == "011" and decision.args() == {"to": "011", "cause": decision.cause}
    assert decision.cause["expect_revision"] == "012"


def test_an_interrupted_run_whose_start_is_unknown_alerts_and_does_nothing_else():
    # what an older worker reported for a killed backup: migration.failed, revision_before null
    decision = decide(_failed(interrupted=True, revision_before=None, revision_after="011", error="interrupted"))
    assert isinstance(decision, NoRollback) and decision.alert
    assert "not recorded" in decision.reason


def test_base_only_for_a_run_recorded_as_starting_there():
    from_base = decide(_failed(revision_before=None, revision_before_known=True, revision_after="011"))
    assert isinstance(from_base, RollbackPlan) and from_base.target is None and from_base.args()["to"] == "base"
    unknown = decide(_failed(revision_before=None, revision_before_known=False, revision_after="011"))
    assert isinstance(unknown, NoRollback)


def test_a_failure_that_changed_nothing_needs_no_rollback():
    same = decide(_failed(revision_before="011", revision_before_known=True, revision_after="011", phase="backup"))
    assert isinstance(same, NoRollback) and not same.alert
    never_started = decide(_failed(error="lock timeout", claimed=False))
    assert isinstance(never_started, NoRollback) and not never_started.alert


def test_an_unreadable_revision_after_alerts():
    decision = decide(_failed(interrupted=True, revision_before="011", revision_before_known=True,
                              revision_after=None, revision_after_known=False))
    assert isinstance(decision, NoRollback) and decision.alert


@pytest.mark.parametrize("kind", ["backup.failed", "restore.failed", "prune.failed", "rollback.failed", "command.failed"])
def test_failures_of_other_kinds_never_roll_back(kind):
    decision = decide(_failed(kind, interrupted=True, revision_before="011", revision_before_known=True,
                              revision_after="009"))
    assert isinstance(decision, NoRollback)


def test_an_event_from_before_revision_before_known_still_counts_when_not_interrupted():
    decision = decide(_failed(revision_before="009", revision_after="011"))
    assert isinstance(decision, RollbackPlan) and decision.target == "009"


# -- stopping -------------------------------------------------------------------------


def test_a_stop_lets_the_work_finish_within_the_grace_then_cancels_it():
    stop = StopRequest()
    cancelled = threading.Event()
    assert not stop.is_set() and not stop.wait(0.01)
    with stop.cancelling(cancelled.set):
        started = time.monotonic()
        stop.request(0.3, "told to stop")
        assert stop.is_set() and stop.wait(0) and not stop.expired
        assert cancelled.wait(5) and stop.expired
        assert 0.25 <= time.monotonic() - started < 3
    # work registered after the grace is over is cancelled at once
    late = threading.Event()
    with stop.cancelling(late.set):
        assert late.is_set()
    assert stop.reason == "told to stop"


def test_work_that_ends_within_the_grace_is_never_cancelled():
    stop = StopRequest()
    cancelled = threading.Event()
    with stop.cancelling(cancelled.set):
        stop.request(0.2)
    time.sleep(0.4)
    assert stop.expired and not cancelled.is_set()
    stop.reset()
    assert not stop.is_set() and not stop.expired


def test_statuses_include_the_lifecycle_states():
    assert {s.value for s in CommandStatus} >= {"accepted", "claimed", "running", "succeeded", "failed", "rejected",
                                                "interrupted"}


def test_the_record_of_steps_says_how_many_committed_and_which_was_next():
    steps = [{"revision": "012"}, {"revision": "013"}]
    plan = lifecycle.initial_plan(CommandType.MIGRATE, "011", True) | {"phase": "steps", "steps": steps, "steps_done": 1}
    report = interrupted_report(CommandType.MIGRATE, State.RUNNING, plan, revision_now="012", revision_now_known=True,
                                reason="gone")
    assert report.data["error"].startswith("interrupted during step 2/2 (013): 1 of 2 committed: gone;")
    assert report.data["steps_done"] == 1
    done = interrupted_report(CommandType.MIGRATE, State.RUNNING, plan | {"steps_done": 2}, revision_now="013",
                              revision_now_known=True, reason="gone")
    assert "during the steps: all 2 committed" in done.data["error"]
