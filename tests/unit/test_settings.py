"""agent/settings.py and agent/core/durations.py: the configuration contract of docs/contract.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbagent.core.durations import parse_duration_s, postgres_interval
from dbagent.core.errors import BadInput, ConfigError
from dbagent.settings import Settings, load_settings

DESIGN_EXAMPLE = """\
[redis]
url = "redis://127.0.0.1:6379/0"
prefix = "dbagent"              # every key, queue and stream name starts with it

[security]
signing_key_env = "DBAGENT_SIGNING_KEY"   # HMAC key for commands; unset = refuse destructive commands

[databases.production]
url = "postgresql://migrator@db1:5432/aegisx"   # password from .pgpass or env, never logged
migrations = "migrations"       # Alembic script directory
backup_dir = "/var/backups/dbagent/production"
pre_migration_backup = true
lock_timeout = "5s"             # PostgreSQL lock_timeout per statement, retried
statement_timeout = "15min"
health_checks = ["select count(*) >= 0 from users"]
critical_tables = ["users", "roles"]   # row counts must not drop across a migration

[api]                            # dbagent serve
listen = "127.0.0.1:8080"
tokens_env = "DBAGENT_API_TOKENS"        # "token1=deploy-bot,token2=ci": bearer token -> actor

[chatops]
slack_signing_secret_env = "DBAGENT_SLACK_SIGNING_SECRET"
[chatops.permissions]            # chat user id -> allowed "command:database" pairs, * wildcards
U024BE7LH = ["rollback:staging", "status:*"]

