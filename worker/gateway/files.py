"""``/v1/files``: upload (streamed into the store), list, read, download (streamed), delete."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from worker.gateway.context import GatewayContext
from worker.gateway.errors import BadRequest, Conflict, NotFound
from worker.gateway.keys import tenant_of
from worker.gateway.paging import int_param, page
from worker.gateway.store import Record

__all__ = ["add_routes", "file_object"]

READ_CHUNK = 256 * 1024
# Lines go to the store in transactions of about this many bytes (or FLUSH_LINES lines).
FLUSH_BYTES = 1024 * 1024
FLUSH_LINES = 1000
PURPOSES = frozenset({"batch"})
MAX_LIST = 10_000


def file_object(row: Record) -> dict[str, Any]:
    """OpenAI's File object."""
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


@dataclass(slots=True)
class _Upload:
    """Splits the streamed bytes into lines and hands them to the store in slices."""

    context: GatewayContext
    file_id: str
    size: int = 0
    lines: int = 0
    line_no: int = 0
    pending: bytearray = field(default_factory=bytearray)
    rows: list[tuple[int, bytes]] = field(default_factory=list)
    row_bytes: int = 0

    async def feed(self, chunk: bytes) -> None:
        limits = self.context.settings
        self.size += len(chunk)
        if self.size > limits.gateway_max_file_bytes:
            raise BadRequest(
                f"the file is larger than {limits.gateway_max_file_bytes} bytes", param="file"
            )
        self.pending += chunk
        start = 0
        while (end := self.pending.find(b"\n", start)) >= 0:
            await self._line(bytes(self.pending[start : end + 1]))
            start = end + 1
        del self.pending[:start]
        if len(self.pending) > self.context.max_line_bytes:
            raise BadRequest(
                f"line {self.line_no + 1} is longer than {self.context.max_line_bytes} bytes",
                param="file",
            )

    async def end(self) -> None:
        if self.pending:
            await self._line(bytes(self.pending))
            self.pending.clear()
        await self._flush()

    async def _line(self, data: bytes) -> None:
        self.line_no += 1
        if data.strip():
            self.lines += 1
            if self.lines > self.context.settings.gateway_max_file_lines:
                raise BadRequest(
                    f"the file has more than {self.context.settings.gateway_max_file_lines} "
                    "request lines",
                    param="file",
                )
        self.rows.append((self.line_no, data))
        self.row_bytes += len(data)
        if self.row_bytes >= FLUSH_BYTES or len(self.rows) >= FLUSH_LINES:
            await self._flush()

    async def _flush(self) -> None:
        rows, self.rows, self.row_bytes = self.rows, [], 0
        await self.context.store.add_lines(self.file_id, rows)


async def _receive(context: GatewayContext, tenant: str | None, part: BodyPartReader) -> Record:
    filename = part.filename or "upload.jsonl"
    file_id = await context.store.begin_upload(tenant, filename, "batch")
    upload = _Upload(context, file_id)
    try:
        while chunk := await part.read_chunk(READ_CHUNK):
            await upload.feed(chunk)
        await upload.end()
        return await context.store.finish_upload(file_id, upload.size, upload.lines, upload.line_no)
    except BaseException:
        await context.store.discard_upload(file_id)
        raise


async def create_file(request: web.Request) -> web.Response:
    context = GatewayContext.of(request)
    tenant = tenant_of(request)
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("send multipart/form-data with fields file and purpose")
    reader = await request.multipart()
    purpose: str | None = None
    stored: Record | None = None
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.text())[:64].strip()
            elif part.name == "file" and stored is None:
                stored = await _receive(context, tenant, part)
            else:
                await part.release()
        if stored is None:
            raise BadRequest("a file is required", param="file")
        if purpose not in PURPOSES:
            raise BadRequest("purpose must be 'batch'", param="purpose")
    except BaseException:
        if stored is not None:
            await context.store.discard_upload(stored["id"])
        raise
    return web.json_response(file_object(stored))


async def list_files(request: web.Request) -> web.Response:
    context = GatewayContext.of(request)
    limit = int_param(request, "limit", MAX_LIST, 1, MAX_LIST)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("order must be asc or desc", param="order")
    rows, more = await context.store.list_files(
        tenant_of(request),
        limit=limit,
        after=request.query.get("after"),
        purpose=request.query.get("purpose"),
        newest_first=order == "desc",
    )
    return web.json_response(page(rows, more, file_object))


async def _file(request: web.Request) -> Record:
    context = GatewayContext.of(request)
    file_id = request.match_info["file_id"]
    row = await context.store.get_file(file_id, tenant_of(request))
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="id")
    return row


async def get_file(request: web.Request) -> web.Response:
    return web.json_response(file_object(await _file(request)))


async def file_content(request: web.Request) -> web.StreamResponse:
    row = await _file(request)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    async for data in GatewayContext.of(request).store.content(row):
        await response.write(data)
    await response.write_eof()
    return response


async def delete_file(request: web.Request) -> web.Response:
    row = await _file(request)
    if not await GatewayContext.of(request).store.delete_file(row["id"]):
        raise Conflict("the file is the input of a batch still running", param="id")
    return web.json_response({"id": row["id"], "object": "file", "deleted": True})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/files", create_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
