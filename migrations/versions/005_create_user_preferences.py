"""Create the user_preferences table.

Revision ID: 005
Revises: 004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "005"
down_revision = "004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "user_preferences",
        sa.Column("user_id", sa.dialects.postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("theme", sa.Text(), server_default=sa.text("'system'"), nullable=False),
        sa.Column("language", sa.Text(), server_default=sa.text("'en'"), nullable=False),
        sa.Column("timezone", sa.Text(), nullable=True),
        sa.Column("date_format", sa.Text(), nullable=True),
        sa.Column(
            "sidebar_collapsed", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column(
            "email_notifications", sa.Boolean(), server_default=sa.text("true"), nullable=False
        ),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("user_id", name="pk_user_preferences"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name="fk_user_preferences_user_id_users",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(
            "theme IN ('light', 'dark', 'system')", name="ck_user_preferences_theme"
        ),
    )


def downgrade() -> None:
    op.drop_table("user_preferences")
