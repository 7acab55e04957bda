"""agent/checks/lint.py: the lint of risky migration SQL, on literal SQL and on the shipped migrations."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dbagent.checks.lint import (
    HAZARD_RULES,
    RULES,
    STATEMENT_MAX_CHARS,
    disabled_rules,
    lint_migrations,
    lint_sql,
    report,
)
from dbagent.core.findings import Finding, Severity, status_of

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def lint(sql: str, **kwargs) -> list[Finding]:
    return lint_sql(sql, revision="012", **kwargs)


def rules(findings: list[Finding]) -> list[str]:
    return [f.rule for f in findings]


# One risky case and its safe twin per rule: (rule, risky SQL, safe SQL, lint_sql keyword arguments).
RULE_TABLE = [
    (
        "drop-column",
        "ALTER TABLE users DROP COLUMN phone",
        "CREATE TABLE imports (id int, scratch text); ALTER TABLE imports DROP COLUMN scratch",
        {},
    ),
    (
        "drop-table",
        "DROP TABLE legacy_sessions",
        "CREATE TABLE scratch (id int); DROP TABLE scratch",
        {},
    ),
    (
        "rename-column",
        "ALTER TABLE users RENAME COLUMN phone TO phone_number",
        "ALTER TABLE users ADD COLUMN phone_number text",
        {},
    ),
    (
        "rename-table",
        "ALTER TABLE users RENAME TO accounts",
        "CREATE TABLE accounts_new (id int); ALTER TABLE accounts_new RENAME TO accounts",
        {},
    ),
    (
        "change-column-type",
        "ALTER TABLE users ALTER COLUMN age TYPE bigint",
        "ALTER TABLE users ADD COLUMN age_big bigint",
        {},
    ),
    (
        "set-not-null",
        "ALTER TABLE users ALTER COLUMN email SET NOT NULL",
        "ALTER TABLE users ADD CONSTRAINT users_email_nn CHECK (email IS NOT NULL) NOT VALID;"
        " ALTER TABLE users VALIDATE CONSTRAINT users_email_nn;"
        " ALTER TABLE users ALTER COLUMN email SET NOT NULL;"
        " ALTER TABLE users DROP CONSTRAINT users_email_nn",
        {},
    ),
    (
        "add-not-null-without-default",
        "ALTER TABLE users ADD COLUMN tier text NOT NULL",
        "ALTER TABLE users ADD COLUMN tier text NOT NULL DEFAULT 'free'",
        {},
    ),
    (
        "volatile-default",
        "ALTER TABLE users ADD COLUMN token uuid DEFAULT gen_random_uuid()",
        "ALTER TABLE users ADD COLUMN joined_at timestamptz DEFAULT now()",
        {},
    ),
    (
        "index-not-concurrently",
        "CREATE INDEX ix_users_email ON users (email)",
        "CREATE INDEX CONCURRENTLY ix_users_email ON users (email)",
        {},
    ),
    (
        "index-not-concurrently",
        "DROP INDEX ix_users_email",
        "DROP INDEX CONCURRENTLY ix_users_email",
        {},
    ),
    (
        "concurrently-in-transaction",
        "BEGIN; CREATE INDEX CONCURRENTLY ix_users_email ON users (email); COMMIT;",
        "BEGIN; COMMIT; CREATE INDEX CONCURRENTLY ix_users_email ON users (email); BEGIN; COMMIT;",
        {},
    ),
    (
        "constraint-not-valid",
        "ALTER TABLE orders ADD CONSTRAINT fk_orders_user FOREIGN KEY (user_id) REFERENCES users (id)",
        "ALTER TABLE orders ADD CONSTRAINT fk_orders_user FOREIGN KEY (user_id) REFERENCES users (id)"
        " NOT VALID; ALTER TABLE orders VALIDATE CONSTRAINT fk_orders_user",
        {},
    ),
    (
        "constraint-not-valid",
        "ALTER TABLE orders ADD CONSTRAINT ck_orders_total CHECK (total >= 0)",
        "ALTER TABLE orders ADD CONSTRAINT ck_orders_total CHECK (total >= 0) NOT VALID;"
        " ALTER TABLE orders VALIDATE CONSTRAINT ck_orders_total",
        {},
    ),
    (
        "unique-without-index",
        "ALTER TABLE users ADD CONSTRAINT uq_users_email UNIQUE (email)",
        "CREATE UNIQUE INDEX CONCURRENTLY uq_users_email_idx ON users (email);"
        " ALTER TABLE users ADD CONSTRAINT uq_users_email UNIQUE USING INDEX uq_users_email_idx",
        {},
    ),
    (
        "truncate",
        "TRUNCATE user_sessions",
        "CREATE TABLE staging (id int); TRUNCATE staging",
        {},
    ),
    (
        "data-change",
        "UPDATE users SET status = 'active' WHERE status IS NULL",
        "UPDATE alembic_version SET version_num='012' WHERE alembic_version.version_num = '011'",
        {},
    ),
    (
        "missing-lock-timeout",
        "BEGIN; ALTER TABLE users ADD COLUMN nickname text; COMMIT;",
        "BEGIN; SET LOCAL lock_timeout = '5s'; ALTER TABLE users ADD COLUMN nickname text; COMMIT;",
        {"runner_sets_lock_timeout": False},
    ),
]


@pytest.mark.parametrize(
    ("rule", "risky", "safe", "kwargs"), RULE_TABLE, ids=[f"{r[0]}-{i}" for i, r in enumerate(RULE_TABLE)]
)
def test_rule_fires_on_the_risky_case_and_not_on_its_safe_twin(rule, risky, safe, kwargs):
    assert rules(lint(risky, **kwargs)) == [rule]
    assert lint(safe, **kwargs) == []


def test_the_rule_table_covers_every_hazard_rule():
    assert {row[0] for row in RULE_TABLE} == set(HAZARD_RULES)


def test_every_rule_says_why_and_how_and_only_data_change_is_a_warning():
    for name in HAZARD_RULES:
        rule = RULES[name]
        assert rule.why and rule.fix, name
        expected = Severity.WARNING if name == "data-change" else Severity.ERROR
        assert rule.severity == expected, name


def test_a_finding_explains_the_hazard_and_the_recipe():
    (finding,) = lint("ALTER TABLE users RENAME COLUMN phone TO phone_number")

    assert finding.revision == "012"
    assert finding.severity == Severity.ERROR
    assert "users.phone" in finding.message and "deploy" in finding.message
    assert "add the new column" in finding.fix and "backfill" in finding.fix
    assert finding.statement == "ALTER TABLE users RENAME COLUMN phone TO phone_number"


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO roles (name) VALUES ('admin')",
        "DELETE FROM sessions WHERE expires_at < now()",
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
        "WITH gone AS (DELETE FROM sessions RETURNING id) SELECT count(*) FROM gone",
    ],
)
def test_every_kind_of_data_change_is_a_warning(sql):
    findings = lint(sql)

    assert rules(findings) == ["data-change"]
    assert findings[0].severity == Severity.WARNING
    assert status_of(findings) == "passed"


@pytest.mark.parametrize(
    "column",
    [
        "token uuid DEFAULT uuid_generate_v4()",
        "jitter float8 DEFAULT random()",
        "seen_at timestamptz DEFAULT clock_timestamp()",
        "n bigint DEFAULT nextval('users_n_seq')",
        "score int DEFAULT my_score(1)",
        "seq bigserial",
        "seq bigint GENERATED ALWAYS AS IDENTITY",
        "total int GENERATED ALWAYS AS (a + b) STORED",
        "label text DEFAULT lower(md5(random()::text))",
    ],
)
def test_volatile_defaults_rewrite_the_table(column):
    assert rules(lint(f"ALTER TABLE users ADD COLUMN {column}")) == ["volatile-default"]


@pytest.mark.parametrize(
    "column",
    [
        "status text DEFAULT 'active' NOT NULL",
        "n int DEFAULT 0 NOT NULL",
        "created_at timestamptz DEFAULT CURRENT_TIMESTAMP NOT NULL",
        "day date DEFAULT CURRENT_DATE",
        "settings jsonb DEFAULT '{}'::jsonb NOT NULL",
        "tags text[] DEFAULT ARRAY[]::text[]",
        "at timestamptz DEFAULT pg_catalog.now()",
        "note text",
    ],
)
def test_constant_and_stable_defaults_are_instant(column):
    assert lint(f"ALTER TABLE users ADD COLUMN {column}") == []


def test_inline_constraints_of_a_new_column_on_an_existing_table():
    findings = lint("ALTER TABLE orders ADD COLUMN coupon_id int REFERENCES coupons (id) UNIQUE")

    assert sorted(rules(findings)) == ["constraint-not-valid", "unique-without-index"]


def test_objects_created_earlier_in_the_migration_are_exempt():
    body = (
        "ALTER TABLE invoices ADD COLUMN total numeric NOT NULL;"
        " ALTER TABLE invoices ADD COLUMN ref uuid DEFAULT gen_random_uuid();"
        " ALTER TABLE invoices ALTER COLUMN user_id SET NOT NULL;"
        " ALTER TABLE invoices ALTER COLUMN number TYPE bigint;"
        " ALTER TABLE invoices ADD CONSTRAINT fk_invoices_user FOREIGN KEY (user_id) REFERENCES users (id);"
        " ALTER TABLE invoices ADD CONSTRAINT ck_invoices_total CHECK (total >= 0);"
        " ALTER TABLE invoices ADD CONSTRAINT uq_invoices_number UNIQUE (number);"
        " CREATE INDEX ix_invoices_user_id ON invoices (user_id);"
        " DROP INDEX ix_invoices_user_id;"
        " ALTER TABLE invoices RENAME COLUMN number TO invoice_number;"
        " ALTER TABLE invoices DROP COLUMN invoice_number;"
        " TRUNCATE invoices;"
    )
    created = "BEGIN; CREATE TABLE invoices (id int, user_id uuid, number int); " + body + " COMMIT;"

    assert lint(created, runner_sets_lock_timeout=False) == []
    # The same statements on a table that already exists: every one of them is a finding.
    existing = rules(lint("BEGIN; " + body + " COMMIT;"))
    assert sorted(set(existing)) == sorted(
        {
            "add-not-null-without-default",
            "volatile-default",
            "set-not-null",
            "change-column-type",
            "constraint-not-valid",
            "unique-without-index",
            "index-not-concurrently",
            "rename-column",
            "drop-column",
            "truncate",
        }
    )
    assert len(existing) == 12


def test_a_renamed_new_table_stays_exempt_and_a_dropped_one_is_forgotten():
    sql = (
        "CREATE TABLE tmp_accounts (id int); ALTER TABLE tmp_accounts RENAME TO accounts;"
        " CREATE INDEX ix_accounts_id ON accounts (id);"
        " DROP TABLE accounts; CREATE INDEX ix_accounts_again ON accounts (id)"
    )

    findings = lint(sql)

    assert rules(findings) == ["index-not-concurrently"]
    assert "ix_accounts_again" in findings[0].statement


def test_create_table_if_not_exists_may_find_a_full_table():
    sql = "CREATE TABLE IF NOT EXISTS users (id int); CREATE INDEX ix_users_id ON users (id)"

    assert rules(lint(sql)) == ["index-not-concurrently"]


def test_schema_qualified_names_match_their_unqualified_spelling():
    sql = (
        "CREATE TABLE public.events (id int); CREATE INDEX ix_events_id ON events (id);"
        " DROP TABLE public.events"
    )
    other_schema = "CREATE TABLE audit.events (id int); CREATE INDEX ix ON events (id)"

    assert lint(sql) == []
    assert rules(lint(other_schema)) == ["index-not-concurrently"]


def test_concurrently_is_fine_even_on_a_new_table_only_outside_a_transaction():
    sql = "BEGIN; CREATE TABLE t (id int); CREATE INDEX CONCURRENTLY ix_t ON t (id); COMMIT;"

    assert rules(lint(sql)) == ["concurrently-in-transaction"]
    assert rules(lint("BEGIN; DROP INDEX CONCURRENTLY ix_t; COMMIT;")) == ["concurrently-in-transaction"]
    assert rules(lint("BEGIN; REINDEX INDEX CONCURRENTLY ix_t; COMMIT;")) == ["concurrently-in-transaction"]


def test_alembic_autocommit_block_is_outside_the_transaction():
    # What Alembic renders offline for 008's `with op.get_context().autocommit_block()`.
    sql = """BEGIN;

