"""The HTTP API (``dbagent serve``): deploy systems and chat-ops submit commands and read the audit trail.

Every endpoint calls the same producer code as the CLI (``Producer.check`` →
``Producer.submit``); this module only adds authentication, HTTP status codes
and metrics. Bearer tokens and the Slack signing secret are read from the
environment variables the configuration names, once, when the app is created.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from dbagent.bus import keys
from dbagent.bus.eventlog import EventLog
from dbagent.bus.producer import Producer
from dbagent.core.commands import MAX_DETAIL_CHARS, Command, Ticket, client_command, message_digest
from dbagent.core.errors import BadInput, ConfigError, DbAgentError, Unavailable
from dbagent.core.events import Event, EventType
from dbagent.core.redact import has_control, printable, redact
from dbagent.interfaces import slack
from dbagent.settings import Settings

log = logging.getLogger(__name__)

# How many stream entries one request reads at most: a command's events, or a
# page of the audit trail. Older entries are still in PostgreSQL's audit log.
SCAN_LIMIT = 100_000
SCAN_PAGE = 1000
# A command submitted by another producer (the CLI, beat, the agent) has no
# submission record here, so its events are looked for among the newest entries.
RECENT_LIMIT = 10_000

# A command the API did not queue names no database: this many configured ones are asked for its outcome.
POSTGRES_LOOKUP_MAX_DATABASES = 20

EVENTS_DEFAULT_LIMIT = 100
EVENTS_MAX_LIMIT = 1000

# A Redis stream id: milliseconds and a sequence number, each a 64-bit unsigned integer.
_STREAM_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
_STREAM_ID_MAX = 2**64 - 1

# The largest request body read (a command is a few hundred bytes; a Slack slash command
# is a form of a dozen short fields). Larger ones are answered 413 before any is parsed.
MAX_BODY_BYTES = 64 * 1024
# The actor a request names besides its token's (the token's actor and it make the command's actor).
MAX_BODY_ACTOR_CHARS = 100
MAX_NAME_CHARS = 100  # a command type, a database's name


submitted_key = keys.submitted
slack_seen_key = keys.slack_seen

# Past twice the window, a replayed request fails the timestamp check anyway.
SLACK_SEEN_TTL_S = 2 * slack.REPLAY_WINDOW_S


# -- request bodies ------------------------------------------------------------


def _one_line(value: str) -> str:
    if has_control(value):
        raise ValueError("must not contain control characters (newlines, escapes)")
    return value


def _text_lines(value: str) -> str:
    if has_control(value.replace("\n", "").replace("\t", "")):
        raise ValueError("must not contain control characters other than newlines and tabs")
    return value


Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), AfterValidator(_one_line)]
BodyActor = Annotated[str, Field(min_length=1, max_length=MAX_BODY_ACTOR_CHARS), AfterValidator(_one_line)]
Detail = Annotated[str, Field(max_length=MAX_DETAIL_CHARS), AfterValidator(_text_lines)]


class CommandRequest(BaseModel):
    """Body of ``POST /v1/commands``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"type": "rollback", "db": "production", "args": {"steps": 1}, "actor": "alice", "ticket": "CHG-1234"},
        {"type": "migrate", "db": "staging", "args": {"to": "011", "dry_run": True}},
    ]})

    type: Name
    db: Name | None = None
    args: dict[str, Any] = Field({}, description="the command type's arguments; `cause` is the agent's alone")
    actor: BodyActor | None = Field(None, description="on whose behalf the token's holder asks")
    ticket: Ticket | None = None


class StartupFailedRequest(BaseModel):
    """Body of ``POST /v1/events/startup-failed``: an application failed to start after a deploy."""

    model_config = ConfigDict(extra="forbid")

    db: Name | None = None
    actor: BodyActor | None = Field(None, description="on whose behalf the token's holder reports")
    ticket: Ticket | None = None
    detail: Detail | None = None


# -- errors ----------------------------------------------------------------------


