"""Pay once (contract §16): the result store answers duplicates, the cache identical requests."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
from aio_pika.abc import AbstractConnection
from brokerctl import close_connections_of
from support.broker import Replies, publish
from support.process import free_port

from worker.messages import JobResult
from worker.mock.upstream import MockUpstream
from worker.service import Worker

StartWorker = Callable[..., Awaitable[Worker]]


def line(text: str, **body: Any) -> dict[str, Any]:
    """A request whose body no other test sends (the cache is keyed by the body)."""
    return {
        "custom_id": "c-1",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"{text} {uuid.uuid4().hex}"}],
            **body,
        },
    }


def results_of(messages: list[Any]) -> list[JobResult]:
    return [JobResult.model_validate_json(m.body) for m in messages if m.type == "chat.result"]


def calls_for(mock: MockUpstream) -> int:
    return sum(1 for r in mock.requests if r.path.endswith("/chat/completions"))


async def test_three_publishes_of_one_job_id_are_one_call_and_three_equal_results(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    redis_url: str,
    settings: Any,
) -> None:
    await start_worker(redis_url=redis_url, result_ttl=60)
    request = line("once")
    job_id = f"job-once-{uuid.uuid4().hex}"
    seen = []
    for _ in range(3):  # one after the other: the first has its result stored
        await publish(
            connection, settings.request_queue, request, message_id=job_id, reply_to=replies.name
        )
        seen += await replies.until_results(1)
    results = results_of(seen)
    assert calls_for(mock) == 1
    assert [r.metadata.cache for r in results] == [None, "stored", "stored"]
    first = results[0].model_dump(exclude={"metadata"})
    assert all(r.model_dump(exclude={"metadata"}) == first for r in results[1:])
    assert results[0].metadata.calls == 1


async def test_four_copies_of_a_slow_job_on_two_workers_make_one_call(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    redis_url: str,
    settings: Any,
) -> None:
    await start_worker(redis_url=redis_url, result_ttl=60, concurrency=2)
    await start_worker(redis_url=redis_url, result_ttl=60, concurrency=2)
    request = line("slow", mock={"latency": 1.0})
    job_id = f"job-slow-{uuid.uuid4().hex}"
    await asyncio.gather(
        *(
            publish(
                connection,
                settings.request_queue,
                request,
                message_id=job_id,
                reply_to=replies.name,
            )
            for _ in range(4)
        )
    )
    results = results_of(await replies.until_results(4, timeout=40))
    assert calls_for(mock) == 1
    assert sorted(str(r.metadata.cache) for r in results) == ["None", "stored", "stored", "stored"]
    assert {r.response.body["choices"][0]["message"]["content"] for r in results if r.response}


async def test_a_replayed_dead_letter_runs_again(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    redis_url: str,
    settings: Any,
) -> None:
    await start_worker(redis_url=redis_url, result_ttl=60)
    request = line("replay")
    job_id = f"job-replay-{uuid.uuid4().hex}"
    await publish(
        connection, settings.request_queue, request, message_id=job_id, reply_to=replies.name
    )
    await replies.until_results(1)
    await publish(
        connection,
        settings.request_queue,
        request,
        message_id=job_id,
        reply_to=replies.name,
        headers={"x-replayed": "true"},
    )
    (again,) = results_of(await replies.until_results(1))
    assert again.metadata.cache is None
    assert calls_for(mock) == 2


async def test_the_cache_answers_the_same_tenant_and_body_only(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    redis_url: str,
    settings: Any,
) -> None:
    await start_worker(redis_url=redis_url, result_ttl=0, cache="on", trust_tenant_header=True)
    request = line("cached")
    seen = []
    # The last one: x-cache false turns the cache off for that message.
    for headers in (
        {"x-tenant": "team-a"},
        {"x-tenant": "team-a"},
        {"x-tenant": "team-b"},
        {"x-tenant": "team-a", "x-cache": "false"},
    ):
        await publish(
            connection,
            settings.request_queue,
            request,
            reply_to=replies.name,
            message_id=uuid.uuid4().hex,
            headers=headers,
        )
        seen += await replies.until_results(1)
    results = results_of(seen)
    assert [r.metadata.cache for r in results] == ["miss", "hit", "miss", None]
    hit = results[1]
    assert hit.metadata.calls == 0
    assert hit.metadata.cost is not None and hit.metadata.cost.total == 0
    assert hit.usage == results[0].usage
    assert hit.response is not None and results[0].response is not None
    assert hit.response.body == results[0].response.body
    assert calls_for(mock) == 3


async def test_a_streamed_hit_still_gets_its_deltas(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    redis_url: str,
    settings: Any,
) -> None:
    await start_worker(redis_url=redis_url, result_ttl=0, cache="on")
    request = line("streamed", stream=True)
    await publish(connection, settings.request_queue, request, reply_to=replies.name)
    await replies.until_results(1)
    await publish(
        connection,
        settings.request_queue,
        request,
        reply_to=replies.name,
        message_id=uuid.uuid4().hex,
    )
    seen = await replies.until_results(1)
    deltas = [orjson.loads(m.body) for m in seen if m.type == "chat.delta"]
    (result,) = results_of(seen)
    assert result.metadata.cache == "hit"
    assert len(deltas) >= 1
    text = "".join(c["delta"].get("content") or "" for d in deltas for c in d["choices"])
    assert result.response is not None
    assert text == result.response.body["choices"][0]["message"]["content"]
    assert calls_for(mock) == 1


async def test_redis_on_a_closed_port_skips_the_store_and_jobs_succeed(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    settings: Any,
) -> None:
    worker = await start_worker(redis_url=f"redis://127.0.0.1:{free_port()}/0", cache="on")
    for n in range(3):
        await publish(
            connection, settings.request_queue, line(f"closed {n}"), reply_to=replies.name
        )
    results = results_of(await replies.until_results(3))
    assert all(r.ok and r.metadata.cache is None for r in results)
    assert worker.once is not None
    skipped = worker.once.store.metrics.snapshot()["skipped"]
    assert sum(skipped.values()) >= 3


@pytest.fixture
def own_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's, to stop mid-run."""
    server = shutil.which("redis-server")
    assert server, "redis-server is needed (Debian's redis-server package)"
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        process = subprocess.Popen(
            [server, "--port", str(port), "--save", "", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            import time

            time.sleep(0.05)
        try:
            yield f"redis://127.0.0.1:{port}/0", process
        finally:
            process.kill()
            process.wait()


async def test_redis_stopped_mid_run_jobs_keep_succeeding(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    own_redis: tuple[str, subprocess.Popen[bytes]],
    settings: Any,
) -> None:
    url, process = own_redis
    await start_worker(redis_url=url, result_ttl=60)
    await publish(connection, settings.request_queue, line("before"), reply_to=replies.name)
    await replies.until_results(1)
    process.kill()
    process.wait()
    for n in range(5):
        await publish(connection, settings.request_queue, line(f"after {n}"), reply_to=replies.name)
    results = results_of(await replies.until_results(5, timeout=30))
    assert all(r.ok for r in results)


async def test_a_call_longer_than_the_lease_keeps_it_renewed(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    redis_url: str,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import payonce

    monkeypatch.setattr(payonce, "LEASE_TTL", 0.6)  # renewed every 0.2 s
    await start_worker(redis_url=redis_url, result_ttl=60, concurrency=1)
    await start_worker(redis_url=redis_url, result_ttl=60, concurrency=1)
    request = line("long", mock={"latency": 2.0})
    job_id = f"job-long-{uuid.uuid4().hex}"
    await publish(
        connection, settings.request_queue, request, message_id=job_id, reply_to=replies.name
    )
    await asyncio.sleep(1.0)  # past the lease's first time to live
    await publish(
        connection, settings.request_queue, request, message_id=job_id, reply_to=replies.name
    )
    results = results_of(await replies.until_results(2, timeout=40))
    assert calls_for(mock) == 1
    assert sorted(str(r.metadata.cache) for r in results) == ["None", "stored"]


async def test_a_call_under_way_when_the_connection_is_lost_is_not_paid_again(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    redis_url: str,
    settings: Any,
) -> None:
    """The broker puts the request back when the worker's connection goes; the call under
    way runs on and stores its result, and the redelivered copy is answered from it."""
    await start_worker(redis_url=redis_url, result_ttl=60)
    request = line("orphan", mock={"latency": 6.0})  # rabbitmqctl takes seconds
    job_id = f"job-orphan-{uuid.uuid4().hex}"
    await publish(
        connection, settings.request_queue, request, message_id=job_id, reply_to=replies.name
    )
    async with asyncio.timeout(10):
        while calls_for(mock) < 1:
            await asyncio.sleep(0.02)
    assert await asyncio.to_thread(close_connections_of, os.getpid())
    (result,) = results_of(await replies.until_results(1, timeout=40))
    assert result.id == job_id and result.error is None
    assert result.metadata.cache == "stored", "answered from the orphan's stored result"
    await asyncio.sleep(1.0)
    assert not results_of(replies.drain()), "exactly one result"
    assert calls_for(mock) == 1, "the answer was paid once"


async def test_a_delivery_stopped_mid_call_gives_its_lease_back(
    start_worker: StartWorker,
    connection: AbstractConnection,
    mock: MockUpstream,
    redis_url: str,
    settings: Any,
) -> None:
    """A stop past its grace cancels the call and ends the lease at once (before, the
    lease's renewals outlived the cancelled delivery): the next worker takes the job
    without waiting on a lease nobody holds."""
    import redis.asyncio as redis

    worker = await start_worker(redis_url=redis_url, result_ttl=60, shutdown_grace=0.5)
    job_id = f"job-stopped-{uuid.uuid4().hex}"
    request = line("stopped", mock={"latency": 30.0})
    await publish(connection, settings.request_queue, request, message_id=job_id)
    async with asyncio.timeout(10):
        while calls_for(mock) < 1:
            await asyncio.sleep(0.02)
    client = redis.Redis.from_url(redis_url)
    try:
        lease = f"cw:lease:{{{job_id}}}"
        assert await client.exists(lease), "the call holds the job's lease"
        worker.stop()
        async with asyncio.timeout(10):
            while await client.exists(lease):
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()
