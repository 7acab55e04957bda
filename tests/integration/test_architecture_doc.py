"""docs/architecture.md's flow of one migrate is what the code does: the events of a real run, in order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
REPEATS = {"backup.progress"}  # as often as pg_dump reports, or not at all for a small database


def documented_events() -> list[str]:
    match = re.search(r"<!-- migrate-events -->\s*```\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert match, "docs/architecture.md lost its list of a migrate's events"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def test_a_migrate_emits_the_events_docs_architecture_lists_in_that_order(env, redis_client):
    env.extra_config = "pre_migration_backup = true"
    env.start_worker()
    assert env.cli("migrate", "--to", "009", "--json", "--no-backup").code == 0

    run = env.cli("migrate", "--to", "011", "--json")  # two steps, with its pre-migration backup

    assert run.code == 0, run.stdout + run.stderr
    events = [e["type"] for e in env.stream_events(redis_client, run.json()["command_id"])]
    assert [e for e in events if e not in REPEATS] == [e for e in documented_events() if e not in REPEATS]
    assert "backup.completed" in events and events.count("migration.step") == 2
