"""Queue items built the way Celery's Redis transport stores them (as captured from a real producer),
for tests that put hostile or hand-made messages straight onto a queue."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

from dbagent.bus.queue import EXECUTE_TASK
from dbagent.core.commands import Command, CommandType


def envelope(body: object, *, task: str = EXECUTE_TASK, task_id: str | None = None, raw_body: str | None = None,
             headers: dict | None = None, drop: tuple[str, ...] = ()) -> bytes:
    """One queue item: ``body`` JSON-encoded then base64'd (or ``raw_body`` as it is)."""
    task_id = task_id or (body[0][0].get("id") if _is_call(body) else None) or str(uuid.uuid4())
    encoded = raw_body if raw_body is not None else base64.b64encode(json.dumps(body).encode()).decode()
    item = {
        "body": encoded,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
                    "group": None, "retries": 0, "timelimit": [None, None], "root_id": task_id, "parent_id": None,
                    "argsrepr": "", "kwargsrepr": "{}", "origin": "test", **(headers or {})},
        "properties": {"correlation_id": task_id, "reply_to": str(uuid.uuid4()), "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": "x"}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }
    for name in drop:
        item.pop(name)
    return json.dumps(item).encode()


def _is_call(body: object) -> bool:
    return isinstance(body, list) and bool(body) and isinstance(body[0], list) and bool(body[0]) and isinstance(body[0][0], dict)


def call(message: dict, *extra: object) -> list:
    """The body of a task call with ``message`` (and ``extra``) as its positional arguments."""
    return [[message, *extra], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


def command_message(type_: CommandType = CommandType.STATUS, *, db: str = "test", command_id: str | None = None,
                    key: str | None = None, signature: str | None = "0" * 64, **args: object) -> dict:
    """A command's queue message: signed with ``key`` if given, else carrying ``signature`` as is."""
    now = datetime.now(UTC)
    command = Command(id=command_id or str(uuid.uuid4()), type=type_, db=db, args=args, actor="mallory",
                      issued_at=now, expires_at=now + timedelta(hours=1))
    if key is not None:
        return command.signed(key.encode()).to_message()
    return {**command.to_message(), "signature": signature}
