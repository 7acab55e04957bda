"""agent/core/commands.py: signing, checking and decoding commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dbagent.core.commands import (
    Command,
    CommandType,
    MigrateArgs,
    RollbackArgs,
    StatusArgs,
    check_client_text,
    check_command,
    client_command,
)
from dbagent.core.errors import BadInput, CommandRejected

ROOT = Path(__file__).resolve().parents[2]
KEY = b"unit-test-signing-key"
NOW = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC)
MAX_AGE_S = 3600.0
MAX_SKEW_S = 300.0


def check(command: Command, key: bytes | None = KEY, *, db: str = "production", now: datetime = NOW) -> None:
    return check_command(command, key, db=db, now=now, max_age_s=MAX_AGE_S, max_skew_s=MAX_SKEW_S)


def make(type_: str = "migrate", args: dict | None = None, **fields) -> Command:
    values = {
        "id": "0b7a3c8e-1111-4222-8333-944445555666",
        "type": type_,
        "db": "production",
        "args": {"dry_run": True} if args is None else args,
        "actor": "deploy-bot",
        "ticket": "CHG-42",
        "issued_at": NOW - timedelta(seconds=10),
    }
    values.update(fields)
    return Command(**values)


@pytest.fixture
def signed() -> Command:
    return make().signed(KEY)


def test_signed_command_passes(signed):
    assert signed.signature is not None
    assert len(signed.signature) == 64  # hex SHA-256
    assert check(signed) is None
    assert signed.parsed_args() == MigrateArgs(dry_run=True)


def test_signing_does_not_change_the_signed_fields(signed):
    unsigned = make()
    assert signed.canonical() == unsigned.canonical()
    assert unsigned.signature is None


TAMPERED = {
    "id": "ffffffff-0000-4000-8000-000000000000",
    "type": CommandType.ROLLBACK,
    "db": "staging",
    "args": {"dry_run": False},
    "actor": "mallory",
    "ticket": "CHG-666",
    "issued_at": NOW - timedelta(seconds=5),
}


@pytest.mark.parametrize("field", sorted(TAMPERED))
def test_every_field_is_covered_by_the_signature(signed, field):
    tampered = signed.model_copy(update={field: TAMPERED[field]})
    assert tampered.signature == signed.signature
    assert tampered.canonical() != signed.canonical()

    with pytest.raises(CommandRejected) as caught:
        check(tampered, db=tampered.db)

    assert "signature" in caught.value.message
    assert caught.value.exit_code == 2


def test_removing_the_ticket_breaks_the_signature(signed):
    tampered = signed.model_copy(update={"ticket": None})

    with pytest.raises(CommandRejected, match="signature"):
        check(tampered)


def test_wrong_key_is_rejected():
    forged = make().signed(b"some-other-key")

    with pytest.raises(CommandRejected) as caught:
        check(forged)

    assert caught.value.message == "signature does not match: the command was forged or altered"


def test_garbage_signature_is_rejected(signed):
    forged = signed.model_copy(update={"signature": "0" * 64})

    with pytest.raises(CommandRejected, match="signature does not match"):
        check(forged)


def test_non_ascii_signature_is_rejected_not_a_crash(signed):
    forged = Command.from_message({**signed.to_message(), "signature": "\u00e9" * 64})

    with pytest.raises(CommandRejected, match="signature"):
        check(forged)


def test_unsigned_command_is_rejected_when_a_key_is_configured():
    with pytest.raises(CommandRejected) as caught:
        check(make(), KEY)

    assert caught.value.message == "command is not signed"


def test_unsigned_read_only_command_is_rejected_too_when_a_key_is_configured():
    with pytest.raises(CommandRejected, match="not signed"):
        check(make("status", {}), KEY)


def test_no_key_configured_read_only_command_passes_unsigned():
    status = make("status", {})

    assert check(status, None) is None
    assert status.is_writer is False
    assert status.parsed_args() == StatusArgs()


@pytest.mark.parametrize(("type_", "args"), [("migrate", {}), ("rollback", {"steps": 1})])
def test_no_key_configured_writers_are_refused(type_, args):
    command = make(type_, args)
    assert command.is_writer is True

    with pytest.raises(CommandRejected) as caught:
        check(command, None)

    assert caught.value.message == (
        f"{type_} changes the database and no signing key is configured: refusing it"
    )


def test_no_key_configured_a_signed_writer_is_still_refused():
    with pytest.raises(CommandRejected, match="no signing key is configured"):
        check(make("migrate", {}).signed(KEY), None)


def test_stale_command_is_rejected():
    old = make(issued_at=NOW - timedelta(seconds=MAX_AGE_S + 1)).signed(KEY)

    with pytest.raises(CommandRejected) as caught:
        check(old)

    assert "stale" in caught.value.message
    assert "3601s ago" in caught.value.message
    assert "3600s" in caught.value.message


def test_command_just_inside_the_age_limit_passes():
    old = make(issued_at=NOW - timedelta(seconds=MAX_AGE_S - 1)).signed(KEY)

    assert check(old) is None


def test_future_command_beyond_skew_is_rejected():
    future = make(issued_at=NOW + timedelta(seconds=MAX_SKEW_S + 60)).signed(KEY)

    with pytest.raises(CommandRejected) as caught:
        check(future)

    assert "in the future" in caught.value.message
    assert "360s" in caught.value.message


def test_future_command_within_skew_passes():
    future = make(issued_at=NOW + timedelta(seconds=MAX_SKEW_S - 1)).signed(KEY)

    assert check(future) is None


def test_naive_issued_at_counts_as_utc():
    naive = make(issued_at=(NOW - timedelta(seconds=MAX_AGE_S + 5)).replace(tzinfo=None)).signed(KEY)

    with pytest.raises(CommandRejected, match="stale"):
        check(naive)


def test_command_for_another_database_is_rejected(signed):
    with pytest.raises(CommandRejected) as caught:
        check(signed, db="staging")

    assert caught.value.message == "command is for database 'production', this worker serves 'staging'"


# -- arguments ----------------------------------------------------------------------


def test_rollback_zero_steps_is_bad_input():
    command = make("rollback", {"steps": 0}).signed(KEY)

    with pytest.raises(BadInput) as caught:
        check(command)

    assert type(caught.value) is BadInput  # the signature held; only the arguments are wrong
    assert caught.value.message.startswith("invalid arguments for rollback: steps:")
    assert "greater than or equal to 1" in caught.value.message
    assert caught.value.exit_code == 2


def test_rollback_with_steps_and_to_is_bad_input():
    command = make("rollback", {"steps": 1, "to": "009"})

    with pytest.raises(BadInput) as caught:
        command.parsed_args()

    assert caught.value.message == (
        "invalid arguments for rollback: args: give either a number of steps or a target revision (--to REV|base)"
    )


def test_rollback_with_neither_steps_nor_to_is_bad_input():
    with pytest.raises(BadInput, match="give either a number of steps or a target revision"):
        make("rollback", {}).parsed_args()


def test_migrate_with_unknown_argument_is_bad_input():
    command = make("migrate", {"dry_run": True, "force": True}).signed(KEY)

    with pytest.raises(BadInput) as caught:
        check(command)

    assert caught.value.message == "invalid arguments for migrate: force: Extra inputs are not permitted"


def test_valid_rollback_arguments_parse():
    assert make("rollback", {"steps": 2}).parsed_args() == RollbackArgs(steps=2)
    assert make("rollback", {"to": "base"}).parsed_args() == RollbackArgs(to="base")


# -- messages -------------------------------------------------------------------------


def test_round_trip_keeps_the_signature_valid(signed):
    message = signed.to_message()
    # what travels through the broker is JSON
    decoded = Command.from_message(json.loads(json.dumps(message)))

    assert decoded == signed
    assert decoded.signature == signed.signature
    assert decoded.canonical() == signed.canonical()
    assert check(decoded) is None


def test_message_has_the_contract_fields(signed):
    message = signed.to_message()

    assert set(message) == {"id", "type", "db", "args", "actor", "ticket", "issued_at", "signature"}
    assert message["type"] == "migrate"
    assert message["issued_at"] == "2025-03-14T11:59:50Z"


@pytest.mark.parametrize(
    "garbage",
    [
        "garbage",
        None,
        42,
        [],
        {},
        {"type": "drop-everything", "db": "production", "actor": "x"},
        {"type": "status", "db": "production", "actor": "x", "evil": 1},
        {"type": "status", "db": "production", "actor": "x", "issued_at": "yesterday"},
    ],
)
def test_from_message_of_garbage_is_rejected(garbage):
    with pytest.raises(CommandRejected) as caught:
        Command.from_message(garbage)

    assert caught.value.message.startswith("malformed command: ")
    assert caught.value.exit_code == 2


def test_canonical_is_stable_and_sorted():
    a = make(args={"to": "009", "dry_run": True, "no_backup": False})
    b = make(args={"no_backup": False, "dry_run": True, "to": "009"})

    assert a.canonical() == a.canonical()
    assert a.canonical() == b.canonical()
    assert a.signed(KEY).signature == b.signed(KEY).signature

    body = json.loads(a.canonical())
    assert list(body) == sorted(body)
    assert list(body["args"]) == sorted(body["args"])
    assert "signature" not in body
    assert a.canonical() == (
        b'{"actor":"deploy-bot","args":{"dry_run":true,"no_backup":false,"to":"009"},'
        b'"db":"production","id":"0b7a3c8e-1111-4222-8333-944445555666",'
        b'"issued_at":"2025-03-14T11:59:50Z","ticket":"CHG-42","type":"migrate"}'
    )


def test_canonical_ignores_the_signature(signed):
    assert signed.canonical() == signed.model_copy(update={"signature": "x"}).canonical()


# -- expiry: waiting in the queue is not staleness -------------------------------


def test_a_signed_expiry_outlives_max_command_age():
    waited = make(issued_at=NOW - timedelta(hours=5)).expiring_in(24 * 3600).signed(KEY)

    assert check(waited) is None  # five hours behind a long backup: still runs


def test_past_its_signed_expiry_a_command_is_rejected_naming_it():
    expired = make(issued_at=NOW - timedelta(hours=25)).expiring_in(24 * 3600).signed(KEY)

    with pytest.raises(CommandRejected) as caught:
        check(expired)

    assert "expired at 2025-03-14T11:00:00+00:00" in caught.value.message


def test_the_expiry_is_signed():
    signed = make().expiring_in(60).signed(KEY)
    stretched = signed.model_copy(update={"expires_at": NOW + timedelta(days=2)})

    with pytest.raises(CommandRejected, match="signature"):
        check(stretched)


def test_an_expiry_beyond_the_longest_allowed_is_refused():
    forever = make().expiring_in(30 * 24 * 3600).signed(KEY)

    with pytest.raises(CommandRejected, match="the limit is 604800s"):
        check(forever)


def test_a_command_without_expiry_signs_and_travels_as_before():
    unsigned = make()
    body = json.loads(unsigned.canonical())
    assert "expires_at" not in body and "expires_at" not in unsigned.to_message()
    with_expiry = unsigned.expiring_in(60)
    assert json.loads(with_expiry.canonical())["expires_at"] == "2025-03-14T12:00:50Z"
    assert with_expiry.to_message()["expires_at"] == "2025-03-14T12:00:50Z"
    assert Command.from_message(with_expiry.signed(KEY).to_message()).expires_at == with_expiry.expires_at


def test_default_expiries_give_writers_a_day_and_reads_an_hour():
    from dbagent.core.commands import default_ttl_s

    assert default_ttl_s(CommandType.MIGRATE, {}) == 24 * 3600
    assert default_ttl_s(CommandType.BACKUP, {}) == 24 * 3600
    assert default_ttl_s(CommandType.STATUS, {}) == 3600
    assert default_ttl_s(CommandType.VERIFY_BACKUP, {}) == 3600


def test_expiry_falls_back_to_max_age_for_a_producer_that_sets_none():
    old_style = make()
    assert old_style.expiry(MAX_AGE_S) == old_style.issued_at + timedelta(seconds=MAX_AGE_S)


# -- bounded, strictly typed input ----------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "args", "reason"),
    [
        ("rollback", {"steps": True}, "steps: Input should be a valid integer"),
        ("rollback", {"steps": "2"}, "steps: Input should be a valid integer"),
        ("rollback", {"steps": 2.0}, "steps: Input should be a valid integer"),
        ("rollback", {"steps": 10_001}, "steps: Input should be less than or equal to 10000"),
        ("rollback", {"to": "008\n2025-01-01 INFO forged"}, "to: must not contain control characters"),
        ("rollback", {"to": "x" * 201}, "to: String should have at most 200 characters"),
        ("migrate", {"dry_run": "yes"}, "dry_run: Input should be a valid boolean"),
        ("migrate", {"allow": ["lock-timeout"] * 101}, "allow: List should have at most 100 items"),
        ("history", {"limit": "50"}, "limit: Input should be a valid integer"),
        ("restore", {"path": "/b/" + "x" * 4096}, "path: String should have at most 4096 characters"),
        ("restore", {"path": "/b/\x1b[2Jfull.dump"}, "path: must not contain control characters"),
        ("verify_backup", {"path": "x" * 4097}, "path: String should have at most 4096 characters"),
        ("verify", {"expect": "011\r"}, "expect: must not contain control characters"),
    ],
)
def test_loosely_typed_or_unbounded_arguments_are_bad_input(type_, args, reason):
    with pytest.raises(BadInput) as caught:
        make(type_, args).parsed_args()
    assert reason in caught.value.message


def test_a_worker_rejects_a_signed_command_with_a_true_for_steps():
    with pytest.raises(BadInput, match="steps: Input should be a valid integer"):
        check(make("rollback", {"steps": True}).signed(KEY))


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("actor", "ci\n2025-01-01 12:00:00 INFO queued rollback", "must not contain control characters"),
        ("actor", "ci\x1b[2K", "must not contain control characters"),
        ("actor", "ci\u202eevil", "must not contain control characters"),
        ("actor", "x" * 201, "at most 200 characters"),
        ("ticket", "CHG-1\r\nforged", "must not contain control characters"),
        ("ticket", "x" * 201, "at most 200 characters"),
    ],
)
def test_actor_and_ticket_are_bounded_single_lines(field, value, reason):
    with pytest.raises(ValueError, match=reason):
        make(**{field: value})
    with pytest.raises(BadInput, match=reason):
        client_command("status", db="production", args={}, **{"actor": "ci", "ticket": None, field: value})


def test_a_client_may_not_set_the_agents_cause():
    cause = {"event_id": "1-0", "run_command_id": "abc", "expect_revision": "011"}
    with pytest.raises(BadInput, match="cause: only the agent sets it"):
        client_command("rollback", db="production", args={"to": "base", "cause": cause}, actor="ci", ticket=None)


def test_the_agents_own_rollback_with_a_cause_is_accepted_by_the_worker():
    # what dbagent.reactor.daemon queues for a failed migration (RollbackPlan.args())
    args = {"to": "010", "cause": {"event_id": "1-0", "event_type": "migration.failed", "run_command_id": "abc",
                                   "revision_before": "010", "expect_revision": "011", "backup": None}}
    command = make("rollback", args, actor="dbagent-agent", ticket=None).signed(KEY)

    assert check(command) is None
    assert command.parsed_args() == RollbackArgs(to="010", cause=args["cause"])


def test_client_command_builds_what_the_worker_accepts():
    command = client_command("rollback", db="production", args={"steps": 2}, actor="ci for alice", ticket="CHG-7")

    assert (command.type, command.args, command.actor, command.ticket) == (CommandType.ROLLBACK, {"steps": 2}, "ci for alice", "CHG-7")
    assert check(command.model_copy(update={"issued_at": NOW}).signed(KEY)) is None


def test_client_command_of_an_unknown_type_names_the_known_ones():
    with pytest.raises(BadInput, match=r"unknown command type 'drop' \(known: status, migrate"):
        client_command("drop", db="production", args={}, actor="ci", ticket=None)


def test_the_bounds_do_not_change_the_canonical_form():
    # The same bytes as before the bounds: signatures made by older producers still verify.
    command = make("rollback", {"steps": 2}, ticket=None)
    assert command.canonical() == (
        b'{"actor":"deploy-bot","args":{"steps":2},"db":"production","id":"0b7a3c8e-1111-4222-8333-944445555666",'
        b'"issued_at":"2025-03-14T11:59:50Z","ticket":null,"type":"rollback"}'
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [("x" * 11, "is 11 characters long, the limit is 10"), ("a\nb", "must not contain control characters")],
)
def test_check_client_text(value, reason):
    with pytest.raises(BadInput, match=reason):
        check_client_text("--ticket", value, 10)
    assert check_client_text("--ticket", "x" * 10, 10) is None
    assert check_client_text("--ticket", None, 10) is None


def test_check_client_text_with_lines_allows_newlines_and_tabs_only():
    assert check_client_text("--detail", "boom\n\tat main()", 100, lines=True) is None
    with pytest.raises(BadInput, match="other than newlines and tabs"):
        check_client_text("--detail", "boom\x1b[2J", 100, lines=True)


# -- the CLI refuses them too, before it connects to anything (exit 2) -------------------------------


@pytest.fixture
def cli_config(tmp_path):
    path = tmp_path / "dbagent.toml"
    # Nothing listens on port 1: a CLI that got as far as connecting would exit 3, not 2.
    path.write_text('[redis]\nurl = "redis://127.0.0.1:1/0"\n[databases.test]\nurl = "postgresql://u@127.0.0.1:1/x"\n')
    return path


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["rollback", "²"], "N must be a whole number of steps, 1 or more (got '²')"),
        (["rollback", "9" * 5000], "N must be a whole number of steps"),
        (["rollback", "20000"], "steps: Input should be less than or equal to 10000"),
        (["status", "--actor", "ci\n2025-01-01 INFO forged"], "actor: must not contain control characters"),
        (["status", "--ticket", "\x1b[2J"], "ticket: must not contain control characters"),
        (["status", "--ticket", "x" * 201], "ticket: String should have at most 200 characters"),
        (["restore", "/b/" + "x" * 5000, "--yes"], "restore FILE is 5003 characters long, the limit is 4096"),
        (["backups", "verify", "/b/\x1b]0;x\x07"], "backups verify FILE must not contain control characters"),
        (["notify", "startup-failed", "--actor", "a\rb"], "--actor must not contain control characters"),
        (["notify", "startup-failed", "--detail", "x" * 4001], "--detail is 4001 characters long, the limit is 4000"),
        (["notify", "startup-failed", "--detail", "boom\x1b[2J"], "--detail must not contain control characters other than"),
    ],
)
def test_the_cli_refuses_bad_input_with_exit_2(cli_config, args, says):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBAGENT_")}
    done = subprocess.run([sys.executable, "-m", "dbagent.interfaces.cli", "--config", str(cli_config), *args],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)

    assert done.returncode == 2, done.stderr
    assert says in " ".join(done.stderr.split()), done.stderr
    assert "Traceback" not in done.stderr
