"""What a backup leaves out and a restore leaves alone, from literal pg_restore listings (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbagent.postgres import backups as bk

# `pg_restore --list` of a database whose role owns public's objects, with a schema and a table of postgres's.
TOC = """;
; Archive created at 2026-12-02 06:43:13 UTC
;     dbname: aegisx
;
6; 2615 17434 SCHEMA - s migrator
7; 2615 17438 SCHEMA - vault postgres
3371; 0 0 ACL - SCHEMA vault postgres
3370; 0 0 ACL - SCHEMA public pg_database_owner
217; 1259 17428 TABLE public t migrator
216; 1259 17427 SEQUENCE public t_id_seq migrator
3372; 0 0 SEQUENCE OWNED BY public t_id_seq migrator
220; 1259 17440 TABLE vault k postgres
3373; 0 0 ACL vault TABLE k postgres
3364; 0 17440 TABLE DATA vault k postgres
3361; 0 17428 TABLE DATA public t migrator
3217; 2606 17445 CONSTRAINT vault k k_pkey postgres
3218; 2606 17446 FK CONSTRAINT public t t_k_fkey migrator
3219; 0 0 DEFAULT ACL - DEFAULT PRIVILEGES FOR TABLES migrator
3220; 0 0 ENCODING - ENCODING 
"""


def test_a_restore_keeps_the_entries_of_its_own_roles_and_drops_those_of_others():
    kept, skipped = bk.owned_by_others(TOC, ["postgres", "pg_read_all_data"])
    assert [s.table for s in skipped] == [
        "SCHEMA vault", "ACL on SCHEMA vault", "TABLE vault.k", "ACL on TABLE vault.k", "TABLE DATA vault.k",
        "CONSTRAINT vault.k k_pkey",
    ]
    assert {s.reason for s in skipped} == {"owned by postgres: left as it is"}
    assert " postgres\n" not in kept and kept.count("migrator\n") == 7
    # comments, entries without an owner and the database owner's stay
    assert "; Archive created" in kept and "ENCODING - ENCODING \n" in kept and "pg_database_owner" in kept


def test_a_superuser_restores_everything():
    kept, skipped = bk.owned_by_others(TOC, [])
    assert skipped == [] and kept == TOC


def test_a_role_that_is_a_suffix_of_an_owner_is_not_that_owner():
    kept, skipped = bk.owned_by_others("1; 1259 1 TABLE public t supermigrator\n", ["migrator"])
    assert skipped == [] and "supermigrator" in kept


@pytest.fixture
def tools(monkeypatch):
    monkeypatch.setattr(bk, "tool_path", lambda name: f"/usr/bin/{name}")


def test_pg_dump_excludes_the_tables_the_role_cannot_read(tools):
    argv = bk.dump_argv(bk.BackupKind.FULL, Path("/b/x.dump"), jobs=1, compression=None, lock_wait_ms=1000,
                        snapshot=None, exclude_tables=["public.payroll", 'vault."Odd Name"'])
    assert "--exclude-table=public.payroll" in argv and '--exclude-table=vault."Odd Name"' in argv
    assert argv.index("--exclude-table=public.payroll") < argv.index("--file")


def test_a_restore_reads_its_filtered_list(tools):
    manifest = bk.Manifest.model_validate({
        "file": "x.dump", "type": "full", "format": "custom", "compression": None, "sha256": "0", "bytes": 1,
        "database": "aegisx", "db": "production", "server_version": "15", "pg_dump_version": "15", "revision": "011",
        "started": "2026-12-02T00:00:00Z", "finished": "2026-12-02T00:00:01Z", "trigger": "manual",
        "command_id": None, "actor": None, "table_count": 1, "verified": True,
    })
    assert manifest.skipped == []  # manifests written before skipping existed read as skipping nothing
    argv = bk.restore_argv(Path("/b/x.dump"), manifest, 1, use_list=Path("/b/.partial-1-x.list"))
    assert "--use-list=/b/.partial-1-x.list" in argv and argv[-1] == "/b/x.dump" and "--clean" in argv


def test_a_manifest_that_does_not_fit_on_the_disk_leaves_no_partial_file(tmp_path):
    """A real write failure: the process may write files of at most 64 bytes (RLIMIT_FSIZE), as a full disk."""
    import subprocess
    import sys

    program = f"""
import resource, signal, sys
from datetime import UTC, datetime
from pathlib import Path
from dbagent.postgres import backups as bk
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
now = datetime.now(UTC)
manifest = bk.Manifest(file="x.dump", type="full", format="custom", compression=None, sha256="0" * 64, bytes=1,
    database="d", db="d", server_version="15", pg_dump_version="15", revision=None, started=now, finished=now,
    trigger="manual", command_id=None, actor=None, table_count=0, verified=True)
try:
    bk.write_manifest(Path({str(tmp_path / "x.dump")!r}), manifest)
except OSError as exc:
    print("refused:", exc.errno)
    sys.exit(0)
sys.exit("the manifest was written past the limit")
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 0 and "refused: 27" in done.stdout, done.stdout + done.stderr  # EFBIG
    assert list(tmp_path.iterdir()) == []
