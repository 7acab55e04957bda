"""Add device, expiry and revocation columns and indexes to user_sessions.

Revision ID: 008
Revises: 007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "008"
down_revision = "007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("user_sessions", sa.Column("device_name", sa.Text(), nullable=True))
    op.add_column("user_sessions", sa.Column("user_agent", sa.Text(), nullable=True))
    op.add_column(
        "user_sessions", sa.Column("ip_address", sa.dialects.postgresql.INET(), nullable=True)
    )
    op.add_column(
        "user_sessions", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "user_sessions", sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "user_sessions", sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True)
    )
    # user_sessions already holds rows: build the indexes without blocking writes.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_user_sessions_user_id",
            "user_sessions",
            ["user_id"],
            postgresql_concurrently=True,
        )
        op.create_index(
            "ix_user_sessions_expires_at",
            "user_sessions",
            ["expires_at"],
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_user_sessions_expires_at",
            table_name="user_sessions",
            postgresql_concurrently=True,
        )
        op.drop_index(
            "ix_user_sessions_user_id",
            table_name="user_sessions",
            postgresql_concurrently=True,
        )
    op.drop_column("user_sessions", "revoked_at")
    op.drop_column("user_sessions", "last_seen_at")
    op.drop_column("user_sessions", "expires_at")
    op.drop_column("user_sessions", "ip_address")
    op.drop_column("user_sessions", "user_agent")
    op.drop_column("user_sessions", "device_name")
