"""``dbagent env validate``: is this host ready to run a database's worker?"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis as redis_lib
from sqlalchemy.exc import SQLAlchemyError

from dbagent.core.errors import DbAgentError, Unavailable
from dbagent.core.redact import redact
from dbagent.postgres.connections import display_url, pg_connection, redis_client
from dbagent.settings import DatabaseSettings, Settings

if TYPE_CHECKING:
    from sqlalchemy import Connection

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
                "SELECT current_user, current_setting('server_version'), current_setting('server_version_num')::int"
            ).one()
            conn.rollback()
            user, version, version_num = row
            major = version_num // 10000
            checks.append(EnvCheck("postgres", OK, f"PostgreSQL {version} at {display_url(db.url)} as {user}"))
            try:
                checks += check_roles(conn, name, db)
            except SQLAlchemyError as exc:
                checks.append(EnvCheck("roles", FAIL, f"the role checks could not run as {user}: {redact(exc).splitlines()[0]}"))
            conn.rollback()
            if (Path(db.migrations) / "env.py").is_file():
                checks += check_alembic_environment(conn, db)
    except Unavailable as exc:
        return [EnvCheck("postgres", FAIL, exc.message, unreachable=True)], None
    return checks, major


def check_alembic_environment(conn: Connection, db: DatabaseSettings) -> list[EnvCheck]:
    """The project's Alembic settings as dbagent reads them, and env.py's contract: it migrates on the
    connection dbagent passes (checked by running it with nothing to migrate, as every migrate does)."""
    from dbagent.postgres.migrator import ForeignConnection, Migrator

    checks: list[EnvCheck] = []
    try:
        migrator = Migrator(db.migrations, db.url)
    except Exception as exc:  # noqa: BLE001 - the project's scripts or ini
        return [EnvCheck("alembic", FAIL, f"Alembic cannot load {db.migrations}: {type(exc).__name__}: {redact(exc)}")]
    if migrator.ini is not None:
        configured = migrator.ini.read_text(encoding="utf-8", errors="replace")
        url_note = (" its sqlalchemy.url is not used: dbagent connects with the database's url from its own config"
                    if any(line.strip().startswith("sqlalchemy.url") for line in configured.splitlines()) else "")
        checks.append(EnvCheck("alembic_ini", OK, f"{migrator.ini} read;{url_note}" if url_note else f"{migrator.ini} read"))
    facts = migrator.environment()
    if facts.error:
        checks.append(EnvCheck("version_table", WARN, f"env.py does not run offline ({facts.error}): the lint cannot"
                               f" render the scripts, and the version table is taken as {facts.qualified_version_table}"))
    else:
        checks.append(EnvCheck("version_table", OK, f"{facts.qualified_version_table} (from env.py)"))
    try:
        per_step = migrator.check_environment(conn)
        checks.append(EnvCheck("env_py", OK, "env.py runs the migrations on dbagent's connection (its lock and timeouts)"))
        checks.append(EnvCheck("transactions", OK, "one per migration (transaction_per_migration): a failure keeps the"
                               " steps before it" if per_step else "one for the whole plan (transaction_per_migration is"
                               " off, Alembic's default): a failure undoes every step of the run, and its locks are held"
                               " until its end"))
    except ForeignConnection as exc:
        checks.append(EnvCheck("env_py", FAIL, exc.message))
    except Exception as exc:  # noqa: BLE001 - env.py is the project's code
        checks.append(EnvCheck("env_py", FAIL, f"env.py failed with nothing to migrate: {type(exc).__name__}: {redact(exc)}"))
    return checks


def check_roles(conn: Connection, name: str, db: DatabaseSettings) -> list[EnvCheck]:
    """What docs/least-privilege.md asks of the migration role (the URL's) and the application's, read from the catalogs."""
    from sqlalchemy import text

    me = conn.execute(text(
        "SELECT current_user, rolsuper, rolcreatedb OR rolsuper, current_database(),"
        " has_database_privilege(current_database(), 'CREATE'), has_database_privilege(current_database(), 'TEMPORARY')"
        " FROM pg_roles WHERE rolname = current_user"
    )).one()
    user, superuser, createdb, database, create_in_db, temporary = me
    checks = _check_app_user(conn, name, db, user)
    if superuser:
        checks.append(EnvCheck("privileges", WARN, f"{user} is a superuser: a dedicated migration role with ownership of the schema is safer"))
    else:
        checks.append(EnvCheck("privileges", OK, f"{user} is not a superuser"))
    checks.append(_check_schemas(conn, user))
    checks.append(_check_dbagent_schema(conn, user, database, create_in_db))
    if temporary:
        checks.append(EnvCheck("temporary", OK, f"{user} may create temporary tables in {database} (the agent's audit sink stages in one)"))
    else:
        checks.append(EnvCheck("temporary", FAIL, f"{user} may not create temporary tables in {database}: the agent's audit sink"
                               f" cannot write dbagent.audit_log; GRANT TEMPORARY ON DATABASE {database} TO {user}"))
    checks.append(_check_readable(conn, user))
    if createdb:
        checks.append(EnvCheck("createdb", OK, f"{user} may create the scratch databases of rehearsals and drills"))
    else:
        checks.append(EnvCheck("createdb", WARN, f"{user} has no CREATEDB: validate --rehearse and backups verify --drill"
                               " will stop (migrate, backup and restore do not need it)"))
    return checks


def _check_app_user(conn: Connection, name: str, db: DatabaseSettings, user: str) -> list[EnvCheck]:
    from sqlalchemy import text

    app = db.app_user
    if app is None:
        return [EnvCheck("migration_user", WARN, f"app_user is not set for {name!r}: cannot check that {user} is not the application's role")]
    if app == user:
        return [EnvCheck("migration_user", FAIL, f"{user} is also the application's role: migrate with a separate role")]
    checks = [EnvCheck("migration_user", OK, f"{user} is not the application's role ({app})")]
    found = conn.execute(text(
        "SELECT rolsuper, pg_has_role(r.oid, current_user, 'USAGE') FROM pg_roles r WHERE rolname = :app"
    ), {"app": app}).one_or_none()
    if found is None:
        checks.append(EnvCheck("app_user", WARN, f"the application's role {app} does not exist on this server"))
    elif found[0]:
        checks.append(EnvCheck("app_user", FAIL, f"the application's role {app} is a superuser: it can alter the schema; NOSUPERUSER it"))
    elif found[1]:
        checks.append(EnvCheck("app_user", FAIL, f"the application's role {app} is a member of {user}: it has the migration role's"
                               f" privileges (the schema's DDL); REVOKE {user} FROM {app}"))
    else:
        checks.append(EnvCheck("app_user", OK, f"the application's role {app} exists, is no superuser and not a member of {user}"))
    return checks


# The schemas the migrations touch: where the application's tables are, and where unqualified
# names (the version table, new tables) go. Owner, or CREATE there, is what DDL needs.
_SCHEMAS = """
SELECT n.nspname, pg_has_role(n.nspowner, 'USAGE') AS owner, has_schema_privilege(n.oid, 'CREATE') AS can_create,
       (SELECT array_agg(format('%I.%I', n.nspname, c.relname) ORDER BY c.relname) FROM pg_class c
         WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
           AND NOT pg_has_role(c.relowner, 'USAGE')) AS not_owned
FROM pg_namespace n
WHERE (n.nspname = current_schema()
       OR n.oid IN (SELECT relnamespace FROM pg_class WHERE relkind IN ('r', 'p') AND relpersistence <> 't'))
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', :excluded) AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY 1
"""


def _check_schemas(conn: Connection, user: str) -> EnvCheck:
    from sqlalchemy import text

    from dbagent.postgres.backups import SCHEMA_EXCLUDED

    rows = conn.execute(text(_SCHEMAS), {"excluded": SCHEMA_EXCLUDED}).all()
    if not rows:
        return EnvCheck("schema_owner", FAIL, f"no schema to migrate: the search_path of {user} names no existing schema")
    closed = [schema for schema, owner, can_create, _ in rows if not (owner or can_create)]
    if closed:
        return EnvCheck("schema_owner", FAIL, f"{user} neither owns nor may CREATE in schema(s) {', '.join(closed)}:"
                        f" migrations there will fail; ALTER SCHEMA ... OWNER TO {user}")
    others = [table for *_, not_owned in rows for table in (not_owned or [])]
    schemas = ", ".join(f"{schema} ({'owner' if owner else 'CREATE'})" for schema, owner, *_ in rows)
    if others:
        shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
        return EnvCheck("schema_owner", WARN, f"{user} may create in {schemas}, but other roles own {shown}:"
                        " migrations cannot alter or drop those")
    return EnvCheck("schema_owner", OK, f"{user} may create in {schemas} and owns every table there")


def _check_dbagent_schema(conn: Connection, user: str, database: str, create_in_db: bool) -> EnvCheck:
    from sqlalchemy import text

    from dbagent.postgres.store import SCHEMA

    found = conn.execute(text(
        "SELECT pg_has_role(n.nspowner, 'USAGE'), has_schema_privilege(n.oid, 'USAGE') AND has_schema_privilege(n.oid, 'CREATE'),"
        " (SELECT array_agg(format('%I.%I', n.nspname, c.relname) ORDER BY c.relname) FROM pg_class c"
        "   WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'S') AND NOT pg_has_role(c.relowner, 'USAGE'))"
        " FROM pg_namespace n WHERE n.nspname = :schema"
    ), {"schema": SCHEMA}).one_or_none()
    if found is None:
        if create_in_db:
            return EnvCheck("dbagent_schema", OK, f"schema {SCHEMA} is not there yet; {user} may CREATE it in {database} (first use does)")
        return EnvCheck("dbagent_schema", FAIL, f"schema {SCHEMA} is not there and {user} may not CREATE in {database}:"
                        f" workers and the agent cannot record anything; GRANT CREATE ON DATABASE {database} TO {user},"
                        f" or create the schema owned by {user}")
    owner, usable, not_owned = found
    if not_owned:
        return EnvCheck("dbagent_schema", FAIL, f"{', '.join(not_owned)} belong to another role: {user} cannot write or upgrade"
                        f" them; ALTER TABLE ... OWNER TO {user}")
    if owner or usable:
        how = "owns" if owner else "has USAGE and CREATE on"
        return EnvCheck("dbagent_schema", OK, f"{user} {how} schema {SCHEMA} and owns its tables")
    return EnvCheck("dbagent_schema", FAIL, f"{user} may not use schema {SCHEMA} (no USAGE and CREATE): workers and the agent"
                    f" cannot record anything; ALTER SCHEMA {SCHEMA} OWNER TO {user}")


def _check_readable(conn: Connection, user: str) -> EnvCheck:
    from sqlalchemy import text

    from dbagent.postgres.backups import SCHEMA_EXCLUDED, TABLES_SQL

    rows = conn.execute(text(TABLES_SQL), {"excluded": SCHEMA_EXCLUDED}).all()
    unreadable = [f"{table} ({why})" for table, _, why in rows if why]
    if unreadable:
        shown = "; ".join(unreadable[:10]) + (f" and {len(unreadable) - 10} more" if len(unreadable) > 10 else "")
        return EnvCheck("readable", WARN, f"{user} cannot read {shown}: backups leave them out (and say so); GRANT SELECT to back them up")
    return EnvCheck("readable", OK, f"{user} can read every table a backup dumps ({sum(1 for _, counted, _ in rows if counted)} tables)")


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