[retention]
pre_migration_days = 30
daily = 7
weekly = 4
monthly = 12
"""

ONE_DB = """\
[databases.production]
url = "postgresql://migrator@db1:5432/aegisx"
"""


def write(tmp_path: Path, text: str, name: str = "dbagent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- loading a file -------------------------------------------------------------


def test_design_example_loads_with_its_values(tmp_path):
    path = write(tmp_path, DESIGN_EXAMPLE)

    settings = load_settings(path)

    assert settings.source == str(path)
    assert settings.redis.url == "redis://127.0.0.1:6379/0"
    assert settings.redis.prefix == "dbagent"
    assert settings.security.signing_key_env == "DBAGENT_SIGNING_KEY"
    assert list(settings.databases) == ["production"]
    db = settings.databases["production"]
    assert db.url == "postgresql://migrator@db1:5432/aegisx"
    assert db.migrations == "migrations"
    assert db.backup_dir == "/var/backups/dbagent/production"
    assert db.pre_migration_backup is True
    assert db.lock_timeout == 5.0
    assert db.statement_timeout == 900.0
    assert db.health_checks == ["select count(*) >= 0 from users"]
    assert db.critical_tables == ["users", "roles"]
    assert settings.api.listen == "127.0.0.1:8080"
    assert settings.api.tokens_env == "DBAGENT_API_TOKENS"
    assert settings.chatops.slack_signing_secret_env == "DBAGENT_SLACK_SIGNING_SECRET"
    assert settings.chatops.permissions == {"U024BE7LH": ["rollback:staging", "status:*"]}
    assert (
        settings.retention.pre_migration_days,
        settings.retention.daily,
        settings.retention.weekly,
        settings.retention.monthly,
    ) == (30, 7, 4, 12)


def test_keys_left_out_take_the_built_in_defaults(tmp_path):
    settings = load_settings(write(tmp_path, ONE_DB))

    db = settings.databases["production"]
    assert db.migrations == "migrations"
    assert db.lock_timeout == 2.0 and db.lock_retries == 10  # issue 5: 2 s, retried
    assert db.statement_timeout == 900.0
    assert db.health_checks == []
    assert settings.redis.prefix == "dbagent"
    assert settings.security.max_command_age == 3600.0


def test_no_file_anywhere_gives_the_built_in_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config/dbagent.toml here

    settings = load_settings()

    assert settings.source is None
    assert settings.databases == {}
    assert settings.redis.url == "redis://127.0.0.1:6379/0"


def test_default_path_config_dbagent_toml_is_used_when_present(tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    write(tmp_path / "config", ONE_DB.replace("db1", "from-default-path"))
    monkeypatch.chdir(tmp_path)

    settings = load_settings()

    assert settings.source == str(Path("config/dbagent.toml"))
    assert settings.databases["production"].url == "postgresql://migrator@from-default-path:5432/aegisx"


def test_dbagent_config_variable_picks_the_file(tmp_path, monkeypatch):
    chosen = write(tmp_path, ONE_DB.replace("db1", "chosen-host"), "chosen.toml")
    monkeypatch.setenv("DBAGENT_CONFIG", str(chosen))
    monkeypatch.chdir(tmp_path)

    settings = load_settings()

    assert settings.source == str(chosen)
    assert settings.databases["production"].url == "postgresql://migrator@chosen-host:5432/aegisx"


def test_explicit_path_wins_over_dbagent_config(tmp_path, monkeypatch):
    explicit = write(tmp_path, ONE_DB.replace("db1", "explicit-host"), "explicit.toml")
    other = write(tmp_path, ONE_DB.replace("db1", "env-host"), "env.toml")
    monkeypatch.setenv("DBAGENT_CONFIG", str(other))

    settings = load_settings(explicit)

    assert settings.source == str(explicit)
    assert settings.databases["production"].url == "postgresql://migrator@explicit-host:5432/aegisx"


# -- environment overrides --------------------------------------------------------


def test_environment_overrides_win_key_by_key(tmp_path, monkeypatch):
    path = write(tmp_path, DESIGN_EXAMPLE)
    monkeypatch.setenv("DBAGENT_REDIS__PREFIX", "from-env")
    monkeypatch.setenv("DBAGENT_DATABASES__PRODUCTION__URL", "postgresql://other@db2:5432/aegisx")
    monkeypatch.setenv("DBAGENT_DATABASES__PRODUCTION__LOCK_TIMEOUT", "2s")

    settings = load_settings(path)

    # overridden keys
    assert settings.redis.prefix == "from-env"
    db = settings.databases["production"]
    assert db.url == "postgresql://other@db2:5432/aegisx"
    assert db.lock_timeout == 2.0
    # the other keys of the same sections are the file's
    assert settings.redis.url == "redis://127.0.0.1:6379/0"
    assert db.statement_timeout == 900.0
    assert db.backup_dir == "/var/backups/dbagent/production"
    assert db.pre_migration_backup is True
    assert db.critical_tables == ["users", "roles"]
    assert list(settings.databases) == ["production"]


def test_environment_override_with_a_bad_value_is_a_config_error(tmp_path, monkeypatch):
    path = write(tmp_path, ONE_DB)
    monkeypatch.setenv("DBAGENT_DATABASES__PRODUCTION__LOCK_TIMEOUT", "soon")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert "databases.production.lock_timeout" in caught.value.message
    assert "'soon' is not a duration" in caught.value.message
    assert caught.value.exit_code == 2


def test_environment_override_that_is_not_json_is_a_config_error(tmp_path, monkeypatch):
    path = write(tmp_path, ONE_DB)
    monkeypatch.setenv("DBAGENT_DATABASES__PRODUCTION__HEALTH_CHECKS", "select 1")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert "health_checks" in caught.value.message
    assert caught.value.exit_code == 2


# -- every problem is a ConfigError naming the file and the key -------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert caught.value.message == f"{path}: no such configuration file"
    assert caught.value.exit_code == 2


def test_missing_file_named_by_dbagent_config(tmp_path, monkeypatch):
    path = tmp_path / "absent.toml"
    monkeypatch.setenv("DBAGENT_CONFIG", str(path))

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert str(path) in caught.value.message
    assert "no such configuration file" in caught.value.message


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path)

    assert caught.value.message == f"{tmp_path}: is a directory, not a configuration file"
    assert caught.value.exit_code == 2


def test_malformed_toml(tmp_path):
    path = write(tmp_path, "[databases.production\nurl = 'x'\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert caught.value.message.startswith(f"{path}: not valid TOML: ")
    assert "line 1" in caught.value.message
    assert caught.value.exit_code == 2


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, ONE_DB + "\n[bogus]\nx = 1\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert caught.value.message == f"{path}: unknown key 'bogus'"
    assert caught.value.exit_code == 2


def test_unknown_key_inside_a_database(tmp_path):
    path = write(tmp_path, ONE_DB + 'lock_timout = "5s"\n')

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert caught.value.message == f"{path}: unknown key 'databases.production.lock_timout'"
    assert caught.value.exit_code == 2


def test_unknown_key_inside_a_section(tmp_path):
    path = write(tmp_path, '[redis]\nprefx = "x"\n')

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert caught.value.message == f"{path}: unknown key 'redis.prefx'"


def test_wrong_type_duration(tmp_path):
    path = write(tmp_path, ONE_DB + 'lock_timeout = "soon"\n')

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    message = caught.value.message
    assert message.startswith(f"{path}: ")
    assert "databases.production.lock_timeout" in message
    assert "'soon' is not a duration" in message
    assert caught.value.exit_code == 2


def test_wrong_type_boolean(tmp_path):
    path = write(tmp_path, ONE_DB + 'pre_migration_backup = "maybe"\n')

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    message = caught.value.message
    assert message.startswith(f"{path}: ")
    assert "databases.production.pre_migration_backup" in message
    assert "valid boolean" in message
    assert "'maybe'" in message
    assert caught.value.exit_code == 2


def test_wrong_type_retention_negative(tmp_path):
    path = write(tmp_path, "[retention]\ndaily = -1\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(path) in caught.value.message
    assert "retention.daily" in caught.value.message


def test_database_without_url(tmp_path):
    path = write(tmp_path, "[databases.production]\nmigrations = 'migrations'\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert caught.value.message == f"{path}: databases.production.url: required key is missing"


def test_bad_database_name(tmp_path):
    path = write(tmp_path, '[databases."bad name"]\nurl = "postgresql://u@h/d"\n')

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(path) in caught.value.message
    assert "database name 'bad name'" in caught.value.message


def test_password_in_a_bad_url_value_is_not_in_the_message(tmp_path):
    path = write(tmp_path, '[databases.production]\nurl = ["postgresql://migrator:s3cr3t-pw@db1:5432/aegisx"]\n')

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    message = caught.value.message
    assert "s3cr3t-pw" not in message
    assert "s3cr3t-pw" not in str(caught.value)
    assert str(path) in message
    assert "databases.production.url" in message
    assert "postgresql://migrator:***@db1:5432/aegisx" in message


def test_password_in_a_bad_redis_url_value_is_not_in_the_message(tmp_path):
    path = write(tmp_path, '[redis]\nurl = 6379\nprefix = ["redis://:r3d1s-pw@cache:6379/0"]\n')

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert "r3d1s-pw" not in caught.value.message
    assert "redis.prefix" in caught.value.message
    assert "redis.url" in caught.value.message


# -- Settings.database -------------------------------------------------------------


def two_dbs(tmp_path) -> Settings:
    return load_settings(
        write(
            tmp_path,
            '[databases.production]\nurl = "postgresql://u@db1/p"\n'
            '[databases.staging]\nurl = "postgresql://u@db2/s"\n',
        )
    )


def test_database_none_with_one_database_returns_it(tmp_path):
    settings = load_settings(write(tmp_path, ONE_DB))

    name, db = settings.database(None)

    assert name == "production"
    assert db is settings.databases["production"]


def test_database_by_name(tmp_path):
    settings = two_dbs(tmp_path)

    name, db = settings.database("staging")

    assert name == "staging"
    assert db.url == "postgresql://u@db2/s"


def test_database_none_with_two_databases_asks_for_db(tmp_path):
    settings = two_dbs(tmp_path)

    with pytest.raises(BadInput) as caught:
        settings.database(None)

    assert "--db" in caught.value.message
    assert "production, staging" in caught.value.message
    assert caught.value.exit_code == 2


def test_database_none_with_no_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings()

    with pytest.raises(BadInput) as caught:
        settings.database(None)

    assert "no database is configured" in caught.value.message
    assert "[databases.NAME]" in caught.value.message


def test_unknown_database_is_named_and_the_configured_ones_listed(tmp_path):
    settings = two_dbs(tmp_path)

    with pytest.raises(BadInput) as caught:
        settings.database("prod")

    assert caught.value.message == "unknown database 'prod' (configured: production, staging)"
    assert caught.value.exit_code == 2


# -- durations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("1ms", 0.001),
        ("5s", 5.0),
        ("5sec", 5.0),
        ("2m", 120.0),
        ("15min", 900.0),
        ("2h", 7200.0),
        ("1.5h", 5400.0),
        ("7d", 604800.0),
        ("10", 10.0),
        ("2.5", 2.5),
        (" 5 s ", 5.0),
        ("0s", 0.0),
        (30, 30.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration_s(text) == pytest.approx(seconds)
    assert isinstance(parse_duration_s(text), float)


@pytest.mark.parametrize("bad", ["soon", "", "5x", "-5s", "5 min later", "1e3s", "s", "5 5s", None, [5]])
def test_parse_duration_rejects_non_durations(bad):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration_s(bad)


def test_parse_duration_rejects_negative_numbers():
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_duration_s(-1)


def test_parse_duration_rejects_booleans():
    with pytest.raises(ValueError, match="a number with a unit"):
        parse_duration_s(True)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(5.0, "5000ms"), (900.0, "900000ms"), (0.25, "250ms"), (0.0015, "2ms"), (0.0, "0ms"), (2, "2000ms")],
)
def test_postgres_interval(seconds, text):
    assert postgres_interval(seconds) == text
