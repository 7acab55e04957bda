"""What a worker takes off its queue: every message checked whole before Celery reads it.

Anyone who can write to Redis can put anything on a database's queue. Celery
would decode what it finds there itself, and some of it kills the worker
(JSON that does not parse, a body that is not base64), crash-loops it (a body
that decodes to something other than a task call returns to the queue at every
crash) or is dropped with a log line (an unknown task, a wrong arity). So the
worker's transport hands Celery only messages that are, byte for byte, what a
dbagent producer sends: a Celery task message of bounded size for the one task,
whose one argument is a command of a known type, signed with the deployment's
key. Anything else is poison: it is moved to the database's dead-letter list
(``keys.dead_commands``: reason, size, digest and a short excerpt, never the
whole payload), a ``command.rejected`` event says so, and it is acknowledged
(it is already off the queue): never requeued, never fatal.

The check is pure (``inspect``); what passes is handed to Celery rebuilt from
what was checked (``task_payload``); the transport is kombu's Redis transport
with its two reads (``_brpop_read``, ``_get``) going through it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

from dbagent.bus import keys
from dbagent.bus.queue import EXECUTE_TASK
from dbagent.core.commands import Command, authenticate, message_digest
from dbagent.core.errors import CommandRejected
from dbagent.core.redact import redact

if TYPE_CHECKING:
    from dbagent.settings import Settings

log = logging.getLogger(__name__)

# A dbagent command message is a few KiB at most (its args are a handful of short fields).
MAX_MESSAGE_BYTES = 256 * 1024
# How much of an untrusted value a log line, an event or a dead letter quotes.
EXCERPT_CHARS = 120

# Celery message headers that would make the worker do more than run the command now:
# hold it (eta), decompress it (compression: a zip bomb), or chain other tasks after it.
_FORBIDDEN_HEADERS = ("eta", "expires", "compression", "chord", "group")
_FORBIDDEN_EMBED = ("callbacks", "errbacks", "chain", "chord")


class Poison(Exception):
    """A queue message that is not a well-formed, signed dbagent command."""

    def __init__(self, reason: str, message: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message  # the command message inside, when it got that far


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """At most ``limit`` characters of an untrusted value, control characters escaped, secrets masked."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)
    cut = text[: limit * 2]  # redact before cutting, on a bounded slice (a secret cut in half is still masked)
    shown = redact(cut).encode("unicode_escape").decode("ascii")
    more = len(text) > limit * 2 or len(shown) > limit
    return shown[:limit] + ("…" if more else "")


