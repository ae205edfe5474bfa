"""The producer client against the real broker, a worker and the mock upstream."""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aio_pika.abc import AbstractConnection
from opentelemetry.sdk.trace import TracerProvider

from worker.messages import ChatCompletionRequest, ErrorCode, JobDelta, JobResult
from worker.mock.upstream import MockUpstream
from worker.producer.client import (
    BrokerUnreachable,
    ChatClient,
    ChatClientError,
    ConnectionLost,
    JobFailed,
    JobTimeout,
    PublishFailed,
    StreamText,
)
from worker.service import Worker
from worker.settings import Settings

WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def chat(content: str = "Hello there", **body: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body}


def message_of(result: JobResult) -> dict[str, Any]:
    assert result.response is not None and result.response.body is not None
    message: dict[str, Any] = result.response.body["choices"][0]["message"]
    return message


@pytest.fixture
async def client(connection: AbstractConnection, settings: Settings) -> AsyncIterator[ChatClient]:
    async with ChatClient(connection, settings=settings) as chat_client:
        yield chat_client


async def test_complete_returns_the_result_with_usage(
    worker: Worker, client: ChatClient, mock: MockUpstream
) -> None:
    result = await client.complete(chat(), custom_id="c-1", job_id="job-c-1", timeout=15)
    assert result.id == "job-c-1" and result.custom_id == "c-1"
    assert result.ok and message_of(result)["content"].startswith("Mock reply")
    assert result.usage is not None and result.usage.total_tokens > 0
    assert mock.stats.total == 1


async def test_complete_accepts_the_model_and_returns_tool_calls_and_reasoning(
    worker: Worker, client: ChatClient
) -> None:
    body = ChatCompletionRequest.model_validate(
        chat("Weather in Paris?", tools=WEATHER, mock={"reasoning": True})
    )
    result = await client.complete(body, timeout=15)
    message = message_of(result)
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert set(orjson.loads(call["function"]["arguments"])) == {"city"}
    assert message["reasoning_content"].startswith("Thinking about")


async def test_complete_skips_the_deltas_of_a_streamed_job(
    worker: Worker, client: ChatClient
) -> None:
    result = await client.complete(chat(stream=True), timeout=15)
    assert result.ok and message_of(result)["content"]


async def test_concurrent_completes_each_get_their_own_result(
    worker: Worker, client: ChatClient
) -> None:
    results = await asyncio.gather(
        *(client.complete(chat(f"question {n}"), custom_id=f"n-{n}", timeout=30) for n in range(40))
    )
    assert [r.custom_id for r in results] == [f"n-{n}" for n in range(40)]
    assert len({message_of(r)["content"] for r in results}) > 1


async def test_stream_yields_deltas_then_the_result(worker: Worker, client: ChatClient) -> None:
    text = StreamText()
    items = []
    body = chat("Stream it", mock={"chunks": 16, "chunk_interval": 0.005, "reasoning": True})
    async for item in client.stream(body, custom_id="s-1", timeout=15):
        items.append(item)
        if isinstance(item, JobDelta):
            text.add(item)
    *deltas, result = items
    assert deltas and all(isinstance(d, JobDelta) for d in deltas)
    assert isinstance(result, JobResult) and result.ok and result.custom_id == "s-1"
    assert [d.seq for d in deltas if isinstance(d, JobDelta)] == list(range(len(deltas)))
    assert text.attempt == 1
    assert str(text) == text.content() == message_of(result)["content"]
    assert text.reasoning() and text.reasoning() == message_of(result)["reasoning_content"]
    assert result.usage is not None and result.usage.completion_tokens > 0


async def test_stream_merges_tool_call_fragments(worker: Worker, client: ChatClient) -> None:
    text = StreamText()
    async for item in client.stream(chat("Weather?", tools=WEATHER), timeout=15):
        if isinstance(item, JobDelta):
            text.add(item)
        else:
            result = item
    assert text.tool_calls() == message_of(result)["tool_calls"]
    assert text.tool_calls()[0]["function"]["name"] == "get_weather"


async def test_stream_restarts_the_text_when_an_attempt_fails_midway(
    worker: Worker, client: ChatClient, mock: MockUpstream
) -> None:
    fault = {"fault": "error_event", "times": 1, "key": uuid.uuid4().hex}
    body = chat("Retry me", mock={**fault, "chunks": 12, "chunk_interval": 0.01})
    text = StreamText()
    attempts: list[int] = []
    partial_of_first = ""
    async for item in client.stream(body, timeout=20):
        if isinstance(item, JobDelta):
            if item.attempt == 2 and not partial_of_first:
                partial_of_first = text.content() or "-"
            text.add(item)
            attempts.append(item.attempt)
        else:
            result = item
    assert attempts[0] == 1 and attempts[-1] == 2, "deltas of attempt 1, then of attempt 2"
    assert partial_of_first not in ("", "-"), "attempt 1 had sent some text before failing"
    assert result.metadata.attempts == 2
    assert text.attempt == 2
    assert text.content() == message_of(result)["content"]
    assert mock.stats.total == 2


