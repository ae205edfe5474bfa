"""The gateway's tables (SQLAlchemy Core): files, their lines, batches, line outcomes."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = ["batches", "file_lines", "files", "metadata", "outcomes"]

metadata = MetaData()

# A file: an uploaded input file (kind "input"), or a batch's output or error file, which is
# virtual: its lines are the batch's outcome rows of that status, streamed in line order.
files = Table(
    "gateway_files",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("tenant", String(256)),
    Column("filename", Text, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("kind", String(16), nullable=False),  # input | output | error
    Column("batch_id", String(64)),  # the batch of an output or error file
    Column("bytes", BigInteger, nullable=False, default=0),
    Column("lines", Integer, nullable=False, default=0),  # request lines (non-blank)
    Column("last_line", Integer, nullable=False, default=0),  # highest line_no stored
    Column("created_at", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),  # uploading | processed
)
Index("ix_gateway_files_tenant_seq", files.c.tenant, files.c.seq)

# Every physical line of an input file, its newline included: the content is their
# concatenation, byte for byte. Blank lines are kept (so a download is exact) but are no job.
file_lines = Table(
    "gateway_file_lines",
    metadata,
    Column("file_id", String(64), primary_key=True),
    Column("line_no", Integer, primary_key=True, autoincrement=False),
    Column("data", LargeBinary, nullable=False),
)

batches = Table(
    "gateway_batches",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("tenant", String(256)),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("end_status", String(16)),  # what finalizing leads to: completed|cancelled|expired
    Column("created_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger),
    Column("expires_at", BigInteger, nullable=False),
    Column("finalizing_at", BigInteger),
    Column("completed_at", BigInteger),
    Column("failed_at", BigInteger),
    Column("expired_at", BigInteger),
    Column("cancelling_at", BigInteger),
    Column("cancelled_at", BigInteger),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("errors", JSON),
    Column("metadata", JSON),
    Column("model", String(256)),
    Column("total", Integer, nullable=False, default=0),
    Column("last_line", Integer, nullable=False, default=0),
    Column("published_upto", Integer, nullable=False, default=0),
    # counters follow the outcome rows exactly: bumped only by rows an insert really added
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("cost", Float),  # null until a line with a known cost finishes
    # who publishes the batch now (one replica at a time), and until when
    Column("lease_owner", String(128)),
    Column("lease_until", Float),
)
Index("ix_gateway_batches_tenant_seq", batches.c.tenant, batches.c.seq)
Index("ix_gateway_batches_status", batches.c.status)

outcomes = Table(
    "gateway_outcomes",
    metadata,
    Column(
        "batch_id",
        String(64),
        ForeignKey("gateway_batches.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("line_no", Integer, primary_key=True, autoincrement=False),
    Column("custom_id", Text),
    Column("status", String(8), nullable=False),  # ok | error
    Column("code", String(64)),  # the error code of a failed line
    Column("line", LargeBinary, nullable=False),  # the output line, JSON, no newline
    Column("input_tokens", Integer, nullable=False, default=0),
    Column("output_tokens", Integer, nullable=False, default=0),
    Column("cached_tokens", Integer, nullable=False, default=0),
    Column("reasoning_tokens", Integer, nullable=False, default=0),
    Column("cost", Float),
)
Index("ix_gateway_outcomes_status", outcomes.c.batch_id, outcomes.c.status, outcomes.c.line_no)
