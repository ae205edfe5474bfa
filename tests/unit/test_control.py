"""The console's requests to the gateways, read from a message (``worker.amqp.control``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from worker.amqp.control import (
    TYPE_GATEWAY_CONTROL,
    cancel_request_of,
    control_exchange,
)


def message(body: Any, kind: str = TYPE_GATEWAY_CONTROL) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return SimpleNamespace(type=kind, body=raw)


def test_a_cancel_request_names_its_batch() -> None:
    request = {"type": "batch_cancel_request", "batch_id": "batch_1"}
    assert cancel_request_of(message(request)) == "batch_1"
    assert control_exchange("chat.events") == "chat.events.gateway-control"


@pytest.mark.parametrize(
    "other",
    [
        message({"type": "batch_cancel_request", "batch_id": "batch_1"}, kind="chat.heartbeat"),
        message({"type": "something_else", "batch_id": "batch_1"}),
        message({"type": "batch_cancel_request", "batch_id": 7}),
        message({"type": "batch_cancel_request", "batch_id": "b" * 200}),
        message(b"not json"),
        message([1, 2]),
        message(b" " * 5000),
    ],
)
def test_anything_else_is_no_request(other: Any) -> None:
    assert cancel_request_of(other) is None
