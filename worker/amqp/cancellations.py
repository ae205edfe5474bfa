"""Batch cancellations on the events exchange: the gateway announces, workers follow.

The gateway publishes ``{"type": "batch_cancel", "batch_id": …}`` (AMQP type
``chat.batch-cancel``) on the fanout exchange ``<WORKER_EVENTS_EXCHANGE>.batch-cancel`` (the
heartbeats' exchange stays free of consumers: a worker binds no queue to it, §14) when a
batch is cancelled, and again every few seconds while it is ``cancelling`` (a worker started
later learns of it too). A worker runs :func:`follow_cancellations` into a
:class:`CancelledBatches` and skips a job whose ``x-batch-id`` is in it, answering it with
a ``cancelled`` error result without a call.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import aio_pika
import orjson
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

__all__ = [
    "H_BATCH_ID",
    "TYPE_BATCH_CANCEL",
    "CancelledBatches",
    "cancel_exchange",
    "cancel_message",
    "follow_cancellations",
    "publish_cancel",
]

log = structlog.get_logger(__name__)

#: the header naming a job's batch
H_BATCH_ID = "x-batch-id"
TYPE_BATCH_CANCEL = "chat.batch-cancel"
EVENT_BATCH_CANCEL = "batch_cancel"
# An announcement is worth nothing after a few rounds: the broker drops stale ones.
CANCEL_TTL_MS = 30_000


def cancel_exchange(events_exchange: str) -> str:
    """The fanout exchange of batch cancellations, named after the events exchange."""
    return f"{events_exchange}.batch-cancel"


class CancelledBatches:
    """Ids of cancelled batches, at most ``max_size`` of them, each kept ``ttl`` seconds
    after it was last announced (the gateway announces while a batch is cancelling)."""

    def __init__(
        self,
        max_size: int = 10_000,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_size, self.ttl, self._clock = max_size, ttl, clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def add(self, batch_id: str) -> None:
        self._seen[batch_id] = self._clock() + self.ttl
        self._seen.move_to_end(batch_id)
        self._prune()
        while len(self._seen) > self.max_size:
            self._seen.popitem(last=False)

    def __contains__(self, batch_id: object) -> bool:
        if not isinstance(batch_id, str) or batch_id not in self._seen:
            return False
        if self._seen[batch_id] <= self._clock():
            del self._seen[batch_id]
            return False
        return True

    def __len__(self) -> int:
        self._prune()
        return len(self._seen)

    def _prune(self) -> None:
        now = self._clock()
        while self._seen:
            oldest, until = next(iter(self._seen.items()))
            if until > now:
                return
            del self._seen[oldest]

    def take(self, message: AbstractIncomingMessage) -> str | None:
        """Add the batch a cancel announcement names and return it; None for any other
        message (heartbeats share the exchange)."""
        if message.type != TYPE_BATCH_CANCEL:
            return None
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            event = orjson.loads(message.body)
            batch_id = event.get("batch_id")
            if event.get("type") == EVENT_BATCH_CANCEL and isinstance(batch_id, str):
                if batch_id not in self:
                    log.info("batch cancelled", batch_id=batch_id)
                self.add(batch_id)
                return batch_id
        return None


def cancel_message(batch_id: str) -> aio_pika.Message:
    body = {"type": EVENT_BATCH_CANCEL, "batch_id": batch_id}
    return aio_pika.Message(
        orjson.dumps(body),
        content_type="application/json",
        type=TYPE_BATCH_CANCEL,
        expiration=CANCEL_TTL_MS / 1000,
    )


async def publish_cancel(channel: AbstractChannel, exchange: str, batch_id: str) -> None:
    """Announce that ``batch_id`` is cancelled (``exchange``: the events exchange)."""
    target = await channel.declare_exchange(
        cancel_exchange(exchange), aio_pika.ExchangeType.FANOUT, durable=True
    )
    await target.publish(cancel_message(batch_id), routing_key="")


async def follow_cancellations(
    connection: AbstractConnection, exchange: str, cancelled: CancelledBatches
) -> Callable[[], Awaitable[None]]:
    """Fill ``cancelled`` from the cancellations of ``exchange`` (the events exchange) through
    a private queue; returns the coroutine function that stops following."""
    channel = await connection.channel(publisher_confirms=False)
    source = await channel.declare_exchange(
        cancel_exchange(exchange), aio_pika.ExchangeType.FANOUT, durable=True
    )
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(source)

    async def on_message(message: AbstractIncomingMessage) -> None:
        cancelled.take(message)

    tag = await queue.consume(on_message, no_ack=True)

    async def stop() -> None:
        with contextlib.suppress(Exception):
            await queue.cancel(tag)
            await channel.close()

    return stop
