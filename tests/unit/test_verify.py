"""agent/postgres/verify.py without a server: SQL building, result interpretation, check isolation."""

from __future__ import annotations

import psycopg.errors
import pytest
import sqlalchemy.exc

from dbagent.core.errors import error_text
from dbagent.postgres.verify import (
    CHECK_NAMES,
    NO_ORPHANS,
    NO_RUN,
    ORPHANS,
    TIMED_OUT,
    Baseline,
    Check,
    ForeignKey,
    critical_tables_check,
    fk_orphans_check,
    foreign_keys_to_scan,
    health_checks_check,
    health_problem,
    is_timeout,
    not_valid_check,
    run_checks,
    summary,
    touched_tables,
)
from dbagent.settings import DatabaseSettings, Settings

ORDERS_FK = ForeignKey(
    name="public.orders.fk_orders_user_id_users",
    child=("public", "orders"),
    child_columns=("user_id",),
    parent=("public", "users"),
    parent_columns=("id",),
)

GRANTS_FK = ForeignKey(
    name='public."GrantLog"."fk_GrantLog_user_roles"',
    child=("public", "GrantLog"),
    child_columns=("user_id", "Role Id"),
    parent=("public", "user_roles"),
    parent_columns=("user_id", "role_id"),
    child_label='public."GrantLog"',
    parent_label="public.user_roles",
)


# -- orphan scans: SQL ----------------------------------------------------------


def test_a_single_column_key_scans_non_null_rows_without_a_parent_once():
    assert ORDERS_FK.orphan_query().as_string() == (
        'SELECT 1 FROM ONLY "public"."orders" AS c WHERE c."user_id" IS NOT NULL'
        ' AND NOT EXISTS (SELECT 1 FROM ONLY "public"."users" AS p WHERE p."id" = c."user_id") LIMIT 1'
    )


def test_a_multi_column_key_pairs_its_columns_in_order_and_quotes_every_name():
    assert GRANTS_FK.orphan_query().as_string() == (
        'SELECT 1 FROM ONLY "public"."GrantLog" AS c WHERE c."user_id" IS NOT NULL AND c."Role Id" IS NOT NULL'
        ' AND NOT EXISTS (SELECT 1 FROM ONLY "public"."user_roles" AS p'
        ' WHERE p."user_id" = c."user_id" AND p."role_id" = c."Role Id") LIMIT 1'
    )


def test_match_full_exempts_only_rows_whose_key_is_entirely_null():
    fk = ForeignKey("s.t.fk", ("s", "t"), ("a", "b"), ("s", "u"), ("x", "y"), match_full=True)
    assert 'WHERE NOT (c."a" IS NULL AND c."b" IS NULL) AND NOT EXISTS' in fk.orphan_query().as_string()


def test_partitioned_tables_are_scanned_with_their_partitions():
    fk = ForeignKey("s.t.fk", ("s", "t"), ("a",), ("s", "u"), ("x",), child_partitioned=True, parent_partitioned=True)
    query = fk.orphan_query().as_string()
    assert "ONLY" not in query and 'FROM "s"."t" AS c' in query and 'FROM "s"."u" AS p' in query


def test_identifiers_cannot_break_out_of_their_quotes():
    fk = ForeignKey("x", ("public", 'evil"; DROP TABLE users; --'), ('c"',), ("public", "p"), ("id",))
    query = fk.orphan_query().as_string()
    assert '"evil""; DROP TABLE users; --"' in query and 'c."c"""' in query


def test_a_key_whose_columns_do_not_pair_up_is_refused():
    with pytest.raises(ValueError, match="2 column"):
        ForeignKey("x", ("s", "t"), ("a", "b"), ("s", "u"), ("x",)).orphan_query()


def test_a_key_describes_itself_with_both_ends():
    assert GRANTS_FK.describe() == (
        'public."GrantLog"."fk_GrantLog_user_roles" (public."GrantLog"(user_id, Role Id) → public.user_roles(user_id, role_id))'
    )


# -- which tables the run touched, which keys to scan -----------------------------


def test_touched_tables_are_the_new_and_the_changed_ones():
    before = {"public.users": "a", "public.roles": "b", "public.gone": "c"}
    after = {"public.users": "a", "public.roles": "B", "public.orders": "d"}
    assert touched_tables(before, after) == ["public.orders", "public.roles"]
    assert touched_tables(before, before) == []


