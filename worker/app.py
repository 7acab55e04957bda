"""The Celery app of a database's worker, and its one task."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_ready

from agent import keys, runner
from agent.errors import DbAgentError
from agent.monitoring import alert, init_sentry
from agent.queue import EXECUTE_TASK, celery_app
from agent.redact import redact
from agent.settings import Settings

log = logging.getLogger("dbagent.worker")


def create_app(settings: Settings, db_name: str) -> Celery:
    """The app a worker of database ``db_name`` runs: its queue alone, one command at a time."""
    app = celery_app(settings)
    app.conf.task_default_queue = keys.queue(settings.redis.prefix, db_name)
    init_sentry(settings, "worker")

    @app.task(name=EXECUTE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def execute(message: Any) -> None:
        # decode → authorise → lock → call → emit: all in runner.execute.
        outcome = runner.execute(settings, db_name, message)
        log.info(
            "command %s (%s) %s%s",
            outcome.get("command_id"),
            outcome.get("type"),
            outcome.get("status"),
            f": {outcome['error']}" if outcome.get("error") else "",
        )
        if outcome.get("status") in ("failed", "rejected"):
            alert(
                f"{outcome.get('type')} on {db_name} {outcome.get('status')}: {outcome.get('error')}",
                level="error" if outcome.get("status") == "failed" else "warning",
                db=db_name,
                command_id=outcome.get("command_id"),
                actor=(message.get("actor") if isinstance(message, dict) else None),
            )

    @worker_ready.connect(weak=False)
    def recover(**_: Any) -> None:
        try:
            reported = runner.recover_interrupted(settings, db_name)
        except DbAgentError as exc:
            log.warning("could not check for interrupted commands: %s", exc)
            return
        except Exception as exc:
            log.warning("could not check for interrupted commands: %s", redact(exc))
            return
        for command_id in reported:
            log.warning("command %s was interrupted by a dead worker; reported as failed", command_id)

    return app


def worker_argv(settings: Settings, db_name: str, loglevel: str = "INFO") -> list[str]:
    return [
        "worker",
        "--queues", keys.queue(settings.redis.prefix, db_name),
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
