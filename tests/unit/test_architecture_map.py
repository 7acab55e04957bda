"""docs/architecture.md's module map is the tree: every module it names exists where it says, and every
module of the tree is in it; every source path the docs and README name exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"


def _map_rows() -> list[tuple[str, list[str]]]:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Module map"):]
    section = section[:section.index("\n## ", 4)] if "\n## " in section[4:] else section
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0].startswith(("package", "---")):
            continue
        folder = re.search(r"\(`([\w/]+/)`\)", cells[0])
        modules = re.findall(r"`([\w]+\.py)`", cells[2])
        rows.append((folder.group(1) if folder else "agent/", modules))
    return rows


def test_every_module_of_the_map_exists_in_its_folder():
    rows = _map_rows()
    assert len(rows) >= 9
    missing = [f"{folder}{m}" for folder, modules in rows for m in modules if not (ROOT / folder / m).is_file()]
    assert missing == []


def test_every_module_of_the_tree_is_in_the_map():
    mapped = {f"{folder}{m}" for folder, modules in _map_rows() for m in modules}
    tree = {str(p.relative_to(ROOT)) for d in ("agent", "worker") for p in (ROOT / d).rglob("*.py")
            if p.name not in ("__init__.py", "_alias.py")}
    assert sorted(tree - mapped) == []


def test_every_source_path_the_docs_name_exists():
    named = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        named |= {(doc.name, m) for m in re.findall(r"(?<![\w/.])((?:agent|worker|tests)/[\w/]+\.py)", doc.read_text(encoding="utf-8"))}
    assert sorted((doc, path) for doc, path in named if not (ROOT / path).is_file()) == []
