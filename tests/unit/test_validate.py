"""agent/checks/validate.py: static checks of migration scripts, on literal sources and the shipped ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbagent.checks.validate import (
    check_sources,
    inspect_script,
    load_sources,
)
from dbagent.core.errors import BadInput
from dbagent.core.findings import Finding, Severity, status_of

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"

REAL_DOWNGRADE = 'def downgrade() -> None:\n    op.drop_table("t{rev}")\n'


def script(rev: str | None, down: str | None, downgrade: str | None = REAL_DOWNGRADE, *, declare_down: bool = True) -> str:
    lines = ['"""A migration."""', "from alembic import op", ""]
    if rev is not None:
        lines.append(f"revision = {rev!r}")
    if declare_down:
        lines.append(f"down_revision = {down!r}")
    lines += ["", "", "def upgrade() -> None:", f'    op.create_table("t{rev}")', "", ""]
    source = "\n".join(lines)
    if downgrade is not None:
        source += downgrade.format(rev=rev)
    return source


def clean_chain() -> list[tuple[str, str]]:
    return [
        ("001_a.py", script("001", None)),
        ("002_b.py", script("002", "001")),
        ("003_c.py", script("003", "002")),
    ]


def rules(findings: list[Finding]) -> set[str]:
    return {f.rule for f in findings}


def only(findings: list[Finding], rule: str) -> list[Finding]:
    return [f for f in findings if f.rule == rule]


def test_clean_chain_has_no_findings():
    findings = check_sources(clean_chain())

    assert findings == []
    assert status_of(findings) == "passed"


def test_inspect_script_reads_the_declarations():
    info = inspect_script("002_b.py", script("002", "001"))

    assert (info.number, info.revision, info.down_revision, info.has_down_revision, info.downgrade) == (
        "002",
        "002",
        "001",
        True,
        "ok",
    )


@pytest.mark.parametrize("bad_name", ["4_x.py", "004-add.py", "004_AddThing.py", "0004_x.py", "004_.py", "004_x.txt.py"])
def test_bad_file_name(bad_name):
    sources = clean_chain() + [(bad_name, script("004", "003"))]

    findings = check_sources(sources)

    naming = only(findings, "naming")
    assert len(naming) == 1
    assert naming[0].severity == Severity.ERROR
    assert naming[0].severity == "error"
    assert naming[0].file == bad_name
    assert naming[0].message.startswith(f"{bad_name}: name it NNN_snake_case_description.py")
    assert status_of(findings) == "failed"


def test_revision_id_not_equal_to_the_file_number():
    sources = [("001_a.py", script("001", None)), ("002_b.py", script("abc123", "001"))]

    findings = check_sources(sources)

    [finding] = only(findings, "revision-id")
    assert finding.severity == "error"
    assert finding.file == "002_b.py"
    assert finding.revision == "abc123"
    assert "revision id is 'abc123', expected '002'" in finding.message


def test_missing_revision_id():
    sources = [("001_a.py", script(None, None))]

    [finding] = only(check_sources(sources), "revision-id")

    assert finding.severity == "error"
    assert "no literal `revision" in finding.message


def test_gap_in_the_numbers():
    sources = [
        ("001_a.py", script("001", None)),
        ("002_b.py", script("002", "001")),
        ("004_d.py", script("004", "002")),
    ]

    findings = check_sources(sources)

    assert rules(findings) == {"sequence"}
    [finding] = findings
    assert finding.severity == "error"
    assert finding.file == "004_d.py"
    assert finding.message == "004_d.py: migrations must be numbered without gaps: 003 is missing"


def test_first_number_must_be_001():
    findings = check_sources([("002_b.py", script("002", None))])

    [finding] = only(findings, "sequence")
    assert "001 is missing" in finding.message


def test_duplicate_revision():
    sources = clean_chain() + [("003_again.py", script("003", "002"))]

    findings = check_sources(sources)

    [duplicate] = only(findings, "duplicate-revision")
    assert duplicate.severity == "error"
    assert duplicate.revision == "003"
    assert duplicate.message == "003_again.py: revision 003 is also declared by 003_c.py"
    assert "sequence" in rules(findings)  # 003 is repeated
    assert status_of(findings) == "failed"


def test_down_revision_pointing_to_the_wrong_parent():
    sources = [
        ("001_a.py", script("001", None)),
        ("002_b.py", script("002", "001")),
        ("003_c.py", script("003", "001")),
    ]

    findings = check_sources(sources)

    [chain] = only(findings, "chain")
    assert chain.severity == "error"
    assert chain.file == "003_c.py"
    assert chain.message == "003_c.py: down_revision is '001', expected '002' (the previous file)"
    # 002 and 003 both hang off 001: two heads as well
    assert "single-head" in rules(findings)


def test_first_script_must_have_no_parent():
    sources = [("001_a.py", script("001", "000"))]

    [chain] = only(check_sources(sources), "chain")

    assert "expected None" in chain.message


def test_two_heads():
    # 003 declares no down_revision at all: it starts a second root, hence a second head
    sources = [
        ("001_a.py", script("001", None)),
        ("002_b.py", script("002", "001")),
        ("003_c.py", script("003", None, declare_down=False)),
    ]

    findings = check_sources(sources)

    assert rules(findings) == {"single-head"}
    [head] = findings
    assert head.severity == "error"
    assert head.message == "several heads: 002, 003; the chain must be linear"


def test_missing_downgrade():
    sources = clean_chain()[:2] + [("003_c.py", script("003", "002", downgrade=None))]

    findings = check_sources(sources)

    assert rules(findings) == {"downgrade"}
    [finding] = findings
    assert finding.severity == "error"
    assert finding.file == "003_c.py"
    assert finding.message == "003_c.py: has no downgrade(): every migration must be reversible"


@pytest.mark.parametrize(
    "body",
    [
        "def downgrade() -> None:\n    pass\n",
        'def downgrade() -> None:\n    """Nothing to undo."""\n',
        "def downgrade() -> None:\n    ...\n",
        'def downgrade() -> None:\n    """Nothing."""\n    pass\n    ...\n',
    ],
    ids=["pass", "docstring", "ellipsis", "all-three"],
)
def test_downgrade_that_does_nothing(body):
    sources = clean_chain()[:2] + [("003_c.py", script("003", "002", downgrade=body))]

    findings = check_sources(sources)

    assert rules(findings) == {"downgrade"}
    [finding] = findings
    assert finding.severity == "error"
    assert finding.message == "003_c.py: downgrade() does nothing: it must reverse upgrade()"


def test_downgrade_that_only_raises_is_not_reversible():
    body = 'def downgrade() -> None:\n    raise NotImplementedError("irreversible")\n'
    sources = clean_chain()[:2] + [("003_c.py", script("003", "002", downgrade=body))]

    assert rules(check_sources(sources)) == {"downgrade"}


def test_syntax_error():
    sources = clean_chain()[:2] + [("003_c.py", "revision = '003'\ndef upgrade(:\n    pass\n")]

    findings = check_sources(sources)

    assert rules(findings) == {"syntax"}
    [finding] = findings
    assert finding.severity == "error"
    assert finding.file == "003_c.py"
    assert finding.message.startswith("003_c.py: does not parse: ")
    assert "(line 2)" in finding.message
    assert status_of(findings) == "failed"


def test_nothing_is_imported_or_run():
    hostile = script("001", None) + "\nimport os\nos._exit(99)\nraise SystemExit(1)\n"

    assert check_sources([("001_a.py", hostile)]) == []


def test_no_scripts_is_a_warning_only():
    findings = check_sources([])

    assert [(f.rule, f.severity) for f in findings] == [("empty", Severity.WARNING)]
    assert status_of(findings) == "passed"


def test_finding_to_json():
    [finding] = check_sources([("001_a.py", script("001", None, downgrade=None))])

    assert finding.to_json() == {
        "revision": "001",
        "rule": "downgrade",
        "severity": "error",
        "message": "001_a.py: has no downgrade(): every migration must be reversible",
        "statement": None,
        "fix": None,
        "file": "001_a.py",
    }


def test_load_sources_of_a_missing_directory(tmp_path):
    with pytest.raises(BadInput) as caught:
        load_sources(tmp_path)

    assert caught.value.message.startswith(f"{tmp_path / 'versions'}: no such directory")


def test_load_sources_sorted_and_only_python(tmp_path):
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "002_b.py").write_text("b")
    (versions / "001_a.py").write_text("a")
    (versions / "__init__.py").write_text("")
    (versions / "notes.txt").write_text("x")

    assert load_sources(tmp_path) == [("001_a.py", "a"), ("002_b.py", "b")]


def test_shipped_migrations_pass():
    sources = load_sources(MIGRATIONS)

    findings = check_sources(sources)

    assert [name[:3] for name, _ in sources] == [f"{n:03d}" for n in range(1, 12)]
    assert [f for f in findings if f.severity == Severity.ERROR] == []
    assert status_of(findings) == "passed"



# -- the alembic convention ------------------------------------------------------------------

MERGE = '''"""merge"""
revision = "m1"
down_revision = ("a2", "b1")
branch_labels = None


def upgrade() -> None:
    """Upgrade schema."""
    pass


def downgrade() -> None:
    """Downgrade schema."""
    pass
'''


def hashed() -> list[tuple[str, str]]:
    """A root, a branch point, two branches and their merge, as ``alembic revision`` / ``merge`` name them."""
    return [
        ("3f1c0a9e7b21_root.py", script("r0", None)),
        ("a1a1a1a1a1a1_a1.py", script("a1", "r0")),
        ("a2a2a2a2a2a2_a2.py", script("a2", "a1")),
        ("b1b1b1b1b1b1_b1.py", script("b1", "r0")),
        ("9e9e9e9e9e9e_merge.py", MERGE),
    ]


def test_the_naming_is_detected_from_the_file_names():
    from dbagent.checks.validate import detect_naming

    assert detect_naming(clean_chain()) == "sequential"
    assert detect_naming(hashed()) == "alembic"
    assert detect_naming(load_sources(MIGRATIONS)) == "sequential"


def test_under_the_alembic_convention_hash_ids_branches_and_their_merge_are_sound():
    assert check_sources(hashed(), "alembic") == []
    assert check_sources(hashed(), "auto") == []
    # Under dbagent's own convention the same scripts are wrong, file by file.
    assert len(only(check_sources(hashed(), "sequential"), "naming")) == len(hashed())


def test_a_merge_is_one_head_and_its_empty_bodies_are_not_a_missing_downgrade():
    info = inspect_script("9e9e9e9e9e9e_merge.py", MERGE)
    assert info.parents == ("a2", "b1") and info.is_merge
    assert "downgrade" not in rules(check_sources(hashed(), "alembic"))
    # A revision that is no merge still needs a downgrade that does something.
    empty = script("c1", "m1", "def downgrade() -> None:\n    pass\n")
    assert rules(check_sources([*hashed(), ("c1c1c1c1c1c1_c1.py", empty)], "alembic")) == {"downgrade"}


def test_two_heads_unmerged_are_an_error_unless_the_project_declares_its_branches():
    unmerged = hashed()[:-1]
    [head] = only(check_sources(unmerged, "alembic"), "single-head")
    assert "a2, b1" in head.message and "alembic merge heads" in head.message
    labelled = [*unmerged[:3], ("b1b1b1b1b1b1_b1.py", script("b1", "r0").replace("down_revision", 'branch_labels = ("b",)\ndown_revision'))]
    assert only(check_sources(labelled, "alembic"), "single-head") == []


def test_a_parent_that_is_no_revision_breaks_the_graph():
    broken = [*hashed(), ("c1c1c1c1c1c1_c1.py", script("c1", "nope"))]
    [chain] = only(check_sources(broken, "alembic"), "chain")
    assert "'nope' is no revision of these scripts" in chain.message


def test_an_unknown_naming_is_refused():
    with pytest.raises(BadInput, match="naming must be one of"):
        check_sources(clean_chain(), "numbers")
