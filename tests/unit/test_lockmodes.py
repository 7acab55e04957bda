"""agent/core/lockmodes.py: one table of which lock each DDL statement takes, read by the lint and by the lock
pre-check alike (they used to keep a table each and disagreed on triggers, storage parameters and partitions)."""

from __future__ import annotations

import pytest

from dbagent.checks import lint
from dbagent.core import retries
from dbagent.core.lockmodes import ACCESS_EXCLUSIVE as AE
from dbagent.core.lockmodes import SHARE
from dbagent.core.lockmodes import SHARE_ROW_EXCLUSIVE as SRE
from dbagent.core.lockmodes import SHARE_UPDATE_EXCLUSIVE as SUE

# (statement, the locks PostgreSQL 15 takes: table → mode), from its ALTER TABLE and LOCK pages.
CASES = [
    ("ALTER TABLE t ENABLE TRIGGER trg", {"t": SRE}),
    ("ALTER TABLE t DISABLE TRIGGER ALL", {"t": SRE}),
    ("ALTER TABLE t SET (fillfactor = 70)", {"t": SUE}),
    ("ALTER TABLE t RESET (autovacuum_enabled)", {"t": SUE}),
    ("ALTER TABLE t ALTER COLUMN c SET (n_distinct = 100)", {"t": SUE}),
    ("ALTER TABLE t ALTER COLUMN c SET STATISTICS 500", {"t": SUE}),
    ("ALTER TABLE t VALIDATE CONSTRAINT c_check", {"t": SUE}),
    ("ALTER TABLE t CLUSTER ON t_pkey", {"t": SUE}),
    ("ALTER TABLE t ATTACH PARTITION t_2026 FOR VALUES FROM (1) TO (2)", {"t": SUE, "t_2026": AE}),
    ("ALTER TABLE t DETACH PARTITION t_2026 CONCURRENTLY", {"t": SUE, "t_2026": AE}),
    ("ALTER TABLE t DETACH PARTITION t_2026", {"t": AE, "t_2026": AE}),
    ("ALTER TABLE t ADD CONSTRAINT t_u_fk FOREIGN KEY (u_id) REFERENCES u (id) NOT VALID", {"t": SRE, "u": SRE}),
    ("ALTER TABLE t ADD COLUMN u_id bigint REFERENCES u (id)", {"t": AE, "u": SRE}),
    ("ALTER TABLE t ADD COLUMN c int", {"t": AE}),
    ("ALTER TABLE t ENABLE TRIGGER trg, ADD COLUMN c int", {"t": AE}),  # the strongest of its subcommands
    ("ALTER TABLE t ALTER COLUMN c SET NOT NULL", {"t": AE}),
    ("LOCK TABLE t IN SHARE MODE", {"t": SHARE}),
    ("LOCK TABLE t", {"t": AE}),
]


@pytest.mark.parametrize(("sql", "locks"), CASES, ids=[c[0] for c in CASES])
def test_the_lock_precheck_and_the_lint_read_the_same_lock(sql, locks):
    assert retries.lock_targets(sql) == locks
    findings = lint.lint_sql(sql, revision="r1", runner_sets_lock_timeout=False)
    says_access_exclusive = any(f.rule == "missing-lock-timeout" for f in findings)
    assert says_access_exclusive == (locks["t"] == AE), [f.message for f in findings]
