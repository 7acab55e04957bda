"""Celery configuration shared by producers and workers: one queue per database."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from dbagent.bus import keys
from dbagent.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

# The one task: run a signed command on the database's worker.
EXECUTE_TASK = "dbagent.execute"


def celery_config(settings: Settings) -> dict[str, Any]:
    redis = settings.redis
    config = {
        "broker_url": redis.url,
        "broker_transport_options": {
            # Celery's own keys share the deployment's prefix like every other name.
            "global_keyprefix": keys.broker_prefix(redis.prefix),
            # A command unacknowledged this long (its worker died) is delivered again;
            # the commands table makes sure it is then reported, never re-applied.
            "visibility_timeout": int(redis.visibility_timeout),
            "socket_connect_timeout": redis.connect_timeout,
        },
        "broker_connection_timeout": redis.connect_timeout,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_default_queue": keys.queue(redis.prefix, "default"),
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }
    if redis.url.startswith("rediss://") and "ssl_cert_reqs" not in redis.url:
        # Left to itself, kombu connects to a rediss:// broker without checking its certificate.
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def celery_app(settings: Settings) -> Celery:
    """A Celery app configured for dbagent, with no tasks registered (enough to publish)."""
    from celery import Celery

    app = Celery("dbagent", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
