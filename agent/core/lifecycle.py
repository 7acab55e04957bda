"""The command lifecycle as one state machine, and what a crash in each phase leaves behind.

::

    received ─► accepted ─► claimed ─► running(phase) ─► succeeded | failed | rejected | interrupted

* **received**: the worker holds the queue message; nothing is recorded. A
  forged, expired or malformed message ends here as *rejected*, an
  unreachable PostgreSQL as *failed*; both publish a result. A crash here
  leaves the message unacknowledged: Redis delivers it again after
  ``visibility_timeout``, and it runs then (its signed expiry permitting).
* **accepted**: the id is in ``dbagent.commands``, written while the worker
  holds the command's own advisory lock (``store.COMMAND_LOCK``) on its
  session. That lock is how anyone tells a live execution from a dead one: it
  is free exactly when the session that ran the command is gone.
* **claimed**: a writer holds the database's writer lock, and its plan is
  persisted before anything changes: type, revision before (and whether it
  is known), target, phase. Readers (status, history…) never claim.
* **running(phase)**: the phase is persisted as it moves (``PHASES``).
* **terminal**: the result is in the row (the record) and then in Redis
  (where producers wait); a result Redis missed is re-published later.

A command whose executor died (kill -9, OOM, a lost PostgreSQL session) is
found by the next worker that looks (at start, before every claim, and every
``relay_interval``): its row is not terminal and its command lock is free. It
is reported by ``interrupted_report`` as a failure of its own kind with
``interrupted: true``, the phase and the persisted revision before, and is
never run again. What the crash left, per phase (``CRASH_LEAVES``), is what
the report says; the agent rolls back only a migrate whose revision before is
known, and only down to it.

Pure: no I/O. The worker's side is ``dbagent.operations.lifecycle``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dbagent.core.commands import CommandStatus, CommandType
from dbagent.core.events import EventType

log = logging.getLogger(__name__)

State = CommandStatus

TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.REJECTED, State.INTERRUPTED})

# Which state may follow which; the store's UPDATEs are guarded by these sources.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.ACCEPTED: frozenset({State.CLAIMED, *TERMINAL}),
    State.CLAIMED: frozenset({State.RUNNING, *TERMINAL}),
    State.RUNNING: frozenset({State.RUNNING, *TERMINAL}),
}


def sources(target: State) -> frozenset[State]:
    """The states a command may be in to move to ``target``."""
    return frozenset(state for state, targets in TRANSITIONS.items() if target in targets)


def can_move(current: State | str, target: State | str) -> bool:
    return State(target) in TRANSITIONS.get(State(current), frozenset())


class Phase(StrEnum):
    CLAIMED = "claimed"
    VALIDATION = "validation"
    BACKUP = "backup"  # a pre-migration backup, or a backup command's dump, read-back and manifest
    # Applying steps: each step's own transaction records it done (``steps_done``), so the
    # record never claims more than what committed. Which step runs right now is shown
    # live (``STEP``, in the presence key and in a failed step's event), not written per step.
    STEPS = "steps"
    STEP = "step"
    VERIFY = "verify"
    CHECK = "check"  # a restore's checksum and full read, before anything changes
    RESTORE = "restore"  # pg_restore is running
    PRUNE = "prune"  # deleting the backups the retention policy let go


PHASES: dict[CommandType, tuple[Phase, ...]] = {
    CommandType.MIGRATE: (Phase.CLAIMED, Phase.VALIDATION, Phase.BACKUP, Phase.STEPS, Phase.VERIFY),
    CommandType.ROLLBACK: (Phase.CLAIMED, Phase.STEPS),
    CommandType.BACKUP: (Phase.CLAIMED, Phase.BACKUP, Phase.PRUNE),
    CommandType.RESTORE: (Phase.CLAIMED, Phase.CHECK, Phase.RESTORE),
    CommandType.PRUNE: (Phase.CLAIMED, Phase.PRUNE),
}

# What a worker dying in each phase leaves; the interrupted report quotes it.
CRASH_LEAVES: dict[Phase, str] = {
    Phase.CLAIMED: "nothing was changed",
    Phase.VALIDATION: "nothing was changed",
    Phase.BACKUP: "nothing was changed; the unfinished backup file was removed and is not listed",
    Phase.STEPS: "the steps that committed stay applied; the one in progress, if any, rolled back with its session",
    Phase.STEP: "the step in progress rolled back with its session; the steps before it stay applied",
    Phase.VERIFY: "every step was applied; verification did not finish",
    Phase.CHECK: "nothing was changed",
    Phase.RESTORE: "pg_restore's single transaction rolled back with its session (a --jobs restore may be partial)",
    Phase.PRUNE: "some of the backups due for deletion may be gone; every backup left is complete",
}

# The failure event of each command type; commands without one of their own report command.failed.
FAILURE_EVENT: dict[CommandType, EventType] = {
    CommandType.MIGRATE: EventType.MIGRATION_FAILED,
    CommandType.ROLLBACK: EventType.ROLLBACK_FAILED,
    CommandType.BACKUP: EventType.BACKUP_FAILED,
    CommandType.RESTORE: EventType.RESTORE_FAILED,
    CommandType.PRUNE: EventType.PRUNE_FAILED,
}


def failure_event(type_: CommandType | str) -> EventType:
    try:
        return FAILURE_EVENT.get(CommandType(type_), EventType.COMMAND_FAILED)
    except ValueError:
        return EventType.COMMAND_FAILED


def initial_plan(type_: CommandType | str, revision_before: str | None, known: bool) -> dict[str, Any]:
    """The plan persisted at claim, before anything changes."""
    return {
        "type": str(type_),
        "phase": Phase.CLAIMED.value,
        "revision_before": revision_before,
        "revision_before_known": known,
    }


@dataclass(frozen=True)
class Report:
    """How an interrupted command is reported: its failure event and its result."""

    event: EventType
    data: dict[str, Any]
    result: dict[str, Any]


def _during(phase: str, plan: dict[str, Any]) -> str:
    """The phase as a reader wants it: which step, of how many, had committed."""
    step = plan.get("step")
    if phase == Phase.STEP and step:
        return f"step {step['number']}/{step['of']} ({step['revision']})"
    if phase == Phase.STEPS:
        steps = plan.get("steps") or []
        done = int(plan.get("steps_done") or 0)
        if done >= len(steps):
            return f"the steps: all {len(steps)} committed"
        return f"step {done + 1}/{len(steps)} ({steps[done].get('revision')}): {done} of {len(steps)} committed"
    return phase.replace("_", " ")


def interrupted_report(
    type_: CommandType | str,
    status: State | str,
    plan: dict[str, Any] | None,
    *,
    revision_now: str | None,
    revision_now_known: bool,
    reason: str,
    left: str | None = None,
) -> Report:
    """The failure an interrupted command is reported as (pure: the caller read the revision).

    ``plan`` is what was persisted at claim and on each phase (None for a
    command that was only accepted); ``reason`` says what happened (the dead
    worker, the lost session). The revision before is only ever the persisted
    one: a plan that lacks it reports it as unknown, and the agent then alerts
    instead of rolling back. ``left`` overrides what the phase says a crash
    leaves, when the caller found out better (a backup complete after all).
    """
    plan = dict(plan or {})
    known = bool(plan.get("revision_before_known"))
    phase = plan.get("phase") or ("accepted" if State(status) == State.ACCEPTED else Phase.CLAIMED.value)
    if left is None:
        try:
            left = CRASH_LEAVES[Phase(phase)]
        except ValueError:
            left = "nothing was changed"  # only accepted: it never started
    where = f"the database is at revision {revision_now or 'base'}" if revision_now_known else "its revision could not be read"
    error = f"interrupted during {_during(phase, plan)}: {reason}; {left}; {where}"
    data: dict[str, Any] = {
        "interrupted": True,
        "phase": phase,
        "revision_before": plan.get("revision_before") if known else None,
        "revision_before_known": known,
        "revision_after": revision_now if revision_now_known else None,
        "revision_after_known": revision_now_known,
        "error": error,
    }
    for key in ("target", "backup", "path", "step", "cause", "steps_done"):
        if plan.get(key) is not None:
            data[key] = plan[key]
    data["claimed"] = State(status) != State.ACCEPTED
    result = {
        "status": State.FAILED.value,
        "exit_code": 1,
        "error": error,
        **{k: v for k, v in data.items() if k != "error"},
    }
    return Report(event=failure_event(type_), data=data, result=result)


def pause_point(name: str) -> None:
    """Fault injection for the fault tests: hold here while ``DBAGENT_PAUSE_AT`` names this point.

    The lifecycle's phases are points (``phase:validation``, ``phase:step:2``,
    ``phase:between_steps:1``…), so a test can kill a worker in any of them.
    """
    if os.environ.get("DBAGENT_PAUSE_AT") == name:
        log.warning("pausing at %s (DBAGENT_PAUSE_AT)", name)
        STOP.wait(3600)  # a worker told to stop goes on from here, as it would from real work


# -- stopping (SIGTERM) ----------------------------------------------------------


class StopRequest:
    """A worker told to stop: the current step, dump or restore gets ``grace_s`` to finish, then is cancelled.

    Operations check ``is_set()`` between steps (and instead of sleeping), and
    register how to cancel what they wait on (``cancelling``: the running
    statement, the pg_dump process). Once the grace has passed, every
    registered cancel runs, now and for anything registered later, so the
    command fails cleanly, releases its locks and reports what it left.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._expired = threading.Event()
        self._lock = threading.Lock()
        self._cancels: dict[int, Callable[[], None]] = {}
        self._next = 0
        self._timer: threading.Timer | None = None
        self.reason = ""

    def request(self, grace_s: float, reason: str = "the worker was told to stop (SIGTERM)") -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            self._timer = threading.Timer(grace_s, self._expire)
            self._timer.daemon = True
            self._timer.start()
        log.warning("%s: the current step has %.0fs to finish", reason, grace_s)

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as a stop is requested."""
        return self._event.wait(seconds)

    @contextmanager
    def cancelling(self, cancel: Callable[[], None]) -> Iterator[None]:
        """While the block runs, ``cancel`` is what ends it once the grace has passed."""
        with self._lock:
            key = self._next
            self._next += 1
            self._cancels[key] = cancel
            expired = self._expired.is_set()
        if expired:
            _quietly(cancel)
        try:
            yield
        finally:
            with self._lock:
                self._cancels.pop(key, None)

    def _expire(self) -> None:
        with self._lock:
            self._expired.set()
            cancels = list(self._cancels.values())
        if cancels:
            log.warning("stop grace over: cancelling the running work")
        for cancel in cancels:
            _quietly(cancel)

    def reset(self) -> None:
        """Forget a stop (tests that run several workers' lives in one process)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._event.clear()
            self._expired.clear()
            self._cancels.clear()
            self.reason = ""


def _quietly(cancel: Callable[[], None]) -> None:
    try:
        cancel()
    except Exception as exc:  # noqa: BLE001 - a cancel that fails leaves the work to finish on its own
        log.warning("could not cancel the running work: %s", exc)


# The worker process's stop request; worker/app.py sets it on SIGTERM.
STOP = StopRequest()
