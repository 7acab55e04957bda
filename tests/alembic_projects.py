"""Alembic projects made the way users make them: ``alembic init`` and ``alembic revision`` (Alembic's own
commands, through its API), hash revision ids, the checked-in fixture's env.py (the connection-sharing
recipe and ``version_table="app_versions"``) or one of its variants."""

from __future__ import annotations

import shutil
from pathlib import Path

from alembic import command
from alembic.config import Config

FIXTURE = Path(__file__).parent / "fixtures" / "alembic_project"

# (message, upgrade body, downgrade body): a linear history of a small app.
LINEAR = [
    ("create accounts table",
     'op.create_table("accounts", sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),'
     ' sa.Column("email", sa.Text(), nullable=False))',
     'op.drop_table("accounts")'),
    ("create projects table",
     'op.create_table("projects", sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),'
     ' sa.Column("account_id", sa.BigInteger(), sa.ForeignKey("accounts.id"), nullable=False))',
     'op.drop_table("projects")'),
    ("add projects name",
     'op.add_column("projects", sa.Column("name", sa.Text(), nullable=True))',
     'op.drop_column("projects", "name")'),
    ("create tasks table",
     'op.create_table("tasks", sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),'
     ' sa.Column("project_id", sa.BigInteger(), sa.ForeignKey("projects.id"), nullable=False))',
     'op.drop_table("tasks")'),
    ("add tasks title",
     'op.add_column("tasks", sa.Column("title", sa.Text(), nullable=True))',
     'op.drop_column("tasks", "title")'),
]


def linear_project(directory: Path, env: str = "env.py", steps: list[tuple[str, str, str]] | None = None) -> list[str]:
    """An ``alembic init`` project in ``directory`` with one ``alembic revision`` per step; its revision ids,
    oldest first. ``env`` names the fixture's env.py variant to use (env.py, env_stock.py, env_own_engine.py)."""
    directory.mkdir(parents=True)
    ini = directory / "alembic.ini"
    command.init(Config(str(ini)), str(directory), template="generic")
    if env != "stock":
        shutil.copy(FIXTURE / env, directory / "env.py")
    return [add_revision(directory, *step) for step in steps or LINEAR]


def add_revision(directory: Path, message: str, upgrade: str, downgrade: str, head: str = "head") -> str:
    """``alembic revision -m MESSAGE --head HEAD`` in the project at ``directory``, with these bodies; its id."""
    script = command.revision(Config(str(directory / "alembic.ini")), message=message, head=head)
    path = Path(script.path)
    text = path.read_text()
    text = text.replace('    """Upgrade schema."""\n    pass', f'    """Upgrade schema."""\n    {upgrade}', 1)
    text = text.replace('    """Downgrade schema."""\n    pass', f'    """Downgrade schema."""\n    {downgrade}', 1)
    assert upgrade in text and downgrade in text, f"Alembic's template changed: {path}"
    path.write_text(text)
    return script.revision


def per_migration_transactions(directory: Path) -> None:
    """Turn ``transaction_per_migration`` on in the fixture's env.py at ``directory`` (each migration in its own
    transaction; Alembic's default, and the fixture's, is one transaction for the whole run)."""
    env_py = directory / "env.py"
    text = env_py.read_text()
    changed = text.replace('version_table="app_versions",', 'version_table="app_versions", transaction_per_migration=True,')
    assert changed != text, f"the fixture's env.py changed: {env_py}"
    env_py.write_text(changed)
