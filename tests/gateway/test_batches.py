"""A batch through the gateway, a real worker, the real broker and the mock upstream,
driven by the real ``openai`` SDK (contract §15)."""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from worker.gateway.app import Gateway
from worker.mock.upstream import MockUpstream
from worker.service import Worker

from .conftest import chat_line, client_for, file_lines, jsonl, wait_batch

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Awaitable[Gateway]]


async def test_a_batch_of_good_and_failing_lines_completes_in_input_order(
    start_gateway: StartGateway, start_worker: Callable[..., Awaitable[Worker]], mock: MockUpstream
) -> None:
    gateway = await start_gateway()
    await start_worker()
    lines: list[dict[str, Any]] = []
    for n in range(40):
        line = chat_line(f"req-{n}", f"hello {n}")
        if n % 7 == 3:
            line["body"]["mock"] = {"fault": "400"}
        lines.append(line)
    failing = {f"req-{n}" for n in range(40) if n % 7 == 3}
    async with client_for(gateway) as client:
        uploaded = await client.files.create(
            file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch"
        )
        assert uploaded.bytes == len(jsonl(lines)) and uploaded.purpose == "batch"
        content = await client.files.content(uploaded.id)
        assert content.read() == jsonl(lines)
        batch = await client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"run": "t1"},
        )
        assert batch.status in ("validating", "in_progress")
        done = await wait_batch(client, batch.id, {"completed", "failed"})
        assert done.status == "completed", done.errors
        assert done.request_counts is not None
        assert done.request_counts.total == 40
        assert done.request_counts.failed == len(failing)
        assert done.request_counts.completed == 40 - len(failing)
        assert done.metadata == {"run": "t1"}
        assert done.usage is not None and done.usage.total_tokens > 0
        output = await file_lines(client, done.output_file_id)
        errors = await file_lines(client, done.error_file_id)
    ok_ids = [line["custom_id"] for line in lines if line["custom_id"] not in failing]
    assert [line["custom_id"] for line in output] == ok_ids
    assert [line["custom_id"] for line in errors] == [
        line["custom_id"] for line in lines if line["custom_id"] in failing
    ]
    for line in output:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"
    for line in errors:
        assert line["error"]["code"] == "invalid_request"
        assert line["response"]["status_code"] == 400


async def test_a_file_with_a_bad_line_fails_the_batch_and_publishes_nothing(
    start_gateway: StartGateway, mock: MockUpstream, settings: Any, connection: Any
) -> None:
    gateway = await start_gateway()
    lines = [chat_line("a"), chat_line("a"), {"custom_id": "c", "method": "GET"}]
    raw = jsonl(lines) + b"not json\n"
    async with client_for(gateway) as client:
        uploaded = await client.files.create(file=("bad.jsonl", io.BytesIO(raw)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        failed = await wait_batch(client, batch.id, {"failed", "in_progress", "completed"})
    assert failed.status == "failed"
    assert failed.errors is not None and failed.errors.data is not None
    found = [(e.code, e.line) for e in failed.errors.data]
    assert found == [("duplicate_custom_id", 2), ("invalid_method", 3), ("invalid_json_line", 4)]
    channel = await connection.channel()
    queue = await channel.declare_queue(settings.request_queue, passive=True)
    assert queue.declaration_result.message_count == 0
    await channel.close()
