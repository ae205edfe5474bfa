"""``/v1/batches``: create, read, list (newest first), cancel; OpenAI's Batch object."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from worker.gateway.context import GatewayContext
from worker.gateway.errors import BadRequest, Conflict, NotFound
from worker.gateway.keys import tenant_of
from worker.gateway.lines import ENDPOINTS
from worker.gateway.paging import int_param, page
from worker.gateway.store import Record

__all__ = ["add_routes", "batch_object"]

_WINDOW = re.compile(r"^([1-9][0-9]{0,5})([hm])$")
MAX_METADATA = 16
CANCELLED = ("cancelling", "cancelled")
_TIMES = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def batch_object(row: Record) -> dict[str, Any]:
    """OpenAI's Batch object, with ``usage`` and ``cost`` summed over finished lines."""
    document: dict[str, Any] = {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "model": row["model"],
        "errors": row["errors"],
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        **{name: row[name] for name in _TIMES},
        "request_counts": {
            "total": row["total"],
            "completed": row["completed"],
            "failed": row["failed"],
        },
        "metadata": row["metadata"],
        "usage": {
            "input_tokens": row["input_tokens"],
            "input_tokens_details": {"cached_tokens": row["cached_tokens"]},
            "output_tokens": row["output_tokens"],
            "output_tokens_details": {"reasoning_tokens": row["reasoning_tokens"]},
            "total_tokens": row["input_tokens"] + row["output_tokens"],
        },
        "cost": row["cost"],
    }
    return document


def window_seconds(window: Any) -> int:
    """``24h`` → 86400; any ``Nh`` or ``Nm``."""
    match = _WINDOW.match(window) if isinstance(window, str) else None
    if match is None:
        raise BadRequest(
            "completion_window must be like 24h (hours) or 90m (minutes)",
            param="completion_window",
        )
    return int(match[1]) * (3600 if match[2] == "h" else 60)


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > MAX_METADATA
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in value.items()
        )
    ):
        raise BadRequest(
            "metadata: at most 16 string keys (64 characters) and values (512)", param="metadata"
        )
    return value


async def create_batch(request: web.Request) -> web.Response:
    context = GatewayContext.of(request)
    tenant = tenant_of(request)
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise BadRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
    seconds = window_seconds(body.get("completion_window"))
    metadata = _metadata(body.get("metadata"))
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str):
        raise BadRequest("input_file_id is required", param="input_file_id")
    input_file = await context.store.get_file(file_id, tenant)
    if input_file is None:
        raise NotFound(f"No such File object: {file_id}", param="input_file_id")
    if input_file["kind"] != "input" or input_file["purpose"] != "batch":
        raise BadRequest("the input file must have purpose 'batch'", param="input_file_id")
    row = await context.batches.create(
        tenant=tenant,
        endpoint=endpoint,
        input_file=input_file,
        completion_window=body["completion_window"],
        window_seconds=seconds,
        metadata=metadata,
    )
    wake = context.wake_runner
    if callable(wake):
        wake()
    return web.json_response(batch_object(row))


async def _batch(request: web.Request) -> Record:
    batch_id = request.match_info["batch_id"]
    row = await GatewayContext.of(request).batches.get(batch_id, tenant_of(request))
    if row is None:
        raise NotFound(f"No such Batch object: {batch_id}", param="id")
    return row


async def get_batch(request: web.Request) -> web.Response:
    return web.json_response(batch_object(await _batch(request)))


async def cancel_batch(request: web.Request) -> web.Response:
    context = GatewayContext.of(request)
    row = await _batch(request)
    # Cancelling twice is no error; cancelling a batch that has ended is.
    already = row["status"] in CANCELLED
    if not already and not await context.lifecycle.cancel(row["id"]):
        fresh = await context.batches.get(row["id"], any_tenant=True)
        status = fresh["status"] if fresh is not None else row["status"]
        if status not in CANCELLED:
            raise Conflict(f"a batch that is {status} cannot be cancelled", param="id")
    fresh = await context.batches.get(row["id"], any_tenant=True)
    return web.json_response(batch_object(fresh or row))


async def list_batches(request: web.Request) -> web.Response:
    context = GatewayContext.of(request)
    limit = int_param(request, "limit", 20, 1, 100)
    rows, more = await context.batches.page(
        tenant_of(request), limit=limit, after=request.query.get("after")
    )
    return web.json_response(page(rows, more, batch_object))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
