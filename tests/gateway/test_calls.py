"""Calls through the gateway (contract §15, Calls): ``POST /v1/chat/completions`` and
``/v1/embeddings`` as one job each, driven by the real ``openai`` SDK against a real
worker, the real broker and the mock upstream."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiohttp
import httpx2
import openai
import orjson
import psutil
import pytest
from aio_pika.abc import AbstractConnection
from openai import AsyncOpenAI
from support.broker import get_one
from support.process import WorkerProcess

from worker.gateway.app import Gateway
from worker.gateway.keys import Keys
from worker.mock.upstream import MockUpstream
from worker.service import Worker
from worker.settings import Settings

from .conftest import client_for, free_port

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Awaitable[Gateway]]
StartWorker = Callable[..., Awaitable[Worker]]
MODEL = "gpt-4o-mini"


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def direct(mock: MockUpstream) -> AsyncOpenAI:
    """A client of the mock itself: what the upstream answers to the same body."""
    return AsyncOpenAI(base_url=mock.base_url, api_key=mock.config.api_key, max_retries=0)


async def read_text(stream: Any, pieces: list[str]) -> None:
    """Every content piece of a stream into ``pieces``, as it comes."""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)


async def settled(gateway: Gateway, timeout: float = 5) -> None:
    """Until no call of the gateway waits for replies."""
    async with asyncio.timeout(timeout):
        while gateway.replies.pending:
            await asyncio.sleep(0.01)


async def test_a_call_answers_what_the_upstream_answers(
    start_gateway: StartGateway, start_worker: StartWorker, mock: MockUpstream
) -> None:
    gateway = await start_gateway()
    await start_worker()
    async with client_for(gateway) as client, direct(mock) as upstream:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=ask("What is a queue?"), max_tokens=50
        )
        answer = raw.parse()
        expected = await upstream.chat.completions.create(
            model=MODEL, messages=ask("What is a queue?"), max_tokens=50
        )
    assert raw.status_code == 200
    assert raw.headers["x-job-id"].startswith("call-")
    assert raw.headers["x-request-id"].startswith("req_")  # the upstream's request id
    assert answer.object == "chat.completion" and answer.model == MODEL
    assert answer.choices[0].message.content == expected.choices[0].message.content
    assert answer.choices[0].finish_reason == expected.choices[0].finish_reason
    assert answer.usage == expected.usage
    await settled(gateway)


async def test_a_streamed_call_reads_as_openais_stream(
    start_gateway: StartGateway, start_worker: StartWorker, mock: MockUpstream
) -> None:
    gateway = await start_gateway()
    await start_worker()
    async with client_for(gateway) as client, direct(mock) as upstream:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=ask("Stream me"),
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"mock": {"chunks": 6, "chunk_interval": 0.02}},
        )
        received = [chunk async for chunk in stream]
        expected = await upstream.chat.completions.create(model=MODEL, messages=ask("Stream me"))
    text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    assert text == expected.choices[0].message.content
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in received)
    assert len({c.id for c in received}) == 1
    assert received[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in received if c.choices]
    assert finishes.count("stop") == 1 and finishes[-1] == "stop"
    assert received[-1].choices == [] and received[-1].usage == expected.usage
    assert len(received) > 3  # deltas as they came, not one chunk at the end
    await settled(gateway)


async def test_the_sdks_stream_helper_assembles_tool_calls(
    start_gateway: StartGateway, start_worker: StartWorker, mock: MockUpstream
) -> None:
    gateway = await start_gateway()
    await start_worker()
    tools: list[Any] = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    async with client_for(gateway) as client, direct(mock) as upstream:
        async with client.chat.completions.stream(
            model=MODEL, messages=ask("Weather in Oslo?"), tools=tools
        ) as stream:
            final = await stream.get_final_completion()
        expected = await upstream.chat.completions.create(
            model=MODEL, messages=ask("Weather in Oslo?"), tools=tools
        )
    got, want = final.choices[0].message, expected.choices[0].message
    assert got.tool_calls is not None and want.tool_calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in got.tool_calls] == [
        (c.id, c.function.name, c.function.arguments) for c in want.tool_calls
    ]
    assert final.choices[0].finish_reason == "tool_calls"
    await settled(gateway)


async def test_a_stream_retried_mid_way_is_one_clean_stream(
    start_gateway: StartGateway, start_worker: StartWorker, mock: MockUpstream
) -> None:
    gateway = await start_gateway()
    await start_worker()
    key = uuid.uuid4().hex
    fault = {"fault": "disconnect", "after_chunks": 5, "times": 1, "key": key}
    async with client_for(gateway) as client, direct(mock) as upstream:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=ask("Tell me a long story"),
            stream=True,
            extra_body={"mock": {**fault, "chunks": 10, "chunk_interval": 0.05}},
        )
        pieces: list[str] = []
        calls_at_first_text = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if calls_at_first_text is None:
                    calls_at_first_text = mock.stats.total
                pieces.append(chunk.choices[0].delta.content)
        expected = await upstream.chat.completions.create(
            model=MODEL, messages=ask("Tell me a long story")
        )
    assert mock.stats.faults["disconnect"] == 1
    assert calls_at_first_text == 1  # the first attempt's text reached the client ...
    assert "".join(pieces) == expected.choices[0].message.content  # ... and none of it twice
    await settled(gateway)


async def test_a_stream_whose_every_attempt_fails_ends_with_an_error_event(
    start_gateway: StartGateway, start_worker: StartWorker, mock: MockUpstream
) -> None:
    gateway = await start_gateway()
    await start_worker(max_attempts=2)
    fault = {"fault": "disconnect", "after_chunks": 4, "chunks": 8, "chunk_interval": 0.02}
    async with client_for(gateway) as client, direct(mock) as upstream:
        stream = await client.chat.completions.create(
            model=MODEL, messages=ask("Fail me"), stream=True, extra_body={"mock": fault}
        )
        pieces: list[str] = []
        with pytest.raises(openai.APIError, match="upstream") as caught:
            await read_text(stream, pieces)
        expected = await upstream.chat.completions.create(model=MODEL, messages=ask("Fail me"))
    assert pieces, "some text came before the failure"
    full = expected.choices[0].message.content or ""
    assert full.startswith("".join(pieces)) and len("".join(pieces)) < len(full)
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "upstream_error"
    await settled(gateway)
    outcome = {"endpoint": "/v1/chat/completions", "outcome": "upstream_error"}
    assert gateway.metrics.registry.get_sample_value("chat_gateway_calls_total", outcome) == 1


async def test_failures_map_to_the_sdks_errors(
    start_gateway: StartGateway, start_worker: StartWorker, mock: MockUpstream
) -> None:
    gateway = await start_gateway()
    await start_worker(allowed_models=frozenset({MODEL}))
    async with client_for(gateway) as client:
        with pytest.raises(openai.BadRequestError) as refused:  # checked at the gateway
            await client.chat.completions.create(model=MODEL, messages=ask("x"), temperature=5)
        assert refused.value.code == "invalid_request" and refused.value.param == "temperature"
        assert mock.stats.total == 0
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model=MODEL, messages=ask("x"), extra_body={"mock": {"fault": "400"}}
            )
        assert bad.value.code == "invalid_request"
        with pytest.raises(openai.AuthenticationError) as auth:
            await client.chat.completions.create(
                model=MODEL, messages=ask("x"), extra_body={"mock": {"fault": "401"}}
            )
        assert auth.value.code == "authentication_error"
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model=MODEL, messages=ask("x"), extra_body={"mock": {"fault": "404"}}
            )
        with pytest.raises(openai.BadRequestError) as unserved:
            await client.chat.completions.create(model="gpt-unserved", messages=ask("x"))
        assert unserved.value.code == "model_not_allowed"
        with pytest.raises(openai.BadRequestError) as streamed:  # before any delta: HTTP 400
            await client.chat.completions.create(
                model=MODEL, messages=ask("x"), stream=True, extra_body={"mock": {"fault": "400"}}
            )
        assert streamed.value.code == "invalid_request"
        with pytest.raises(openai.BadRequestError, match="stream"):
            await client.embeddings.create(
                model="text-embedding-3-small", input="x", extra_body={"stream": True}
            )
    await settled(gateway)


async def test_bodies_that_are_not_a_request_are_refused_before_publishing(
    start_gateway: StartGateway, connection: AbstractConnection, names: dict[str, str]
) -> None:
    gateway = await start_gateway(max_message_bytes=4096)
    url = f"http://127.0.0.1:{gateway.port}/v1/chat/completions"
    big = orjson.dumps({"model": MODEL, "messages": ask("x" * 5000)})
    async with aiohttp.ClientSession() as session:
        for data, status, code in (
            (big, 413, None),
            (b"{not json", 400, "invalid_json"),
            (b"[]", 400, "invalid_json"),
            (orjson.dumps({"model": MODEL}), 400, "invalid_request"),
        ):
            async with session.post(url, data=data) as response:
                document = await response.json()
                assert response.status == status, document
                assert document["error"]["code"] == code
    channel = await connection.channel()
    queue = await channel.declare_queue(names["request_queue"], passive=True)
    assert queue.declaration_result.message_count == 0
    await channel.close()
    assert gateway.replies.pending == 0


async def test_a_lane_no_queue_takes_answers_503(
    start_gateway: StartGateway, names: dict[str, str]
) -> None:
    gateway = await start_gateway(gateway_lane=f"{names['request_queue']}.nowhere")
    async with client_for(gateway) as client:
        with pytest.raises(openai.InternalServerError) as refused:
            await client.chat.completions.create(model=MODEL, messages=ask("anyone?"))
    assert refused.value.status_code == 503 and "WORKER_GATEWAY_LANE" in refused.value.message
    assert gateway.replies.pending == 0


async def test_an_expired_call_answers_504(
    start_gateway: StartGateway, start_worker: StartWorker, mock: MockUpstream
) -> None:
    gateway = await start_gateway(request_timeout=1.0)
    async with client_for(gateway) as client:
        call = asyncio.create_task(
            client.chat.completions.create(model=MODEL, messages=ask("too late"))
        )
        await asyncio.sleep(1.5)  # no worker until the deadline has passed
        await start_worker()
        with pytest.raises(openai.InternalServerError) as late:
            await call
    assert late.value.status_code == 504 and late.value.code == "expired"
    assert mock.stats.total == 0
    await settled(gateway)


async def test_a_call_is_one_job_with_its_tenant_deadline_and_reply_queue(
    start_gateway: StartGateway, connection: AbstractConnection, names: dict[str, str]
) -> None:
    keys = Keys(((hashlib.sha256(b"key-a").digest(), "team-a"),))
    gateway = await start_gateway(keys=keys, request_timeout=120.0)
    async with client_for(gateway, "key-a") as client, client_for(gateway, "bad") as stranger:
        with pytest.raises(openai.AuthenticationError):
            await stranger.chat.completions.create(model=MODEL, messages=ask("x"))
        body = {"model": MODEL, "messages": ask("hello"), "seed": 7, "unknown_field": [1]}
        call = asyncio.create_task(
            client.chat.completions.create(
                model=MODEL, messages=ask("hello"), seed=7, extra_body={"unknown_field": [1]}
            )
        )
        job = await get_one(connection, names["request_queue"])  # no worker: the test is one
        line = orjson.loads(job.body)
        assert line == {
            "custom_id": job.message_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": body,
        }
        assert job.correlation_id == job.message_id and job.message_id.startswith("call-")
        assert job.reply_to == gateway.replies.name
        assert job.headers["x-tenant"] == "team-a"
        deadline = datetime.fromisoformat(str(job.headers["x-deadline"]))
        assert 110 < (deadline - datetime.now(UTC)).total_seconds() <= 120
        assert gateway.replies.pending == 1
        # A reply for no waiting call is dropped; the call's own is its answer.
        completion = {"object": "chat.completion", "id": "x", "choices": [], "model": MODEL}
        channel = await connection.channel()
        for correlation_id in ("someone-else", job.correlation_id):
            result = {
                "id": job.message_id,
                "type": "result",
                "response": {"status_code": 200, "request_id": "r1", "body": completion},
                "error": None,
            }
            await channel.default_exchange.publish(
                aio_pika.Message(
                    orjson.dumps(result), correlation_id=correlation_id, type="chat.result"
                ),
                job.reply_to,
            )
        answer = await call
        await channel.close()
    assert answer.id == "x" and answer.choices == []
    await settled(gateway)


async def test_a_client_that_goes_away_leaves_nothing_behind(
    start_gateway: StartGateway, start_worker: StartWorker, mock: MockUpstream
) -> None:
    gateway = await start_gateway()
    await start_worker()
    slow = {"mock": {"latency": 3}}
    async with client_for(gateway) as client:
        calls = [
            asyncio.create_task(
                client.chat.completions.create(model=MODEL, messages=ask("a"), extra_body=slow)
            ),
            asyncio.create_task(
                client.chat.completions.create(
                    model=MODEL, messages=ask("b"), stream=True, extra_body=slow
                )
            ),
        ]
        async with asyncio.timeout(10):
            while gateway.replies.pending < 2:
                await asyncio.sleep(0.01)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        gone = time.monotonic()
        await settled(gateway, timeout=2)
        assert time.monotonic() - gone < 1.0
    samples = gateway.metrics.registry.get_sample_value(
        "chat_gateway_calls_total",
        {"endpoint": "/v1/chat/completions", "outcome": "client_gone"},
    )
    assert samples == 2


async def test_embeddings_through_the_gateway(
    start_gateway: StartGateway, start_worker: StartWorker, mock: MockUpstream
) -> None:
    gateway = await start_gateway()
    await start_worker()
    async with client_for(gateway) as client:
        answer = await client.embeddings.create(
            model="text-embedding-3-small", input=["one", "two"], dimensions=8
        )
    assert [item.index for item in answer.data] == [0, 1]
    assert all(len(item.embedding) == 8 for item in answer.data)
    assert answer.usage.prompt_tokens > 0


CONCURRENT = 2000


@pytest.mark.timeout(600)
async def test_thousands_of_concurrent_calls_leave_nothing_behind(
    start_gateway: StartGateway, settings: Settings
) -> None:
    gateway = await start_gateway()
    # The mock and the worker in processes of their own: this loop runs the gateway and
    # the 2,000 clients, and the gateway's table and tasks are what is checked.
    port = free_port()
    upstream = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "worker", "mock-upstream", "--port", str(port)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    worker = WorkerProcess(
        settings, concurrency=1000, upstream_base_url=f"http://127.0.0.1:{port}/v1"
    )
    # aiohttp's pool: httpx's hands out connections in time quadratic in the requests waiting
    pool = httpx2.Limits(max_connections=CONCURRENT + 50, max_keepalive_connections=CONCURRENT + 50)
    me = psutil.Process()
    rss: list[float] = []
    elapsed: list[float] = []
    try:
        async with client_for(gateway) as client:  # the first answer: the worker is up
            await client.chat.completions.create(model=MODEL, messages=ask("warm up"))
        await asyncio.sleep(0.5)
        baseline = len(asyncio.all_tasks())
        for _ in range(2):
            http = openai.DefaultAioHttpClient(limits=pool, timeout=120)
            started = time.perf_counter()
            async with AsyncOpenAI(
                base_url=f"http://127.0.0.1:{gateway.port}/v1",
                api_key="none",
                max_retries=0,
                http_client=http,
            ) as client:
                answers = await asyncio.gather(
                    *(
                        client.chat.completions.create(model=MODEL, messages=ask(f"hello {n}"))
                        for n in range(CONCURRENT)
                    )
                )
                assert gateway.replies.pending == 0
            elapsed.append(time.perf_counter() - started)
            contents = [answer.choices[0].message.content or "" for answer in answers]
            assert all(text.startswith("Mock reply to 1 messages:") for text in contents)
            assert len({answer.id for answer in answers}) == CONCURRENT
            async with asyncio.timeout(15):  # the closed connections' handlers end
                while len(asyncio.all_tasks()) > baseline:
                    await asyncio.sleep(0.05)
            rss.append(me.memory_info().rss / 2**20)
        assert await gateway.replies.consumers() == 1
        if shutil.which("rabbitmqctl"):  # the broker's own view, where this host can ask it
            listed = await asyncio.create_subprocess_exec(
                "rabbitmqctl",
                "list_consumers",
                "-q",
                "queue_name",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            output, _ = await asyncio.wait_for(listed.communicate(), 60)
            if listed.returncode == 0:
                queues = [line.strip() for line in output.decode().splitlines()]
                assert queues.count(gateway.replies.name) == 1
    finally:
        worker.kill()
        upstream.kill()
        await upstream.wait()
    print(f"\n{CONCURRENT} calls at once, twice: seconds {elapsed}, test process RSS MiB {rss}")
    assert rss[1] - rss[0] < 40
