"""The gateways' side of the events: their status reports, and the console's requests to them.

Each gateway replica publishes, every 2 s, a small status message of AMQP type
``chat.gateway`` to the events exchange (``WORKER_EVENTS_EXCHANGE``, beside the workers'
heartbeats, for the console to read): the batches of its store. The console asks the
gateways to act through a fanout exchange of its own, ``<WORKER_EVENTS_EXCHANGE>.gateway-control``
(``{"type": "batch_cancel_request", "batch_id": …}``, AMQP type ``chat.gateway-control``),
which each replica follows through a private queue: the replica whose store holds that
batch cancels it as ``POST /v1/batches/{id}/cancel`` would. Both are fire-and-forget and
short-lived (a TTL): a status is replaced two seconds later, and a request the gateways did
not hear in time is repeated by the operator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aio_pika
import orjson
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

__all__ = [
    "EVENT_BATCH_CANCEL_REQUEST",
    "EVENT_GATEWAY",
    "TYPE_GATEWAY_CONTROL",
    "TYPE_GATEWAY_STATUS",
    "cancel_request_of",
    "control_exchange",
    "follow_control",
    "publish_cancel_request",
    "publish_status",
]

log = structlog.get_logger(__name__)

TYPE_GATEWAY_STATUS = "chat.gateway"
EVENT_GATEWAY = "gateway"
TYPE_GATEWAY_CONTROL = "chat.gateway-control"
EVENT_BATCH_CANCEL_REQUEST = "batch_cancel_request"
# A status older than this is worthless (another comes every 2 s); a request not taken
# within this long is not taken: the operator sees the batch still running and asks again.
STATUS_TTL_MS = 10_000
CONTROL_TTL_MS = 30_000
MAX_CONTROL_BYTES = 4096


def control_exchange(events_exchange: str) -> str:
    """The fanout exchange of requests to the gateways, named after the events exchange."""
    return f"{events_exchange}.gateway-control"


async def publish_status(
    channel: AbstractChannel, events_exchange: str, body: Mapping[str, Any]
) -> None:
    """One gateway status on the events exchange: not persistent, not mandatory."""
    exchange = await channel.declare_exchange(
        events_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    message = aio_pika.Message(
        orjson.dumps(body),
        content_type="application/json",
        type=TYPE_GATEWAY_STATUS,
        expiration=STATUS_TTL_MS / 1000,
        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
    )
    await exchange.publish(message, routing_key="", mandatory=False)


async def publish_cancel_request(
    channel: AbstractChannel, events_exchange: str, batch_id: str
) -> None:
    """Ask every gateway replica to cancel ``batch_id`` (the one whose store holds it does)."""
    exchange = await channel.declare_exchange(
        control_exchange(events_exchange), aio_pika.ExchangeType.FANOUT, durable=True
    )
    message = aio_pika.Message(
        orjson.dumps({"type": EVENT_BATCH_CANCEL_REQUEST, "batch_id": batch_id}),
        content_type="application/json",
        type=TYPE_GATEWAY_CONTROL,
        expiration=CONTROL_TTL_MS / 1000,
    )
    await exchange.publish(message, routing_key="", mandatory=False)


def cancel_request_of(message: AbstractIncomingMessage) -> str | None:
    """The batch id a cancel request names; None for anything else."""
    if message.type != TYPE_GATEWAY_CONTROL or len(message.body) > MAX_CONTROL_BYTES:
        return None
    with contextlib.suppress(orjson.JSONDecodeError):
        event = orjson.loads(message.body)
        if isinstance(event, dict) and event.get("type") == EVENT_BATCH_CANCEL_REQUEST:
            batch_id = event.get("batch_id")
            if isinstance(batch_id, str) and 0 < len(batch_id) <= 128:
                return batch_id
    return None


async def follow_control(
    connection: AbstractConnection,
    events_exchange: str,
    on_cancel: Callable[[str], Awaitable[None]],
) -> Callable[[], Awaitable[None]]:
    """Call ``on_cancel(batch_id)`` for each cancel request, through a private queue; returns
    the coroutine function that stops following."""
    channel = await connection.channel(publisher_confirms=False)
    source = await channel.declare_exchange(
        control_exchange(events_exchange), aio_pika.ExchangeType.FANOUT, durable=True
    )
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(source)

    async def on_message(message: AbstractIncomingMessage) -> None:
        batch_id = cancel_request_of(message)
        if batch_id is None:
            return
        try:
            await on_cancel(batch_id)
        except Exception:  # one request's failure does not end the following
            log.exception("a cancel request failed", batch_id=batch_id)

    tag = await queue.consume(on_message, no_ack=True)

    async def stop() -> None:
        with contextlib.suppress(Exception):
            await queue.cancel(tag)
            await channel.close()

    return stop
