"""Static checks of migration scripts: naming, revision ids, the graph, a real downgrade().

Two conventions (``naming``): ``sequential`` (dbagent's own: ``NNN_description.py``,
the revision id is the number, one linear chain) and ``alembic`` (any file name,
any revision id, Alembic's own rules: no duplicate ids, every ``down_revision``
known, one head unless the project declares branches, a downgrade that does
something except in a merge revision). ``detect_naming`` picks one from the
scripts when the configuration says ``auto``.

Pure: it reads the scripts' source as text and parses it with ``ast``; nothing
is imported or run, so a broken script cannot hurt the checker.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbagent.core.errors import BadInput
from dbagent.core.findings import Finding, Severity

FILE_NAME = re.compile(r"^(?P<number>\d{3})_(?P<description>[a-z0-9]+(?:_[a-z0-9]+)*)\.py$")
_NUMBERED = re.compile(r"^\d{3}_")

SEQUENTIAL = "sequential"
ALEMBIC = "alembic"
AUTO = "auto"
NAMINGS = (SEQUENTIAL, ALEMBIC)


@dataclass(frozen=True)
class ScriptInfo:
    file: str
    number: str | None
    revision: str | None
    down_revision: str | None
    has_down_revision: bool
    downgrade: str  # "missing" | "empty" | "raises" | "ok"
    parents: tuple[str, ...] = ()  # every down_revision (two or more: a merge)
    upgrade: str = "missing"
    branch_labels: bool = False

    @property
    def is_merge(self) -> bool:
        return len(self.parents) > 1


def load_sources(script_location: str | Path) -> list[tuple[str, str]]:
    """(file name, source) of every script in the project's version directories (``versions/``, or its
    ``version_locations``), sorted by name."""
    from dbagent.postgres.migrator import version_directories

    directories, recursive = version_directories(script_location)
    missing = [d for d in directories if not d.is_dir()]
    if missing:
        raise BadInput(f"{missing[0]}: no such directory (is 'migrations' set right in the config?)")
    files = [p for d in directories for p in (d.rglob("*.py") if recursive else d.glob("*.py"))]
    return [(p.name, p.read_text(encoding="utf-8")) for p in sorted(files, key=lambda p: p.name) if p.name != "__init__.py"]


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ...


def _downgrade_kind(body: list[ast.stmt]) -> str:
    """"ok", "empty" (pass, a docstring, ...) or "raises" (Alembic's idiom for irreversible)."""
    meaningful = [
        s
        for s in body
        if not isinstance(s, ast.Pass) and not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
    ]
    if not meaningful:
        return "empty"
    if all(isinstance(s, ast.Raise) for s in meaningful):
        return "raises"
    return "ok"


# A worker validates before every migrate and rollback: a script unchanged since is not parsed again.
INSPECTED_SCRIPTS = 4096


@functools.lru_cache(maxsize=INSPECTED_SCRIPTS)
def inspect_script(file: str, source: str) -> ScriptInfo:
    """What a script declares (pure: cached by file name and source); raises SyntaxError for one that does not
    parse."""
    tree = ast.parse(source, filename=file)
    values: dict[str, Any] = {}
    downgrade = upgrade = "missing"
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and node.value is not None:
                    values[target.id] = _literal(node.value)
        elif isinstance(node, ast.FunctionDef) and node.name == "downgrade":
            downgrade = _downgrade_kind(node.body)
        elif isinstance(node, ast.FunctionDef) and node.name == "upgrade":
            upgrade = _downgrade_kind(node.body)
    match = FILE_NAME.match(file)
    revision = values.get("revision")
    down = values.get("down_revision")
    if isinstance(down, str):
        parents: tuple[str, ...] = (down,)
    elif isinstance(down, tuple | list):
        parents = tuple(d for d in down if isinstance(d, str))
    else:
        parents = ()
    return ScriptInfo(
        file=file,
        number=match["number"] if match else None,
        revision=revision if isinstance(revision, str) else None,
        down_revision=down if isinstance(down, str) else None,
        has_down_revision="down_revision" in values,
        downgrade=downgrade,
        parents=parents,
        upgrade=upgrade,
        branch_labels=bool(values.get("branch_labels")) and values.get("branch_labels") is not ...,
    )


def detect_naming(sources: list[tuple[str, str]]) -> str:
    """``sequential`` when most scripts are named ``NNN_…``, else ``alembic``."""
    if not sources:
        return SEQUENTIAL
    numbered = sum(1 for file, _ in sources if _NUMBERED.match(file))
    return SEQUENTIAL if numbered * 2 > len(sources) else ALEMBIC


def check_sources(sources: list[tuple[str, str]], naming: str = SEQUENTIAL) -> list[Finding]:
    """Every finding about a set of migration scripts, in file order, under the ``naming`` convention."""
    if naming == AUTO:
        naming = detect_naming(sources)
    if naming not in NAMINGS:
        raise BadInput(f"naming must be one of {', '.join(NAMINGS)} or auto, not {naming!r}")
    sequential = naming == SEQUENTIAL
    findings: list[Finding] = []
    scripts: list[ScriptInfo] = []

    def error(script: ScriptInfo | None, rule: str, message: str, file: str | None = None) -> None:
        findings.append(
            Finding(script.revision if script else None, rule, Severity.ERROR, message, file=file or (script.file if script else None))
        )

    for file, source in sources:
        try:
            script = inspect_script(file, source)
        except SyntaxError as exc:
            findings.append(Finding(None, "syntax", Severity.ERROR, f"{file}: does not parse: {exc.msg} (line {exc.lineno})", file=file))
            continue
        scripts.append(script)
        if sequential and script.number is None:
            error(script, "naming", f"{file}: name it NNN_snake_case_description.py (three digits, then a description)")
        if script.revision is None:
            error(script, "revision-id", f"{file}: no literal `revision = \"...\"` found")
        elif sequential and script.number is not None and script.revision != script.number:
            error(script, "revision-id", f"{file}: revision id is {script.revision!r}, expected {script.number!r} from the file name")
        if script.is_merge and script.downgrade == "empty" and script.upgrade in ("empty", "missing"):
            pass  # what `alembic merge` writes: joining two branches changes nothing, undoing it neither
        elif script.downgrade == "missing":
            error(script, "downgrade", f"{file}: has no downgrade(): every migration must be reversible")
        elif script.downgrade == "empty":
            error(script, "downgrade", f"{file}: downgrade() does nothing: it must reverse upgrade()")
        elif script.downgrade == "raises":
            error(script, "downgrade", f"{file}: downgrade() only raises: the migration is irreversible")

    numbered = sorted((s for s in scripts if s.number is not None), key=lambda s: s.number or "")
    seen: dict[str, str] = {}
    for script in scripts:
        if script.revision is None:
            continue
        if script.revision in seen:
            error(script, "duplicate-revision", f"{script.file}: revision {script.revision} is also declared by {seen[script.revision]}")
        seen[script.revision] = script.file

    if not sequential:
        return findings + _graph_findings(scripts, seen)

    expected_number = 1
    previous: ScriptInfo | None = None
    for script in numbered:
        number = int(script.number or 0)
        if number != expected_number:
            missing = f"{expected_number:03d}" if number > expected_number else None
            detail = f"{missing} is missing" if missing else f"{script.number} is repeated"
            error(script, "sequence", f"{script.file}: migrations must be numbered without gaps: {detail}")
        expected_number = number + 1
        expected_down = previous.revision if previous else None
        if script.has_down_revision and script.down_revision != expected_down:
            error(
                script,
                "chain",
                f"{script.file}: down_revision is {script.down_revision!r}, expected {expected_down!r} (the previous file)",
            )
        previous = script

    referenced = {parent for s in scripts for parent in s.parents}
    heads = sorted(s.revision for s in scripts if s.revision and s.revision not in referenced)
    if len(heads) > 1:
        findings.append(
            Finding(None, "single-head", Severity.ERROR, f"several heads: {', '.join(heads)}; the chain must be linear")
        )
    if not scripts and not findings:
        findings.append(Finding(None, "empty", Severity.WARNING, "no migration scripts found"))
    return findings


def _graph_findings(scripts: list[ScriptInfo], files: dict[str, str]) -> list[Finding]:
    """Alembic's rules for its revision graph: every parent known, one head unless branches are declared."""
    found: list[Finding] = []
    for script in scripts:
        for parent in script.parents:
            if parent not in files:
                found.append(Finding(
                    script.revision, "chain", Severity.ERROR,
                    f"{script.file}: down_revision {parent!r} is no revision of these scripts", file=script.file,
                ))
    referenced = {parent for s in scripts for parent in s.parents}
    heads = sorted(s.revision for s in scripts if s.revision and s.revision not in referenced)
    if len(heads) > 1 and not any(s.branch_labels for s in scripts):
        found.append(Finding(
            None, "single-head", Severity.ERROR,
            f"several heads: {', '.join(heads)}; join them with `alembic merge heads`, or declare the branches"
            " (branch_labels) if they are meant to stay apart",
        ))
    roots = [s for s in scripts if s.revision and not s.parents and s.has_down_revision]
    if len(roots) > 1 and not any(s.branch_labels for s in scripts):
        found.append(Finding(
            None, "chain", Severity.ERROR,
            f"several revisions start from base ({', '.join(s.revision or '' for s in roots)}): one history must have one root"
            " unless its branches are declared",
        ))
    return found
