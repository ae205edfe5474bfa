"""The core path against the real broker and the mock upstream over loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aio_pika.abc import AbstractConnection
from support.broker import Replies, publish

from worker.messages import JobDelta, JobResult
from worker.mock.upstream import MockUpstream
from worker.service import Worker
from worker.settings import Settings


def chat(content: str = "Hello there", **body: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body}


async def test_plain_job_result_goes_to_reply_to_with_ids_and_usage(
    worker: Worker, connection: AbstractConnection, replies: Replies, settings: Settings
) -> None:
    request = {
        "custom_id": "order-42",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": chat(),
    }
    await publish(
        connection,
        settings.request_queue,
        request,
        message_id="job-1",
        correlation_id="corr-1",
        reply_to=replies.name,
    )

    message = await replies.get()
    result = JobResult.model_validate_json(message.body)
    assert result.id == "job-1"
    assert result.custom_id == "order-42"
    assert result.error is None
    assert result.response is not None and result.response.status_code == 200
    assert result.response.request_id and result.response.request_id.startswith("req_")
    body = result.response.body or {}
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"]
    assert result.usage is not None and result.usage.total_tokens > 0
    assert result.usage.prompt_tokens_details is not None
    assert result.usage.model_dump(exclude_none=True) == body["usage"]
    assert result.metadata.attempts == 1 and result.metadata.model == "gpt-4o-mini"
    assert message.correlation_id == "corr-1"
    assert message.type == "chat.result"
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2
    headers = message.headers or {}
    assert headers["x-job-id"] == "job-1"
    assert headers["x-custom-id"] == "order-42"
    assert headers["x-status"] == "ok"
    assert headers["x-attempts"] == 1
    assert headers["x-usage-prompt-tokens"] == result.usage.prompt_tokens
    assert headers["x-usage-completion-tokens"] == result.usage.completion_tokens
    assert headers["x-usage-total-tokens"] == result.usage.total_tokens


async def test_without_reply_to_the_result_goes_to_the_result_queue(
    worker: Worker, connection: AbstractConnection, settings: Settings
) -> None:
    await publish(connection, settings.request_queue, {"body": chat()})
    channel = await connection.channel()
    queue = await channel.get_queue(settings.result_queue)
    async with asyncio.timeout(15):
        while (message := await queue.get(fail=False)) is None:
            await asyncio.sleep(0.05)
    await message.ack()
    result = JobResult.model_validate_json(message.body)
    assert message.routing_key == "result.ok"
    assert result.id and message.correlation_id == result.id  # defaults to the job id
    assert (message.headers or {})["x-job-id"] == result.id


async def test_body_fields_reach_the_upstream_unchanged_with_the_bearer_key(
    worker: Worker,
    connection: AbstractConnection,
    replies: Replies,
    settings: Settings,
    mock: MockUpstream,
) -> None:
    body = chat(
        "Seeds",
        temperature=0.7,
        top_p=0.9,
        n=1,
        stop=["END"],
        max_tokens=50,
        max_completion_tokens=60,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"50256": -100},
        user="user-7",
        seed=1234,
        reasoning_effort="low",
        response_format={"type": "json_object"},
        modalities=["text"],
        tool_choice="none",
        tools=[{"type": "function", "function": {"name": "f"}}],
        vendor_extension={"keep": [1, 2.5, None, "x"]},
    )
    await publish(connection, settings.request_queue, {"body": body}, reply_to=replies.name)
    result = JobResult.model_validate_json((await replies.get()).body)
    assert result.error is None
    (recorded,) = [r for r in mock.requests if r.body.get("messages") == body["messages"]]
    assert recorded.body == body
    assert recorded.headers["authorization"] == "Bearer sk-test-0123456789"
    assert recorded.path.endswith("/chat/completions")


async def test_streamed_job_deltas_concatenate_to_the_result(
    worker: Worker,
    connection: AbstractConnection,
    replies: Replies,
    settings: Settings,
    mock: MockUpstream,
) -> None:
    body = chat(
        "Stream it", stream=True, mock={"chunks": 20, "chunk_interval": 0.002, "reasoning": True}
    )
    await publish(
        connection,
        settings.request_queue,
        {"custom_id": "s-1", "body": body},
        message_id="stream-1",
        correlation_id="c-s",
        reply_to=replies.name,
    )
    messages = await replies.until_results(1)
    *delta_messages, last = messages
    assert last.type == "chat.result"
    deltas = [JobDelta.model_validate_json(m.body) for m in delta_messages]
    assert deltas, "a streamed job sends deltas"
    assert [d.seq for d in deltas] == list(range(len(deltas)))
    assert {d.attempt for d in deltas} == {1}
    assert all(m.type == "chat.delta" and m.correlation_id == "c-s" for m in delta_messages)
    result = JobResult.model_validate_json(last.body)
    message = (result.response.body or {})["choices"][0]["message"] if result.response else {}
    content = "".join(d.choices[0].delta.get("content", "") for d in deltas)
    reasoning = "".join(d.choices[0].delta.get("reasoning_content", "") for d in deltas)
    assert content == message["content"]
    assert reasoning and reasoning == message["reasoning_content"]
    assert deltas[-1].choices[0].finish_reason == "stop"
    assert result.usage is not None and result.usage.completion_tokens > 0
    assert result.metadata.ttft_ms is not None
    assert len(deltas) <= 20, "chunks within the flush interval are coalesced"
    (recorded,) = [r for r in mock.requests if r.body.get("messages") == body["messages"]]
    assert recorded.body["stream_options"] == {"include_usage": True}


async def test_streamed_tool_call_arguments_are_merged(
    worker: Worker, connection: AbstractConnection, replies: Replies, settings: Settings
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    await publish(
        connection,
        settings.request_queue,
        {"body": chat("Weather?", stream=True, tools=tools)},
        reply_to=replies.name,
    )
    *delta_messages, last = await replies.until_results(1)
    result = JobResult.model_validate_json(last.body)
    (call,) = (result.response.body or {})["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert isinstance(orjson.loads(call["function"]["arguments"]), dict)
    fragments = [
        fragment
        for m in delta_messages
        for choice in JobDelta.model_validate_json(m.body).choices
        for fragment in choice.delta.get("tool_calls", [])
    ]
    assert "".join(f["function"]["arguments"] for f in fragments) == call["function"]["arguments"]
    assert result.response and result.response.body
    assert result.response.body["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", "invalid_message"),
        ({"body": {"messages": [{"role": "user", "content": "no model"}]}}, "invalid_message"),
        ({"body": chat(temperature=3)}, "invalid_message"),
        ({"url": "/v1/completions", "body": chat()}, "invalid_request"),
        ({"url": "/v1/embeddings", "body": chat()}, "invalid_message"),  # §18: no input
        ({"method": "GET", "body": chat()}, "invalid_request"),
        ({"body": {"model": "m", "messages": "not a list"}}, "invalid_message"),
    ],
)
async def test_invalid_messages_fail_without_an_upstream_call_and_the_worker_goes_on(
    worker: Worker,
    connection: AbstractConnection,
    replies: Replies,
    settings: Settings,
    mock: MockUpstream,
    payload: bytes | dict[str, Any],
    code: str,
) -> None:
    await publish(
        connection, settings.request_queue, payload, message_id="bad-1", reply_to=replies.name
    )
    message = await replies.get()
    result = JobResult.model_validate_json(message.body)
    assert result.error is not None and result.error.code == code
    assert message.routing_key == replies.name
    assert (message.headers or {})["x-error-code"] == code
    assert (message.headers or {})["x-status"] == "error"
    assert mock.stats.total == 0, "an invalid job never reaches the upstream"

    channel = await connection.channel()
    dlq = await channel.get_queue(settings.dead_letter_queue)
    async with asyncio.timeout(10):
        while (dead := await dlq.get(fail=False)) is None:
            await asyncio.sleep(0.05)
    await dead.ack()
    payload_bytes = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    assert dead.body == payload_bytes
    headers = dead.headers or {}
    assert headers["x-error-code"] == code
    assert headers["x-job-id"] == "bad-1"
    assert headers["x-error-message"]
    assert headers["x-attempts"] == 0

    await publish(connection, settings.request_queue, {"body": chat()}, reply_to=replies.name)
    assert JobResult.model_validate_json((await replies.get()).body).error is None
