"""Create the navigation_items table (a tree of menu entries).

Revision ID: 006
Revises: 005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "006"
down_revision = "005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "navigation_items",
        sa.Column(
            "id",
            sa.dialects.postgresql.UUID(as_uuid=True),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
        ),
        sa.Column("parent_id", sa.dialects.postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("icon", sa.Text(), nullable=True),
        sa.Column("sort_order", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("required_permission", sa.Text(), nullable=True),
        sa.Column("is_visible", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="pk_navigation_items"),
        sa.UniqueConstraint("key", name="uq_navigation_items_key"),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["navigation_items.id"],
            name="fk_navigation_items_parent_id_navigation_items",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_navigation_items_parent_id_sort_order",
        "navigation_items",
        ["parent_id", "sort_order"],
    )


def downgrade() -> None:
    op.drop_index("ix_navigation_items_parent_id_sort_order", table_name="navigation_items")
    op.drop_table("navigation_items")