def test_keys_on_or_to_a_touched_table_are_scanned():
    other = ForeignKey("public.a.fk", ("public", "a"), ("x",), ("public", "b"), ("id",))
    assert foreign_keys_to_scan([ORDERS_FK, GRANTS_FK, other], ["public.users"]) == [ORDERS_FK]
    assert foreign_keys_to_scan([ORDERS_FK, GRANTS_FK, other], ['public."GrantLog"']) == [GRANTS_FK]
    assert foreign_keys_to_scan([ORDERS_FK, GRANTS_FK, other], []) == []


# -- fk_orphans: interpretation ---------------------------------------------------


def test_fk_orphans_passes_when_nothing_was_touched_or_nothing_to_scan():
    assert fk_orphans_check([], [], 30) == Check("fk_orphans", True, "no table was touched by the run")
    assert fk_orphans_check([], ["public.t"], 30) == Check(
        "fk_orphans", True, "no foreign keys on or to the 1 table the run touched"
    )
    assert fk_orphans_check([(ORDERS_FK, NO_ORPHANS), (GRANTS_FK, NO_ORPHANS)], ["public.users", "public.x"], 30) == Check(
        "fk_orphans", True, "no orphans for the 2 foreign keys on or to the 2 tables the run touched"
    )


def test_fk_orphans_names_the_constraint_with_orphans_and_the_one_over_budget():
    check = fk_orphans_check(
        [(ORDERS_FK, ORPHANS), (GRANTS_FK, TIMED_OUT), (ORDERS_FK, "permission denied for table orders")],
        ["public.users"],
        0.5,
    )
    assert not check.ok
    assert check.detail == (
        "orphan rows for public.orders.fk_orders_user_id_users (public.orders(user_id) → public.users(id)); "
        'could not finish scanning public."GrantLog"."fk_GrantLog_user_roles" within 500ms (fk_check_timeout); '
        "could not scan public.orders.fk_orders_user_id_users: permission denied for table orders"
    )


# -- not_valid_constraints ----------------------------------------------------------


def test_not_valid_constraints_left_by_the_run_fail_the_ones_from_before_do_not():
    baseline = Baseline(not_valid=frozenset({"public.users.ck_old"}))
    assert not_valid_check(["public.users.ck_old", "public.orders.fk_new"], baseline) == Check(
        "not_valid_constraints", False, "left NOT VALID by the run: public.orders.fk_new"
    )
    assert not_valid_check(["public.users.ck_old"], baseline) == Check(
        "not_valid_constraints", True, "no NOT VALID constraint left by the run (1 already NOT VALID before it)"
    )
    assert not_valid_check([], baseline).ok


def test_without_a_run_every_not_valid_constraint_fails():
    assert not_valid_check(["public.b.x", "public.a.y"], None) == Check(
        "not_valid_constraints", False, "NOT VALID constraints: public.a.y, public.b.x"
    )
    assert not_valid_check([], None) == Check("not_valid_constraints", True, "no NOT VALID constraints")


# -- health checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "rows", "problem"),
    [
        (1, [(True,)], None),
        (2, [(True, "extra")], None),
        (1, [(False,)], "returned false"),
        (1, [(None,)], "returned NULL"),
        (1, [], "returned no rows"),
        (1, [(True,), (True,)], "returned more than one row"),
        (0, [()], "returned no columns"),
        (1, [(1,)], "returned 1 (int), not a boolean"),
        (1, [("t",)], "returned 't' (str), not a boolean"),
        (None, [], "returned no result set (it must be a query returning true)"),
    ],
)
def test_a_health_check_passes_only_on_one_row_whose_first_column_is_true(columns, rows, problem):
    assert health_problem(columns, rows) == problem


def test_health_checks_name_each_failing_query_with_its_number_and_problem():
    long_query = "select " + " and ".join(["true"] * 60)
    check = health_checks_check([("select true", None), ("select\n  false", "returned false"), (long_query, "timed out")])
    assert not check.ok and check.name == "health_checks"
    assert check.detail.startswith("2 of 3 failed: [2] select false: returned false; [3] select true and true")
    assert check.detail.endswith("…: timed out") and "[1]" not in check.detail
    assert health_checks_check([("select true", None)]) == Check("health_checks", True, "all 1 returned true")
    assert health_checks_check([]) == Check("health_checks", True, "no health checks configured")


# -- critical tables --------------------------------------------------------------


def test_critical_tables_fail_on_fewer_rows_naming_both_counts():
    check = critical_tables_check(["users", "roles"], {"users": 10, "roles": 3}, {"users": 8, "roles": 3})
    assert check == Check("critical_tables", False, "users lost rows: 10 before the run, 8 after")


