"""The gateway's store: one async engine (SQLite or PostgreSQL), files and their lines."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Insert,
    RowMapping,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from worker.gateway.migrate import upgrade
from worker.gateway.schema import batches, file_lines, files

__all__ = ["Record", "Store", "async_url", "insert_ignoring", "new_id", "now"]

Record = RowMapping
"""A row as a read-only mapping of column name to value."""

#: rows a download reads per query: each page is its own short transaction
PAGE = 1000
#: bytes a page of lines holds at most (one longer line is a page of its own)
PAGE_BYTES = 4 * 1024 * 1024
#: an upload left in "uploading" this long was abandoned by a gateway that died
STALE_UPLOAD = 3600
# SQLite: how long a writer waits for another process's lock before it fails.
SQLITE_BUSY_MS = 30_000
LIVE = ("validating", "in_progress", "cancelling", "finalizing")


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def async_url(url: str) -> str:
    """``sqlite:///x`` → ``sqlite+aiosqlite:///x``; ``postgresql://`` → ``+asyncpg``."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise ValueError(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    cursor.close()


def insert_ignoring(connection: AsyncConnection, table: Any) -> Insert:
    """``INSERT … ON CONFLICT DO NOTHING`` in the connection's dialect."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


def same_tenant(column: Any, tenant: str | None) -> ColumnElement[bool]:
    result: ColumnElement[bool] = column.is_not_distinct_from(tenant)
    return result


class Store:
    """Files and their lines; :mod:`worker.gateway.ledger` keeps the batches' outcomes."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @classmethod
    async def open(cls, url: str) -> Store:
        """Connect to ``url`` (``sqlite:///…`` or ``postgresql://…``) and migrate."""
        target = async_url(url)
        if target.startswith("sqlite"):
            # One connection: writes take turns in-process instead of failing on the lock;
            # every query is short (pages), so nothing waits long for it.
            engine = create_async_engine(target, pool_size=1, max_overflow=0)
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            engine = create_async_engine(target, pool_size=10, max_overflow=10, pool_pre_ping=True)
        await upgrade(engine)
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as connection:
                await connection.execute(select(1))
        except Exception:
            return False
        return True

    # --- uploads ---------------------------------------------------------------------

    async def begin_upload(self, tenant: str | None, filename: str, purpose: str) -> str:
        file_id = new_id("file-")
        async with self.engine.begin() as connection:
            await connection.execute(
                insert(files).values(
                    id=file_id,
                    tenant=tenant,
                    filename=filename,
                    purpose=purpose,
                    kind="input",
                    bytes=0,
                    lines=0,
                    last_line=0,
                    created_at=now(),
                    status="uploading",
                )
            )
        return file_id

    async def add_lines(self, file_id: str, rows: Sequence[tuple[int, bytes]]) -> None:
        if rows:
            async with self.engine.begin() as connection:
                await connection.execute(
                    insert(file_lines),
                    [{"file_id": file_id, "line_no": n, "data": data} for n, data in rows],
                )

    async def finish_upload(self, file_id: str, size: int, lines: int, last_line: int) -> Record:
        async with self.engine.begin() as connection:
            await connection.execute(
                update(files)
                .where(files.c.id == file_id)
                .values(bytes=size, lines=lines, last_line=last_line, status="processed")
            )
            row = (await connection.execute(select(files).where(files.c.id == file_id))).one()
        return row._mapping

    async def discard_upload(self, file_id: str) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(delete(file_lines).where(file_lines.c.file_id == file_id))
            await connection.execute(delete(files).where(files.c.id == file_id))

    async def discard_stale_uploads(self) -> int:
        """Remove uploads a dead gateway left half-written."""
        async with self.engine.begin() as connection:
            stale = select(files.c.id).where(
                files.c.status == "uploading", files.c.created_at < now() - STALE_UPLOAD
            )
            ids = list((await connection.execute(stale)).scalars())
            if ids:
                await connection.execute(delete(file_lines).where(file_lines.c.file_id.in_(ids)))
                await connection.execute(delete(files).where(files.c.id.in_(ids)))
        return len(ids)

    # --- reading -----------------------------------------------------------------------

    async def get_file(self, file_id: str, tenant: str | None) -> Record | None:
        query = select(files).where(
            files.c.id == file_id,
            same_tenant(files.c.tenant, tenant),
            files.c.status != "uploading",
        )
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).first()
        return None if row is None else row._mapping

    async def list_files(
        self,
        tenant: str | None,
        *,
        limit: int,
        after: str | None = None,
        purpose: str | None = None,
        newest_first: bool = True,
    ) -> tuple[list[Record], bool]:
        """A page of the tenant's files, and whether more follow."""
        query = select(files).where(
            same_tenant(files.c.tenant, tenant), files.c.status != "uploading"
        )
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        if after is not None:
            mark = select(files.c.seq).where(files.c.id == after).scalar_subquery()
            query = query.where(files.c.seq < mark if newest_first else files.c.seq > mark)
        order = files.c.seq.desc() if newest_first else files.c.seq.asc()
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query.order_by(order).limit(limit + 1))).all()
        return [row._mapping for row in rows[:limit]], len(rows) > limit

    async def delete_file(self, file_id: str) -> bool:
        """Delete a file; False when a live batch still reads it (as input)."""
        async with self.engine.begin() as connection:
            busy = select(func.count()).where(
                batches.c.input_file_id == file_id, batches.c.status.in_(LIVE)
            )
            if (await connection.execute(busy)).scalar_one():
                return False
            await connection.execute(delete(file_lines).where(file_lines.c.file_id == file_id))
            await connection.execute(delete(files).where(files.c.id == file_id))
        return True

    async def lines(
        self, file_id: str, after: int = 0, limit: int = PAGE
    ) -> list[tuple[int, bytes]]:
        """Physical lines after line ``after``, in order, newlines included: at most
        ``limit`` of them, and no more than :data:`PAGE_BYTES` but for a single long line."""
        sizes = (
            select(file_lines.c.line_no, func.length(file_lines.c.data))
            .where(file_lines.c.file_id == file_id, file_lines.c.line_no > after)
            .order_by(file_lines.c.line_no)
            .limit(limit)
        )
        async with self.engine.connect() as connection:
            listed = (await connection.execute(sizes)).all()
            upto, total = None, 0
            for line_no, size in listed:
                if upto is not None and total + size > PAGE_BYTES:
                    break
                upto, total = line_no, total + size
            if upto is None:
                return []
            query = (
                select(file_lines.c.line_no, file_lines.c.data)
                .where(
                    file_lines.c.file_id == file_id,
                    file_lines.c.line_no > after,
                    file_lines.c.line_no <= upto,
                )
                .order_by(file_lines.c.line_no)
            )
            return [(n, bytes(data)) for n, data in (await connection.execute(query)).all()]

    async def iter_lines(
        self, file_id: str, after: int = 0, upto: int | None = None
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Every physical line after ``after`` (up to ``upto``), page by page."""
        while True:
            page = await self.lines(file_id, after)
            if not page:
                return
            for line_no, data in page:
                if upto is not None and line_no > upto:
                    return
                yield line_no, data
            after = page[-1][0]

    async def content(self, file: Record) -> AsyncIterator[bytes]:
        """A file's bytes, page by page: an input file's lines, or a batch's outcome lines."""
        if file["kind"] == "input":
            async for _, data in self.iter_lines(file["id"]):
                yield data
            return
        from worker.gateway.ledger import iter_outcome_lines

        status = "ok" if file["kind"] == "output" else "error"
        async for line in iter_outcome_lines(self.engine, file["batch_id"], status):
            yield line + b"\n"
