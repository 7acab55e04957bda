"""Generate an Alembic project of N revisions in one linear chain, made the way `alembic revision` makes them.

For the benchmarks of issue 11 (dbagent on user-made Alembic projects): hash
revision ids (Alembic's own ``uuid4().hex[-12:]``), files named by Alembic's
``file_template`` (default ``%(rev)s_%(slug)s``), the stock ``script.py.mako``.
It runs ``alembic.command.init`` once, then ``alembic.command.revision`` in a
loop (in process, not one subprocess per revision, sharing one ScriptDirectory
unless ``--reload``), and fills in each
revision's ``upgrade()``/``downgrade()``: in groups of three, create a small
table, add a column to it, index that column; each with its downgrade.

``env.py`` is the fixture's (``tests/fixtures/alembic_project/env.py``: the
generated one plus the cookbook's shared connection and
``version_table="app_versions"``), so the project can be driven on a passed
connection; ``--stock-env`` keeps the one ``alembic init`` wrote.

Run::

    .venv/bin/python bench/make_hash_chain.py /tmp/hash_chain            # 300 revisions
    .venv/bin/python bench/make_hash_chain.py /tmp/hash_chain -n 1000 --file-template '%%(year)d_%%(month).2d_%%(day).2d_%%(hour).2d%%(minute).2d-%%(rev)s_%%(slug)s'

The directory must not exist or be empty. Prints how long each part took.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import textwrap
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_ENV = ROOT / "tests" / "fixtures" / "alembic_project" / "env.py"

URL_OLD = "sqlalchemy.url = driver://user:pass@localhost/dbname\n"
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/hash_chain"

UPGRADE_STUB = '    """Upgrade schema."""\n    pass\n'
DOWNGRADE_STUB = '    """Downgrade schema."""\n    pass\n'


def bodies(i: int) -> tuple[str, str, str]:
    """(message, upgrade body, downgrade body) of the i-th revision (1-based)."""
    group, kind = divmod(i - 1, 3)
    table = f"bench_{group + 1:05d}"
    if kind == 0:
        return (
            f"create table {table}",
            f'''
            op.create_table(
                "{table}",
                sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
                sa.Column("name", sa.Text(), nullable=False),
                sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
            )
            ''',
            f'''
            op.drop_table("{table}")
            ''',
        )
    if kind == 1:
        return (
            f"add {table} note",
            f'''
            op.add_column("{table}", sa.Column("note", sa.Text(), nullable=True))
            ''',
            f'''
            op.drop_column("{table}", "note")
            ''',
        )
    return (
        f"index {table} name",
        f'''
        op.create_index("ix_{table}_name", "{table}", ["name"])
        ''',
        f'''
        op.drop_index("ix_{table}_name", table_name="{table}")
        ''',
    )


def indent(text: str) -> str:
    return textwrap.indent(textwrap.dedent(text).strip("\n"), "    ") + "\n"


def fill(path: Path, upgrade: str, downgrade: str) -> None:
    source = path.read_text()
    if source.count(UPGRADE_STUB) != 1 or source.count(DOWNGRADE_STUB) != 1:
        raise SystemExit(f"{path}: not the stock template's stubs (did script.py.mako change?)")
    source = source.replace(UPGRADE_STUB, '    """Upgrade schema."""\n' + indent(upgrade))
    source = source.replace(DOWNGRADE_STUB, '    """Downgrade schema."""\n' + indent(downgrade))
    path.write_text(source)


@contextlib.contextmanager
def one_script_directory(cfg: Config):
    """Let every ``command.revision`` share one ScriptDirectory.

    ``command.revision`` builds a new ``ScriptDirectory`` per call, which reads
    every file in versions/ again: N revisions cost N²/2 file loads. Its
    ``generate_revision`` adds the new script to the revision map it holds, so
    one shared instance sees the same chain; the files written are the same.
    """
    shared = ScriptDirectory.from_config(cfg)
    original = command.ScriptDirectory.from_config
    command.ScriptDirectory.from_config = classmethod(lambda cls, config: shared)  # type: ignore[method-assign]
    try:
        yield
    finally:
        command.ScriptDirectory.from_config = original  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where the project goes (must not exist, or be empty)")
    parser.add_argument("-n", "--revisions", type=int, default=300, help="how many revisions (default 300)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"sqlalchemy.url written to alembic.ini ({DEFAULT_URL})")
    parser.add_argument("--file-template", help="file_template written to alembic.ini (default: Alembic's)")
    parser.add_argument("--stock-env", action="store_true", help="keep the env.py `alembic init` wrote")
    parser.add_argument("--quiet", action="store_true", help="do not print Alembic's 'Generating ...' lines")
    parser.add_argument("--reload", action="store_true",
                        help="let each command.revision re-read versions/ as the CLI does (quadratic: slower)")
    args = parser.parse_args()

    project: Path = args.directory.resolve()
    if project.exists() and any(project.iterdir()):
        parser.error(f"{project} is not empty")
    project.mkdir(parents=True, exist_ok=True)
    ini = project / "alembic.ini"

    started = time.perf_counter()
    out = io.StringIO()
    sink = contextlib.redirect_stdout(out) if args.quiet else contextlib.nullcontext()
    with sink:
        command.init(Config(str(ini)), str(project), template="generic")
    text = ini.read_text()
    if URL_OLD not in text:
        raise SystemExit(f"{ini}: no stock sqlalchemy.url line")
    text = text.replace(URL_OLD, f"sqlalchemy.url = {args.url}\n")
    if args.file_template:
        text = text.replace("[alembic]\n", f"[alembic]\nfile_template = {args.file_template}\n", 1)
    ini.write_text(text)
    if not args.stock_env:
        shutil.copy(FIXTURE_ENV, project / "env.py")
    init_s = time.perf_counter() - started

    cfg = Config(str(ini))
    cfg.set_main_option("script_location", str(project))
    first = last = None
    loop_started = time.perf_counter()
    with contextlib.nullcontext() if args.reload else one_script_directory(cfg):
        for i in range(1, args.revisions + 1):
            message, upgrade, downgrade = bodies(i)
            with sink:
                script = command.revision(cfg, message=message)
            assert script is not None and not isinstance(script, list)
            fill(Path(script.path), upgrade, downgrade)
            first = first or script.revision
            last = script.revision
            if not args.quiet and i % 100 == 0:
                print(f"  {i} revisions, {time.perf_counter() - loop_started:.1f}s", file=sys.stderr)
    loop_s = time.perf_counter() - loop_started
    total_s = time.perf_counter() - started

    print(f"wrote {args.revisions} revisions to {project}/versions (first {first}, head {last})")
    print(f"init {init_s:.2f}s, revisions {loop_s:.2f}s ({loop_s / max(args.revisions, 1) * 1000:.1f} ms each),"
          f" total {total_s:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
