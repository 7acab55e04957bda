"""Add profile and status columns to users.

Revision ID: 004
Revises: 003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "004"
down_revision = "003"
branch_labels = None
depends_on = None

# Nullable text columns, in the order they are added (dropped in reverse).
_PROFILE_COLUMNS = (
    "first_name",
    "last_name",
    "display_name",
    "avatar_url",
    "phone",
    "locale",
    "timezone",
)


def upgrade() -> None:
    for name in _PROFILE_COLUMNS:
        op.add_column("users", sa.Column(name, sa.Text(), nullable=True))
    # NOT NULL with a constant default: a metadata-only change since PostgreSQL 11.
    op.add_column(
        "users",
        sa.Column("status", sa.Text(), server_default=sa.text("'active'"), nullable=False),
    )
    op.add_column("users", sa.Column("email_verified_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "ALTER TABLE users ADD CONSTRAINT users_status_check "
        "CHECK (status IN ('active', 'inactive', 'suspended', 'pending')) NOT VALID"
    )
    op.execute("ALTER TABLE users VALIDATE CONSTRAINT users_status_check")


def downgrade() -> None:
    op.execute("ALTER TABLE users DROP CONSTRAINT users_status_check")
    op.drop_column("users", "email_verified_at")
    op.drop_column("users", "status")
    for name in reversed(_PROFILE_COLUMNS):
        op.drop_column("users", name)
