"""Upstream faults, retries, delay queues, dead letters and request checks, end to end."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aio_pika.abc import AbstractConnection
from support.broker import Replies, get_one, publish

from worker.messages import JobDelta, JobResult
from worker.mock.upstream import MockUpstream
from worker.service import Worker

StartWorker = Callable[..., Awaitable[Worker]]


def job(mock: dict[str, Any] | None = None, **body: Any) -> dict[str, Any]:
    """A request whose upstream behaviour the mock takes from ``mock`` (keyed per test)."""
    key = uuid.uuid4().hex
    options = {"key": key, **(mock or {})}
    return {
        "custom_id": key,
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"fault test {key}"}],
            "mock": options,
            **body,
        },
    }


def calls(mock: MockUpstream, request: dict[str, Any]) -> int:
    return sum(1 for r in mock.requests if r.body.get("messages") == request["body"]["messages"])


async def run_job(
    connection: AbstractConnection,
    replies: Replies,
    queue: str,
    request: dict[str, Any],
    **properties: Any,
) -> tuple[JobResult, list[JobDelta]]:
    await publish(connection, queue, request, reply_to=replies.name, **properties)
    *deltas, last = await replies.until_results(1, timeout=30)
    return (
        JobResult.model_validate_json(last.body),
        [JobDelta.model_validate_json(m.body) for m in deltas],
    )


@pytest.mark.parametrize(
    ("fault", "stream"),
    [
        ({"fault": "429", "retry_after": 1}, False),
        ({"fault": "429", "retry_after_ms": 200}, False),
        ({"fault": "503"}, False),
        ({"fault": "malformed"}, False),
        ({"fault": "disconnect"}, False),
        ({"fault": "malformed"}, True),
        ({"fault": "error_event"}, True),
        ({"fault": "disconnect"}, True),
        ({"fault": "stall", "stall": 5}, True),
    ],
)
async def test_a_passing_fault_is_retried_and_the_job_succeeds(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    fault: dict[str, Any],
    stream: bool,
) -> None:
    worker = await start_worker(stream_idle_timeout=0.5, request_timeout=2)
    request = job({**fault, "times": 1, "chunks": 6}, stream=stream)
    result, deltas = await run_job(connection, replies, worker.settings.request_queue, request)
    assert result.error is None, result.error
    # A call refused for budget (429) is not an attempt: the job waited for budget (§11).
    refused = fault["fault"] == "429"
    assert result.metadata.attempts == (1 if refused else 2)
    assert (result.metadata.rate_limit_wait_ms > 0) is refused
    assert calls(mock, request) == 2
    if stream:
        last_attempt = [d for d in deltas if d.attempt == 2]
        assert [d.seq for d in last_attempt] == list(range(len(last_attempt)))
        text = "".join(d.choices[0].delta.get("content", "") for d in last_attempt)
        assert result.response is not None
        assert text == (result.response.body or {})["choices"][0]["message"]["content"]


async def test_retry_after_as_an_http_date_is_honoured(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
) -> None:
    worker = await start_worker()
    request = job({"fault": "429", "retry_after": 2, "retry_after_date": True, "times": 1})
    started = asyncio.get_running_loop().time()
    result, _ = await run_job(connection, replies, worker.settings.request_queue, request)
    assert result.error is None
    assert result.metadata.attempts == 1
    assert result.metadata.rate_limit_wait_ms >= 900
    assert asyncio.get_running_loop().time() - started >= 0.9


@pytest.mark.parametrize(
    ("fault", "code", "attempts"),
    [
        ({"fault": "400"}, "invalid_request", 1),
        ({"fault": "422"}, "invalid_request", 1),
        ({"fault": "401"}, "authentication_error", 1),
        ({"fault": "403"}, "authentication_error", 1),
        ({"fault": "404"}, "not_found", 1),
        ({"fault": "500"}, "upstream_error", 3),
        # Waiting for budget is not an attempt: it ends at WORKER_RATE_LIMIT_MAX_WAIT.
        ({"fault": "429", "retry_after_ms": 10}, "rate_limited", 0),
        ({"fault": "stall", "stall": 5}, "timeout", 3),
    ],
)
async def test_a_lasting_fault_fails_with_its_code_and_is_dead_lettered(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    fault: dict[str, Any],
    code: str,
    attempts: int,
) -> None:
    worker = await start_worker(max_attempts=3, request_timeout=0.3, rate_limit_max_wait=0.5)
    request = job(fault)
    result, _ = await run_job(
        connection, replies, worker.settings.request_queue, request, message_id="failing-1"
    )
    assert result.error is not None
    assert result.error.code == code
    assert result.metadata.attempts == attempts
    if code == "rate_limited":
        assert calls(mock, request) >= 2, "refused calls were made again while budget waited"
    else:
        assert calls(mock, request) == attempts
    if fault["fault"].isdigit():
        assert result.error.status_code == int(fault["fault"])
        assert result.response is not None
        assert result.response.status_code == int(fault["fault"])
        assert "error" in (result.response.body or {}), "the upstream's error body is kept"
    dead = await get_one(connection, worker.settings.dead_letter_queue)
    assert orjson.loads(dead.body) == request
    headers = dead.headers or {}
    assert headers["x-error-code"] == code
    assert headers["x-attempts"] == attempts
    assert headers["x-job-id"] == "failing-1"


async def test_a_long_retry_after_goes_round_a_delay_queue(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Budget waits over 3 s leave the process (30 s in production: kept short here).
    monkeypatch.setattr("worker.retry.RATE_LIMIT_INLINE_WAIT", 3.0)
    worker = await start_worker()
    request = job({"fault": "429", "retry_after": 6, "times": 1})
    await publish(
        connection,
        worker.settings.request_queue,
        request,
        message_id="later-1",
        reply_to=replies.name,
    )
    async with asyncio.timeout(10):
        while calls(mock, request) < 1:
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    assert worker.in_flight == 0, "the slot is free while the job waits in the delay queue"
    # Back from the 5 s delay queue, it waits the last second inline, then succeeds.
    result = JobResult.model_validate_json((await replies.get(timeout=30)).body)
    assert result.id == "later-1"
    assert result.error is None
    assert result.metadata.attempts == 1
    assert 5000 <= result.metadata.rate_limit_wait_ms <= 8000
    assert calls(mock, request) == 2


async def test_a_job_past_its_deadline_is_not_sent_upstream(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
) -> None:
    worker = await start_worker()
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    request = job()
    result, _ = await run_job(
        connection, replies, worker.settings.request_queue, request, headers={"x-deadline": past}
    )
    assert result.error is not None
    assert result.error.code == "expired"
    assert calls(mock, request) == 0
    result, _ = await run_job(
        connection, replies, worker.settings.request_queue, job(), headers={"x-deadline": future}
    )
    assert result.error is None


async def test_models_outside_the_allow_list_are_refused(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
) -> None:
    worker = await start_worker(allowed_models="gpt-4o-mini,o4-mini")
    request = job(model="gpt-5-secret")
    result, _ = await run_job(connection, replies, worker.settings.request_queue, request)
    assert result.error is not None
    assert result.error.code == "model_not_allowed"
    assert calls(mock, request) == 0
    result, _ = await run_job(connection, replies, worker.settings.request_queue, job())
    assert result.error is None


async def test_a_forbidden_reply_to_gets_its_error_on_the_result_exchange(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
) -> None:
    worker = await start_worker(reply_to_pattern=r"replies\.[a-z]+")
    request = job()
    await publish(
        connection,
        worker.settings.request_queue,
        request,
        reply_to=replies.name,
        message_id="forbidden-1",
    )
    message = await get_one(connection, worker.settings.result_queue)
    result = JobResult.model_validate_json(message.body)
    assert message.routing_key == "result.error"
    assert result.error is not None
    assert result.error.code == "forbidden_reply_to"
    assert calls(mock, request) == 0


async def test_a_message_over_the_size_limit_is_invalid(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
) -> None:
    worker = await start_worker(max_message_bytes=2000)
    result, _ = await run_job(
        connection, replies, worker.settings.request_queue, job(padding="x" * 3000)
    )
    assert result.error is not None
    assert result.error.code == "invalid_message"
    assert "WORKER_MAX_MESSAGE_BYTES" in result.error.message


async def test_a_reply_to_queue_that_does_not_exist_falls_back_to_the_result_exchange(
    start_worker: StartWorker,
    connection: AbstractConnection,
    mock: MockUpstream,
) -> None:
    worker = await start_worker()
    await publish(
        connection,
        worker.settings.request_queue,
        job(stream=True),
        reply_to="no-such-queue-" + uuid.uuid4().hex,
        message_id="orphan-1",
    )
    channel = await connection.channel()
    results = await channel.get_queue(worker.settings.result_queue)
    async with asyncio.timeout(15):
        while (message := await results.get(fail=False)) is None:
            await asyncio.sleep(0.05)
    await message.ack()
    assert message.routing_key == "result.ok"
    assert JobResult.model_validate_json(message.body).id == "orphan-1"


async def test_a_message_redelivered_too_often_is_stopped_and_dead_lettered(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
) -> None:
    worker = await start_worker(max_attempts=3)
    request = job()
    # As a quorum queue reports a message that already took three workers down.
    result, _ = await run_job(
        connection,
        replies,
        worker.settings.request_queue,
        request,
        headers={"x-delivery-count": 3},
        message_id="poison-1",
    )
    assert result.error is not None
    assert result.error.code == "upstream_error"
    assert calls(mock, request) == 0
    dead = await get_one(connection, worker.settings.dead_letter_queue)
    assert (dead.headers or {})["x-job-id"] == "poison-1"
