"""Grant the wildcard permission '*' to the admin role (data migration).

Revision ID: 011
Revises: 010
"""

from __future__ import annotations

import sqlalchemy as sa  # noqa: F401  (kept for the uniform migration header)
from alembic import op

revision = "011"
down_revision = "010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "INSERT INTO roles (name, description) VALUES ('admin', 'Administrator') "
        "ON CONFLICT (name) DO NOTHING"
    )
    op.execute(
        "INSERT INTO permissions (name, description) "
        "VALUES ('*', 'Wildcard: every permission') "
        "ON CONFLICT (name) DO NOTHING"
    )
    op.execute(
        "INSERT INTO role_permissions (role_id, permission_id) "
        "SELECT r.id, p.id FROM roles r, permissions p "
        "WHERE r.name = 'admin' AND p.name = '*' "
        "ON CONFLICT DO NOTHING"
    )


def downgrade() -> None:
    op.execute(
        "DELETE FROM role_permissions "
        "WHERE role_id IN (SELECT id FROM roles WHERE name = 'admin') "
        "AND permission_id IN (SELECT id FROM permissions WHERE name = '*')"
    )
    op.execute("DELETE FROM permissions WHERE name = '*'")
    # No migration before 011 seeds roles: remove 'admin' unless it is in use.
    op.execute(
        "DELETE FROM roles WHERE name = 'admin' "
        "AND NOT EXISTS (SELECT 1 FROM role_permissions rp WHERE rp.role_id = roles.id) "
        "AND NOT EXISTS (SELECT 1 FROM user_roles ur WHERE ur.role_id = roles.id)"
    )
