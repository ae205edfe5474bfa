"""Traces across the queue, metrics on /metrics, JSON logs, readiness, and no content leaks."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator

import aiohttp
import orjson
import prometheus_client
import pytest
import structlog
from aio_pika.abc import AbstractConnection
from brokerctl import close_connections_of
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from support.broker import Replies, make_settings, publish

from worker.health import HealthServer
from worker.logs import configure_logging
from worker.messages import JobResult
from worker.mock.upstream import MockConfig, MockUpstream
from worker.service import Worker
from worker.telemetry import Telemetry

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
async def observed(
    amqp_url: str, names: dict[str, str], mock: MockUpstream, connection: AbstractConnection
) -> AsyncIterator[tuple[Worker, InMemorySpanExporter, HealthServer]]:
    spans = InMemorySpanExporter()
    telemetry = Telemetry(
        span_processor=SimpleSpanProcessor(spans), registry=prometheus_client.CollectorRegistry()
    )
    running = Worker(make_settings(amqp_url, names, mock), telemetry=telemetry)
    health = HealthServer(lambda: running.ready, 0, registry=telemetry.registry, host="127.0.0.1")
    await health.start()
    task = asyncio.create_task(running.run())
    async with asyncio.timeout(15):
        await running.wait_ready()
    yield running, spans, health
    running.stop()
    await asyncio.wait_for(task, 30)
    await health.stop()


def chat(content: str, **body: object) -> dict[str, object]:
    return {
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body}
    }


async def test_one_trace_from_the_producer_through_the_worker_to_the_result(
    observed: tuple[Worker, InMemorySpanExporter, HealthServer],
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
) -> None:
    running, spans, _ = observed
    traceparent = f"00-{TRACE_ID}-{PRODUCER_SPAN}-01"
    await publish(
        connection,
        running.settings.request_queue,
        chat("trace me", max_tokens=40, temperature=0.5, top_p=0.9, stream=True),
        message_id="traced-1",
        correlation_id="conv-1",
        reply_to=replies.name,
        headers={"traceparent": traceparent},
    )
    *deltas, last = await replies.until_results(1)
    result = JobResult.model_validate_json(last.body)
    assert result.error is None

    async with asyncio.timeout(5):  # the job span ends just after the ack
        while len(spans.get_finished_spans()) < 2:
            await asyncio.sleep(0.01)
    finished = {span.kind: span for span in spans.get_finished_spans()}
    consumer, client = finished[SpanKind.CONSUMER], finished[SpanKind.CLIENT]
    assert format(consumer.context.trace_id, "032x") == TRACE_ID
    assert consumer.parent is not None
    assert format(consumer.parent.span_id, "016x") == PRODUCER_SPAN
    assert consumer.attributes is not None
    assert consumer.attributes["messaging.system"] == "rabbitmq"
    assert consumer.attributes["messaging.operation.name"] == "process"
    assert consumer.attributes["messaging.destination.name"] == running.settings.request_queue
    assert consumer.attributes["messaging.message.id"] == "traced-1"
    assert consumer.attributes["messaging.message.conversation_id"] == "conv-1"
    assert isinstance(consumer.attributes["messaging.rabbitmq.message.delivery_tag"], int)

    assert client.parent is not None
    assert client.parent.span_id == consumer.context.span_id
    assert client.name == "chat gpt-4o-mini"
    attributes = client.attributes or {}
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.request.max_tokens"] == 40
    assert attributes["gen_ai.request.temperature"] == 0.5
    assert attributes["gen_ai.request.top_p"] == 0.9
    assert attributes["gen_ai.response.id"]
    assert attributes["gen_ai.response.model"] == "gpt-4o-mini"
    assert tuple(attributes["gen_ai.response.finish_reasons"]) == ("stop",)
    assert result.usage is not None
    assert attributes["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == result.usage.completion_tokens
    every_value = [
        str(v) for s in spans.get_finished_spans() for v in (s.attributes or {}).values()
    ]
    assert not any("trace me" in value for value in every_value), "no content on spans"

    upstream_headers = mock.requests[-1].headers
    assert upstream_headers["traceparent"] == (
        f"00-{TRACE_ID}-{format(client.context.span_id, '016x')}-01"
    )
    consumer_parent = f"00-{TRACE_ID}-{format(consumer.context.span_id, '016x')}-01"
    assert (last.headers or {})["traceparent"] == consumer_parent
    assert deltas
    assert all((d.headers or {})["traceparent"] == consumer_parent for d in deltas)


async def test_without_an_exporter_the_producer_context_still_flows(
    worker: Worker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
) -> None:
    traceparent = f"00-{TRACE_ID}-{PRODUCER_SPAN}-01"
    await publish(
        connection,
        worker.settings.request_queue,
        chat("no exporter"),
        reply_to=replies.name,
        headers={"traceparent": traceparent},
    )
    message = await replies.get()
    assert (message.headers or {})["traceparent"] == traceparent
    assert mock.requests[-1].headers["traceparent"] == traceparent


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return sum(
        value
        for (sample, keys), value in values.items()
        if sample == name and all((k, v) in keys for k, v in labels.items())
    )


async def test_metrics_count_jobs_tokens_and_retries(
    observed: tuple[Worker, InMemorySpanExporter, HealthServer],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    running, _, health = observed
    queue = running.settings.request_queue
    for n in range(3):
        await publish(connection, queue, chat(f"count {n}"), reply_to=replies.name)
    await publish(
        connection,
        queue,
        chat("retry", mock={"fault": "500", "times": 1, "key": "metrics-retry"}),
        reply_to=replies.name,
    )
    await publish(connection, queue, chat("bad", temperature=9), reply_to=replies.name)
    results = [JobResult.model_validate_json(m.body) for m in await replies.until_results(5)]
    prompt = sum(r.usage.prompt_tokens for r in results if r.usage)
    completion = sum(r.usage.completion_tokens for r in results if r.usage)

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{health.port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    values = samples(text)
    assert total(values, "chat_worker_jobs_total", outcome="ok") == 4
    assert (
        total(values, "chat_worker_jobs_total", outcome="error", error_code="invalid_message") == 1
    )
    assert total(values, "chat_worker_dead_lettered_total") == 1
    assert total(values, "chat_worker_retries_total", error_code="upstream_error") == 1
    assert total(values, "chat_worker_jobs_in_flight") == 0
    assert (
        total(
            values,
            "gen_ai_client_token_usage_sum",
            gen_ai_token_type="input",
            gen_ai_request_model="gpt-4o-mini",
        )
        == prompt
    )
    assert total(values, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == completion
    assert total(values, "gen_ai_client_operation_duration_seconds_count") == 5  # 4 ok + 1 retry
    assert (
        total(values, "gen_ai_client_operation_duration_seconds_count", error_type="upstream_error")
        == 1
    )
    assert total(values, "chat_worker_job_duration_seconds_count") == 5


async def test_log_lines_are_json_with_job_fields_and_never_content_or_secrets(
    amqp_url: str,
    names: dict[str, str],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    key = "sk-distinctive-SECRET-4f9a1c"
    prompt = "my distinctive private prompt 7f3e"
    reply = "a distinctive completion text 91bd"
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream, cache=False)
    try:
        async with MockUpstream(MockConfig(api_key=key)) as mock:
            settings = make_settings(amqp_url, names, mock, upstream_api_key=key)
            running = Worker(
                settings,
                telemetry=Telemetry(
                    span_processor=SimpleSpanProcessor(InMemorySpanExporter()),
                    registry=prometheus_client.CollectorRegistry(),
                ),
            )
            task = asyncio.create_task(running.run())
            await running.wait_ready()
            await publish(
                connection,
                settings.request_queue,
                {"custom_id": "log-1", **chat(prompt, mock={"content": reply})},
                message_id="logged-1",
                correlation_id="corr-log",
                reply_to=replies.name,
            )
            await publish(
                connection,
                settings.request_queue,
                chat(prompt, stream=True, mock={"content": reply, "fault": "400"}),
                reply_to=replies.name,
            )
            results = [
                JobResult.model_validate_json(m.body) for m in await replies.until_results(2)
            ]
            running.stop()
            await task
    finally:
        structlog.reset_defaults()
    assert any(r.error is None for r in results)
    output = stream.getvalue()
    assert key not in output
    assert prompt not in output
    assert reply not in output
    lines = [orjson.loads(line) for line in output.splitlines() if line.strip()]
    (finished,) = [
        line
        for line in lines
        if line.get("event") == "job finished" and line.get("job_id") == "logged-1"
    ]
    assert finished["custom_id"] == "log-1"
    assert finished["correlation_id"] == "corr-log"
    assert finished["model"] == "gpt-4o-mini"
    assert finished["attempt"] == 1
    assert finished["outcome"] == "ok"
    assert finished["error_code"] is None
    assert finished["latency_ms"] > 0
    assert finished["prompt_tokens"] > 0
    assert finished["completion_tokens"] > 0
    assert len(finished["trace_id"]) == 32
    assert len(finished["span_id"]) == 16
    assert all("timestamp" in line and "level" in line for line in lines)


async def test_readyz_turns_503_without_the_broker_and_200_when_back(
    observed: tuple[Worker, InMemorySpanExporter, HealthServer],
) -> None:
    running, _, health = observed
    base = f"http://127.0.0.1:{health.port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/healthz") as response:
            assert response.status == 200
        async with session.get(f"{base}/readyz") as response:
            assert response.status == 200
        seen: list[int] = []

        async def watch() -> None:
            while True:
                async with session.get(f"{base}/readyz") as response:
                    seen.append(response.status)
                if 503 in seen and seen[-1] == 200:
                    return
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        assert await asyncio.to_thread(close_connections_of, os.getpid())
        await asyncio.wait_for(watcher, 30)
    assert 503 in seen
    assert seen[-1] == 200
    assert running.ready
