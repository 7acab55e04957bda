"""The Celery app of a database's worker, and its one task."""

from __future__ import annotations

import gc
import logging
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from dbagent.bus import keys
from dbagent.bus.queue import EXECUTE_TASK, celery_app
from dbagent.core.errors import ConfigError
from dbagent.core.lifecycle import STOP
from dbagent.core.redact import redact
from dbagent.monitoring import alert, init_sentry
from dbagent.operations import lifecycle
from dbagent.settings import Settings
from dbagent.worker import intake

log = logging.getLogger("dbagent.worker")

# How much of a command's error a worker's log line (and its alert) quotes.
LOGGED_ERROR_CHARS = 500


def create_app(settings: Settings, db_name: str) -> Celery:
    """The app a worker of database ``db_name`` runs: its queue alone, one command at a time."""
    if not settings.redis.url.startswith(("redis://", "rediss://")):
        raise ConfigError(f"[redis] url must be a redis:// or rediss:// URL for a worker, not {redact(settings.redis.url)}")
    app = celery_app(settings)
    app.conf.task_default_queue = keys.queue(settings.redis.prefix, db_name)
    # Every message is checked whole before Celery reads it; poison is dead-lettered (dbagent.worker.intake).
    app.conf.broker_transport = intake.TRANSPORT
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options, "dbagent_intake": intake.Intake(settings, db_name),
    }
    init_sentry(settings, "worker")

    @app.task(name=EXECUTE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def execute(message: Any) -> None:
        # decode → authorise → lock → call → emit: all in lifecycle.execute.
        outcome = lifecycle.execute(settings, db_name, message)
        # What a log line or an alert quotes of a command is bounded and escaped (intake.excerpt).
        error = intake.excerpt(outcome["error"], LOGGED_ERROR_CHARS) if outcome.get("error") else None
        log.info(
            "command %s (%s) %s%s",
            outcome.get("command_id"),
            outcome.get("type"),
            outcome.get("status"),
            f": {error}" if error else "",
        )
        if outcome.get("status") in ("failed", "rejected"):
            alert(
                f"{outcome.get('type')} on {db_name} {outcome.get('status')}: {error}",
                level="error" if outcome.get("status") == "failed" else "warning",
                db=db_name,
                command_id=outcome.get("command_id"),
                actor=(message.get("actor") if isinstance(message, dict) else None),
            )

    relay = lifecycle.Relay(settings, db_name)

    @worker_ready.connect(weak=False)
    def recover(**_: Any) -> None:
        # Before the first command: report what a dead worker left, re-publish what Redis missed.
        counts = relay.once()
        if counts and counts["reaped"]:
            log.warning("%d command(s) interrupted by a dead worker were reported as failed", counts["reaped"])
        relay.start()
        # What start-up built (Celery, the settings, the imports) lives as long as the worker: out of the
        # garbage collector's full passes, which otherwise walk it again and again during a long plan.
        gc.freeze()

    @worker_shutting_down.connect(weak=False)
    def stopping(sig: str = "SIGTERM", how: str = "Warm", **_: Any) -> None:
        # The running command finishes its step within stop_grace, or cancels it; either way it
        # releases the lock and reports what it left before the worker exits.
        STOP.request(settings.worker.stop_grace, f"the worker was told to stop ({sig}, {how.lower()} shutdown)")

    return app


def worker_argv(settings: Settings, db_name: str, loglevel: str = "INFO") -> list[str]:
    return [
        "worker",
        "--queues", keys.queue(settings.redis.prefix, db_name),
        # One process: the command runs where SIGTERM lands (a pool child would die at once under
        # systemd's KillMode=control-group), and one command at a time.
        "--pool", "solo",
        "--concurrency", "1",
        "--prefetch-multiplier", "1",
        "--hostname", f"{db_name}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel", loglevel,
    ]


def run_worker(settings: Settings, db_name: str, loglevel: str = "INFO") -> None:
    app = create_app(settings, db_name)
    app.worker_main(worker_argv(settings, db_name, loglevel))
