"""How a stream is read and its deltas leave (issue 15): one read per flush interval, the
deltas of many streams in one write, a delta refused mid-stream, and the Outbox's bytes
and delivery tags against the real broker."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
import orjson
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiohttp import web
from pamqp.commands import Basic
from support.broker import Replies, publish

from worker.amqp.outbox import Outbox, PreparedPublish
from worker.amqp.topology import DELTA
from worker.messages import JobDelta, JobResult
from worker.mock.upstream import MockUpstream
from worker.service import Worker
from worker.upstream.client import Upstream

StartWorker = Callable[..., Awaitable[Worker]]


def chat(**mock: Any) -> dict[str, Any]:
    key = uuid.uuid4().hex
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"pacing {key}"}],
        "stream": True,
        "mock": {"key": key, **mock},
    }


def content_of(result: JobResult) -> str:
    assert result.response is not None and result.response.body is not None
    text: str = result.response.body["choices"][0]["message"]["content"]
    return text


def text_of(deltas: list[JobDelta]) -> str:
    return "".join(d.choices[0].delta.get("content") or "" for d in deltas)


async def test_a_fast_stream_is_read_and_published_once_an_interval(
    start_worker: StartWorker, connection: AbstractConnection, replies: Replies
) -> None:
    """60 chunks 5 ms apart with a 50 ms flush interval: the first content at once, then a
    delta every interval carrying what came meanwhile, never faster."""
    worker = await start_worker(stream_flush_interval=0.05)
    body = chat(chunks=60, chunk_interval=0.005)
    await publish(
        connection,
        worker.settings.request_queue,
        {"custom_id": "p", "body": body},
        reply_to=replies.name,
    )
    arrivals: list[float] = []
    messages: list[AbstractIncomingMessage] = []
    while True:
        message = await replies.get(timeout=30)
        arrivals.append(time.monotonic())
        messages.append(message)
        if message.type == "chat.result":
            break
    *delta_messages, last = messages
    result = JobResult.model_validate_json(last.body)
    deltas = [JobDelta.model_validate_json(m.body) for m in delta_messages]
    assert result.error is None
    assert [d.seq for d in deltas] == list(range(len(deltas)))
    assert text_of(deltas) == content_of(result)
    # ~300 ms of stream in 50 ms steps: a handful of deltas, several chunks each.
    assert 3 <= len(deltas) <= 12, len(deltas)
    # Between the second and the last delta (the first goes at once; the result follows
    # the last at once), the arrivals are an interval apart.
    gaps = [b - a for a, b in itertools.pairwise(arrivals[1 : len(deltas)])]
    assert gaps and statistics.median(gaps) >= 0.035, gaps


async def test_many_streams_share_ticks_and_lose_nothing(
    start_worker: StartWorker, connection: AbstractConnection, replies: Replies
) -> None:
    """32 streams at once: every delta of every job arrives, gapless, adding up to its
    result (their deltas leave together, a tick's worth in one write)."""
    worker = await start_worker(stream_flush_interval=0.05, concurrency=32)
    jobs = 32
    for index in range(jobs):
        await publish(
            connection,
            worker.settings.request_queue,
            {"custom_id": f"j{index}", "body": chat(chunks=30, chunk_interval=0.01)},
            reply_to=replies.name,
            correlation_id=f"j{index}",
        )
    messages = await replies.until_results(jobs, timeout=60)
    by_job: dict[str, list[AbstractIncomingMessage]] = {}
    for message in messages:
        by_job.setdefault(str(message.correlation_id), []).append(message)
    assert len(by_job) == jobs
    for job_messages in by_job.values():
        *delta_messages, last = job_messages
        assert last.type == "chat.result"
        deltas = [JobDelta.model_validate_json(m.body) for m in delta_messages]
        assert [d.seq for d in deltas] == list(range(len(deltas)))
        assert text_of(deltas) == content_of(JobResult.model_validate_json(last.body))


async def test_a_reply_queue_that_fills_mid_stream_moves_the_rest_to_the_exchange(
    start_worker: StartWorker,
    connection: AbstractConnection,
    names: dict[str, str],
    mock: MockUpstream,
) -> None:
    """The reply queue takes two deltas, then refuses (reject-publish): the refused delta
    and everything after it, the result included, go to the result exchange; nothing is
    lost, nothing repeats, and the upstream is called once."""
    worker = await start_worker(stream_flush_interval=0.02)
    channel = await connection.channel()
    small = f"{names['request_queue']}.small-reply"
    on_exchange = f"{names['request_queue']}.deltas"
    await channel.declare_queue(
        small, durable=True, arguments={"x-max-length": 2, "x-overflow": "reject-publish"}
    )
    deltas_queue = await channel.declare_queue(on_exchange, durable=True)
    await deltas_queue.bind(worker.settings.result_exchange, DELTA)
    body = chat(chunks=40, chunk_interval=0.005)
    try:
        await publish(
            connection,
            worker.settings.request_queue,
            {"custom_id": "f", "body": body},
            reply_to=small,
        )
        results_queue = await channel.get_queue(worker.settings.result_queue)
        result_message = None
        async with asyncio.timeout(30):
            while result_message is None:
                result_message = await results_queue.get(fail=False)
                if result_message is None:
                    await asyncio.sleep(0.05)
        await result_message.ack()
        await asyncio.sleep(0.2)  # the deltas went before the result
        in_reply = [m async for m in _drain(channel, small)]
        on_exch = [m async for m in _drain(channel, on_exchange)]
    finally:
        await channel.queue_delete(small)
        await channel.queue_delete(on_exchange)
    result = JobResult.model_validate_json(result_message.body)
    assert result.error is None
    first = [JobDelta.model_validate_json(m.body) for m in in_reply]
    rest = [JobDelta.model_validate_json(m.body) for m in on_exch]
    assert [d.seq for d in first] == [0, 1]
    assert [d.seq for d in first + rest] == list(range(len(first) + len(rest)))
    assert text_of(first + rest) == content_of(result)
    assert sum(1 for r in mock.requests if r.body.get("messages") == body["messages"]) == 1


async def _drain(channel: aio_pika.abc.AbstractChannel, queue: str) -> Any:
    source = await channel.get_queue(queue)
    while (message := await source.get(fail=False)) is not None:
        await message.ack()
        yield message


# --- the Outbox against the real broker ---------------------------------------------------


async def test_outbox_and_basic_publish_interleave_in_tag_order(amqp_url: str) -> None:
    """Publishes through the Outbox and aiormq's own basic_publish on one channel, in one
    loop iteration and across several: all confirmed, the queue holds them in call order,
    a return reaches the publish it belongs to."""
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        assert isinstance(channel, aiormq.Channel)
        queue = f"test-outbox-{uuid.uuid4().hex[:8]}"
        await channel.queue_declare(queue, auto_delete=True)
        outbox = Outbox(channel)
        route = PreparedPublish(
            outbox,
            exchange="",
            routing_key=queue,
            properties=Basic.Properties(delivery_mode=1, content_type="text/plain"),
            mandatory=True,
        )
        nowhere = PreparedPublish(
            outbox,
            exchange="",
            routing_key=f"{queue}.missing",
            properties=Basic.Properties(delivery_mode=1),
            mandatory=True,
        )
        waits: list[Any] = []
        for round_ in range(5):
            for index in range(20):
                waits.append(route.publish(f"{round_}-{index}-a".encode()))
            # aiormq's own publish in the same iteration, then more of ours after it
            waits.append(
                asyncio.ensure_future(
                    channel.basic_publish(f"{round_}-x".encode(), routing_key=queue, mandatory=True)
                )
            )
            await asyncio.sleep(0)
            for index in range(20):
                waits.append(route.publish(f"{round_}-{index}-b".encode()))
            await asyncio.sleep(0.01)
        returned = nowhere.publish(b"lost")
        await asyncio.gather(*waits)
        with pytest.raises(aiormq.exceptions.PublishError):
            await returned
        bodies = []
        while True:
            got = await channel.basic_get(queue, no_ack=True)
            if got.body is None or not got.body:
                break
            bodies.append(got.body.decode())
        assert len(bodies) == 5 * 41
        for round_ in range(5):
            mine = [b for b in bodies if b.startswith(f"{round_}-")]
            assert mine[:20] == [f"{round_}-{i}-a" for i in range(20)]
            assert mine[20] == f"{round_}-x"
            assert mine[21:] == [f"{round_}-{i}-b" for i in range(20)]
        assert not channel.message_id_delivery_tag  # every id forgotten once confirmed
        await channel.queue_delete(queue)
    finally:
        await connection.close()


async def test_a_finished_stream_gives_its_connection_back() -> None:
    """A server that ends the body a moment after ``[DONE]`` (a separate write, as many
    do): the worker reads that end, so the next stream reuses the connection."""
    peers: list[str] = []

    async def sse(request: web.Request) -> web.StreamResponse:
        peers.append(str(request.transport.get_extra_info("peername") if request.transport else ""))
        await request.read()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        for delta, finish in (({"content": "hi"}, None), ({}, "stop")):
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            await response.write(b"data: " + orjson.dumps({**chunk, "choices": [choice]}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(0.02)  # the body's end comes in a later write
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", sse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = Upstream(f"http://127.0.0.1:{port}/v1/chat/completions", max_connections=4)
    try:
        for _ in range(3):
            async with client.open_stream(b'{"stream": true}', {}) as chunks:
                while await chunks.read() is not None:
                    pass
                assert chunks.done
        assert len(peers) == 3 and len(set(peers)) == 1, peers
    finally:
        await client.aclose()
        await runner.cleanup()