def inspect(raw: bytes | str, *, key: bytes | None, task: str = EXECUTE_TASK) -> tuple[dict[str, Any], str]:
    """The command message in ``raw`` and its delivery tag, if ``raw`` is a well-formed call of ``task``
    with one signed command.

    Raises Poison naming the first thing wrong. Checks what Celery would trip on,
    in the order it would meet it, and then that the command is ours.
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        raise Poison(f"message of {len(raw)} bytes, over the limit of {MAX_MESSAGE_BYTES}")
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise Poison("message is not JSON") from None
    if not isinstance(payload, dict):
        raise Poison(f"message is a JSON {type(payload).__name__}, not an object")
    properties, headers = payload.get("properties"), payload.get("headers")
    if not isinstance(properties, dict):
        raise Poison("message has no properties")
    if not isinstance(properties.get("delivery_tag"), str) or not isinstance(properties.get("delivery_info"), dict):
        raise Poison("message properties have no delivery tag or delivery info")
    if not isinstance(headers, dict):
        raise Poison("message has no headers")
    if headers.get("task") != task:
        raise Poison(f"message is for task {excerpt(headers.get('task'), 60)!s}, not {task}")
    for name in _FORBIDDEN_HEADERS:
        if headers.get(name) is not None:
            raise Poison(f"message sets the {name!r} header, which dbagent producers never set")
    if payload.get("content-type") != "application/json" or payload.get("content-encoding") != "utf-8":
        raise Poison("message body is not UTF-8 JSON")
    if properties.get("body_encoding") != "base64" or not isinstance(payload.get("body"), str):
        raise Poison("message body is not base64 text")
    try:
        body = json.loads(base64.b64decode(payload["body"], validate=True))
    except (binascii.Error, ValueError):
        raise Poison("message body is not base64-encoded JSON") from None
    if not (isinstance(body, list) and len(body) == 3 and isinstance(body[0], list) and isinstance(body[1], dict)):
        raise Poison("message body is not a task call ([args, kwargs, options])")
    args, kwargs, embed = body
    if len(args) != 1 or kwargs or not isinstance(args[0], dict):
        raise Poison(f"task call has {len(args)} positional and {len(kwargs)} keyword arguments, not one command")
    if embed is not None and not isinstance(embed, dict):
        raise Poison("task call options are not an object")
    for name in _FORBIDDEN_EMBED:
        if (embed or {}).get(name):
            raise Poison(f"task call chains other work ({name}), which dbagent producers never do")
    message = args[0]
    if headers.get("id") != message.get("id"):
        raise Poison("task id and command id differ", message)
    try:
        command = Command.from_message(message)
        authenticate(command, key)
    except CommandRejected as exc:
        raise Poison(exc.message, message) from None
    return message, properties["delivery_tag"]


def task_payload(message: dict[str, Any], delivery_tag: str, queue: str, task: str = EXECUTE_TASK) -> dict[str, Any]:
    """The kombu payload Celery is given for a checked command: rebuilt from what was checked, so no
    other header, option or property of the original (a time limit of the wrong type, a routing key
    naming another queue for its redelivery) reaches Celery."""
    task_id = message["id"]
    body = [[message], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
            "parent_id": None, "argsrepr": "", "kwargsrepr": "{}", "origin": "dbagent", "ignore_result": True,
        },
        "properties": {
            "correlation_id": task_id, "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0, "body_encoding": "base64", "delivery_tag": delivery_tag,
        },
    }


class Intake:
    """The worker's boundary for one database: inspect, and dead-letter what does not pass."""

    def __init__(self, settings: Settings, db_name: str, worker: str | None = None) -> None:
        self.settings = settings
        self.db_name = db_name
        self.worker = worker
        self.refused = 0

    def accept(self, raw: bytes | str, queue: str) -> dict[str, Any] | None:
        """The payload to hand to Celery, or None once ``raw`` is dead-lettered."""
        try:
            message, delivery_tag = inspect(raw, key=self.settings.security.signing_key())
            return task_payload(message, delivery_tag, queue)
        except Poison as poison:
            self.dead_letter(raw, queue, poison.reason, poison.message)
        except Exception as exc:  # noqa: BLE001 - whatever else a hostile payload provokes is poison too
            self.dead_letter(raw, queue, f"unreadable message ({type(exc).__name__})", None)
        return None

    def dead_letter(self, raw: bytes | str, queue: str, reason: str, message: dict[str, Any] | None) -> None:
        """Record a refused message (bounded), say so with command.rejected, never raise."""
        from dbagent.bus.eventlog import EventLog
        from dbagent.operations import context, lifecycle
        from dbagent.operations.journal import Journal
        from dbagent.postgres.connections import redis_client

        self.refused += 1
        data = raw.encode() if isinstance(raw, str) else bytes(raw)
        claimed = message.get("id") if message else None
        command_id = claimed if isinstance(claimed, str) and 0 < len(claimed) <= lifecycle.MAX_ID_CHARS else None
        digest = message_digest(message) if message is not None else None
        record = {
            "at": time.time(),
            "queue": queue,
            "reason": reason,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest()[:16],
            "command_id": command_id,
            "excerpt": excerpt(data),
        }
        log.warning(
            "refused a message on %s (%d bytes, sha256 %s%s): %s; dead-lettered",
            queue, record["size"], record["sha256"], f", command {command_id}" if command_id else "", reason,
        )
        prefix = self.settings.redis.prefix
        try:
            client = redis_client(self.settings.redis)
            dead = keys.dead_commands(prefix, self.db_name)
            with client.pipeline(transaction=False) as pipe:
                pipe.lpush(dead, json.dumps(record))
                pipe.ltrim(dead, 0, keys.DEAD_COMMANDS_KEPT - 1)
                pipe.execute()
            journal = Journal(EventLog(client, prefix), prefix, self.db_name, None)
            worker = self.worker or context.worker_name(self.db_name)
            event = {k: record[k] for k in ("size", "sha256", "queue")}
            lifecycle.record_rejection(
                journal, self.settings.databases[self.db_name], reason, worker,
                command_id=command_id, dead_letter=True, **event,
            )
            if command_id and digest:
                # The producer of a message refused for its signature still learns why, under its own digest.
                journal.refuse({
                    "command_id": command_id, "type": None, "db": self.db_name, "status": "rejected",
                    "error": reason, "exit_code": 2,
                }, digest)
        except Exception as exc:  # noqa: BLE001 - a refused message is gone from the queue either way
            log.error("could not record the refused message (sha256 %s): %s", record["sha256"], excerpt(exc, 300))


class GuardedQoS(kombu_redis.QoS):
    """kombu's unacknowledged-message bookkeeping, surviving an entry it did not write.

    Redelivery (after the visibility timeout) decodes each entry of the unacked
    hash; one that does not decode would stop the worker at every start. It is
    dropped from the hash and its index and dead-lettered instead. What is put
    back on the queue goes through the Intake again when it is read.
    """

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        try:
            super().restore_by_tag(tag, client, leftmost)
        except (ValueError, TypeError, UnicodeDecodeError):
            with self.channel.conn_or_acquire(client) as conn:
                raw = conn.hget(self.unacked_key, tag) or b""
                with conn.pipeline() as pipe:
                    self._remove_from_indices(tag, pipe).execute()
            intake = self.channel._intake()
            if intake is not None:
                intake.dead_letter(raw, "unacked", "an unacknowledged entry that is not one kombu wrote", None)


class GuardedChannel(kombu_redis.Channel):
    """kombu's Redis channel, reading every message through the worker's Intake first."""

    QoS = GuardedQoS

    def _intake(self) -> Intake | None:
        return self.connection.client.transport_options.get("dbagent_intake")

    def _accept(self, item: bytes, queue: str) -> dict[str, Any] | None:
        intake = self._intake()
        if intake is None:  # not a worker's connection: kombu's own reading
            return json.loads(bytes_to_str(item))
        return intake.accept(item, queue)

    # The two reads of kombu's Redis Channel (5.x), with their decoding through _accept.
    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # As kombu does: disconnect so the next poll reconnects.
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = self._accept(item, dest)
            if payload is not None:
                self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _get(self, queue: str) -> dict[str, Any]:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    payload = self._accept(item, queue)
                    if payload is not None:
                        return payload
            self._maybe_update_queues_expire(client, queue)
            raise kombu_redis.Empty()


class GuardedTransport(kombu_redis.Transport):
    """kombu's Redis transport with GuardedChannel: ``broker_transport`` of a worker."""

    Channel = GuardedChannel
    driver_type = "redis"
    driver_name = "redis"


TRANSPORT = f"{__name__}:GuardedTransport"