class ApiError(Exception):
    """Raised by an endpoint for an answer that is neither a success nor a DbAgentError."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def http_status(exc: DbAgentError) -> int:
    if isinstance(exc, BadInput):
        return 422
    if isinstance(exc, Unavailable):
        return 503
    return 500


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": redact(message)}, status_code=status, headers=headers)


def shown(value: object) -> str:
    """A value for a log line: secrets masked, on one line (a newline or an escape in it cannot forge another)."""
    return printable(redact(value))


def check_stream_id(after: str) -> None:
    """BadInput unless ``after`` is a Redis stream id (``1700000000000-0``, or ``-``)."""
    if after == "-":
        return
    found = _STREAM_ID.fullmatch(after)
    if found is None or int(found[1]) > _STREAM_ID_MAX or int(found[2] or 0) > _STREAM_ID_MAX:
        raise BadInput(f"after must be a stream id such as 1700000000000-0 (got {after[:50]!r})")


def is_last_stream_id(after: str) -> bool:
    """The largest stream id there is: nothing comes after it (and Redis refuses to look)."""
    return after == f"{_STREAM_ID_MAX}-{_STREAM_ID_MAX}"


def describe_validation(errors: list[Any]) -> str:
    """One line for pydantic's list of errors: ``type: Field required; args: …``."""
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        location = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "header"))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts) or "invalid request"


# -- configuration read from the environment --------------------------------------


def parse_tokens(raw: str, env_name: str) -> dict[str, str]:
    """``token1=deploy-bot,token2=ci`` → {token: actor}; ConfigError naming the entry, never its token."""
    tokens: dict[str, str] = {}
    for number, entry in enumerate(raw.split(","), 1):
        if not entry.strip():
            continue
        # The actor is after the last '=': base64 tokens may end in '=' themselves.
        token, sep, actor = entry.strip().rpartition("=")
        token, actor = token.strip(), actor.strip()
        if not sep or not token or not actor:
            raise ConfigError(f"${env_name}: entry {number} is not 'token=actor'")
        if token in tokens:
            raise ConfigError(f"${env_name}: entry {number} repeats the token of an earlier entry")
        tokens[token] = actor
    return tokens


def authenticate(tokens: dict[str, str], authorization: str | None) -> str | None:
    """The actor a ``Bearer`` header's token stands for, or None."""
    scheme, _, presented = (authorization or "").strip().partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        return None
    found = None
    # Compare against every token, in constant time each, so timing tells nothing.
    for token, actor in tokens.items():
        if hmac.compare_digest(presented.encode(), token.encode()):
            found = actor
    return found


def token_actor(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """FastAPI dependency: the actor of the request's bearer token, else 401 (503 when none is configured)."""
    tokens: dict[str, str] = request.app.state.tokens
    if not tokens:
        env_name = request.app.state.settings.api.tokens_env
        raise ApiError(503, f"no API tokens are configured: set ${env_name} to 'token=actor,…'")
    actor = authenticate(tokens, authorization)
    if actor is None:
        raise ApiError(401, "missing or unknown bearer token", {"WWW-Authenticate": "Bearer"})
    return actor


Actor = Annotated[str, Depends(token_actor)]


def on_behalf(token_actor: str, body_actor: str | None) -> str:
    """The actor recorded for a request: the token's holder, and whom it speaks for."""
    return f"{token_actor} for {body_actor}" if body_actor else token_actor


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8080`` for IPv6) → (host, port)."""
    host, sep, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"api.listen must be 'host:port', e.g. 127.0.0.1:8080 (got {listen!r})")
    return host, int(port)


# -- reading the event stream ------------------------------------------------------


def command_events(events: EventLog, command_id: str, after: str | None) -> list[Event]:
    """One command's events, oldest first, read from ``after`` on (or among the newest entries)."""
    if after is None:
        return [event for _, event in events.tail(RECENT_LIMIT) if event.command_id == command_id]
    found: list[Event] = []
    cursor, scanned = after, 0
    while scanned < SCAN_LIMIT:
        page = events.read(after=cursor, count=SCAN_PAGE)
        if not page:
            break
        scanned += len(page)
        cursor = page[-1][0]
        found.extend(event for _, event in page if event.command_id == command_id)
    return found


def list_events(
    events: EventLog, *, db: str | None, after: str | None, limit: int
) -> tuple[list[tuple[str, Event]], str]:
    """Up to ``limit`` entries (of one database) and the stream id to continue after.

    The id returned is that of the last entry read, matching or not, so a reader
    following one quiet database still moves forward through the stream.
    """
    if after is None:
        end = events.last_id()
        newest = events.tail(limit, db)
        return newest, newest[-1][0] if newest else end
    found: list[tuple[str, Event]] = []
    cursor, scanned = after, 0
    while len(found) < limit and scanned < SCAN_LIMIT:
        page = events.read(after=cursor, count=SCAN_PAGE)
        if not page:
            break
        for entry_id, event in page:
            scanned += 1
            cursor = entry_id
            if db is None or event.db == db:
                found.append((entry_id, event))
                if len(found) == limit:
                    break
    return found, cursor


