"""``dbagent agent``: the audit sink and the rollback trigger, as consumer groups on the event stream.

Several agents may run at once: each group hands an entry to one of them,
entries of a stopped agent are taken over, and every action is idempotent
(audit rows by event id, rollbacks by a command id derived from the failed run).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from dbagent.bus import keys
from dbagent.bus.consumer import ConsumerOptions, Entry, GroupConsumer, Outcome
from dbagent.bus.producer import Producer
from dbagent.core.commands import Command, CommandType
from dbagent.core.errors import DbAgentError, error_text
from dbagent.core.events import Event, EventType
from dbagent.core.lifecycle import pause_point
from dbagent.core.rollback import (
    AGENT_ACTOR,
    ROLLBACK_TRIGGERS,
    NoRollback,
    decide,
    plan_escalation,
)
from dbagent.monitoring import alert, flush, init_sentry
from dbagent.postgres import store
from dbagent.postgres.connections import pg_connection, ping_redis, redis_client
from dbagent.reactor.audit import AuditSink
from dbagent.settings import Settings

log = logging.getLogger("dbagent.agent")

AUDIT_GROUP = "audit"
# An automatic rollback still queued an hour after the failure is no longer the fix it was:
# the worker refuses it then, and an operator decides (the alert says so).
AGENT_ROLLBACK_TTL_S = 3600.0
ROLLBACK_GROUP = "rollback"


class RollbackTrigger:
    """Handler for the ``rollback`` group: failure events become signed rollback commands."""

    def __init__(self, settings: Settings, producer: Producer) -> None:
        self.settings = settings
        self.producer = producer

    def __call__(self, entries: list[Entry]) -> Outcome:
        outcome = Outcome()
        for entry_id, event in entries:
            if event.type not in ROLLBACK_TRIGGERS and event.type != EventType.ROLLBACK_FAILED:
                outcome.done.add(entry_id)
                continue
            if event.db not in self.settings.databases:
                outcome.dead[entry_id] = f"database {event.db!r} is not configured"
                continue
            try:
                self.handle(event)
            except DbAgentError as exc:
                log.warning("could not act on %s %s yet: %s", event.type, event.id, exc)
                continue
            outcome.done.add(entry_id)
        return outcome

    def handle(self, event: Event) -> None:
        if event.type == EventType.ROLLBACK_FAILED:
            self.escalate(event)
            return
        last_run = self.last_run(event) if event.type == EventType.APP_STARTUP_FAILED else None
        plan = decide(event, last_run)
        if isinstance(plan, NoRollback):
            if plan.alert:
                alert(f"{event.type} on {event.db}: {plan.reason}", db=event.db, command_id=event.command_id,
                      actor=event.actor, event=str(event.type))
            else:
                log.info("%s %s on %s: no rollback: %s", event.type, event.id, event.db, plan.reason)
            return
        pause_point("agent.before_act")
        command = Command(
            id=plan.command_id,
            type=CommandType.ROLLBACK,
            db=plan.db,
            args=plan.args(),
            actor=AGENT_ACTOR,
            ticket=event.ticket or f"event:{event.id}",
        ).expiring_in(AGENT_ROLLBACK_TTL_S)
        self.producer.submit(command)
        log.info("%s on %s: rollback to %s enqueued (command %s)", event.type, plan.db, plan.target or "base", plan.command_id)

    def escalate(self, event: Event) -> None:
        db = self.settings.databases[event.db]
        escalation = plan_escalation(event, db.auto_restore)
        assert escalation is not None
        alert(escalation.message, db=event.db, command_id=event.command_id, actor=event.actor, event="rollback.failed")
        if escalation.restore_path and escalation.restore_command_id:
            command = Command(
                id=escalation.restore_command_id,
                type=CommandType.RESTORE,
                db=event.db,
                args={"path": escalation.restore_path},
                actor=AGENT_ACTOR,
                ticket=event.ticket or f"event:{event.id}",
            ).expiring_in(AGENT_ROLLBACK_TTL_S)
            self.producer.submit(command)
            log.warning("auto_restore: restore of %s enqueued (command %s)", escalation.restore_path, command.id)

    def last_run(self, event: Event) -> dict[str, Any] | None:
        """The database's last migrate run that changed something, from its audit log."""
        db = self.settings.databases[event.db]
        try:
            with pg_connection(db, "dbagent agent") as conn:
                return store.last_changing_migrate(conn, event.ts)
        except SQLAlchemyError as exc:
            raise DbAgentError(f"cannot read the audit log of {event.db}: {error_text(exc, one_line=True)}") from None


def run_agent(settings: Settings, name: str | None = None, stop: threading.Event | None = None) -> None:
    """Run both consumer groups until SIGTERM/SIGINT (or ``stop`` is set)."""
    init_sentry(settings, "agent")
    client = redis_client(settings.redis)
    ping_redis(client, settings.redis)
    prefix = settings.redis.prefix
    name = name or f"{socket.gethostname()}:{os.getpid()}"
    stop = stop or threading.Event()
    options = ConsumerOptions(
        claim_idle_ms=round(settings.agent.claim_idle * 1000), max_deliveries=settings.agent.max_deliveries
    )

    def on_dead(entry_id: str, fields: dict[str, str], reason: str) -> None:
        alert(f"event {entry_id} ({fields.get('type')}) moved to the dead-letter stream: {reason}",
              db=fields.get("db"), command_id=fields.get("command_id"))

    sink = AuditSink(settings)
    consumers = [
        GroupConsumer(client, keys.events(prefix), AUDIT_GROUP, name, sink, keys.dead_letters(prefix), options, on_dead),
        GroupConsumer(client, keys.events(prefix), ROLLBACK_GROUP, name, RollbackTrigger(settings, Producer(settings, client)),
                      keys.dead_letters(prefix), options, on_dead),
    ]
    for consumer in consumers:
        consumer.ensure_group()

    def shutdown(signum: int, frame: Any) -> None:
        log.info("stopping (signal %d)", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, shutdown)
        signal.signal(signal.SIGINT, shutdown)
    threads = [threading.Thread(target=_guarded, args=(c, stop), name=f"agent-{c.group}", daemon=True) for c in consumers]
    for thread in threads:
        thread.start()
    log.info("agent %s consuming %s (groups %s, %s)", name, keys.events(prefix), AUDIT_GROUP, ROLLBACK_GROUP)
    try:
        while not stop.wait(0.5):
            if not all(t.is_alive() for t in threads):
                raise DbAgentError("a consumer thread stopped; see the log")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        sink.close()
        flush()


def _guarded(consumer: GroupConsumer, stop: threading.Event) -> None:
    try:
        consumer.run(stop)
    except Exception:
        log.exception("consumer %s failed", consumer.group)
        stop.set()
