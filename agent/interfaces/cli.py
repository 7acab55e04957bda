"""The ``dbagent`` command line: the runbook's verbs, through the queue to the database's worker."""

from __future__ import annotations

import gc
import getpass
import json
import os
import re
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from dbagent.core.errors import BadInput, DbAgentError
from dbagent.core.events import Event
from dbagent.core.redact import redact
from dbagent.settings import Settings, load_settings

app = typer.Typer(
    name="dbagent",
    help="Run PostgreSQL migrations, backups and rollbacks in production, safely and with an audit trail.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
env_app = typer.Typer(help="Check this host's configuration and dependencies.", no_args_is_help=True)
app.add_typer(env_app, name="env")
backups_app = typer.Typer(help="List, verify and prune the backups of a database.", no_args_is_help=True)
app.add_typer(backups_app, name="backups")

# Piped output is read by scripts and logs: do not fold tables to 80 columns there.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 240)


class _State:
    config: str | None = None
    debug: bool = False
    settings: Settings | None = None


state = _State()

DbOpt = Annotated[str | None, typer.Option("--db", help="Database name (default: the only one configured).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (events as JSON lines on stderr).")]
ActorOpt = Annotated[str | None, typer.Option("--actor", help="Who asks, for the audit trail (default: $DBAGENT_ACTOR or user@host).")]
TicketOpt = Annotated[str | None, typer.Option("--ticket", help="Change ticket reference, for the audit trail.")]
NoWaitOpt = Annotated[bool, typer.Option("--no-wait", help="Print the command id and return without waiting.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the outcome.", min=0.1)]


@app.callback()
def _global(
    config: Annotated[str | None, typer.Option("--config", help="Configuration file (default: $DBAGENT_CONFIG, then config/dbagent.toml).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    state.config = config
    state.debug = debug


def settings() -> Settings:
    if state.settings is None:
        state.settings = load_settings(state.config)
    return state.settings


def default_actor(actor: str | None) -> str:
    if actor:
        return actor
    if os.environ.get("DBAGENT_ACTOR"):
        return os.environ["DBAGENT_ACTOR"]
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{os.uname().nodename}"


# -- running a command through the queue ---------------------------------------


def submit(
    type_: str,
    args: dict[str, Any],
    *,
    db: str | None,
    as_json: bool,
    actor: str | None,
    ticket: str | None,
    no_wait: bool,
    timeout: float,
) -> dict[str, Any]:
    """Enqueue a command, stream its events, and return its result (exits on --no-wait)."""
    from dbagent.bus.producer import Producer, Progress
    from dbagent.core.commands import client_command

    cfg = settings()
    name, _ = cfg.database(db)
    command = client_command(type_, db=name, args=args, actor=default_actor(actor), ticket=ticket)
    producer = Producer(cfg)
    after = producer.check()
    command = producer.submit(command)
    if no_wait:
        if as_json:
            _print_json({"command_id": command.id, "type": type_, "db": name, "status": "queued", "error": None,
                         "expires_at": command.expires_at.isoformat() if command.expires_at else None})
        else:
            out.print(command.id)
        raise typer.Exit(0)

    def on_event(event: Event) -> None:
        if as_json:
            print(json.dumps(event.to_json()), file=sys.stderr, flush=True)
        else:
            err.print(format_event(event))

    said: list[str] = []

    def on_state(progress: Progress) -> None:
        # A line each time what is true changes; "queued" only once it has lasted (most commands start at once).
        if as_json or (progress.state == "queued" and progress.waited_s < 2):
            return
        if progress.state == "running" and (not said or said[-1] == "running"):
            return  # its events say what it does; a line only after a wait or a reconnection
        if not said or said[-1] != progress.state:
            said.append(progress.state)
            err.print(f"[dim]{_escape(progress.say())}[/dim]")

    return producer.wait(command, after, on_event=on_event, timeout_s=timeout, on_state=on_state)


def finish(result: dict[str, Any], as_json: bool, render: Any = None) -> NoReturn:
    """Print the result and exit with its code."""
    code = int(result.get("exit_code") or (0 if result.get("status") == "succeeded" else 1))
    if as_json:
        _print_json(result)
    else:
        if render is not None and result.get("status") == "succeeded":
            render(result)
        elif render is not None and (result.get("verify") or result.get("validation")):
            render(result)
        if result.get("error"):
            err.print(f"error: {redact(result['error'])}")
    raise typer.Exit(code)


def _print_json(body: dict[str, Any]) -> None:
    print(json.dumps(body, default=str), flush=True)


def format_event(event: Event) -> str:
    data = event.data
    when = event.ts.astimezone().strftime("%H:%M:%S")
    detail = ""
    if event.type == "migration.step":
        arrow = "↑" if data.get("direction") == "up" else "↓"
        detail = f"{arrow} {data.get('revision')} {data.get('description', '')} ({data.get('duration_ms')} ms) [{data.get('number')}/{data.get('of')}]"
    elif event.type in ("migration.started", "rollback.started"):
        detail = f"{data.get('revision_before') or 'base'} → {data.get('target') or 'base'}, {len(data.get('steps') or [])} step(s)"
    elif event.type in ("migration.completed", "rollback.completed"):
        detail = f"now at {data.get('revision_after') or 'base'} ({data.get('duration_ms')} ms)"
    elif event.type in ("migration.failed", "rollback.failed"):
        detail = f"{data.get('error', '')}; at {data.get('revision_after') or 'base'}"
    elif event.type.startswith("verify."):
        detail = ", ".join(f"{c['name']}: {'ok' if c['ok'] else c['detail']}" for c in data.get("checks", []))
    elif event.type == "lock.waiting" and data.get("guard") == "table_locks":
        blockers = data.get("blockers") or []
        who = ", ".join(
            f"pid {b['pid']} ({b.get('application_name') or b.get('usename')}, {b.get('state')},"
            f" transaction open {b.get('xact_age_s', 0):.0f}s: {b.get('query', '')[:60]})"
            for b in blockers[:3]
        ) or "sessions that let go before dbagent looked"
        verb = "timed out after" if data.get("tried") else "not tried: would queue the application for up to"
        detail = (
            f"step {data.get('revision')} attempt {data.get('attempt')}/{data.get('attempts')} {verb}"
            f" {data.get('lock_timeout_ms', 0) / 1000:g}s; blocked by {who}; retry in {data.get('retry_in_ms', 0) / 1000:.1f}s"
        )
    elif event.type == "lock.waiting":
        holder = data.get("holder") or {}
        who = holder.get("worker") or holder.get("application_name") or holder.get("pid") or "?"
        detail = f"{data.get('guard')} held by {who}, waited {data.get('waited_ms', 0) / 1000:.0f}s"
    elif event.type.startswith(("backup.", "restore.")):
        size = f" {_human_bytes(data['bytes'])}" if data.get("bytes") else ""
        took = f" in {data['duration_ms'] / 1000:.1f}s" if data.get("duration_ms") is not None else ""
        detail = f"{data.get('type', '')} {data.get('path', '')}{size}{took} {data.get('error', '')}".strip()
        if data.get("skipped"):
            detail += f"; skipped {len(data['skipped'])}: " + ", ".join(
                f"{e['table']} ({e['reason']})" for e in data["skipped"][:5]) + (", ..." if len(data["skipped"]) > 5 else "")
    elif event.type == "command.accepted":
        detail = f"by {data.get('worker')}"
    elif event.type == "command.rejected":
        detail = str(data.get("reason", ""))
    elif event.type.startswith("lock."):
        detail = f"token {data.get('token')}"
    style = "red" if event.type.endswith(("failed", "rejected")) else ("green" if event.type.endswith("completed") else "")
    line = f"{when} {event.db} {event.type:<20} {detail}"
    return f"[{style}]{_escape(line)}[/{style}]" if style else _escape(line)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# -- commands --------------------------------------------------------------


@app.command()
def status(db: DbOpt = None, as_json: JsonOpt = False, actor: ActorOpt = None, ticket: TicketOpt = None,
           no_wait: NoWaitOpt = False, timeout: TimeoutOpt = 3600.0) -> None:
    """Current revision, pending migrations, lock holder."""
    result = submit("status", {}, db=db, as_json=as_json, actor=actor, ticket=ticket, no_wait=no_wait, timeout=timeout)

    def render(r: dict[str, Any]) -> None:
        out.print(f"database  {r['db']}")
        current = r.get("current_heads") or ([r["current"]] if r.get("current") else [])
        heads = r.get("heads") or ([r["head"]] if r.get("head") else [])
        if len(current) > 1 or len(heads) > 1:  # between a branch point and its merge
            out.print(f"revision  {', '.join(current) or 'base'} ({len(current)} heads)" if len(current) > 1
                      else f"revision  {current[0] if current else 'base'}")
            out.print(f"heads     {', '.join(heads) or 'base'} (of the scripts)")
        else:
            out.print(f"revision  {r.get('current') or 'base'} (head {r.get('head') or 'base'})")
        if r.get("branch_points"):
            out.print(f"branches  from {', '.join(r['branch_points'])}")
        pending = r.get("pending") or []
        out.print(f"pending   {len(pending)}" + ("" if pending else " (up to date)"))
        for step in pending:
            out.print(f"          {step['revision']}  {step['description']}")
        lock = r.get("lock")
        if lock:
            lease = lock.get("lease") or {}
            session = lock.get("session") or {}
            out.print(f"lock      held by {lease.get('worker') or session.get('application_name')}"
                      f"{' (command ' + lease['command_id'] + ')' if lease.get('command_id') else ''}")
        else:
            out.print("lock      free")
        for kind, b in sorted((r.get("last_backups") or {}).items()):
            out.print(f"backup    {kind:<7} {_short_ts(b['created'])}  {_human_bytes(b['bytes'])}  {b['trigger']}  {b['path']}")
        if r.get("problem"):
            err.print(f"warning: {r['problem']}")

    finish(result, as_json, render)


@app.command()
def migrate(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print pending steps and their SQL; change nothing.")] = False,
    to: Annotated[str | None, typer.Option("--to", help="Target revision on any branch, or several joined by commas (default: every head).")] = None,
    no_backup: Annotated[bool, typer.Option("--no-backup", help="Skip the pre-migration backup (recorded in the audit trail).")] = False,
    allow: Annotated[list[str] | None, typer.Option(
        "--allow", metavar="RULE",
        help="Let this migration go ahead despite validation errors of this rule (repeatable; recorded in the audit trail).",
    )] = None,
    db: DbOpt = None, as_json: JsonOpt = False, actor: ActorOpt = None, ticket: TicketOpt = None,
    no_wait: NoWaitOpt = False, timeout: TimeoutOpt = 3600.0,
) -> None:
    """Validate → backup → migrate → verify; --dry-run shows the plan, its SQL and the validation findings."""
    if to is not None:
        _check_revision_locally(db, to, allow_base=False)
    allowed: list[str] = []
    if allow:  # checked here too, so a typo fails fast (the worker checks again)
        from dbagent.checks.preflight import check_allow

        try:
            allowed = check_allow(allow)
        except BadInput as exc:
            err.print(f"error: {exc.message}")
            raise typer.Exit(2) from None
    args = {"dry_run": dry_run, "to": to, "no_backup": no_backup, "allow": allowed}
    result = submit("migrate", args, db=db, as_json=as_json, actor=actor, ticket=ticket, no_wait=no_wait, timeout=timeout)

    def render(r: dict[str, Any]) -> None:
        if r.get("status") != "succeeded" and not r.get("verify"):  # stopped by validation
            _render_findings([f for f in (r.get("validation") or {}).get("findings") or [] if f["severity"] == "error"])
            return
        if r.get("dry_run"):
            steps = r.get("steps") or []
            out.print(f"dry run: {r['db']} at {r.get('revision_before') or 'base'}, {len(steps)} pending step(s); nothing was changed")
            for step in steps:
                out.print(f"\n-- {step['revision']}: {step['description']}")
                out.print(step.get("sql", "").rstrip(), markup=False)
            _render_findings((r.get("validation") or {}).get("findings") or [])
            return
        before, after = r.get("revision_before") or "base", r.get("revision_after") or "base"
        steps = r.get("steps") or []
        if not steps:
            out.print(f"{r['db']} is up to date at {after}")
        else:
            out.print(f"migrated {r['db']} from {before} to {after} ({len(steps)} step(s))")
        _render_checks(r.get("verify"))

    finish(result, as_json, render)


@app.command(context_settings={"ignore_unknown_options": True})
def rollback(
    steps: Annotated[str | None, typer.Argument(help="How many migrations to undo, walking down from the one head (across a merge too).", show_default=False)] = None,
    to: Annotated[str | None, typer.Option("--to", help="Where to end, exactly: a revision, several joined by commas (to keep several branches), or 'base'.")] = None,
    db: DbOpt = None, as_json: JsonOpt = False, actor: ActorOpt = None, ticket: TicketOpt = None,
    no_wait: NoWaitOpt = False, timeout: TimeoutOpt = 3600.0,
) -> None:
    """Downgrade N steps, or to a revision (--to REV|base)."""
    args: dict[str, Any] = {}
    if (steps is None) == (to is None):
        raise BadInput("rollback takes either N (how many steps) or --to REV|base")
    if steps is not None:
        # ASCII digits only: '²'.isdigit() is true, and int() refuses it.
        if not re.fullmatch(r"[0-9]{1,9}", steps) or int(steps) < 1:
            raise BadInput(f"rollback N: N must be a whole number of steps, 1 or more (got {steps!r})")
        args["steps"] = int(steps)
    else:
        _check_revision_locally(db, to, allow_base=True)
        args["to"] = to
    result = submit("rollback", args, db=db, as_json=as_json, actor=actor, ticket=ticket, no_wait=no_wait, timeout=timeout)

    def render(r: dict[str, Any]) -> None:
        out.print(f"rolled back {r['db']} from {r.get('revision_before') or 'base'} to {r.get('revision_after') or 'base'}"
                  f" ({len(r.get('steps') or [])} step(s))")

    finish(result, as_json, render)


@app.command()
def verify(
    expect: Annotated[str | None, typer.Option("--expect", help="Expected revision (default: head).")] = None,
    db: DbOpt = None, as_json: JsonOpt = False, actor: ActorOpt = None, ticket: TicketOpt = None,
    no_wait: NoWaitOpt = False, timeout: TimeoutOpt = 3600.0,
) -> None:
    """Integrity checks: expected revision, no invalid indexes."""
    result = submit("verify", {"expect": expect}, db=db, as_json=as_json, actor=actor, ticket=ticket, no_wait=no_wait, timeout=timeout)
    finish(result, as_json, lambda r: _render_checks(r.get("verify")))


@app.command()
def history(
    limit: Annotated[int, typer.Option("--limit", help="How many entries.", min=1)] = 50,
    db: DbOpt = None, as_json: JsonOpt = False, actor: ActorOpt = None, ticket: TicketOpt = None,
    no_wait: NoWaitOpt = False, timeout: TimeoutOpt = 3600.0,
) -> None:
    """The change log: every step applied or reverted, by whom, how long it took."""
    result = submit("history", {"limit": limit}, db=db, as_json=as_json, actor=actor, ticket=ticket, no_wait=no_wait, timeout=timeout)

    def render(r: dict[str, Any]) -> None:
        table = Table("finished", "revision", "dir", "description", "actor", "ticket", "ms", "outcome", box=None)
        for e in r.get("entries") or []:
            table.add_row(_short_ts(e.get("finished_at") or e.get("started_at")), e["revision"], e["direction"],
                          e.get("description") or "", e.get("actor") or "", e.get("ticket") or "",
                          str(e.get("duration_ms") if e.get("duration_ms") is not None else ""), e["outcome"])
        out.print(table)

    finish(result, as_json, render)


@app.command()
def backup(
    kind: Annotated[str, typer.Argument(help="full, schema or data.")] = "full",
    db: DbOpt = None, as_json: JsonOpt = False, actor: ActorOpt = None, ticket: TicketOpt = None,
    no_wait: NoWaitOpt = False, timeout: TimeoutOpt = 6 * 3600.0,
) -> None:
    """pg_dump to backup_dir, verified (checksum and full read), with a manifest beside it."""
    if kind not in ("full", "schema", "data"):
        raise BadInput(f"backup takes full, schema or data (got {kind!r})")
    result = submit("backup", {"kind": kind}, db=db, as_json=as_json, actor=actor, ticket=ticket, no_wait=no_wait, timeout=timeout)

    def render(r: dict[str, Any]) -> None:
        out.print(f"{r['path']}  {_human_bytes(r['bytes'])}  sha256 {r['sha256']}")
        _render_skipped(r.get("skipped"), "not in this backup")

    finish(result, as_json, render)


def _render_skipped(skipped: list[dict[str, str]] | None, what: str) -> None:
    for entry in skipped or []:
        err.print(f"[yellow]warning:[/yellow] {_escape(entry['table'])} {what}: {_escape(entry['reason'])}")


@app.command()
def restore(
    file: Annotated[str, typer.Argument(help="A backup in the database's backup_dir.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Parallel jobs (directory format only; not atomic).", min=1)] = 1,
    db: DbOpt = None, as_json: JsonOpt = False, actor: ActorOpt = None, ticket: TicketOpt = None,
    no_wait: NoWaitOpt = False, timeout: TimeoutOpt = 6 * 3600.0,
) -> None:
    """Verify a backup's checksum and readability, then restore it (replacing what it contains)."""
    from dbagent.core.commands import MAX_PATH_CHARS, check_client_text

    check_client_text("restore FILE", file, MAX_PATH_CHARS)
    name, _ = settings().database(db)
    if not yes:
        if not sys.stdin.isatty():
            raise BadInput("restore replaces the database's contents: confirm with --yes when not at a terminal")
        if not typer.confirm(f"Restore {file} into database {name!r}? Objects in the backup are dropped and recreated"):
            raise BadInput("restore not confirmed")
    result = submit("restore", {"path": file, "jobs": jobs}, db=db, as_json=as_json, actor=actor, ticket=ticket,
                    no_wait=no_wait, timeout=timeout)

    def render(r: dict[str, Any]) -> None:
        out.print(f"restored {r['path']} into {r['db']}: revision {r.get('revision_before') or 'base'} → {r.get('revision_after') or 'base'}")
        _render_skipped(r.get("skipped"), "not restored")

    finish(result, as_json, render)


@backups_app.command("list")
def backups_list(
    db: DbOpt = None, as_json: JsonOpt = False, actor: ActorOpt = None, ticket: TicketOpt = None,
    no_wait: NoWaitOpt = False, timeout: TimeoutOpt = 3600.0,
) -> None:
    """Complete backups, newest first: path, type, trigger, size, created, revision, verified."""
    result = submit("list_backups", {}, db=db, as_json=as_json, actor=actor, ticket=ticket, no_wait=no_wait, timeout=timeout)

    def render(r: dict[str, Any]) -> None:
        table = Table("created", "type", "trigger", "size", "revision", "verified", "path", box=None)
        for b in r.get("backups") or []:
            table.add_row(_short_ts(b["created"]), b["type"], b["trigger"], _human_bytes(b["bytes"]),
                          b.get("revision") or "base", "yes" if b["verified"] else "no", b["path"])
        out.print(table)

    finish(result, as_json, render)


@backups_app.command("verify")
def backups_verify(
    file: Annotated[str | None, typer.Argument(help="A backup (default: the newest).")] = None,
    drill: Annotated[bool, typer.Option("--drill", help="Also restore into a scratch database and compare row counts.")] = False,
    db: DbOpt = None, as_json: JsonOpt = False, actor: ActorOpt = None, ticket: TicketOpt = None,
    no_wait: NoWaitOpt = False, timeout: TimeoutOpt = 6 * 3600.0,
) -> None:
    """Checksum and full read of a backup; --drill restores it into a scratch database too."""
    from dbagent.core.commands import MAX_PATH_CHARS, check_client_text

    check_client_text("backups verify FILE", file, MAX_PATH_CHARS)
    result = submit("verify_backup", {"path": file, "drill": drill}, db=db, as_json=as_json, actor=actor, ticket=ticket,
                    no_wait=no_wait, timeout=timeout)

    def render(r: dict[str, Any]) -> None:
        for b in r.get("backups") or []:
            drilled = b.get("drill")
            extra = f", drill: {drilled['tables']} tables, {drilled['rows']} rows match" if drilled else ""
            out.print(f"ok {b['path']}: checksum {b['checksum']}, full read {b['full_read']}{extra}")

    finish(result, as_json, render)


@backups_app.command("prune")
def backups_prune(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the decisions; delete nothing.")] = False,
    db: DbOpt = None, as_json: JsonOpt = False, actor: ActorOpt = None, ticket: TicketOpt = None,
    no_wait: NoWaitOpt = False, timeout: TimeoutOpt = 3600.0,
) -> None:
    """Apply the retention policy, printing every decision and its reason."""
    result = submit("prune", {"dry_run": dry_run}, db=db, as_json=as_json, actor=actor, ticket=ticket, no_wait=no_wait, timeout=timeout)

    def render(r: dict[str, Any]) -> None:
        for d in r.get("decisions") or []:
            verb = "keep  " if d["keep"] else ("delete" if not r["dry_run"] else "would delete")
            out.print(f"{verb} {d['path']}: {'; '.join(d['reasons'])}", markup=False)
            if d.get("warning"):
                err.print(f"warning: {d['warning']}", markup=False)
        deleted = r["would_delete"] if r["dry_run"] else r["deleted"]
        out.print(f"{'dry run: ' if r['dry_run'] else ''}{r['kept']} kept, {deleted} {'to delete' if r['dry_run'] else 'deleted'}")

    finish(result, as_json, render)


@app.command()
def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    limit: Annotated[int, typer.Option("--limit", help="How many of the newest events to show first.", min=1)] = 50,
    command_id: Annotated[str | None, typer.Option("--command", help="Only this command's events.")] = None,
    db: Annotated[str | None, typer.Option("--db", help="Only this database's events (default: all).")] = None,
    source: Annotated[str, typer.Option("--source", help="auto (PostgreSQL's audit log, else the stream), postgres or stream.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """The audit trail: from PostgreSQL's audit log (the record), or the Redis stream."""
    from dbagent.bus.eventlog import EventLog
    from dbagent.postgres.connections import redis_client

    if source not in ("auto", "postgres", "stream"):
        raise BadInput(f"--source takes auto, postgres or stream (got {source!r})")
    cfg = settings()
    names = [cfg.database(db)[0]] if db is not None else sorted(cfg.databases)
    client = redis_client(cfg.redis)
    log = EventLog(client, cfg.redis.prefix)

    def show(event: Event) -> None:
        if as_json:
            print(json.dumps(event.to_json()), flush=True)
        else:
            out.print(format_event(event))

    shown: list[Event] = []
    if source in ("auto", "postgres") and names:
        try:
            shown = _audit_events(cfg, names, limit, command_id)
        except DbAgentError as exc:
            if source == "postgres":
                raise
            err.print(f"warning: reading the stream instead of the audit log: {exc.message}", markup=False)
            source = "stream"
    elif source == "auto":
        source = "stream"
    if source == "stream":
        from dbagent.postgres.connections import ping_redis

        ping_redis(client, cfg.redis)
        if command_id:
            entries = log.read(command_id=command_id, db=db, count=1_000_000)[-limit:]
        else:
            entries = log.tail(limit, db)
        shown = [event for _, event in entries]
    for event in shown:
        show(event)
    if follow:
        from dbagent.postgres.connections import ping_redis

        ping_redis(client, cfg.redis)
        seen = {event.id for event in shown}
        try:
            for _, event in log.follow(log.last_id(), db):
                if event.id not in seen and (command_id is None or event.command_id == command_id):
                    show(event)
        except KeyboardInterrupt:
            raise typer.Exit(0) from None


def _audit_events(cfg: Settings, names: list[str], limit: int, command_id: str | None) -> list[Event]:
    from dbagent.reactor.audit import read_audit

    merged: list[Event] = []
    for name in names:
        merged += read_audit(name, cfg.databases[name], limit=limit, command_id=command_id)
    merged.sort(key=lambda e: e.ts)
    return merged[-limit:]


@app.command()
def validate(
    db: DbOpt = None,
    as_json: JsonOpt = False,
    rehearse: Annotated[bool, typer.Option("--rehearse", help="Then apply each pending migration up, down and up again on a scratch database, comparing schemas.")] = False,
    from_empty: Annotated[bool, typer.Option("--from-empty", help="With --rehearse: start from an empty database, not the newest schema backup.")] = False,
    lint_all: Annotated[bool, typer.Option("--all", help="Lint every revision, those up to the database's lint_from baseline included.")] = False,
    allow: Annotated[list[str] | None, typer.Option(
        "--allow", metavar="RULE", help="Report errors of this rule without failing (repeatable), as migrate --allow.",
    )] = None,
) -> None:
    """Static checks of the scripts, a lint of the SQL each upgrade() emits (pglast), checksums of the applied ones."""
    from dbagent.checks import preflight
    from dbagent.checks.validate import AUTO

    db_name, database = settings().database(db)
    progress = None if as_json else (lambda line: out.print(line, markup=False))
    try:
        verdict = preflight.validate(database, allow=allow or [], lint_all=lint_all,
                                     rehearse_as=db_name if rehearse else None, from_empty=from_empty,
                                     on_progress=progress)
    except BadInput as exc:  # an unknown --allow rule, or a lint_from that names no revision of these scripts
        err.print(f"error: {exc.message}")
        raise typer.Exit(2) from None
    findings, naming, lint_from = verdict.findings, verdict.naming, verdict.lint_from
    status = verdict.to_json()["status"]
    detected = " (detected)" if database.naming == AUTO else ""
    if as_json:
        _print_json({
            "status": status, "naming": naming, "naming_detected": database.naming == AUTO,
            "lint_from": lint_from, "findings": findings,
            "allowed": verdict.to_json()["allowed"], **({"rehearsal": verdict.rehearsal} if rehearse else {}),
        })
    else:
        _render_findings(findings)
        out.print(f"validate: {status} ({len(findings)} finding(s)) in {database.migrations}; naming: {naming}{detected}")
        if lint_from:
            out.print(f"baseline: {lint_from} and its ancestors taken as reviewed (lint_from); --all lints them too")
    raise typer.Exit(1 if status == "failed" else 0)


@app.command()
def init(
    databases: Annotated[list[str], typer.Option("--db", metavar="NAME=URL", help="A database to manage (repeatable).")],
    migrations: Annotated[str | None, typer.Option("--migrations", help="The script directory (default: from ./alembic.ini, else ./alembic or ./migrations).")] = None,
    output: Annotated[Path, typer.Option("--output", help="Where to write the configuration.")] = Path("config/dbagent.toml"),
    redis_url: Annotated[str, typer.Option("--redis", help="Redis URL for queues and events.")] = "redis://127.0.0.1:6379/0",
    prefix: Annotated[str, typer.Option("--prefix", help="Prefix of every Redis key and queue.")] = "dbagent",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing configuration file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Adopt an existing Alembic project: write a configuration for it, check env.py, validate. Changes no database."""
    from dbagent.checks.onboard import onboard, parse_databases

    try:
        done = onboard(Path.cwd(), output, parse_databases(databases), migrations=migrations, redis_url=redis_url,
                       prefix=prefix, force=force)
    except BadInput as exc:
        err.print(f"error: {exc.message}")
        raise typer.Exit(2) from None
    body = done.to_json()
    if as_json:
        _print_json(body)
    else:
        out.print(f"wrote {done.config} for {done.migrations} (naming: {done.naming}, detected)")
        mark = {"ok": "[green]ok[/green]", "refused": "[red]needs a change[/red]", "unchecked": "[yellow]unchecked[/yellow]"}
        out.print(f"env.py: {mark[done.env_py]}: {_escape(done.env_detail)}")
        _render_findings(done.findings)
        out.print(f"validate: {'failed' if done.errors else 'passed'} ({len(done.findings)} finding(s))")
        if body["status"] == "ok":
            out.print(f"next: DBAGENT_CONFIG={done.config} dbagent env validate, then dbagent worker --db NAME")
    raise typer.Exit(0 if body["status"] == "ok" else 1)


@env_app.command("validate")
def env_validate(
    name: Annotated[str | None, typer.Argument(help="Database (default: the only one configured).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Config complete, PostgreSQL and Redis reachable, pg_dump/pg_restore usable, roles and backup_dir right."""
    from dbagent.checks.envcheck import exit_code, validate_environment

    cfg = settings()
    db_name, database = cfg.database(name)
    checks = validate_environment(cfg, db_name, database)
    code = exit_code(checks)
    if as_json:
        _print_json({"db": db_name, "status": "ok" if code == 0 else "failed", "checks": [c.to_json() for c in checks]})
    else:
        marks = {"ok": "[green]ok  [/green]", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]"}
        for c in checks:
            out.print(f"{marks[c.status]} {c.name:<15} {_escape(c.detail)}")
    raise typer.Exit(code)


@env_app.command("show")
def env_show(as_json: JsonOpt = False) -> None:
    """The configuration in force (file and environment), secrets masked."""
    cfg = settings()
    body = json.loads(redact(cfg.model_dump_json()))
    body = {"source": cfg.source, **body}
    if as_json:
        _print_json(body)
    else:
        out.print_json(data=body)


@app.command()
def worker(
    db: Annotated[str | None, typer.Option("--db", help="The database whose queue to serve.")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", help="Log level.")] = "INFO",
) -> None:
    """A Celery worker for one database's queue (concurrency 1, late acknowledgement)."""
    from dbagent.worker.app import run_worker

    cfg = settings()
    name, _ = cfg.database(db)
    run_worker(cfg, name, loglevel)


@app.command()
def beat(
    loglevel: Annotated[str, typer.Option("--loglevel", help="Log level.")] = "INFO",
) -> None:
    """Scheduled backups (daily, weekly, monthly marks, each followed by a prune); one leader at a time."""
    from dbagent.worker.beat import run_beat

    cfg = settings()
    if cfg.security.signing_key() is None:
        raise BadInput(f"beat publishes signed commands: set the signing key in ${cfg.security.signing_key_env}")
    run_beat(cfg, loglevel)


@app.command("agent")
def agent_command(
    loglevel: Annotated[str, typer.Option("--loglevel", help="Log level.")] = "INFO",
) -> None:
    """Audit sink and rollback trigger: consumes the event stream (several agents may run)."""
    import logging

    from dbagent.reactor.daemon import run_agent

    logging.basicConfig(level=loglevel, format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")
    cfg = settings()
    if cfg.security.signing_key() is None:
        raise BadInput(f"the agent publishes signed rollbacks: set the signing key in ${cfg.security.signing_key_env}")
    run_agent(cfg)


notify_app = typer.Typer(help="Report application events that dbagent acts on.", no_args_is_help=True)
app.add_typer(notify_app, name="notify")


@notify_app.command("startup-failed")
def notify_startup_failed(
    detail: Annotated[str | None, typer.Option("--detail", help="What failed (recorded in the audit trail).")] = None,
    db: DbOpt = None, as_json: JsonOpt = False, actor: ActorOpt = None, ticket: TicketOpt = None,
) -> None:
    """The application failed to start after a deploy: the agent rolls back the last migration run."""
    from dbagent.bus.eventlog import EventLog
    from dbagent.core.commands import (
        MAX_ACTOR_CHARS,
        MAX_DETAIL_CHARS,
        MAX_TICKET_CHARS,
        check_client_text,
    )
    from dbagent.core.events import EventType
    from dbagent.postgres.connections import ping_redis, redis_client

    check_client_text("--actor", default_actor(actor), MAX_ACTOR_CHARS)
    check_client_text("--ticket", ticket, MAX_TICKET_CHARS)
    check_client_text("--detail", detail, MAX_DETAIL_CHARS, lines=True)
    cfg = settings()
    name, _ = cfg.database(db)
    client = redis_client(cfg.redis)
    ping_redis(client, cfg.redis)
    event = Event(type=EventType.APP_STARTUP_FAILED, db=name, actor=default_actor(actor), ticket=ticket,
                  data={"detail": redact(detail) if detail else None})
    EventLog(client, cfg.redis.prefix).publish([event])
    if as_json:
        _print_json({"event_id": event.id, "type": event.type, "db": name, "status": "published", "error": None})
    else:
        out.print(f"app.startup_failed published for {name} (event {event.id}); the agent rolls back the last migration run")


@app.command()
def serve(
    listen: Annotated[str | None, typer.Option("--listen", help="host:port (default: [api] listen).")] = None,
) -> None:
    """HTTP API for deploy systems and chat-ops (Slack)."""
    from dbagent.interfaces.api import run

    run(settings(), listen)


@app.command()
def demo(
    keep: Annotated[bool, typer.Option("--keep", help="Leave the embedded servers' data in .dbagent/.")] = False,
) -> None:
    """The whole loop on embedded PostgreSQL and Redis: no servers, no config needed."""
    from dbagent.demo.walkthrough import run_demo

    raise typer.Exit(run_demo(keep=keep))


# -- helpers ----------------------------------------------------------------


def _check_revision_locally(db: str | None, rev: str | None, *, allow_base: bool) -> None:
    """Fail fast on a revision the local scripts do not know (the worker checks again)."""
    if rev is None or rev in ("head", "heads") or (allow_base and rev == "base"):
        return
    from pathlib import Path

    _, database = settings().database(db)
    if not (Path(database.migrations) / "env.py").is_file():
        return
    from dbagent.postgres.migrator import Migrator

    Migrator(database.migrations, database.url).resolve(rev)


def _render_findings(findings: list[dict[str, Any]]) -> None:
    for f in findings:
        where = f" {f['revision']}" if f.get("revision") else ""
        (err if f["severity"] == "error" else out).print(f"{f['severity']}:{where} [{f['rule']}] {f['message']}", markup=False)
        if f.get("statement"):
            out.print(f"    statement: {f['statement']}", markup=False)
        if f.get("fix"):
            out.print(f"    fix: {f['fix']}", markup=False)


def _render_checks(body: dict[str, Any] | None) -> None:
    if not body:
        return
    for check in body.get("checks", []):
        mark = "[green]ok  [/green]" if check["ok"] else "[red]FAIL[/red]"
        out.print(f"{mark} {check['name']:<22} {_escape(check['detail'])}")


def _human_bytes(size: int | None) -> str:
    value = float(size or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _short_ts(value: str | None) -> str:
    if not value:
        return ""
    return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def main() -> None:
    """Console entry point: one clear line and an exit code for every dbagent error."""
    try:
        app()
    except DbAgentError as exc:
        if state.debug:
            traceback.print_exc()
        err.print(f"error: {redact(exc.message)}", markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    finally:
        # The command is done and its output flushed: what its imports built is left to the process's end,
        # not to a last full garbage collection (about 70 ms of every short command's wall time).
        gc.freeze()


if __name__ == "__main__":
    main()
