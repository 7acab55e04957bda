"""Configuration: a TOML file, overridden by ``DBAGENT_<SECTION>__<KEY>`` variables.

The file comes from ``--config``, else ``DBAGENT_CONFIG``, else
``config/dbagent.toml`` when it exists, else the built-in defaults.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from dbagent.core.durations import parse_duration_s
from dbagent.core.errors import BadInput, ConfigError
from dbagent.core.redact import redact

if TYPE_CHECKING:
    from dbagent.core.retries import RetryPolicy

DEFAULT_CONFIG_PATH = Path("config/dbagent.toml")

Seconds = Annotated[float, BeforeValidator(parse_duration_s)]


def _at_least_1ms(value: float) -> float:
    if value < 0.001:
        raise ValueError("must be at least 1ms: PostgreSQL reads 0 as 'no timeout'")
    return value


# PostgreSQL timeouts: zero would silently mean "wait forever".
TimeoutSeconds = Annotated[float, BeforeValidator(parse_duration_s), AfterValidator(_at_least_1ms)]

_DEV_OR_TEST = re.compile(r"(^|[_-])(dev|develop|development|test|testing|local)([_-]|$)", re.IGNORECASE)
_DB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RedisSettings(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "dbagent"
    lease_ttl: Seconds = Field(30.0, description="writer lease lifetime; renewed every third of it")
    visibility_timeout: Seconds = Field(
        7200.0, description="after this long an unacknowledged command is redelivered"
    )
    connect_timeout: Seconds = 3.0


class SecuritySettings(_Section):
    signing_key_env: str = "DBAGENT_SIGNING_KEY"
    max_command_age: Seconds = Field(
        3600.0, description="a command without a signed expiry (from an older producer) is rejected this long after issue"
    )
    max_command_ttl: Seconds = Field(
        7 * 24 * 3600.0, description="the longest expiry a producer may sign into a command (after its issue)"
    )
    max_clock_skew: Seconds = Field(300.0, description="how far in the future issued_at may be")

    def signing_key(self) -> bytes | None:
        value = os.environ.get(self.signing_key_env, "")
        return value.encode() if value else None


_CLOCK = re.compile(r"^(?:(?P<day>mon|tue|wed|thu|fri|sat|sun|[1-9]|[12][0-9]|3[01]) )?(?P<hour>[01]?[0-9]|2[0-3]):(?P<minute>[0-5][0-9])$")


def _clock(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _CLOCK.match(value.strip().lower()):
        raise ValueError(f"{value!r} is not a time: write 'HH:MM' (UTC), 'sun HH:MM' for weekly, '1 HH:MM' for monthly")
    return value.strip().lower()


Clock = Annotated[str | None, BeforeValidator(_clock)]


class ScheduleSettings(_Section):
    """Scheduled full backups, each followed by a prune; all times UTC."""

    daily: Clock = Field(None, description="'HH:MM': a full backup every day")
    weekly: Clock = Field(None, description="'sun HH:MM': the weekly mark")
    monthly: Clock = Field(None, description="'1 HH:MM': the monthly mark (day of month)")
    every: Seconds | None = Field(None, description="a full backup at this interval (instead of, or besides, the clock times)")
    prune: bool = True


class DatabaseSettings(_Section):
    url: str
    migrations: str = "migrations"
    naming: Literal["auto", "sequential", "alembic"] = Field(
        "auto",
        description="sequential: NNN_description.py, the id is the number, one linear chain; alembic: any file name and"
        " revision id, Alembic's graph rules (branches and merges); auto: detected from the scripts",
    )
    lint_from: str | None = Field(
        None,
        description="a baseline for an old history: this revision and its ancestors are taken as reviewed (not linted,"
        " their per-script rules not applied; graph rules and checksums still are); validate --all lints them anyway",
    )
    backup_dir: str | None = None
    pre_migration_backup: bool | None = Field(
        None, description="default: true unless the database's name looks like dev or test"
    )
    backup_jobs: int = Field(1, ge=1, le=64, description="above 1: directory format, pg_dump -j N")
    backup_compression: int | None = Field(None, ge=0, le=9, description="pg_dump -Z; default: pg_dump's")
    backup_lock_wait_timeout: TimeoutSeconds = Field(30.0, description="pg_dump --lock-wait-timeout")
    verify_after_backup: bool = Field(True, description="read every new backup back in full (pg_restore) before listing it as verified")
    lock_timeout: TimeoutSeconds = Field(
        2.0, description="PostgreSQL lock_timeout of every statement; a step that times out is retried"
    )
    validate_before_migrate: Literal["auto", "enforce", "warn"] = Field(
        "auto",
        description="enforce: a validation error stops a migrate unless --allow names its rule; warn: reported only;"
        " auto: enforce unless the database's name looks like dev or test",
    )
    lock_retries: int = Field(10, ge=1, le=1000, description="attempts of a step that keeps timing out on its locks")
    lock_timeout_growth: float = Field(1.5, ge=1.0, le=10.0, description="each retry's lock_timeout is this much longer")
    lock_timeout_max: TimeoutSeconds = Field(10.0, description="the longest lock_timeout a retry grows to")
    lock_retry_pause: Seconds = Field(1.0, ge=0, description="the first pause between attempts; doubles, jittered 50-100%")
    lock_retry_max_pause: Seconds = Field(30.0, ge=0, description="the longest pause between attempts")
    lock_holder_grace: Seconds = Field(
        0.2, ge=0, description="a conflicting transaction open longer than this is waited out before a step asks for its lock"
    )
    statement_timeout: TimeoutSeconds = 900.0
    connect_timeout: Seconds = 5.0
    lock_wait_timeout: Seconds = Field(1800.0, description="how long a writer waits for the database's lock")
    lock_blocking_threshold: Seconds = Field(
        2.0, description="a lock.blocking event once a session waits on a migration step (or it on one) this long"
    )
    health_checks: list[str] = []
    health_check_timeout: TimeoutSeconds = Field(
        5.0, description="each health check query runs at most this long (statement_timeout); longer fails it"
    )
    fk_check_timeout: TimeoutSeconds = Field(
        30.0, description="each foreign-key orphan scan after a migration runs at most this long; longer fails the check"
    )
    critical_tables: list[str] = []
    app_user: str | None = Field(None, description="the application's role; must differ from the migration user")
    schedule: ScheduleSettings = ScheduleSettings()
    auto_restore: bool = Field(False, description="a failed automatic rollback escalates to restoring the pre-migration backup")
    backfill_batch_size: int = Field(1000, ge=1, description="rows per batch of a batched data migration (dbagent.backfill)")
    backfill_pause: Seconds = Field(0.0, description="pause between a batched data migration's batches, to spare replicas and the application")

    def enforces_validation(self, name: str) -> bool:
        if self.validate_before_migrate != "auto":
            return self.validate_before_migrate == "enforce"
        return not _DEV_OR_TEST.search(name)

    def retry_policy(self) -> RetryPolicy:
        from dbagent.core.retries import RetryPolicy

        return RetryPolicy(
            lock_timeout_s=self.lock_timeout,
            attempts=self.lock_retries,
            growth=self.lock_timeout_growth,
            max_lock_timeout_s=max(self.lock_timeout_max, self.lock_timeout),
            pause_s=self.lock_retry_pause,
            max_pause_s=self.lock_retry_max_pause,
            holder_grace_s=self.lock_holder_grace,
        )

    def takes_pre_migration_backup(self, name: str) -> bool:
        if self.pre_migration_backup is not None:
            return self.pre_migration_backup
        return not _DEV_OR_TEST.search(name)


class MonitoringSettings(_Section):
    sentry_dsn_env: str = Field("SENTRY_DSN", description="env var holding the Sentry DSN; unset = no Sentry")
    environment: str = "production"


class AgentSettings(_Section):
    claim_idle: Seconds = Field(30.0, description="take over entries a stopped agent left pending this long")
    max_deliveries: int = Field(5, ge=1, description="an entry failing this often goes to the dead-letter stream")


class WorkerSettings(_Section):
    stop_grace: Seconds = Field(
        20.0, ge=0,
        description="told to stop (SIGTERM), a worker lets the current step, dump or restore run this long, then cancels it",
    )
    reconnect_timeout: Seconds = Field(
        60.0, ge=0, description="after losing PostgreSQL mid-command, how long the worker tries to reach it to record the outcome"
    )
    relay_interval: Seconds = Field(
        5.0, ge=0.1,
        description="how often a worker re-publishes outcomes Redis missed and reports commands a dead worker left",
    )


class BeatSettings(_Section):
    leader_ttl: Seconds = Field(30.0, description="a stopped beat's leadership passes to a standby after this")


class ApiSettings(_Section):
    listen: str = "127.0.0.1:8080"
    tokens_env: str = "DBAGENT_API_TOKENS"


class ChatopsSettings(_Section):
    slack_signing_secret_env: str = "DBAGENT_SLACK_SIGNING_SECRET"
    permissions: dict[str, list[str]] = {}


class RetentionSettings(_Section):
    pre_migration_days: int = Field(30, ge=0)
    daily: int = Field(7, ge=0)
    weekly: int = Field(4, ge=0)
    monthly: int = Field(12, ge=0)


class Settings(BaseSettings):
    """The whole configuration of one dbagent deployment."""

    model_config = SettingsConfigDict(
        env_prefix="DBAGENT_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    redis: RedisSettings = RedisSettings()
    security: SecuritySettings = SecuritySettings()
    databases: dict[str, DatabaseSettings] = {}
    api: ApiSettings = ApiSettings()
    worker: WorkerSettings = WorkerSettings()
    beat: BeatSettings = BeatSettings()
    agent: AgentSettings = AgentSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    chatops: ChatopsSettings = ChatopsSettings()
    retention: RetentionSettings = RetentionSettings()

    _source: str | None = PrivateAttr(None)

    @property
    def source(self) -> str | None:
        """The file this configuration came from (None: defaults and environment only)."""
        return self._source

    @field_validator("databases")
    @classmethod
    def _names(cls, value: dict[str, DatabaseSettings]) -> dict[str, DatabaseSettings]:
        for name in value:
            if not _DB_NAME.match(name):
                raise ValueError(f"database name {name!r} must be letters, digits, '_' or '-'")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init arguments; environment variables
        # come first so that they override the file, key by key.
        return env_settings, init_settings

    def database(self, name: str | None) -> tuple[str, DatabaseSettings]:
        """The named database, or the only one configured when no name is given."""
        if name is None:
            if len(self.databases) == 1:
                return next(iter(self.databases.items()))
            if not self.databases:
                raise BadInput(
                    f"no database is configured in {self.source or 'the built-in defaults'}: "
                    "add a [databases.NAME] section"
                )
            raise BadInput(
                f"several databases are configured ({', '.join(sorted(self.databases))}): choose one with --db"
            )
        if name not in self.databases:
            known = ", ".join(sorted(self.databases)) or "none"
            raise BadInput(f"unknown database {name!r} (configured: {known})")
        return name, self.databases[name]


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """Which configuration file applies, or None for the built-in defaults."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get("DBAGENT_CONFIG")
    if from_env:
        return Path(from_env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read and validate the configuration; every problem is a ConfigError naming the file."""
    file = config_path(path)
    data: dict[str, Any] = {}
    where = "the environment"
    if file is not None:
        where = str(file)
        try:
            with open(file, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"{file}: no such configuration file") from None
        except IsADirectoryError:
            raise ConfigError(f"{file}: is a directory, not a configuration file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot be read: {exc.strerror}") from None
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise ConfigError(f"{where}: {problems}") from None
    except SettingsError as exc:
        # An environment override of a list or table key that is not JSON.
        culprits = ", ".join(
            f"${name} ({name[len('DBAGENT_'):].lower().replace('__', '.')})" for name in _non_json_overrides()
        ) or redact(exc)
        raise ConfigError(
            f"environment override {culprits}: list and table values are written as JSON,"
            ' e.g. \'["select 1"]\''
        ) from None
    settings._source = str(file) if file else None
    return settings


# Keys whose values are lists or tables: from the environment they must be JSON.
_STRUCTURED_KEYS = {"databases", "health_checks", "critical_tables", "permissions", "chatops", "redis", "security", "api", "retention", "worker"}


def _non_json_overrides() -> list[str]:
    found = []
    for name, value in os.environ.items():
        if not name.upper().startswith("DBAGENT_"):
            continue
        if name.lower().rsplit("__", 1)[-1].removeprefix("dbagent_") not in _STRUCTURED_KEYS:
            continue
        try:
            json.loads(value)
        except ValueError:
            found.append(name)
    return sorted(found)


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    variable = "DBAGENT_" + "__".join(str(part) for part in error["loc"]).upper()
    if any(name.upper() == variable for name in os.environ):
        location = f"{location} (from ${variable})"
    if error["type"] == "extra_forbidden":
        return f"unknown key {location!r}"
    if error["type"] == "missing":
        return f"{location}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    return redact(f"{location}: {message} (got {error.get('input')!r})")