# -- metrics -------------------------------------------------------------------------


class Metrics:
    """The app's own Prometheus registry (not the process-global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.commands = Counter(
            "dbagent_api_commands_accepted", "Commands queued through the API, per type and database.",
            ["type", "db"], registry=self.registry,
        )
        self.requests = Counter(
            "dbagent_api_http_requests", "HTTP requests answered, per route, method and status.",
            ["route", "method", "status"], registry=self.registry,
        )
        self.stream_length = Gauge(
            "dbagent_event_stream_length", "Entries in the event stream at the last scrape.",
            registry=self.registry,
        )


class LimitBody:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413, whether its
    Content-Length says so or its chunks add up to it.

    The body is read here (it is small) and handed on whole, so no endpoint ever
    holds or parses more than ``limit`` bytes, and a request that lies about its
    length is caught as it streams.
    """

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            declared = declared.strip()
            if not declared.isdigit():
                await self._answer(send, 400, "Content-Length is not a number of bytes")
                return
            if len(declared) > 20 or int(declared) > self.limit:
                await self._too_large(send, declared.decode()[:30])
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(send, f"more than {self.limit}")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        handed = False

        async def replay() -> Any:
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: a disconnect

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any, size: str) -> None:
        await self._answer(send, 413, f"request body too large ({size} bytes): the limit is {self.limit} bytes")

    @staticmethod
    async def _answer(send: Any, status: int, text: str) -> None:
        body = json.dumps({"error": text}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class CountRequests:
    """ASGI middleware counting responses by route template (never the raw path: ids would
    make one series per command)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route=route, method=scope["method"], status=str(status)).inc()


# -- the app ---------------------------------------------------------------------------


def create_app(settings: Settings, producer: Producer | None = None) -> FastAPI:
    """The API of one deployment; ``producer`` defaults to one on the configured Redis."""
    producer = producer if producer is not None else Producer(settings)
    prefix = settings.redis.prefix
    tokens_env = settings.api.tokens_env
    tokens = parse_tokens(_environ(tokens_env), tokens_env)
    secret_env = settings.chatops.slack_signing_secret_env
    slack_secret = _environ(secret_env).encode() or None
    metrics = Metrics()
    if not tokens:
        log.warning("no API tokens in $%s: every /v1 endpoint but Slack's answers 503", tokens_env)
    if slack_secret is None:
        log.warning("no Slack signing secret in $%s: /v1/chatops/slack answers 503", secret_env)

    app = FastAPI(
        title="dbagent",
        description="Queue migrations, backups and rollbacks; read their outcomes and the audit trail.",
    )
    app.add_middleware(LimitBody)
    app.add_middleware(CountRequests, metrics=metrics)
    app.state.settings = settings
    app.state.producer = producer
    app.state.metrics = metrics
    app.state.tokens = tokens

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(DbAgentError)
    async def _dbagent_error(request: Request, exc: DbAgentError) -> JSONResponse:
        status = http_status(exc)
        if status == 500:
            log.error("%s %s failed: %s", request.method, shown(request.url.path), shown(exc.message))
        return _error(status, exc.message)

    @app.exception_handler(redis.RedisError)
    async def _redis_error(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("%s %s: Redis error: %s", request.method, shown(request.url.path), shown(exc))
        return _error(503, f"Redis is unavailable: {redact(exc)}")

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own answers (404, 405) in this API's shape. FastAPI says 400 for a body
        # json cannot read at all (nested too deep, a number of thousands of digits): a bad body is 422.
        if exc.status_code == 400:
            return _error(422, "the request body is not valid JSON (too deeply nested, or a number too long)")
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, describe_validation(list(exc.errors())))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s", request.method, shown(request.url.path), type(exc).__name__, shown(exc))
        return _error(500, "internal error (see the API's log)")

    def database_name(db: str | None, how: str) -> str:
        if db is None and len(settings.databases) > 1:
            raise BadInput(f"several databases are configured ({', '.join(sorted(settings.databases))}): {how}")
        return settings.database(db)[0]

    def build_command(type_: str, db: str | None, args: dict[str, Any], actor: str, ticket: str | None) -> Command:
        name = database_name(db, 'give "db"')
        return client_command(type_, db=name, args=args, actor=actor, ticket=ticket)

    def submit(command: Command) -> Command:
        """Queue the command as the CLI does, and remember it as queued."""
        after = producer.check()
        sent = producer.submit(command)
        # The digest of the message as sent: where the worker publishes its refusal, if it refuses it.
        record = {
            "command": sent.model_dump(mode="json", exclude={"signature"}), "after": after,
            "digest": message_digest(sent.to_message()),
        }
        try:
            producer.redis.set(submitted_key(prefix, command.id), json.dumps(record), ex=keys.RESULT_TTL_S)
        except redis.RedisError as exc:
            # The command is on its queue already: answer 202 all the same.
            log.warning("command %s queued, but its submission record was not written: %s", command.id, shown(exc))
        metrics.commands.labels(type=command.type.value, db=command.db).inc()
        log.info("queued %s of %s for %s: command %s", command.type.value, command.db, shown(command.actor), command.id)
        return sent

    @app.post("/v1/commands", status_code=202)
    def post_command(body: CommandRequest, actor: Actor) -> dict[str, Any]:
        """Queue a command on its database's worker."""
        command = build_command(body.type, body.db, body.args, on_behalf(actor, body.actor), body.ticket)
        submit(command)
        return {"command_id": command.id}

    @app.get("/v1/commands/{command_id}")
    def get_command(command_id: str, _: Actor, db: str | None = None) -> dict[str, Any]:
        """The command's result (as ``dbagent … --json`` prints it) and its events.

        Redis holds the outcome while it is fresh; without it (Redis lost it, or
        is down) the database's own record answers.
        """
        if len(command_id) > 100:
            raise ApiError(404, "unknown command")
        if db is not None:
            settings.database(db)
        try:
            raw = producer.redis.get(submitted_key(prefix, command_id))
            submitted = json.loads(raw) if raw else None
            result = producer.result(command_id, (submitted or {}).get("digest"))
        except redis.RedisError as exc:
            log.warning("GET /v1/commands/%s: Redis error, reading PostgreSQL: %s", shown(command_id), shown(exc))
            recorded = outcome_from_postgres(command_id, db)
            if recorded is None:
                raise
            return {**recorded, "events": [], "source": "postgres"}
        events = command_events(producer.events, command_id, submitted["after"] if submitted else None)
        presence = producer.presence(command_id) if result is None else None
        if result is None and presence is None and (events or not submitted):
            # Not running now and not merely queued: finished, with its outcome gone from Redis (or never
            # published there, Redis being down at the time), or unknown here.
            result = outcome_from_postgres(command_id, db or (submitted or {}).get("command", {}).get("db"))
        body = [event.to_json() for event in events]
        if result is not None:
            return {**result, "events": body}
        queued = submitted["command"] if submitted else {}
        if events or presence:
            return {
                "command_id": command_id, "type": queued.get("type"), "db": queued.get("db") or (events[0].db if events else None),
                "status": "running", "error": None, "events": body,
                **({"worker": presence.get("worker"), "phase": presence.get("phase"), "step": presence.get("step")}
                   if presence else {}),
            }
        if submitted:
            return {
                "command_id": command_id, "type": queued["type"], "db": queued["db"],
                "status": "queued", "error": None, "events": [], "expires_at": queued.get("expires_at"),
            }
        raise ApiError(404, "unknown command")

    def outcome_from_postgres(command_id: str, db: str | None) -> dict[str, Any] | None:
        """The command's recorded outcome in its database (or in each configured one, up to a few)."""
        names = [db] if db else sorted(settings.databases)[:POSTGRES_LOOKUP_MAX_DATABASES]
        for name in names:
            outcome = producer.outcome_from_postgres(command_id, name)
            if outcome is not None:
                return outcome
        return None

    @app.get("/v1/events")
    def get_events(
        _: Actor,
        db: str | None = None,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=EVENTS_MAX_LIMIT)] = EVENTS_DEFAULT_LIMIT,
    ) -> dict[str, Any]:
        """The audit trail: the newest ``limit`` entries, or those after a stream id."""
        if db is not None:
            settings.database(db)
        if after is not None:
            check_stream_id(after)
            if is_last_stream_id(after):
                return {"events": [], "last_id": after}
        entries, last_id = list_events(producer.events, db=db, after=after, limit=limit)
        return {"events": [event.to_json() for _, event in entries], "last_id": last_id}

    @app.post("/v1/events/startup-failed", status_code=202)
    def post_startup_failed(body: StartupFailedRequest, actor: Actor) -> dict[str, Any]:
        """An application failed to start after a deploy: the agent rolls its database back."""
        name = database_name(body.db, 'give "db"')
        event = Event(
            type=EventType.APP_STARTUP_FAILED.value,
            db=name,
            actor=on_behalf(actor, body.actor),
            ticket=body.ticket,
            data={"detail": redact(body.detail) if body.detail else None},
        )
        producer.events.publish([event])
        log.info("startup failure of %s reported by %s: event %s", name, shown(event.actor), event.id)
        return {"event_id": event.id}

    @app.post("/v1/chatops/slack")
    async def post_slack(request: Request) -> dict[str, Any]:
        """A Slack slash command, e.g. ``/dbagent rollback staging 1``."""
        if slack_secret is None:
            raise ApiError(503, f"Slack chat-ops is not configured: set ${secret_env}")
        raw = await request.body()
        signature = request.headers.get("x-slack-signature")
        try:
            slack.verify_signature(
                slack_secret,
                timestamp=request.headers.get("x-slack-request-timestamp"),
                signature=signature,
                body=raw,
                now_s=time.time(),
            )
        except slack.SignatureRejected as exc:
            log.warning("refused a Slack request: %s", shown(exc.message))
            raise ApiError(401, f"Slack request refused: {exc.message}") from None
        return await run_in_threadpool(answer_slack, slack.parse_form(raw), signature or "")

    def answer_slack(form: dict[str, str], signature: str) -> dict[str, Any]:
        user = form.get("user_id", "")
        try:
            first_time = producer.redis.set(slack_seen_key(prefix, signature), "1", nx=True, ex=SLACK_SEEN_TTL_S)
        except redis.RedisError as exc:
            log.warning("slack request from %s not handled: %s", shown(user), shown(exc))
            return _ephemeral(f"Could not handle this request: {UNAVAILABLE_TEXT}")
        if not first_time:
            log.warning("refused a replayed Slack request from %s", shown(user))
            raise ApiError(401, "Slack request refused: already handled (replayed)")
        try:
            wanted = slack.parse_text(form.get("text", ""))
        except slack.UsageError as exc:
            return _ephemeral(exc.message)
        if wanted.is_help:
            return _ephemeral(slack.USAGE)
        permissions = settings.chatops.permissions
        if not permissions.get(user):
            return _ephemeral(f"Sorry, you are not allowed to use dbagent (no [chatops.permissions] for {user}).")
        try:
            name = database_name(wanted.db, f"say which one: {wanted.verb} <db>")
        except BadInput as exc:
            return _ephemeral(exc.message)
        if not slack.is_allowed(permissions, user, wanted.verb, name):
            log.warning("slack user %s may not %s %s", shown(user), wanted.verb, name)
            needed = f"{wanted.verb}:{name}"
            return _ephemeral(
                f'Sorry, you are not allowed to {wanted.verb} {name} (it needs "{needed}" in [chatops.permissions]).'
            )
        try:
            command = build_command(wanted.verb, name, wanted.args, f"slack:{user}", None)
            submit(command)
        except BadInput as exc:
            return _ephemeral(f"Could not queue {wanted.verb} of {name}: {redact(exc.message)}")
        except Unavailable as exc:
            log.warning("slack %s of %s not queued: %s", wanted.verb, name, shown(exc.message))
            return _ephemeral(f"Could not queue {wanted.verb} of {name}: {UNAVAILABLE_TEXT}")
        return {"response_type": "in_channel", "text": f"{wanted.verb} of {name} queued: command {command.id}"}

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """Whether the API can reach Redis."""
        try:
            producer.redis.ping()
        except redis.RedisError as exc:
            log.warning("health check: cannot reach Redis: %s", shown(exc))
            return JSONResponse({"status": "unavailable", "error": "cannot reach Redis"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    def get_metrics() -> Response:
        """Prometheus text format."""
        try:
            metrics.stream_length.set(producer.redis.xlen(keys.events(prefix)))
        except redis.RedisError as exc:
            log.warning("metrics: cannot read the event stream's length: %s", shown(exc))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# What a Slack user is told when Redis is down; the details go to the API's log only.
UNAVAILABLE_TEXT = "the queue is unavailable, try again shortly."


def _ephemeral(text: str) -> dict[str, Any]:
    """A Slack answer only the asking user sees (Slack wants 200 even for refusals)."""
    return {"response_type": "ephemeral", "text": text}


def _environ(name: str) -> str:
    return os.environ.get(name, "").strip()


def run(settings: Settings, listen: str | None = None) -> None:
    """Serve the API with uvicorn on ``listen`` (default: ``[api] listen``) until interrupted."""
    import uvicorn

    host, port = parse_listen(listen or settings.api.listen)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)
