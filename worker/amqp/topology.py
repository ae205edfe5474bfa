"""The broker objects the worker relies on: request, result, dead-letter and delay queues.

Names come from :class:`~worker.settings.Settings`; header and routing-key names used on the
wire live here too, so no literal is written twice.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from worker.settings import Settings

__all__ = [
    "TopologyUnavailable",
    "dead_letter_queue_for",
    "declare",
    "delay_queue_name",
    "delay_queues",
    "delay_tier",
    "queue_arguments",
]

log = structlog.get_logger(__name__)

# Routing keys on the result exchange.
RESULT_BINDING = "result.*"
RESULT_OK = "result.ok"
RESULT_ERROR = "result.error"
DELTA = "delta"
APP_ID = "chat-worker"  # the app_id of everything the worker publishes

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
H_COST = "x-cost-usd"  # on a result: metadata.cost.total (§17)
H_CALLS = "x-calls"  # upstream calls so far, set on a job sent round a delay queue
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

# A declare that gets no answer (a queue whose replicas are out of reach) must not hold up
# the start of consuming for long.
DECLARE_TIMEOUT = 15.0

QueueType = Literal["quorum", "classic"]


class TopologyUnavailable(RuntimeError):
    """The request queue could be neither declared nor found: nothing to consume."""


def delay_queue_name(queue: str, seconds: int, queue_type: QueueType) -> str:
    """The delay queue of tier ``seconds`` of request queue (lane) ``queue``.

    Quorum delay queues have names of their own: deployments from before §13 hold classic
    queues under the old names, and a declare with other arguments fails (406).
    """
    if queue_type == "quorum":
        return f"{queue}.delay.quorum.{seconds}s"
    return f"{queue}.delay.{seconds}s"


def delay_queues(settings: Settings, queue: str | None = None) -> list[str]:
    """Every delay queue of lane ``queue`` (default: the only lane), shortest wait first."""
    lane = queue if queue is not None else settings.lanes[0].queue
    return [delay_queue_name(lane, seconds, settings.queue_type) for seconds in DELAY_TIERS]


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


def _delay_arguments(settings: Settings, lane: str, seconds: int) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "x-queue-type": settings.queue_type,
        "x-message-ttl": seconds * 1000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": lane,
    }
    if settings.queue_type == "quorum":
        # A quorum queue dead-letters at most once by default: a message expiring while the
        # request queue is electing a leader would be dropped. At least once needs
        # reject-publish (RabbitMQ 3.10+), so a full delay queue refuses a publish rather
        # than dropping its oldest message.
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return arguments


def queue_arguments(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every queue the worker declares, request queues (lanes) first, with its arguments."""
    queues: dict[str, dict[str, Any]] = {}
    for lane in settings.lanes:
        request: dict[str, Any] = {
            **_durable_type(settings),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead_letter_queue_for(settings, lane.queue),
        }
        if settings.queue_type == "quorum":
            request["x-delivery-limit"] = settings.delivery_limit
        queues[lane.queue] = request
    for lane in settings.lanes:
        queues[dead_letter_queue_for(settings, lane.queue)] = _durable_type(settings)
        for seconds in DELAY_TIERS:
            name = delay_queue_name(lane.queue, seconds, settings.queue_type)
            queues[name] = _delay_arguments(settings, lane.queue, seconds)
    if settings.result_queue:
        queues[settings.result_queue] = _durable_type(settings)
    return queues


async def declare(connection: AbstractConnection, settings: Settings) -> dict[str, str]:
    """Declare every queue and exchange; idempotent, safe from many workers at once.

    Returns what could not be declared, by name, with why (empty when all is well): a queue
    whose node is down (a classic queue's home node, a quorum queue without a majority)
    does not stop the worker, which consumes and declares it again later (§13). Raises
    :class:`TopologyUnavailable` only when a request queue (lane) itself is out of reach.

    A queue that already exists with other arguments (declared by an operator, or by an
    older version) is used as it is, with a warning, instead of stopping the worker.
    """
    missing: dict[str, str] = {}
    lanes = {lane.queue for lane in settings.lanes}
    declarer = _Declarer(connection)
    try:
        for name, arguments in queue_arguments(settings).items():
            problem = await declarer.queue(name, arguments)
            if problem is None:
                continue
            if name in lanes:
                raise TopologyUnavailable(f"request queue {name!r}: {problem}")
            missing[name] = problem
        channel = await declarer.channel()
        exchange = await channel.declare_exchange(
            settings.result_exchange,
            aio_pika.ExchangeType.TOPIC,
            durable=True,
            timeout=DECLARE_TIMEOUT,
        )
        if settings.result_queue and settings.result_queue not in missing:
            queue = await channel.get_queue(settings.result_queue, ensure=False)
            await queue.bind(exchange, RESULT_BINDING, timeout=DECLARE_TIMEOUT)
    finally:
        await declarer.close()
    for name, problem in missing.items():
        log.warning(
            "queue out of reach; consuming anyway, declaring it later", queue=name, reason=problem
        )
    return missing


# A channel-level refusal (the channel closes, the connection stays): worth a passive check.
_CHANNEL_ERRORS = (
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ChannelClosed,
    TimeoutError,
)


class _Declarer:
    """Declares queues one by one, opening a fresh channel after a refusal closed one."""

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._channel: AbstractChannel | None = None

    async def channel(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel(publisher_confirms=False)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(Exception):
                await self._channel.close()

    async def queue(self, name: str, arguments: dict[str, Any]) -> str | None:
        """Declare ``name``, else check it exists; None when usable, else why not."""
        try:
            channel = await self.channel()
            await channel.declare_queue(
                name, durable=True, arguments=arguments, timeout=DECLARE_TIMEOUT
            )
            return None
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            log.warning(
                "queue exists with other arguments; using it as it is", queue=name, reason=str(exc)
            )
        except _CHANNEL_ERRORS as exc:
            log.info("could not declare a queue; checking it exists", queue=name, reason=repr(exc))
        await self.close()  # after a timeout the channel may still answer late
        self._channel = None
        try:
            channel = await self.channel()
            await channel.declare_queue(name, passive=True, timeout=DECLARE_TIMEOUT)
            return None
        except _CHANNEL_ERRORS as exc:
            self._channel = None
            return _reason(exc)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer in {DECLARE_TIMEOUT:g}s"
    return str(exc) or type(exc).__name__
