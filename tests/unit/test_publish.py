"""The publisher's settling publishes without a broker: nacks published again, returns not."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import aiormq
import orjson
import pytest
from pamqp.commands import Basic
from support.jobs_envelope import make_envelope

from worker.amqp import publish as publishing
from worker.amqp.publish import CopyRefused, Publisher, render_result
from worker.errors import RateLimited
from worker.job import Envelope, JobOutcome, failed
from worker.messages import JobResult
from worker.settings import Settings


class Clock:
    """``time.monotonic`` and ``asyncio.sleep`` of the publisher: sleeps pass at once."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 3))
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    for name in list(os.environ):
        if name.startswith("WORKER_"):
            monkeypatch.delenv(name)
    fake = Clock()
    # The module's own name for ``time`` only: the event loop reads the real clock.
    monkeypatch.setattr(publishing, "time", SimpleNamespace(monotonic=fake.monotonic))
    monkeypatch.setattr("worker.amqp.publish.asyncio.sleep", fake.sleep)
    return fake


def nack() -> aiormq.exceptions.DeliveryError:
    return aiormq.exceptions.DeliveryError(None, Basic.Nack(delivery_tag=1))


def returned() -> aiormq.exceptions.DeliveryError:
    message = SimpleNamespace(delivery=Basic.Return(reply_code=312, reply_text="NO_ROUTE"))
    return aiormq.exceptions.PublishError(message, Basic.Return())  # type: ignore[arg-type]


class Channel:
    """An aiormq channel whose publishes answer from a script (an exception or None), the
    last answer repeated; records where each went."""

    def __init__(self, *answers: Exception | None) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, str]] = []
        tune = SimpleNamespace(frame_max=131072)
        self.connection = SimpleNamespace(url="amqp://worker:pw@broker/", connection_tune=tune)

    async def basic_publish(
        self, body: bytes, *, exchange: str, routing_key: str, **_: Any
    ) -> None:
        self.sent.append((exchange, routing_key))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer is not None:
            raise answer


def publisher(channel: Channel, **settings: Any) -> Publisher:
    config = Settings(_env_file=None, result_queue="results", **settings)  # type: ignore[call-arg]
    return Publisher(channel, config)  # type: ignore[arg-type]


ENVELOPE = Envelope(
    job_id="job-1",
    correlation_id="job-1",
    reply_to=None,
    reply_to_forbidden=False,
    deadline=None,
    bad_deadline=None,
    prior_attempts=0,
    redeliveries=0,
    headers={},
)


async def publish_result(target: Publisher) -> None:
    await target.result(ENVELOPE, None, JobOutcome(attempts=1), b"{}", {})


async def test_item19_a_nacked_result_is_published_again_with_backoff(clock: Clock) -> None:
    channel = Channel(nack(), nack(), nack(), None)
    await publish_result(publisher(channel))
    assert channel.sent == [("chat.results", "result.ok")] * 4, "never to the dead letters"
    assert clock.slept == [0.1, 0.2, 0.4]


async def test_item19_the_pause_doubles_up_to_its_cap(clock: Clock) -> None:
    channel = Channel(*[nack()] * 8, None)
    await publish_result(publisher(channel))
    assert clock.slept == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]


async def test_item19_a_nack_past_the_window_falls_back_to_the_dead_letter_queue(
    clock: Clock,
) -> None:
    channel = Channel(nack(), nack(), nack(), nack(), None)  # DLQ: the fifth publish
    await publish_result(publisher(channel, publish_retry_window=0.5))
    assert clock.slept == [0.1, 0.2, 0.2], "the last pause ends at the window"
    assert channel.sent[:4] == [("chat.results", "result.ok")] * 4
    assert channel.sent[4:] == [("", "chat.requests.dlq")]


async def test_item19_a_return_falls_back_at_once(clock: Clock) -> None:
    channel = Channel(returned(), None)
    await publish_result(publisher(channel))
    assert channel.sent == [("chat.results", "result.ok"), ("", "chat.requests.dlq")]
    assert clock.slept == []


async def test_item19_a_dead_letter_queue_that_keeps_refusing_raises(clock: Clock) -> None:
    channel = Channel(returned(), nack())
    with pytest.raises(CopyRefused) as refused:
        await publish_result(publisher(channel, publish_retry_window=1))
    assert refused.value.destination == "chat.requests.dlq"
    assert not refused.value.returned
    assert sum(clock.slept) == pytest.approx(1.0)


def test_a_successful_result_carries_every_metadata_field_of_the_contract() -> None:
    outcome = JobOutcome(
        attempts=1,
        status_code=200,
        request_id="req-1",
        body={"object": "chat.completion", "choices": []},
        usage={"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
        latency_ms=812.4,
        finished_at=datetime(2026, 12, 7, tzinfo=UTC),
        upstream="openai",
        calls=2,
        cache="miss",
        cost={"input": 1e-6, "output": 2e-6, "total": 3e-6, "currency": "USD", "source": "x"},
    )
    document = orjson.loads(
        render_result(make_envelope(), "order-42", "gpt-4o-mini", outcome, "h/1")
    )
    assert set(document["metadata"]) == {
        "attempts",
        "calls",
        "model",
        "latency_ms",
        "ttft_ms",
        "worker",
        "finished_at",
        "upstream",
        "lane",
        "tenant",
        "rate_limit_wait_ms",
        "cache",
        "cost",
    }
    assert document["metadata"]["finished_at"] == "2026-12-07T00:00:00Z"
    result = JobResult.model_validate(document)
    assert result.ok and result.metadata.calls == 2 and result.metadata.cache == "miss"
    assert result.metadata.cost is not None and result.metadata.cost.total == 3e-6


def test_a_failed_result_has_the_error_and_no_response_without_an_upstream_answer() -> None:
    outcome = failed(RateLimited("waited 3600s for budget"), attempts=0)
    document = orjson.loads(render_result(make_envelope(), None, None, outcome, "h/1"))
    assert document["error"] == {
        "code": "rate_limited",
        "message": "waited 3600s for budget",
        "status_code": None,
    }
    assert document["response"] is None and document["usage"] is None
    assert document["metadata"]["cost"] is None