async def test_complete_raises_job_failed_for_an_invalid_body(
    worker: Worker, client: ChatClient
) -> None:
    with pytest.raises(JobFailed) as failed:
        await client.complete(chat(temperature=3), custom_id="bad", timeout=15)
    assert failed.value.code is ErrorCode.INVALID_MESSAGE
    assert failed.value.result.custom_id == "bad"
    assert "temperature" in str(failed.value)

    result = await client.complete(chat(temperature=3), timeout=15, raise_on_error=False)
    assert result.error is not None and result.error.code is ErrorCode.INVALID_MESSAGE


async def test_stream_raises_job_failed_after_the_deltas(
    worker: Worker, client: ChatClient
) -> None:
    body = chat(mock={"fault": "401"})
    with pytest.raises(JobFailed) as failed:
        async for _ in client.stream(body, timeout=15):
            pass
    assert failed.value.code is ErrorCode.AUTHENTICATION_ERROR


async def test_a_passed_deadline_fails_as_expired(
    worker: Worker, client: ChatClient, mock: MockUpstream
) -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    with pytest.raises(JobFailed) as failed:
        await client.complete(chat(), deadline=past, timeout=15)
    assert failed.value.code is ErrorCode.EXPIRED
    assert mock.stats.total == 0

    future = datetime.now(UTC) + timedelta(minutes=5)
    assert (await client.complete(chat(), deadline=future, timeout=15)).ok


async def test_complete_raises_job_timeout_when_no_worker_answers(
    connection: AbstractConnection, client: ChatClient, settings: Settings
) -> None:
    channel = await connection.channel()
    await channel.declare_queue(settings.request_queue, durable=True)
    with pytest.raises(JobTimeout) as timed_out:
        await client.complete(chat(), job_id="slow-1", timeout=0.5)
    assert timed_out.value.job_id == "slow-1"
    assert isinstance(timed_out.value, TimeoutError)
    with pytest.raises(JobTimeout):
        async for _ in client.stream(chat(), timeout=0.3):
            pass


async def test_submit_publishes_a_persistent_job_with_its_properties(
    connection: AbstractConnection, client: ChatClient, settings: Settings
) -> None:
    channel = await connection.channel()
    queue = await channel.declare_queue(settings.request_queue, durable=True)
    deadline = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("produce") as span:
        job_id = await client.submit(
            chat(), custom_id="p-1", reply_to="my.replies", deadline=deadline, priority=3
        )
        trace_id = format(span.get_span_context().trace_id, "032x")
    plain_id = await client.submit(chat())
    message = await queue.get(timeout=5)
    assert message.message_id == job_id and len(job_id) == 32
    assert message.delivery_mode == 2 and message.priority == 3
    assert message.reply_to == "my.replies"
    assert message.content_type == "application/json"
    headers = message.headers or {}
    assert datetime.fromisoformat(str(headers["x-deadline"])) == deadline
    assert trace_id in str(headers["traceparent"])
    line = orjson.loads(message.body)
    assert line == {
        "custom_id": "p-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": chat(),
    }
    second = await queue.get(timeout=5)
    assert second.message_id == plain_id
    assert "x-deadline" not in (second.headers or {})
    # Issue 27: every publish carries its time and a trace context, a new trace without a
    # current span (W3C traceparent: version 00, 32 + 16 hex digits, sampled).
    for published in (message, second):
        assert published.timestamp is not None
        assert abs((datetime.now(UTC) - published.timestamp).total_seconds()) < 60
    traceparent = str((second.headers or {})["traceparent"])
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", traceparent), traceparent
    assert trace_id not in traceparent and "0" * 32 not in traceparent


async def test_submit_fails_when_the_request_queue_does_not_exist(
    connection: AbstractConnection,
) -> None:
    async with ChatClient(connection, request_queue=f"missing-{uuid.uuid4().hex}") as client:
        with pytest.raises(PublishFailed):
            await client.submit(chat())
        with pytest.raises(ValueError, match="time zone"):
            await client.submit(chat(), deadline=datetime(2030, 1, 1))


async def test_item27_connect_with_the_broker_down_raises_a_client_error() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    with pytest.raises(BrokerUnreachable, match="connection refused") as caught:
        async with ChatClient.connect(url, request_queue="q"):
            pass
    assert isinstance(caught.value, ChatClientError) and isinstance(caught.value, ConnectionError)


async def test_connect_opens_and_closes_its_own_connection(
    worker: Worker, amqp_url: str, settings: Settings
) -> None:
    async with ChatClient.connect(amqp_url, settings=settings) as client:
        assert (await client.complete(chat(), timeout=15)).ok
    assert client.connection.is_closed


async def test_a_lost_connection_fails_the_waiting_calls(
    connection: AbstractConnection, amqp_url: str, settings: Settings
) -> None:
    channel = await connection.channel()
    await channel.declare_queue(settings.request_queue, durable=True)
    async with ChatClient.connect(amqp_url, settings=settings) as client:
        waiting = asyncio.create_task(client.complete(chat(), timeout=30))
        await asyncio.sleep(0.3)
        await client.connection.close()
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(waiting, 5)