-- Running upgrade 007 -> 008

ALTER TABLE user_sessions ADD COLUMN revoked_at TIMESTAMP WITH TIME ZONE;

COMMIT;

CREATE INDEX CONCURRENTLY ix_user_sessions_user_id ON user_sessions (user_id);

BEGIN;

UPDATE alembic_version SET version_num='008' WHERE alembic_version.version_num = '007';

COMMIT;
"""
    assert lint(sql) == []


def test_alembic_bookkeeping_is_never_a_finding():
    sql = """BEGIN;
CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
INSERT INTO alembic_version (version_num) VALUES ('001') RETURNING alembic_version.version_num;
UPDATE alembic_version SET version_num='002' WHERE alembic_version.version_num = '001';
DELETE FROM alembic_version WHERE alembic_version.version_num = '002';
DROP TABLE alembic_version;
COMMIT;
"""
    assert lint(sql, runner_sets_lock_timeout=False) == []


def test_missing_lock_timeout_only_when_the_runner_sets_none():
    sql = "BEGIN; ALTER TABLE users DROP COLUMN phone; ALTER TABLE users RENAME COLUMN a TO b; COMMIT;"

    assert rules(lint(sql)) == ["drop-column", "rename-column"]
    # Reported once per migration, at the first statement that needs the lock.
    findings = lint(sql, runner_sets_lock_timeout=False)
    assert rules(findings) == ["drop-column", "missing-lock-timeout", "rename-column"]
    assert "DROP COLUMN" in findings[1].statement


@pytest.mark.parametrize(
    "setting",
    ["SET lock_timeout = '5s';", "SET lock_timeout TO 5000;", "BEGIN; SET LOCAL lock_timeout = '2s';"],
)
def test_a_lock_timeout_set_before_the_lock_satisfies_the_rule(setting):
    assert lint(f"{setting} ALTER TABLE users ADD COLUMN note text", runner_sets_lock_timeout=False) == []


@pytest.mark.parametrize(
    "sql",
    [
        "SET lock_timeout = 0; ALTER TABLE users ADD COLUMN note text",
        "SET lock_timeout = '5s'; RESET lock_timeout; ALTER TABLE users ADD COLUMN note text",
        "BEGIN; SET LOCAL lock_timeout = '5s'; COMMIT; BEGIN; ALTER TABLE users ADD COLUMN note text; COMMIT;",
        "ALTER TABLE users ADD COLUMN note text; SET lock_timeout = '5s'",
        "LOCK TABLE users; SET lock_timeout = '5s'",
    ],
)
def test_a_lock_timeout_that_is_off_expired_or_late_does_not(sql):
    assert rules(lint(sql, runner_sets_lock_timeout=False)) == ["missing-lock-timeout"]


def test_weaker_locks_need_no_lock_timeout():
    sql = (
        "ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID;"
        " ALTER TABLE orders VALIDATE CONSTRAINT fk;"
        " CREATE INDEX CONCURRENTLY ix_orders_user_id ON orders (user_id)"
    )
    assert lint(sql, runner_sets_lock_timeout=False) == []


def test_set_not_null_needs_the_check_validated_not_just_added():
    sql = (
        "ALTER TABLE users ADD CONSTRAINT users_email_nn CHECK (email IS NOT NULL) NOT VALID;"
        " ALTER TABLE users ALTER COLUMN email SET NOT NULL"
    )
    assert rules(lint(sql)) == ["set-not-null"]
    other_column = (
        "ALTER TABLE users ADD CONSTRAINT users_email_nn CHECK (email IS NOT NULL) NOT VALID;"
        " ALTER TABLE users VALIDATE CONSTRAINT users_email_nn;"
        " ALTER TABLE users ALTER COLUMN phone SET NOT NULL"
    )
    assert rules(lint(other_column)) == ["set-not-null"]


def test_statement_text_is_the_statement_alone_and_trimmed():
    long_insert = "INSERT INTO t (v) VALUES " + ", ".join(f"('{i:04d}')" for i in range(200))
    sql = f"-- Running upgrade 011 -> 012\n\nDROP TABLE old_t;\n\n-- seed\n{long_insert};\n"

    drop, insert = lint(sql)

    assert drop.statement == "DROP TABLE old_t"
    assert insert.statement.startswith("INSERT INTO t (v) VALUES ('0000')")
    assert len(insert.statement) == STATEMENT_MAX_CHARS and insert.statement.endswith("…")


def test_sql_that_does_not_parse_is_one_error():
    findings = lint("ALTER TABLE users DROP COLUMN phone; ALTER TABEL users ADD COLUMN x int")

    assert rules(findings) == ["parse-error"]
    assert findings[0].severity == Severity.ERROR


# -- allow directives ---------------------------------------------------------


def test_disabled_rules_reads_directives_with_their_reasons():
    source = '''"""A migration."""
from alembic import op

# dbagent: allow drop-column -- phone is unused since release 41 (ticket OPS-12)
# dbagent: allow rename-table, truncate -- staging table, no readers


def upgrade() -> None:
    op.drop_column("users", "phone")  # dbagent: allow data-change   --  one-row seed
    op.execute("SELECT '# dbagent: allow drop-table -- in a string, not a comment'")
'''
    assert disabled_rules(source) == {
        "drop-column": "phone is unused since release 41 (ticket OPS-12)",
        "rename-table": "staging table, no readers",
        "truncate": "staging table, no readers",
        "data-change": "one-row seed",
    }


def test_a_directive_without_reason_maps_to_an_empty_reason():
    assert disabled_rules("# dbagent: allow drop-column\n# dbagent: allow truncate --   \n") == {
        "drop-column": "",
        "truncate": "",
    }


def test_an_allowed_rule_with_a_reason_produces_no_finding():
    sql = "ALTER TABLE users DROP COLUMN phone; TRUNCATE sessions"

    findings = lint(sql, disabled={"drop-column": "unused since release 41"})

    assert rules(findings) == ["truncate"]


def test_an_allow_without_reason_is_itself_an_error_and_switches_nothing_off():
    sql = "ALTER TABLE users DROP COLUMN phone"

    findings = lint(sql, disabled=disabled_rules("# dbagent: allow drop-column\n"))

    assert rules(findings) == ["allow-without-reason", "drop-column"]
    assert findings[0].severity == Severity.ERROR
    assert "drop-column" in findings[0].message


def test_an_allow_of_an_unknown_rule_is_an_error():
    findings = lint("SELECT 1", disabled={"drop-colum": "typo"})

    assert rules(findings) == ["allow-unknown-rule"]
    assert "drop-colum" in findings[0].message


# -- JSON and validate's shape ------------------------------------------------------


def test_report_json_shape():
    findings = lint("DROP TABLE legacy; INSERT INTO roles (name) VALUES ('x')")

    body = report(findings)

    assert set(body) == {"status", "findings"}
    assert body["status"] == "failed"
    assert [f["rule"] for f in body["findings"]] == ["drop-table", "data-change"]
    for entry in body["findings"]:
        assert {"revision", "rule", "severity", "message", "statement", "fix"} <= set(entry)
        assert entry["revision"] == "012"
    assert [f["severity"] for f in body["findings"]] == ["error", "warning"]
    assert report([])["status"] == "passed"


def test_a_lint_finding_is_the_one_finding_type_with_its_statement_and_fix():
    (lint_finding,) = lint("TRUNCATE sessions", file="012_x.py")

    assert isinstance(lint_finding, Finding)
    assert (lint_finding.revision, lint_finding.rule, lint_finding.severity, lint_finding.file) == (
        "012",
        "truncate",
        Severity.ERROR,
        "012_x.py",
    )
    assert lint_finding.statement == "TRUNCATE sessions" and lint_finding.fix
    assert Finding.from_json(lint_finding.to_json()) == lint_finding


# -- the shipped migrations -----------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_findings() -> list[Finding]:
    return lint_migrations(MIGRATIONS)


def test_the_shipped_migrations_have_no_errors(shipped_findings):
    assert [f for f in shipped_findings if f.severity == Severity.ERROR] == []
    assert status_of(shipped_findings) == "passed"


def test_the_shipped_migrations_warn_only_about_the_data_inserted_by_011(shipped_findings):
    assert [(f.revision, f.rule, f.file) for f in shipped_findings] == [
        ("011", "data-change", "011_add_admin_wildcard_permission.py")
    ] * 3
    assert [f.statement.split(" (")[0] for f in shipped_findings] == [
        "INSERT INTO roles",
        "INSERT INTO permissions",
        "INSERT INTO role_permissions",
    ]


NEW_MIGRATION = '''"""Drop the phone column and empty the sessions.

