"""The broker objects the worker relies on: request, result, dead-letter and delay queues.

Names come from :class:`~worker.settings.Settings`; header and routing-key names used on the
wire live here too, so no literal is written twice.
"""

from __future__ import annotations

from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from worker.settings import Settings

__all__ = ["dead_letter_queue_for", "declare", "delay_queue_name", "delay_tier"]

log = structlog.get_logger(__name__)

# Routing keys on the result exchange.
RESULT_BINDING = "result.*"
RESULT_OK = "result.ok"
RESULT_ERROR = "result.error"
DELTA = "delta"

# AMQP `type` of what the worker publishes.
TYPE_RESULT = "chat.result"
TYPE_DELTA = "chat.delta"

# Headers.
H_JOB_ID = "x-job-id"
H_CUSTOM_ID = "x-custom-id"
H_STATUS = "x-status"
H_ERROR_CODE = "x-error-code"
H_ERROR_MESSAGE = "x-error-message"
H_ATTEMPTS = "x-attempts"
H_DEADLINE = "x-deadline"
H_DELIVERY_COUNT = "x-delivery-count"  # set by quorum queues on redelivery
H_REDELIVERIES = "x-redeliveries"  # kept by the worker itself on classic queues
H_USAGE_PROMPT = "x-usage-prompt-tokens"
H_USAGE_COMPLETION = "x-usage-completion-tokens"
H_USAGE_TOTAL = "x-usage-total-tokens"
H_RATE_LIMIT_WAIT = "x-rate-limit-wait-ms"  # time waited for budget so far, across deliveries
# On a result kept in the dead-letter queue because nothing took it: where it was sent.
H_UNROUTABLE_RESULT = "x-unroutable-result"

# Fixed-TTL delay tiers, in seconds. One TTL per queue: mixed per-message TTLs on one queue
# would let a long wait at the head hold back every shorter one behind it.
DELAY_TIERS = (1, 5, 30, 120, 600)


def delay_queue_name(queue: str, seconds: int) -> str:
    """The delay queue of tier ``seconds`` of request queue (lane) ``queue``."""
    return f"{queue}.delay.{seconds}s"


def dead_letter_queue_for(settings: Settings, lane_queue: str) -> str:
    """A lane's dead-letter queue: ``WORKER_DEAD_LETTER_QUEUE`` with one lane,
    ``<lane>.dlq`` with several (§12)."""
    if len(settings.lanes) == 1:
        return settings.dead_letter_queue
    return f"{lane_queue}.dlq"


def delay_tier(wait: float) -> int:
    """The shortest tier that waits at least ``wait`` seconds (the longest one at most)."""
    return next((tier for tier in DELAY_TIERS if tier >= wait), DELAY_TIERS[-1])


def _durable_type(settings: Settings) -> dict[str, Any]:
    return {"x-queue-type": settings.queue_type}


async def declare(connection: AbstractConnection, settings: Settings) -> None:
    """Declare every queue and exchange; idempotent, safe from many workers at once.

    A queue that already exists with other arguments (declared by an operator, or by an
    older version) is used as it is, with a warning, instead of stopping the worker.
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        for lane in settings.lanes:
            channel = await _declare_lane(connection, channel, settings, lane.queue)
        exchange = await channel.declare_exchange(
            settings.result_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        if settings.result_queue:
            channel = await _declare_queue(
                connection, channel, settings.result_queue, _durable_type(settings)
            )
            queue = await channel.get_queue(settings.result_queue, ensure=False)
            await queue.bind(exchange, RESULT_BINDING)
    finally:
        await channel.close()


async def _declare_lane(
    connection: AbstractConnection, channel: AbstractChannel, settings: Settings, queue: str
) -> AbstractChannel:
    """A request queue (lane), its dead-letter queue and its delay queues."""
    dead_letter_queue = dead_letter_queue_for(settings, queue)
    dead_letter = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead_letter_queue}
    request_args: dict[str, Any] = {**_durable_type(settings), **dead_letter}
    if settings.queue_type == "quorum":
        request_args["x-delivery-limit"] = settings.delivery_limit
    channel = await _declare_queue(connection, channel, queue, request_args)
    channel = await _declare_queue(connection, channel, dead_letter_queue, _durable_type(settings))
    for seconds in DELAY_TIERS:
        channel = await _declare_queue(
            connection,
            channel,
            delay_queue_name(queue, seconds),
            {
                # Classic: quorum queues only gained message TTL in 3.10 and gain nothing
                # here, since a delayed message is also on the request queue's record.
                "x-queue-type": "classic",
                "x-message-ttl": seconds * 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue,
            },
        )
    return channel


async def _declare_queue(
    connection: AbstractConnection,
    channel: AbstractChannel,
    name: str,
    arguments: dict[str, Any],
) -> AbstractChannel:
    """Declare ``name``; return a usable channel (a failed declare closes the old one)."""
    try:
        await channel.declare_queue(name, durable=True, arguments=arguments)
        return channel
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        log.warning(
            "queue exists with other arguments; using it as it is", queue=name, reason=str(exc)
        )
    channel = await connection.channel(publisher_confirms=False)
    await channel.declare_queue(name, passive=True)
    return channel
