"""``dbagent init``: adopt an existing Alembic project.

Finds the project's script directory, detects its naming convention, writes a
``dbagent.toml`` for it (one ``[databases.NAME]`` section per ``--db``),
checks env.py against dbagent's contract (on the first database, when it can
be reached: the same check every migrate makes) and runs the static
validation. Nothing is migrated and no database is changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbagent.core.errors import BadInput
from dbagent.core.redact import redact

# Where projects usually keep their script directory, relative to where init runs.
_USUAL = ("alembic", "migrations", "db/migrations", ".")


@dataclass
class Onboarding:
    config: Path
    migrations: Path
    naming: str
    env_py: str  # "ok" | "refused" | "unchecked"
    env_detail: str
    findings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [f for f in self.findings if f["severity"] == "error"]

    def to_json(self) -> dict[str, Any]:
        return {
            "config": str(self.config), "migrations": str(self.migrations), "naming": self.naming,
            "env_py": self.env_py, "env_detail": self.env_detail, "findings": self.findings,
            "status": "ok" if self.env_py != "refused" and not self.errors else "needs-changes",
        }


def find_script_directory(start: Path, explicit: str | None = None) -> Path:
    """The Alembic script directory: the one given, the ``script_location`` of ``start/alembic.ini``, or a usual place."""
    if explicit:
        path = Path(explicit)
        if not (path / "env.py").is_file():
            raise BadInput(f"{path}: not an Alembic script directory (no env.py)")
        return path
    ini = start / "alembic.ini"
    if ini.is_file():
        from alembic.config import Config

        location = Config(str(ini)).get_main_option("script_location")
        if location and ":" not in location and (start / location / "env.py").is_file():
            return (start / location).resolve()
    for usual in _USUAL:
        if (start / usual / "env.py").is_file():
            return (start / usual).resolve()
    raise BadInput(f"no Alembic project found in {start} (no alembic.ini, no env.py in {', '.join(_USUAL)}): give --migrations")


def parse_databases(specs: list[str]) -> dict[str, str]:
    """``NAME=URL`` pairs, in order."""
    databases: dict[str, str] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url:
            raise BadInput(f"--db takes NAME=URL, not {redact(spec)!r}")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise BadInput(f"database name {name!r}: letters, digits, '-' and '_' only")
        if name in databases:
            raise BadInput(f"database {name!r} is given twice")
        databases[name] = url
    if not databases:
        raise BadInput("give at least one database: --db NAME=postgresql://user@host/dbname")
    return databases


def render_config(migrations: Path, naming: str, databases: dict[str, str], redis_url: str, prefix: str) -> str:
    """The TOML of a new configuration (see config/dbagent.example.toml for every other key)."""
    lines = [
        "# Written by `dbagent init`; every key is documented in config/dbagent.example.toml.",
        "[redis]",
        f"url = {json.dumps(redis_url)}",
        f"prefix = {json.dumps(prefix)}",
        "",
        "[security]",
        'signing_key_env = "DBAGENT_SIGNING_KEY"   # the key itself is never written to a file',
    ]
    for name, url in databases.items():
        lines += [
            "",
            f"[databases.{name}]",
            f"url = {json.dumps(url)}   # a password belongs in ~/.pgpass or PGPASSWORD, not here",
            f"migrations = {json.dumps(str(migrations))}",
            f"naming = {json.dumps(naming)}   # detected by dbagent init",
        ]
    return "\n".join(lines) + "\n"


def onboard(
    start: Path, output: Path, databases: dict[str, str], *, migrations: str | None = None,
    redis_url: str = "redis://127.0.0.1:6379/0", prefix: str = "dbagent", force: bool = False,
) -> Onboarding:
    from dbagent.checks import preflight
    from dbagent.checks.validate import detect_naming, load_sources

    location = find_script_directory(start, migrations)
    if output.exists() and not force:
        raise BadInput(f"{output} exists: give --force to replace it, or --output another path")
    naming = detect_naming(load_sources(location))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_config(location, naming, databases, redis_url, prefix), encoding="utf-8")
    first = next(iter(databases.values()))
    env_py, detail = _check_env_py(location, first)
    found = preflight.findings(location, naming=naming)
    return Onboarding(output, location, naming, env_py, detail, found)


def _check_env_py(location: Path, url: str) -> tuple[str, str]:
    """Run env.py with nothing to migrate on a connection to ``url``, as every migrate does first."""
    from dbagent.core.errors import DbAgentError
    from dbagent.postgres.connections import pg_connection
    from dbagent.postgres.migrator import ForeignConnection, Migrator
    from dbagent.settings import DatabaseSettings

    try:
        migrator = Migrator(location, url)
        with pg_connection(DatabaseSettings(url=url, migrations=str(location)), application_name="dbagent init") as conn:
            migrator.check_environment(conn)
        return "ok", "env.py runs the migrations on dbagent's connection"
    except ForeignConnection as exc:
        return "refused", exc.message
    except DbAgentError as exc:
        return "unchecked", f"env.py not checked: {exc.message}"
    except Exception as exc:  # noqa: BLE001 - env.py is the project's code, the database may be away
        return "unchecked", f"env.py not checked: {type(exc).__name__}: {redact(exc)}"