Revision ID: 012
Revises: 011
"""

from alembic import op

revision = "012"
down_revision = "011"
branch_labels = None
depends_on = None

# dbagent: allow drop-column -- phone has been unused since release 41 (OPS-12)


def upgrade() -> None:
    op.drop_column("users", "phone")
    op.execute("TRUNCATE user_sessions")


def downgrade() -> None:
    op.execute("ALTER TABLE users ADD COLUMN phone TEXT")
'''


def test_lint_migrations_renders_each_upgrade_and_honours_its_directives(tmp_path):
    location = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, location, ignore=shutil.ignore_patterns("__pycache__"))
    (location / "versions" / "012_drop_phone.py").write_text(NEW_MIGRATION, encoding="utf-8")

    findings = [f for f in lint_migrations(location) if f.revision == "012"]

    assert [(f.rule, f.file, f.statement) for f in findings] == [
        ("truncate", "012_drop_phone.py", "TRUNCATE user_sessions")
    ]


def test_a_script_that_controls_its_own_transaction_is_found_in_its_source():
    from dbagent.checks.lint import transaction_control

    source = '''
from alembic import op
import sqlalchemy as sa


def upgrade():
    op.execute("CREATE TABLE a (id int)")
    op.execute("COMMIT")
    op.execute(sa.text("begin"))
    op.get_bind().commit()
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY ix ON a (id)")
    op.execute("SELECT 'COMMIT'")


def downgrade():
    op.execute("ROLLBACK")
'''
    assert transaction_control(source) == [(8, "COMMIT"), (9, "BEGIN"), (10, "commit()"), (17, "ROLLBACK")]
    assert transaction_control("def upgrade():\n    op.execute('SELECT 1')\n") == []


def test_the_lint_renders_a_chain_in_one_offline_run_with_the_same_findings(tmp_path):
    # `dbagent validate` of many revisions: one run of env.py for the chain, as `alembic upgrade head --sql`,
    # not one per revision; each revision's SQL as rendered on its own.
    from dbagent.postgres.migrator import Migrator

    location = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, location, ignore=shutil.ignore_patterns("__pycache__"))
    runs = tmp_path / "offline-runs"
    env_py = location / "env.py"
    text = env_py.read_text()
    counted = text.replace("def run_migrations_offline() -> None:\n",
                           f"def run_migrations_offline() -> None:\n    open({str(runs)!r}, 'a').write('run\\n')\n", 1)
    assert counted != text
    env_py.write_text(counted)

    one_pass = lint_migrations(location)
    assert runs.read_text().count("run") == 2  # the environment read once (its version table), the chain once
    runs.unlink()
    step_by_step = lint_migrations(location, render=Migrator(str(location), "postgresql://lint@localhost/lint").offline_sql)
    assert runs.read_text().count("run") == 1 + 11  # the environment, then each of the 11 revisions
    assert one_pass == step_by_step and one_pass


def test_a_script_that_breaks_the_one_pass_is_still_named(tmp_path):
    location = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, location, ignore=shutil.ignore_patterns("__pycache__"))
    path = next((location / "versions").glob("005_*.py"))
    source = path.read_text()
    path.write_text(source.replace("def upgrade() -> None:\n", "def upgrade() -> None:\n    raise RuntimeError('boom')\n", 1))

    findings = lint_migrations(location)

    assert [(f.revision, f.rule) for f in findings if f.rule == "render-failed"] == [("005", "render-failed")]
    assert {f.revision for f in findings} - {"005"}  # the others are linted still
