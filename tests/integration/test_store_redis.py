"""The result store and the cache against a real Redis: leases across clients, waiting,
expiry, and a Redis that is not there, then is again."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import pytest
import redis
from support.forward import Forwarder

from worker.store import (
    Acquired,
    CachedAnswer,
    Circuit,
    CircuitState,
    Held,
    ResultStore,
    Skipped,
    StoreConfig,
    Stored,
    cache_key,
    open_store,
)
from worker.store.backends import RedisBackend

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted after it."""
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend(redis_url)
    yield backend
    await backend.aclose()


def results(backend: RedisBackend, prefix: str, ttl: float = 60) -> ResultStore:
    return ResultStore(backend, Circuit(errors=backend.errors), prefix=prefix, ttl=ttl)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_store_then_lookup(backend: RedisBackend, prefix: str, redis_url: str) -> None:
    store = results(backend, prefix, ttl=30)
    assert await store.lookup("job-1") is None
    assert await store.store("job-1", b'{"id":"job-1"}')
    assert await store.lookup("job-1") == b'{"id":"job-1"}'
    client = redis.Redis.from_url(redis_url)
    try:
        ttl = client.pttl(f"{prefix}:result:{{job-1}}")
    finally:
        client.close()
    assert 29_000 < ttl <= 30_000  # every key expires


async def test_two_workers_racing_for_a_lease_one_wins(redis_url: str, prefix: str) -> None:
    workers = [RedisBackend(redis_url) for _ in range(2)]
    try:
        stores = [results(backend, prefix) for backend in workers]
        for round_ in range(20):
            job = f"job-{round_}"
            outcomes = await asyncio.gather(
                *(store.acquire(job, f"w{i}", 30) for i, store in enumerate(stores))
            )
            assert sorted(type(o).__name__ for o in outcomes) == ["Acquired", "Held"]
    finally:
        for backend in workers:
            await backend.aclose()


async def test_release_and_renew_compare_the_holder(backend: RedisBackend, prefix: str) -> None:
    store = results(backend, prefix)
    assert await store.acquire("job", "w1", 0.5) == Acquired()
    assert not await store.release("job", "w2")
    assert not await store.renew("job", "w2", 30)
    assert await store.renew("job", "w1", 30)
    await asyncio.sleep(0.6)
    held = await store.acquire("job", "w2", 30)
    assert isinstance(held, Held)
    assert held.remaining > 25
    assert await store.release("job", "w1")
    assert await store.acquire("job", "w2", 30) == Acquired()


async def test_the_waiter_gets_the_bytes_the_holder_stores(redis_url: str, prefix: str) -> None:
    first, second = RedisBackend(redis_url), RedisBackend(redis_url)
    try:
        holder, other = results(first, prefix), results(second, prefix)
        assert await holder.acquire("job", "w1", 30) == Acquired()
        waiter = asyncio.create_task(other.wait_for("job", "w2", 30, within=5))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        body = b'{"id":"job","type":"result"}' * 1000
        assert await holder.store("job", body)
        assert await holder.release("job", "w1")
        assert await asyncio.wait_for(waiter, 2) == Stored(body)
        assert other.metrics.results_served == 1
    finally:
        await first.aclose()
        await second.aclose()


async def test_an_expired_lease_lets_the_waiter_take_over(
    backend: RedisBackend, prefix: str
) -> None:
    store = results(backend, prefix)
    assert await store.acquire("job", "crashed", 0.3) == Acquired()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await store.wait_for("job", "w2", 30, within=5) == Acquired()
    assert 0.25 < loop.time() - started < 1.5
    assert isinstance(await store.acquire("job", "crashed", 0.3), Held)


async def test_cache_round_trip(redis_url: str, prefix: str) -> None:
    store = open_store(redis_url, StoreConfig(prefix=prefix, cache_ttl=30))
    assert store is not None and store.cache is not None
    try:
        key = cache_key("acme", {"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
        assert await store.cache.get(key) is None
        answer = CachedAnswer(200, "req-1", {"object": "chat.completion", "choices": []})
        assert await store.cache.put(key, answer)
        assert await store.cache.get(key) == answer
    finally:
        await store.aclose()


async def test_no_redis_is_skipped_within_the_timeout_and_opens_once() -> None:
    changes: list[tuple[CircuitState, CircuitState]] = []
    store = open_store(
        f"redis://127.0.0.1:{free_port()}/0",
        StoreConfig(),
        on_change=lambda old, new, reason: changes.append((old, new)),
    )
    assert store is not None and store.results is not None and store.cache is not None
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await store.results.lookup("job") is None
        assert loop.time() - started < store.circuit.timeout + 0.1
        assert isinstance(await store.results.acquire("job", "w1", 30), Skipped)
        assert not await store.results.store("job", b"{}")
        assert isinstance(await store.cache.get("k"), Skipped)
        assert changes == [(CircuitState.CLOSED, CircuitState.OPEN)]
        assert store.metrics.skipped == {"lookup": 1, "acquire": 1, "store": 1, "cache_get": 1}
        assert store.metrics.circuit == 2
    finally:
        await store.aclose()


async def test_an_unroutable_redis_is_skipped_within_the_timeout() -> None:
    # A server that accepts and never answers: the timeout, not the network, ends the call.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = RedisBackend(f"redis://127.0.0.1:{port}/0")
    store = results(backend, "never")
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert isinstance(await store.acquire("job", "w1", 30), Skipped)
        assert loop.time() - started < 0.5
    finally:
        await backend.aclose()
        server.close()
        await server.wait_closed()


async def test_the_circuit_closes_by_itself_when_redis_is_back(redis_url: str, prefix: str) -> None:
    target = urlsplit(redis_url)
    forwarder = Forwarder(free_port(), (target.hostname or "127.0.0.1", target.port or 6379))
    backend = RedisBackend(f"redis://127.0.0.1:{forwarder.port}/0")
    changes: list[tuple[CircuitState, CircuitState]] = []
    circuit = Circuit(
        errors=backend.errors,
        backoff=(0.2, 0.4),
        on_change=lambda old, new, reason: changes.append((old, new)),
    )
    store = ResultStore(backend, circuit, prefix=prefix)
    try:
        assert isinstance(await store.acquire("job", "w1", 30), Skipped)  # nothing listens
        assert circuit.state is CircuitState.OPEN
        await forwarder.start()
        # The circuit asks again by itself once its back-off is over: no operator, no restart.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        outcome = await store.acquire("job", "w1", 30)
        while isinstance(outcome, Skipped) and loop.time() < deadline:
            await asyncio.sleep(0.05)
            outcome = await store.acquire("job", "w1", 30)
        assert outcome == Acquired()
        assert circuit.state is CircuitState.CLOSED
        assert changes == [
            (CircuitState.CLOSED, CircuitState.OPEN),
            (CircuitState.HALF_OPEN, CircuitState.CLOSED),
        ]
        # Down again: the pooled connection breaks, and the call is skipped.
        await forwarder.stop()
        assert not await store.renew("job", "w1", 30)
        assert store.metrics.skipped["renew"] == 1
        assert circuit.state is CircuitState.OPEN
    finally:
        await backend.aclose()
        await forwarder.stop()