def test_critical_tables_pass_when_counts_hold_or_grow_or_the_table_is_new():
    check = critical_tables_check(
        ["users", "roles", "audit"], {"users": 10, "roles": 3, "audit": None}, {"users": 12, "roles": 3, "audit": 1}
    )
    assert check == Check("critical_tables", True, "row counts kept: users 10 → 12, roles 3 → 3, audit new, 1 row")


def test_a_missing_or_uncountable_critical_table_fails():
    timeout = "canceling statement due to statement timeout"
    check = critical_tables_check(
        ["users", "roles", "x"], {"users": 10, "roles": None, "x": 1}, {"users": None, "roles": None, "x": timeout}
    )
    assert check.detail == (
        "users does not exist (it had 10 rows before the run); roles does not exist; "
        "x: could not count its rows: canceling statement due to statement timeout"
    )


def test_without_a_run_critical_tables_only_need_to_exist():
    assert critical_tables_check(["users"], None, {"users": 0}) == Check("critical_tables", True, NO_RUN)
    assert critical_tables_check(["users"], None, {"users": None}) == Check("critical_tables", False, "users does not exist")
    assert critical_tables_check([], None, {}) == Check("critical_tables", True, "no critical tables configured")


# -- errors -------------------------------------------------------------------------


def test_a_statement_timeout_is_recognised_through_sqlalchemys_wrapping():
    timeout = psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
    cancelled = psycopg.errors.QueryCanceled("canceling statement due to user request")
    assert is_timeout(timeout) and is_timeout(sqlalchemy.exc.OperationalError("select", None, timeout))
    assert not is_timeout(cancelled) and not is_timeout(RuntimeError("statement timeout"))


def test_error_text_is_the_first_line_of_postgres_message_without_secrets():
    orig = psycopg.errors.UndefinedTable('relation "x" does not exist\nLINE 1: select * from x')
    assert error_text(sqlalchemy.exc.ProgrammingError("select", None, orig), one_line=True) == 'relation "x" does not exist'
    assert error_text(RuntimeError("cannot reach postgresql://u:hunter2@db/x"), one_line=True) == "cannot reach postgresql://u:***@db/x"


def test_summary_lists_only_failures():
    checks = [Check("revision", True, "ok"), Check("fk_orphans", False, "orphans"), Check("health_checks", False, "false")]
    assert summary(checks) == "fk_orphans: orphans; health_checks: false"
    assert summary(checks[:1]) == "all 1 checks passed"


# -- isolation: a check that raises is a failed check, never an exception -------------


class _DeadConnection:
    """Stands in for a SQLAlchemy Connection whose server went away."""

    def __init__(self) -> None:
        self.rollbacks = 0

    def in_transaction(self) -> bool:
        return False

    def exec_driver_sql(self, statement: str) -> None:
        raise sqlalchemy.exc.OperationalError(statement, None, psycopg.OperationalError("server closed the connection"))

    def rollback(self) -> None:
        self.rollbacks += 1
        raise RuntimeError("rollback on a closed connection")


def test_every_check_reports_even_when_the_connection_is_gone():
    db = DatabaseSettings(url="postgresql://x@h/d", health_checks=["select true"], critical_tables=["users"])
    conn = _DeadConnection()
    checks = run_checks(conn, "011", "011", db, Baseline())  # type: ignore[arg-type]
    assert [c.name for c in checks] == list(CHECK_NAMES)
    by_name = {c.name: c for c in checks}
    assert by_name["revision"].ok
    for name in ("invalid_indexes", "not_valid_constraints", "fk_orphans"):
        assert by_name[name] == Check(name, False, "the check could not run: server closed the connection")
    assert by_name["health_checks"].detail == "1 of 1 failed: [1] select true: failed: server closed the connection"
    assert by_name["critical_tables"].detail == "users: could not count its rows: server closed the connection"
    assert conn.rollbacks >= 5


# -- settings -----------------------------------------------------------------------


def test_the_verification_budgets_have_defaults_and_take_durations():
    db = DatabaseSettings(url="postgresql://x@h/d")
    assert db.health_check_timeout == 5.0 and db.fk_check_timeout == 30.0
    settings = Settings(
        databases={"p": {"url": "postgresql://x@h/d", "health_check_timeout": "500ms", "fk_check_timeout": "2min"}}
    )
    assert settings.databases["p"].health_check_timeout == 0.5 and settings.databases["p"].fk_check_timeout == 120.0
    with pytest.raises(ValueError, match="at least 1ms"):
        DatabaseSettings(url="postgresql://x@h/d", fk_check_timeout="0s")
