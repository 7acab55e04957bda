"""``dbagent env validate``: is this host ready to run a database's worker?"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis as redis_lib

from agent.connections import display_url, pg_connection, redis_client
from agent.errors import DbAgentError, Unavailable
from agent.redact import redact
from agent.settings import DatabaseSettings, Settings

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class EnvCheck:
    name: str
    status: str  # ok | warn | fail
    detail: str
    unreachable: bool = False

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body.pop("unreachable")
        return body


def _major(version_text: str) -> int | None:
    match = re.search(r"(\d+)(?:\.\d+)?", version_text)
    return int(match.group(1)) if match else None


def check_tool(tool: str, server_major: int | None) -> EnvCheck:
    path = shutil.which(tool)
    if path is None:
        return EnvCheck(tool, FAIL, f"{tool} is not on PATH: install the PostgreSQL client of the server's version")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return EnvCheck(tool, FAIL, f"{path} does not run: {exc}")
    major = _major(out.rsplit(" ", 1)[-1]) if out else None
    if server_major is not None and major is not None and major < server_major:
        return EnvCheck(tool, FAIL, f"{out} is older than the server ({server_major}): it cannot dump or restore it")
    return EnvCheck(tool, OK, f"{out} at {path}")


def check_backup_dir(path: str | None) -> EnvCheck:
    if not path:
        return EnvCheck("backup_dir", WARN, "backup_dir is not set: backups have nowhere to go")
    directory = Path(path)
    if not directory.exists():
        parent = directory.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if os.access(parent, os.W_OK):
            return EnvCheck("backup_dir", WARN, f"{directory} does not exist yet; it will be created with mode 0700")
        return EnvCheck("backup_dir", FAIL, f"{directory} does not exist and {parent} is not writable")
    info = directory.stat()
    if not stat.S_ISDIR(info.st_mode):
        return EnvCheck("backup_dir", FAIL, f"{directory} is not a directory")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return EnvCheck("backup_dir", FAIL, f"{directory} has mode {mode:04o}: others can read backups; chmod 0700 it")
    if info.st_uid != os.geteuid():
        return EnvCheck("backup_dir", FAIL, f"{directory} is owned by uid {info.st_uid}, not this user ({os.geteuid()})")
    if not os.access(directory, os.W_OK):
        return EnvCheck("backup_dir", FAIL, f"{directory} is not writable")
    return EnvCheck("backup_dir", OK, f"{directory} is private (0{mode:o}) and writable")


def check_config(settings: Settings, name: str, db: DatabaseSettings) -> list[EnvCheck]:
    checks = [EnvCheck("config", OK, f"{settings.source or 'built-in defaults and environment'}; database {name!r}")]
    env = Path(db.migrations) / "env.py"
    if env.is_file():
        checks.append(EnvCheck("migrations", OK, f"{db.migrations} (Alembic environment found)"))
    else:
        checks.append(EnvCheck("migrations", FAIL, f"{db.migrations}: no env.py; set databases.{name}.migrations"))
    if settings.security.signing_key() is None:
        checks.append(
            EnvCheck("signing_key", WARN, f"${settings.security.signing_key_env} is unset: migrate and rollback will be refused")
        )
    else:
        checks.append(EnvCheck("signing_key", OK, f"${settings.security.signing_key_env} is set"))
    return checks


def check_postgres(name: str, db: DatabaseSettings) -> tuple[list[EnvCheck], int | None]:
    checks: list[EnvCheck] = []
    try:
        with pg_connection(db, application_name="dbagent env validate") as conn:
            row = conn.exec_driver_sql(
                "SELECT current_user, current_setting('server_version'), current_setting('server_version_num')::int,"
                " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
            ).one()
            conn.rollback()
    except Unavailable as exc:
        return [EnvCheck("postgres", FAIL, exc.message, unreachable=True)], None
    user, version, version_num, superuser = row
    major = version_num // 10000
    checks.append(EnvCheck("postgres", OK, f"PostgreSQL {version} at {display_url(db.url)} as {user}"))
    if db.app_user is None:
        checks.append(EnvCheck("migration_user", WARN, f"app_user is not set for {name!r}: cannot check that {user} is not the application's role"))
    elif db.app_user == user:
        checks.append(EnvCheck("migration_user", FAIL, f"{user} is also the application's role: migrate with a separate role"))
    else:
        checks.append(EnvCheck("migration_user", OK, f"{user} is not the application's role ({db.app_user})"))
    if superuser:
        checks.append(EnvCheck("privileges", WARN, f"{user} is a superuser: a dedicated migration role with ownership of the schema is safer"))
    return checks, major


def check_redis(settings: Settings) -> EnvCheck:
    client = redis_client(settings.redis)
    try:
        info = client.info("server")
    except redis_lib.RedisError as exc:
        return EnvCheck("redis", FAIL, f"cannot reach Redis at {display_url(settings.redis.url)}: {redact(exc)}", unreachable=True)
    finally:
        client.close()
    return EnvCheck("redis", OK, f"Redis {info.get('redis_version')} at {display_url(settings.redis.url)}")


def validate_environment(settings: Settings, name: str, db: DatabaseSettings) -> list[EnvCheck]:
    checks = check_config(settings, name, db)
    pg_checks, server_major = check_postgres(name, db)
    checks += pg_checks
    checks.append(check_redis(settings))
    checks.append(check_tool("pg_dump", server_major))
    checks.append(check_tool("pg_restore", server_major))
    checks.append(check_backup_dir(db.backup_dir))
    return checks


def exit_code(checks: list[EnvCheck]) -> int:
    if any(c.unreachable for c in checks):
        return Unavailable.exit_code
    if any(c.status == FAIL for c in checks):
        return DbAgentError.exit_code
    return 0
