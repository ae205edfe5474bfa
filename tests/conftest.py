"""Shared fixtures: a real broker, a real mock upstream over loopback, per-test queue names.

The broker is found in this order: ``WORKER_TEST_AMQP_URL``, the local one on 5672, a
throwaway RabbitMQ through testcontainers where Docker runs. With none, the session stops
with one line saying so; integration tests are never skipped.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from support.broker import Replies, fresh_telemetry, make_settings

from worker.amqp.connect import reachable
from worker.amqp.topology import DELAY_TIERS, delay_queue_name
from worker.mock.broker import docker_available, throwaway_broker
from worker.mock.upstream import MockConfig, MockUpstream
from worker.service import Worker
from worker.settings import Settings

LOCAL_BROKER = "amqp://guest:guest@127.0.0.1:5672/"

# Interop tests need LiteLLM's proxy (~750 MB), installed only by `make interop`, which names
# it in LITELLM_BIN; without it they are not collected (never skipped).
collect_ignore_glob = [] if os.environ.get("LITELLM_BIN") else ["interop/*"]


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    explicit = os.environ.get("WORKER_TEST_AMQP_URL")
    candidates = [explicit] if explicit else [LOCAL_BROKER]
    problems = []
    for url in candidates:
        problem = asyncio.run(reachable(url, wait=5))
        if problem is None:
            yield url
            return
        problems.append(f"{url.split('@')[-1]}: {problem}")
    if not explicit and docker_available():
        with throwaway_broker() as url:
            yield url
            return
    pytest.exit(
        "no RabbitMQ for the tests: set WORKER_TEST_AMQP_URL, start one on 127.0.0.1:5672 "
        f"(`rabbitmq-server -detached`), or run Docker ({'; '.join(problems)})",
        returncode=3,
    )


LOCAL_REDIS = "redis://127.0.0.1:6379/0"


def _redis_answers(url: str) -> str | None:
    """None when a Redis server answers PING at ``url``, else why not."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A Redis key prefix of this test's own; its keys (``<prefix>:*``) are deleted after."""
    import redis.asyncio as aioredis

    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{name}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: ``WORKER_TEST_REDIS_URL``, the local one on 6379, else a throwaway
    ``redis-server`` on a free port. With none, the session stops with one line."""
    import shutil
    import socket
    import subprocess
    import tempfile

    explicit = os.environ.get("WORKER_TEST_REDIS_URL")
    url = explicit or LOCAL_REDIS
    problem = _redis_answers(url)
    if problem is None:
        yield url
        return
    server = None if explicit else shutil.which("redis-server")
    if server is not None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as workdir:
            process = subprocess.Popen(
                [server, "--port", str(port), "--save", "", "--dir", workdir],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                url = f"redis://127.0.0.1:{port}/0"
                for _ in range(100):
                    if (problem := _redis_answers(url)) is None:
                        yield url
                        return
                    time.sleep(0.05)
            finally:
                process.terminate()
                process.wait(10)
    pytest.exit(
        f"no Redis for the tests: set WORKER_TEST_REDIS_URL, start one on 127.0.0.1:6379, or "
        f"install redis-server ({problem})",
        returncode=3,
    )


#: lanes tests name beside their request queue (``<request queue>.batch``, …)
LANES = ("interactive", "batch")


@pytest.fixture
def names() -> dict[str, str]:
    """Queue and exchange names of this test alone."""
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    return {
        "request_queue": f"{prefix}.requests",
        "result_exchange": f"{prefix}.results",
        "result_queue": f"{prefix}.results",
        "dead_letter_queue": f"{prefix}.dlq",
        "events_exchange": f"{prefix}.events",
    }


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    async with MockUpstream(MockConfig(api_key="sk-test-0123456789")) as server:
        yield server


@pytest.fixture
def settings(amqp_url: str, names: dict[str, str], mock: MockUpstream) -> Settings:
    return make_settings(amqp_url, names, mock)


@pytest.fixture
async def connection(amqp_url: str, names: dict[str, str]) -> AsyncIterator[AbstractConnection]:
    """The test's own producer/consumer connection; deletes the test's queues after."""
    conn = await aio_pika.connect(amqp_url)
    yield conn
    channel = await conn.channel()
    for name in (names["request_queue"], names["result_queue"], names["dead_letter_queue"]):
        await channel.queue_delete(name)
    # The request queue and the lanes tests add beside it, with their delay queues.
    for lane in (names["request_queue"], *(f"{names['request_queue']}.{n}" for n in LANES)):
        for seconds in DELAY_TIERS:
            for queue_type in ("quorum", "classic"):
                await channel.queue_delete(delay_queue_name(lane, seconds, queue_type))
    await channel.exchange_delete(names["result_exchange"])
    await channel.exchange_delete(names["events_exchange"])
    await channel.exchange_delete(names["events_exchange"] + ".batch-cancel")
    await conn.close()


@pytest.fixture
async def start_worker(
    amqp_url: str, names: dict[str, str], mock: MockUpstream, connection: AbstractConnection
) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Start workers with settings overrides; each is stopped at the end of the test."""
    started: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(**overrides: Any) -> Worker:
        running = Worker(
            make_settings(amqp_url, names, mock, **overrides), telemetry=fresh_telemetry()
        )
        task = asyncio.create_task(running.run())
        started.append((running, task))
        async with asyncio.timeout(15):
            await running.wait_ready()
        return running

    yield start
    for running, task in started:
        running.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def worker(settings: Settings, connection: AbstractConnection) -> AsyncIterator[Worker]:
    """A worker consuming the test's queues in this event loop (stopped before the test's
    queues are deleted)."""
    running = Worker(settings, telemetry=fresh_telemetry())
    task = asyncio.create_task(running.run())
    async with asyncio.timeout(15):
        await running.wait_ready()
    yield running
    running.stop()
    await asyncio.wait_for(task, 30)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def broker_user(amqp_url: str) -> Iterator[tuple[str, str]]:
    """A broker user of this test alone, allowed everything on ``/``; deleted after.
    Yields its name and a URL that logs in as it."""
    name, password = f"test-tenant-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    _rabbitmqctl("add_user", name, password)
    try:
        _rabbitmqctl("set_permissions", "-p", "/", name, ".*", ".*", ".*")
        host = amqp_url.split("@", 1)[-1]
        yield name, f"amqp://{name}:{password}@{host}"
    finally:
        _rabbitmqctl("delete_user", name)


@pytest.fixture
async def replies(connection: AbstractConnection) -> Replies:
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    inbox = Replies(channel, queue)
    await inbox.start()
    return inbox


# One marker per kind of test, given by the folder it lives in: `pytest -m unit` runs
# anywhere in seconds (no broker, no network); the others need what their make target starts.
KINDS = ("unit", "integration", "cluster", "browser", "deploy", "interop", "soak")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(kind) for kind in KINDS):
            continue  # a module of another folder that says its kind (tests/gateway/test_units)
        folder = item.path.parent.name
        item.add_marker(folder if folder in KINDS else "integration")
