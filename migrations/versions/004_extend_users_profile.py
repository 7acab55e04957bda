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


def upgrade() -> None:
    op.add_column("users", sa.Column("first_name", sa.Text(), nullable=True))
    op.add_column("users", sa.Column("last_name", sa.Text(), nullable=True))
    op.add_column("users", sa.Column("display_name", sa.Text(), nullable=True))
    op.add_column("users", sa.Column("avatar_url", sa.Text(), nullable=True))
    op.add_column("users", sa.Column("phone", sa.Text(), nullable=True))
    op.add_column("users", sa.Column("locale", sa.Text(), nullable=True))
    op.add_column("users", sa.Column("timezone", sa.Text(), nullable=True))
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
    op.drop_column("users", "timezone")
    op.drop_column("users", "locale")
    op.drop_column("users", "phone")
    op.drop_column("users", "avatar_url")
    op.drop_column("users", "display_name")
    op.drop_column("users", "last_name")
    op.drop_column("users", "first_name")
