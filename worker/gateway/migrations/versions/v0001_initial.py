"""The gateway's first tables: files, file lines, batches, outcomes."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_files",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("tenant", sa.String(256)),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("batch_id", sa.String(64)),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("last_line", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
    )
    op.create_index("ix_gateway_files_tenant_seq", "gateway_files", ["tenant", "seq"])
    op.create_table(
        "gateway_file_lines",
        sa.Column("file_id", sa.String(64), primary_key=True),
        sa.Column("line_no", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "gateway_batches",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("tenant", sa.String(256)),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("end_status", sa.String(16)),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("in_progress_at", sa.BigInteger()),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("finalizing_at", sa.BigInteger()),
        sa.Column("completed_at", sa.BigInteger()),
        sa.Column("failed_at", sa.BigInteger()),
        sa.Column("expired_at", sa.BigInteger()),
        sa.Column("cancelling_at", sa.BigInteger()),
        sa.Column("cancelled_at", sa.BigInteger()),
        sa.Column("output_file_id", sa.String(64)),
        sa.Column("error_file_id", sa.String(64)),
        sa.Column("errors", sa.JSON()),
        sa.Column("metadata", sa.JSON()),
        sa.Column("model", sa.String(256)),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("last_line", sa.Integer(), nullable=False),
        sa.Column("published_upto", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost", sa.Float()),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_until", sa.Float()),
    )
    op.create_index("ix_gateway_batches_tenant_seq", "gateway_batches", ["tenant", "seq"])
    op.create_index("ix_gateway_batches_status", "gateway_batches", ["status"])
    op.create_table(
        "gateway_outcomes",
        sa.Column(
            "batch_id",
            sa.String(64),
            sa.ForeignKey("gateway_batches.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("line_no", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("custom_id", sa.Text()),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("code", sa.String(64)),
        sa.Column("line", sa.LargeBinary(), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("reasoning_tokens", sa.Integer(), nullable=False),
        sa.Column("cost", sa.Float()),
    )
    op.create_index(
        "ix_gateway_outcomes_status", "gateway_outcomes", ["batch_id", "status", "line_no"]
    )


def downgrade() -> None:
    op.drop_table("gateway_outcomes")
    op.drop_table("gateway_batches")
    op.drop_table("gateway_file_lines")
    op.drop_table("gateway_files")
