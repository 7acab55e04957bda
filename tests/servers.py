"""Real PostgreSQL and Redis for integration and fault tests.

From ``DBAGENT_TEST_DATABASE_URL`` / ``DBAGENT_TEST_REDIS_URL`` when set, else
the local services. Each test gets its own database and its own key prefix,
and both are removed afterwards; no Redis database is ever flushed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from dbagent.demo.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "migrations"
ADMIN_URL = os.environ.get("DBAGENT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DBAGENT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SIGNING_KEY = "integration-test-key"


def db_url(name: str, admin: str = ADMIN_URL) -> str:
    return admin.rsplit("/", 1)[0] + "/" + name


def role_url(url: str, role: str) -> str:
    """The same server and database, connecting as ``role`` (no password: the test servers trust local logins)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = f"{role}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def create_database(name: str, admin: str = ADMIN_URL) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(name: str, admin: str = ADMIN_URL) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PrivateCluster:
    """A PostgreSQL cluster of the test's own (its port, its data directory), for tests that restart the server.

    The shared server is never restarted. As root, the cluster runs as the
    ``postgres`` system user (initdb refuses root).
    """

    def __init__(self) -> None:
        import tempfile

        self.bin = _pg_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="dbagent-cluster-"))
        self.data = self.dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._as_owner(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        (self.data / "postgresql.auto.conf").write_text(
            f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.dir}'\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        )
        if os.geteuid() == 0:
            shutil.chown(self.data / "postgresql.auto.conf", "postgres", "postgres")
        self.start()

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_owner(self, argv: list[str]) -> None:
        command = [str(Path(self.bin) / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._as_owner(["pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60", "start"])

    def stop(self, mode: str = "fast") -> None:
        self._as_owner(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"])

    def restart(self) -> None:
        self._as_owner(["pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-m", "fast", "-w", "-t", "60", "restart"])

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _pg_bin() -> str:
    found = shutil.which("pg_ctl")
    if found:
        return str(Path(found).parent)
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not versions:
        raise RuntimeError("no PostgreSQL server binaries (pg_ctl) found")
    return str(versions[-1])


class PrivateRedis:
    """A Redis server of the test's own, for tests that stop or restart Redis (never the shared one)."""

    def __init__(self) -> None:
        import tempfile

        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="dbagent-redis-"))
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("the private Redis did not start")

    def stop(self) -> None:
        """Gone without saving anything: a restart comes back empty, as an unpersisted Redis does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)


@dataclass
class Env:
    """One test's world: a database, a key prefix, a config file, and helpers to drive dbagent."""

    name: str
    prefix: str
    tmp: Path
    admin: str = ADMIN_URL
    redis_url: str = REDIS_URL
    migrations: Path = MIGRATIONS
    extra_config: str = ""
    statement_timeout: str = "2min"
    lock_timeout: str = "5s"
    workers: list[subprocess.Popen] = field(default_factory=list)
    _logs: dict[int, Path] = field(default_factory=dict)
    role: str | None = None  # dbagent connects as this role instead of the admin's (least_privilege_env)
    app_role: str | None = None  # the application's role of a least_privilege_env

    @property
    def url(self) -> str:
        return role_url(db_url(self.name, self.admin), self.role) if self.role else db_url(self.name, self.admin)

    @property
    def admin_db_url(self) -> str:
        """This test's database, as the admin (a superuser) rather than ``role``."""
        return db_url(self.name, self.admin)

    def admin_sql(self, query: str, *params: Any) -> list[tuple]:
        with psycopg.connect(self.admin_db_url, autocommit=True) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    @property
    def config(self) -> Path:
        path = self.tmp / "dbagent.toml"
        backups = self.tmp / "backups"
        backups.mkdir(mode=0o700, exist_ok=True)
        path.write_text(
            f"""
[redis]
url = "{self.redis_url}"
prefix = "{self.prefix}"
lease_ttl = "3s"

[databases.test]
url = "{self.url}"
migrations = "{self.migrations}"
backup_dir = "{backups}"
lock_timeout = "{self.lock_timeout}"
statement_timeout = "{self.statement_timeout}"
{self.extra_config}
"""
        )
        return path

    def environ(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DBAGENT_")}
        env.update({"DBAGENT_SIGNING_KEY": SIGNING_KEY, "PYTHONUNBUFFERED": "1"}, **extra)
        return env

    def cli(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Result:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.environ(),
            cwd=ROOT,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)

    def start_worker(self, log_name: str = "worker", **extra_env: str) -> subprocess.Popen:
        return self.start_process(["worker", "--db", "test", "--loglevel", "INFO"], log_name, **extra_env)

    def start_agent(self, log_name: str = "agent", **extra_env: str) -> subprocess.Popen:
        return self.start_process(["agent"], log_name, **extra_env)

    def log_of(self, proc: subprocess.Popen) -> str:
        return self._logs[proc.pid].read_text()

    def start_process(self, args: list[str], log_name: str, **extra_env: str) -> subprocess.Popen:
        """A dbagent subprocess in its own process group, logging to a file; stopped after the test."""
        path = self.tmp / f"{log_name}-{len(self.workers)}.log"
        log = open(path, "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(self.config), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environ(**extra_env),
            cwd=ROOT,
            start_new_session=True,
        )
        self.workers.append(proc)
        self._logs[proc.pid] = path
        return proc

    def kill_worker(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                self.kill_worker(proc, signal.SIGTERM)

    def sql(self, query: str, *params: Any) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    def revision(self) -> str | None:
        rows = self.sql(
            "SELECT version_num FROM alembic_version"
            if self.sql("SELECT to_regclass('public.alembic_version')")[0][0]
            else "SELECT NULL WHERE false"
        )
        return rows[0][0] if rows else None

    def stream_events(self, client: redis.Redis, command_id: str | None = None) -> list[dict[str, Any]]:
        entries = client.xrange(f"{self.prefix}:events")
        events = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]
        for e in events:
            e["data"] = json.loads(e["data"])
        return [e for e in events if command_id is None or e["command_id"] == command_id]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> dict[str, Any]:
        return json.loads(self.stdout.strip().splitlines()[-1])

    def event_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr.splitlines() if line.startswith("{")]


def script(revision: str, down: str, doc: str, upgrade: list[str], downgrade: list[str]) -> str:
    """An Alembic script running the given statements."""
    return f'''"""{doc}"""
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in {upgrade!r}:
        op.execute(statement)


def downgrade() -> None:
    for statement in {downgrade!r}:
        op.execute(statement)
'''


# A step that needs ACCESS EXCLUSIVE on users (lock retries, their benchmark).
ADD_USERS_NICKNAME = script(
    "012", "011", "Add users.nickname.", ["ALTER TABLE users ADD COLUMN nickname text"], ["ALTER TABLE users DROP COLUMN nickname"]
)


def copy_migrations(tmp: Path, extra: dict[str, str] | None = None, upto: int | None = None) -> Path:
    """A copy of the shipped migrations (optionally only the first `upto`), plus extra scripts."""
    target = tmp / "migrations"
    shutil.copytree(MIGRATIONS, target, ignore=shutil.ignore_patterns("__pycache__"))
    if upto is not None:
        for path in (target / "versions").glob("*.py"):
            if int(path.name[:3]) > upto:
                path.unlink()
    for name, source in (extra or {}).items():
        (target / "versions" / name).write_text(source)
    return target


def new_env(tmp: Path) -> Env:
    token = uuid.uuid4().hex[:10]
    return Env(name=f"dbagent_t_{token}", prefix=f"dbagent-test-{token}", tmp=tmp)


# -- least privilege: the roles of docs/least-privilege.md ---------------------------

LEAST_PRIVILEGE_DOC = ROOT / "docs" / "least-privilege.md"
# The names the page's SQL uses, and what a test replaces them with.
DOC_MIGRATOR, DOC_APP, DOC_DATABASE = "migrator", "aegisx_app", "aegisx"


def least_privilege_sql(block: str) -> str:
    """The SQL block of docs/least-privilege.md marked ``<!-- least-privilege: {block} -->``, verbatim."""
    import re

    text = LEAST_PRIVILEGE_DOC.read_text()
    match = re.search(rf"<!-- least-privilege: {block} -->\s*```sql\n(.*?)```", text, re.DOTALL)
    if match is None:
        raise AssertionError(f"{LEAST_PRIVILEGE_DOC}: no SQL block marked 'least-privilege: {block}'")
    return match.group(1)


def sql_statements(sql: str, names: dict[str, str]) -> list[str]:
    """The statements of a doc block, its role and database names replaced by a test's (whole identifiers only)."""
    import re

    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b")
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [pattern.sub(lambda m: names[m.group(1)], s).strip() for s in body.split(";") if s.strip()]


def new_least_privilege_env(tmp: Path) -> Env:
    """A world whose dbagent connects as a fresh non-superuser migration role (created by ``setup_least_privilege``)."""
    token = uuid.uuid4().hex[:10]
    app = f"dbagent_app_{token}"
    return Env(name=f"dbagent_t_{token}", prefix=f"dbagent-test-{token}", tmp=tmp, role=f"dbagent_mig_{token}",
               app_role=app, extra_config=f'app_user = "{app}"')


def setup_least_privilege(world: Env) -> None:
    """The roles and the database of docs/least-privilege.md, by its own SQL: the server block, then the database's as the role."""
    names = {DOC_MIGRATOR: world.role, DOC_APP: world.app_role, DOC_DATABASE: world.name}
    with psycopg.connect(world.admin, autocommit=True) as conn:
        for statement in sql_statements(least_privilege_sql("server"), names):
            conn.execute(statement)
    with psycopg.connect(world.url, autocommit=True) as conn:
        for statement in sql_statements(least_privilege_sql("database"), names):
            conn.execute(statement)


def drop_least_privilege_env(world: Env) -> None:
    """The database, anything else the test's roles own (scratch databases, objects elsewhere), and the roles."""
    roles = [r for r in (world.role, world.app_role) if r]
    drop_database(world.name, world.admin)
    with psycopg.connect(world.admin, autocommit=True) as conn:
        owned = conn.execute(
            "SELECT datname FROM pg_database WHERE datdba IN (SELECT oid FROM pg_roles WHERE rolname = ANY(%s))", (roles,)
        ).fetchall()
        for (name,) in owned:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        for role in roles:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(f'DROP OWNED BY "{role}"')
                conn.execute(f'DROP ROLE "{role}"')
