"""Talking to the broker in tests: settings, publishing, collecting replies."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import prometheus_client
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from worker.mock.upstream import MockUpstream
from worker.settings import Settings
from worker.telemetry import Telemetry


def fresh_telemetry() -> Telemetry:
    """Metrics of one test's worker alone (the process-wide registry would add up)."""
    return Telemetry(registry=prometheus_client.CollectorRegistry())


def make_settings(
    amqp_url: str, names: dict[str, str], mock: MockUpstream, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        "upstream_base_url": mock.base_url,
        "upstream_api_key": mock.config.api_key,
        "concurrency": 16,
        "http_port": 0,
        "stream_flush_interval": 0.01,
        **names,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class Replies:
    """An exclusive reply queue of the test's, read message by message."""

    def __init__(self, channel: AbstractChannel, queue: aio_pika.abc.AbstractQueue) -> None:
        self.channel = channel
        self.queue = queue
        self.name = queue.name
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def start(self) -> None:
        await self.queue.consume(self._inbox.put, no_ack=True)

    async def get(self, timeout: float = 15) -> AbstractIncomingMessage:
        async with asyncio.timeout(timeout):
            return await self._inbox.get()

    def drain(self) -> list[AbstractIncomingMessage]:
        """Every message arrived and not read yet, without waiting."""
        found = []
        while not self._inbox.empty():
            found.append(self._inbox.get_nowait())
        return found

    async def until_results(self, count: int, timeout: float = 30) -> list[AbstractIncomingMessage]:
        """Every message until ``count`` results have arrived (deltas included, in order)."""
        seen: list[AbstractIncomingMessage] = []
        results = 0
        async with asyncio.timeout(timeout):
            while results < count:
                message = await self._inbox.get()
                seen.append(message)
                results += message.type == "chat.result"
        return seen


async def publish(
    connection: AbstractConnection, queue: str, body: bytes | dict[str, Any], **properties: Any
) -> None:
    """Publish a request as a producer would (persistent, confirmed)."""
    import orjson

    data = body if isinstance(body, bytes) else orjson.dumps(body)
    channel = await connection.channel()
    properties.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
    await channel.default_exchange.publish(aio_pika.Message(data, **properties), queue)
    await channel.close()


async def get_one(
    connection: AbstractConnection, queue: str, timeout: float = 15
) -> AbstractIncomingMessage:
    """The next message of a durable queue (polled, acknowledged)."""
    channel = await connection.channel()
    source = await channel.get_queue(queue)
    async with asyncio.timeout(timeout):
        while (message := await source.get(fail=False)) is None:
            await asyncio.sleep(0.05)
    await message.ack()
    return message


async def depth(connection: AbstractConnection, queue: str) -> int:
    """Messages ready in a durable queue now."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await channel.close()


async def drain(connection: AbstractConnection, queue: str) -> list[AbstractIncomingMessage]:
    """Every message now in a durable queue (acknowledged)."""
    channel = await connection.channel()
    source = await channel.get_queue(queue)
    found = []
    while (message := await source.get(fail=False)) is not None:
        await message.ack()
        found.append(message)
    await channel.close()
    return found
