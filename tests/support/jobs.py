"""Requests for the mock upstream, and what the mock saw of them."""

from __future__ import annotations

import uuid
from typing import Any

from worker.mock.upstream import MockUpstream


def chat_job(
    key: str | None = None, mock: dict[str, Any] | None = None, **body: Any
) -> dict[str, Any]:
    """A request line whose ``custom_id`` and message are ``key`` (a fresh one by default),
    with ``mock`` options for the mock upstream and more of the chat body."""
    key = key or uuid.uuid4().hex
    return {
        "custom_id": key,
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"job {key}"}],
            "mock": {"key": key, **(mock or {})},
            **body,
        },
    }


def calls(mock: MockUpstream, request: dict[str, Any]) -> int:
    """Upstream calls the mock received for ``request`` (matched by its messages)."""
    return sum(1 for r in mock.requests if r.body.get("messages") == request["body"]["messages"])
