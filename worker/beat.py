"""``dbagent beat``: Celery beat publishing signed backup commands, one leader at a time.

Only the beat holding the leader lease in Redis schedules; a second beat
started by mistake stands by and takes over if the leader stops. Each run has
a command id derived from its slot, so even two beats firing the same slot
produce one backup (the worker executes an id at most once).
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from celery.beat import ScheduleEntry as CeleryEntry
from celery.beat import Scheduler
from celery.schedules import crontab, schedule

from dbagent.bus import keys
from dbagent.bus.lease import RedisLease, read_lease
from dbagent.bus.producer import Producer
from dbagent.bus.queue import celery_app
from dbagent.core.commands import Command, CommandType
from dbagent.core.schedule import ScheduleEntry, entries
from dbagent.postgres.connections import redis_client
from dbagent.settings import Settings

log = logging.getLogger("dbagent.beat")

# How often a beat looks at its schedule (and a standby at the leader lease).
TICK_S = 1.0


class DbAgentScheduler(Scheduler):
    """A Celery beat scheduler whose entries publish signed dbagent commands."""

    settings: Settings  # set by run_beat before Celery instantiates the scheduler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.entries_by_name = {e.name: e for e in entries(self.settings)}
        self.producer_ = Producer(self.settings)
        client = redis_client(self.settings.redis)
        owner = {"beat": f"{socket.gethostname()}:{os.getpid()}"}
        prefix = self.settings.redis.prefix
        self.lease = RedisLease(client, keys.beat_leader(prefix), keys.fence(prefix, "beat"), owner, self.settings.beat.leader_ttl)
        self.leading = False
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        beat_schedule = {}
        for entry in self.entries_by_name.values():
            if entry.every_s is not None:
                when: Any = schedule(timedelta(seconds=entry.every_s))
            else:
                when = crontab(
                    minute=entry.minute,
                    hour=entry.hour,
                    day_of_week=entry.day_of_week if entry.day_of_week is not None else "*",
                    day_of_month=entry.day_of_month if entry.day_of_month is not None else "*",
                )
            beat_schedule[entry.name] = {"task": "dbagent.scheduled", "schedule": when, "args": (entry.name,)}
        self.merge_inplace(beat_schedule)
        log.info("schedule: %s", ", ".join(sorted(beat_schedule)) or "nothing configured")

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self._lead():
            return TICK_S
        return min(super().tick(*args, **kwargs), TICK_S)

    def _lead(self) -> bool:
        if self.leading and not self.lease.lost.is_set():
            return True
        if self.lease.try_acquire():
            self.lease.start_heartbeat()
            self.leading = True
            log.info("this beat leads the schedule (token %s)", self.lease.token)
            # Entries are due from now on: nothing "missed" while standing by is replayed.
            for entry in self.schedule.values():
                entry.last_run_at = self.app.now()
            self._heap = None
            return True
        if self.leading or not getattr(self, "_said_standby", False):
            self._said_standby = True
            holder = read_lease(self.lease.client, self.lease.key) or {}
            log.warning("standing by: beat %s holds the schedule; this one schedules nothing", holder.get("beat", "?"))
        self.leading = False
        return False

    def apply_async(self, entry: CeleryEntry, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        entry = self.reserve(entry) if advance else entry
        spec: ScheduleEntry = self.entries_by_name[entry.args[0]]
        now = datetime.now(UTC)
        command = Command(
            id=spec.command_id(self.settings.redis.prefix, now),
            type=CommandType.BACKUP,
            db=spec.db,
            args={"kind": "full", "trigger": "schedule", "mark": spec.mark, "prune": spec.prune},
            actor="beat",
            ticket=f"schedule:{spec.name}",
            issued_at=now,
        )
        # Queued behind a long migration or for a stopped worker, it may still run until the next
        # slot's backup replaces it.
        command = command.expiring_in(max((spec.next_slot(now) - now).total_seconds(), 60.0))
        self.producer_.submit(command)
        log.info("scheduled %s backup of %s: command %s", spec.mark, spec.db, command.id)
        return _Sent(command.id)

    def close(self) -> None:
        if self.leading:
            self.lease.release()
        super().close()


class _Sent:
    """What Celery's beat expects back from apply_async: something with an id."""

    def __init__(self, id_: str) -> None:
        self.id = id_


def create_beat_app(settings: Settings) -> Celery:
    app = celery_app(settings)
    app.conf.beat_max_loop_interval = TICK_S
    return app


def run_beat(settings: Settings, loglevel: str = "INFO") -> None:
    from celery.apps.beat import Beat

    logging.basicConfig(level=loglevel, format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")
    from dbagent.monitoring import init_sentry

    init_sentry(settings, "beat")
    DbAgentScheduler.settings = settings
    app = create_beat_app(settings)
    Beat(app=app, scheduler=DbAgentScheduler, max_interval=TICK_S, loglevel=loglevel, no_color=True).run()
