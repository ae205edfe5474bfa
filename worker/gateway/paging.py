"""Lists in OpenAI's shape: ``{"object": "list", "data", "first_id", "last_id", "has_more"}``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from worker.gateway.errors import BadRequest
from worker.gateway.store import Record

__all__ = ["int_param", "page"]


def page(
    rows: list[Record], more: bool, render: Callable[[Record], dict[str, Any]]
) -> dict[str, Any]:
    data = [render(row) for row in rows]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name} must be an integer", param=name) from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}", param=name)
    return value
