"""Sentry for the worker, beat and agent, with secrets scrubbed; alerts that always reach the log too."""

from __future__ import annotations

import logging
import os
from typing import Any

from dbagent.core.redact import redact
from dbagent.settings import Settings

log = logging.getLogger("dbagent.alert")

_enabled = False


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """Every string Sentry would send passes through redact: no password leaves the host."""
    return _scrub(event)


def init_sentry(settings: Settings, component: str) -> bool:
    """Start Sentry when a DSN is configured (``SENTRY_DSN`` or ``[monitoring] sentry_dsn_env``)."""
    global _enabled
    dsn = os.environ.get(settings.monitoring.sentry_dsn_env, "")
    if not dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration

    sentry_sdk.init(
        dsn=dsn,
        environment=settings.monitoring.environment,
        integrations=[CeleryIntegration()],
        before_send=_before_send,
        before_breadcrumb=lambda crumb, hint: _scrub(crumb),
        send_default_pii=False,
        server_name=component,
    )
    sentry_sdk.set_tag("component", component)
    _enabled = True
    return True


def alert(message: str, *, level: str = "error", **tags: Any) -> None:
    """Report something an operator must act on: to the log, and to Sentry when enabled."""
    text = redact(message)
    log.log(logging.ERROR if level == "error" else logging.WARNING, "%s %s", text, {k: v for k, v in tags.items() if v})
    if not _enabled:
        return
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        for key, value in tags.items():
            if value is not None:
                scope.set_tag(key, str(value))
        sentry_sdk.capture_message(text, level=level)


def flush(timeout_s: float = 5.0) -> None:
    if _enabled:
        import sentry_sdk

        sentry_sdk.flush(timeout=timeout_s)
