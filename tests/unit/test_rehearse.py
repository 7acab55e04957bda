"""The schema snapshot comparison of the rehearsal, on literal snapshots."""

from __future__ import annotations

from dbagent.checks.rehearse import (
    SCRATCH_PREFIX,
    SchemaObject,
    compare,
    scratch_name,
    snapshot_of,
)

USERS = SchemaObject("table", "public.users")
EMAIL = SchemaObject("column", "public.users.email", "text not null", "table public.users")
NICKNAME = SchemaObject("column", "public.users.nickname", "text", "table public.users")

WHEN = "after downgrade of 012"


def messages(before: list[SchemaObject], after: list[SchemaObject]) -> list[str]:
    return [d.describe(WHEN) for d in compare(snapshot_of(before), snapshot_of(after))]


def test_identical_snapshots_have_no_difference():
    assert messages([USERS, EMAIL], [EMAIL, USERS]) == []


def test_a_column_left_behind_is_named_with_its_type():
    assert messages([USERS, EMAIL], [USERS, EMAIL, NICKNAME]) == [
        "column public.users.nickname (text) is still there after downgrade of 012"
    ]


def test_a_dropped_object_and_a_changed_definition_are_named():
    loose_email = SchemaObject("column", "public.users.email", "text", "table public.users")
    index = SchemaObject("index", "public.users_email_idx", "CREATE INDEX users_email_idx ON public.users USING btree (email)",
                         "table public.users")
    assert messages([USERS, EMAIL, index], [USERS, loose_email]) == [
        "column public.users.email differs after downgrade of 012: text, was text not null",
        "index public.users_email_idx (CREATE INDEX users_email_idx ON public.users USING btree (email)) is missing"
        " after downgrade of 012",
    ]


def test_the_parts_of_a_table_left_behind_are_implied_by_the_table():
    extra = SchemaObject("table", "public.extra")
    parts = [
        SchemaObject("column", "public.extra.id", "integer not null", "table public.extra"),
        SchemaObject("constraint", "public.extra.extra_pkey", "PRIMARY KEY (id)", "table public.extra"),
        SchemaObject("sequence", "public.extra_id_seq", "integer start 1", "table public.extra"),
    ]
    assert messages([USERS], [USERS, extra, *parts]) == ["table public.extra is still there after downgrade of 012"]
    # the other way round too: a table the downgrade dropped is one difference
    assert messages([USERS, extra, *parts], [USERS]) == ["table public.extra is missing after downgrade of 012"]


def test_a_part_added_to_a_table_that_stays_is_named_even_if_another_table_is_new():
    other = SchemaObject("table", "public.other")
    assert messages([USERS], [USERS, other, NICKNAME]) == [
        "column public.users.nickname (text) is still there after downgrade of 012",
        "table public.other is still there after downgrade of 012",
    ]


def test_whitespace_in_definitions_is_normalised():
    a = SchemaObject("view", "public.v", "SELECT 1\n   FROM t")
    b = SchemaObject("view", "public.v", "SELECT 1 FROM   t")
    assert messages([a], [b]) == []


def test_long_definitions_are_shortened_in_messages():
    body = "CREATE FUNCTION public.f() RETURNS integer AS $$ " + "SELECT 1; " * 40 + "$$"
    [message] = messages([], [SchemaObject("function", "public.f()", body)])
    assert message.startswith("function public.f() (CREATE FUNCTION public.f()")
    assert "…) is still there after downgrade of 012" in message and len(message) < 260


def test_each_difference_suggests_a_fix():
    [added] = compare(snapshot_of([]), snapshot_of([NICKNAME]))
    [removed] = compare(snapshot_of([NICKNAME]), snapshot_of([]))
    assert "drop what upgrade() created" in added.fix()
    assert "recreate what upgrade() dropped" in removed.fix()


def test_scratch_names_fit_postgres_and_differ():
    first, second = scratch_name("Prod-EU" + "x" * 80), scratch_name("Prod-EU" + "x" * 80)
    assert first.startswith(SCRATCH_PREFIX + "prod_eu") and first != second
    assert len(first.encode()) <= 63 and first.replace("_", "").isalnum()
