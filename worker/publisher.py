"""Everything the worker publishes: deltas, results, delay-queue retries, dead letters.

Every publish waits for the broker's confirm; the caller acknowledges the request only
after that (contract §8).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aio_pika
import aiormq
import orjson
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pamqp.commands import Basic

from worker.errors import JobError
from worker.jobs import Deferral, Envelope, JobOutcome
from worker.settings import Settings
from worker.topology import (
    DELTA,
    H_ATTEMPTS,
    H_CUSTOM_ID,
    H_DELIVERY_COUNT,
    H_ERROR_CODE,
    H_ERROR_MESSAGE,
    H_JOB_ID,
    H_REDELIVERIES,
    H_STATUS,
    H_USAGE_COMPLETION,
    H_USAGE_PROMPT,
    H_USAGE_TOTAL,
    RESULT_ERROR,
    RESULT_OK,
    TYPE_DELTA,
    TYPE_RESULT,
    delay_queue_name,
    delay_tier,
)

__all__ = ["Publisher", "copy_request", "render_result"]

log = structlog.get_logger(__name__)

Properties = Basic.Properties

APP_ID = "chat-worker"
# Header values are free text from an upstream; keep dead-letter headers small.
MAX_HEADER_TEXT = 1000


def render_result(
    envelope: Envelope,
    custom_id: str | None,
    model: str | None,
    outcome: JobOutcome,
    worker: str,
) -> bytes:
    """The result document of contract §4 (schema: :class:`~worker.messages.JobResult`).

    Built as a dict and serialised once: the upstream's body and usage pass through as
    parsed, never re-validated, which is most of a job's JSON.
    """
    error = outcome.error
    document = {
        "id": envelope.job_id,
        "custom_id": custom_id,
        "type": "result",
        "response": None
        if outcome.status_code is None
        else {
            "status_code": outcome.status_code,
            "request_id": outcome.request_id,
            "body": outcome.body,
        },
        "error": None
        if error is None
        else {"code": error.code.value, "message": error.message, "status_code": error.status_code},
        "usage": outcome.usage or None,
        "metadata": {
            "attempts": outcome.attempts,
            "model": model,
            "latency_ms": outcome.latency_ms,
            "ttft_ms": outcome.ttft_ms,
            "worker": worker,
            "finished_at": outcome.finished_at,
            "upstream": outcome.upstream,
            "lane": envelope.lane,
            "tenant": envelope.tenant,
            "rate_limit_wait_ms": outcome.rate_limit_wait_ms,
        },
    }
    return orjson.dumps(document, option=orjson.OPT_UTC_Z)


class Publisher:
    """Publishes on one confirm channel; routes replies to ``reply_to`` or the exchange.

    Publishes go to the channel's aiormq core with properties built directly: an
    ``aio_pika.Message`` costs ten times as much to turn into frames, on every result and
    every delta.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel, settings: Settings) -> None:
        self._channel = channel
        self._settings = settings

    @classmethod
    async def open(cls, channel: AbstractChannel, settings: Settings) -> Publisher:
        return cls(await channel.get_underlay_channel(), settings)

    async def _send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Properties,
        *,
        mandatory: bool = False,
    ) -> None:
        """Publish and wait for the broker's confirm (a nack raises ``DeliveryError``)."""
        await self._channel.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=mandatory,
        )

    async def delta(
        self,
        envelope: Envelope,
        custom_id: str | None,
        attempt: int,
        seq: int,
        choices: list[dict[str, Any]],
        trace: Mapping[str, str],
    ) -> None:
        body = orjson.dumps(
            {
                "id": envelope.job_id,
                "custom_id": custom_id,
                "type": "delta",
                "attempt": attempt,
                "seq": seq,
                "choices": choices,
            }
        )
        properties = Properties(
            content_type="application/json",
            message_type=TYPE_DELTA,
            correlation_id=envelope.correlation_id,
            # Deltas are worth nothing once the result is out: no need to hit the disk.
            delivery_mode=1,
            headers={H_JOB_ID: envelope.job_id, **trace},
            app_id=APP_ID,
        )
        await self._reply(envelope, body, properties, DELTA)

    async def result(
        self,
        envelope: Envelope,
        custom_id: str | None,
        outcome: JobOutcome,
        document: bytes,
        trace: Mapping[str, str],
    ) -> None:
        """Publish a rendered result (:func:`render_result`) with the contract's headers."""
        headers: dict[str, Any] = {
            H_JOB_ID: envelope.job_id,
            H_STATUS: "ok" if outcome.error is None else "error",
            H_ATTEMPTS: outcome.attempts,
            **trace,
        }
        if custom_id is not None:
            headers[H_CUSTOM_ID] = custom_id
        if outcome.error is not None:
            headers[H_ERROR_CODE] = outcome.error.code.value
        usage = outcome.usage or {}
        for name, key in (
            (H_USAGE_PROMPT, "prompt_tokens"),
            (H_USAGE_COMPLETION, "completion_tokens"),
            (H_USAGE_TOTAL, "total_tokens"),
        ):
            if isinstance(usage.get(key), int):
                headers[name] = usage[key]
        properties = Properties(
            content_type="application/json",
            message_type=TYPE_RESULT,
            correlation_id=envelope.correlation_id,
            delivery_mode=2,
            headers=headers,
            app_id=APP_ID,
            timestamp=outcome.finished_at,
        )
        routing_key = RESULT_OK if outcome.error is None else RESULT_ERROR
        await self._reply(envelope, document, properties, routing_key)

    async def _reply(
        self, envelope: Envelope, body: bytes, properties: Properties, routing_key: str
    ) -> None:
        if envelope.reply_to:
            try:
                await self._send("", envelope.reply_to, body, properties, mandatory=True)
                return
            except aiormq.exceptions.DeliveryError as exc:
                if not _returned(exc):
                    raise
                log.warning(
                    "reply_to queue does not exist; sending to the result exchange instead",
                    job_id=envelope.job_id,
                    reply_to=envelope.reply_to,
                )
                # Later messages of this job go straight to the exchange.
                envelope.reply_to = None
        exchange = self._settings.result_exchange
        if routing_key == DELTA:
            # Deltas are for whoever listens; with no binding they are simply not wanted.
            await self._send(exchange, routing_key, body, properties)
            return
        try:
            await self._send(exchange, routing_key, body, properties, mandatory=True)
        except aiormq.exceptions.DeliveryError as exc:
            if not _returned(exc):
                raise
            # Nothing is bound for results (WORKER_RESULT_QUEUE empty and no queue of the
            # operator's): retrying cannot help, and a failed job is in the DLQ anyway.
            log.error(
                "result unroutable: no queue bound to the result exchange for it",
                job_id=envelope.job_id,
                exchange=exchange,
                routing_key=routing_key,
            )

    async def dead_letter(
        self, message: AbstractIncomingMessage, envelope: Envelope, error: JobError, attempts: int
    ) -> None:
        """Keep the original request, with why it failed, in the dead-letter queue."""
        headers = _carried_headers(message)
        headers.update(
            {
                H_ERROR_CODE: error.code.value,
                H_ERROR_MESSAGE: error.message[:MAX_HEADER_TEXT],
                H_ATTEMPTS: attempts,
                H_JOB_ID: envelope.job_id,
            }
        )
        await self._send_copy(message, envelope, headers, self._settings.dead_letter_queue)

    async def defer(
        self, message: AbstractIncomingMessage, envelope: Envelope, deferral: Deferral
    ) -> int:
        """Send the request round a delay queue; returns the tier's seconds."""
        tier = delay_tier(deferral.wait)
        headers = _carried_headers(message)
        headers[H_ATTEMPTS] = deferral.attempts
        queue = delay_queue_name(self._settings.request_queue, tier, self._settings.queue_type)
        await self._send_copy(message, envelope, headers, queue)
        return tier

    async def requeue_counted(
        self, message: AbstractIncomingMessage, envelope: Envelope, redeliveries: int
    ) -> None:
        """Put a redelivered request back with its redelivery count (classic queues keep
        none, and without one a message that crashes workers would loop for ever)."""
        headers = _carried_headers(message)
        headers[H_REDELIVERIES] = redeliveries
        await self._send_copy(message, envelope, headers, self._settings.request_queue)

    async def _send_copy(
        self,
        message: AbstractIncomingMessage,
        envelope: Envelope,
        headers: dict[str, Any],
        queue: str,
    ) -> None:
        copy = copy_request(message, message_id=envelope.job_id, headers=headers)
        await self._send("", queue, copy.body, copy.properties)


def _returned(exc: aiormq.exceptions.DeliveryError) -> bool:
    """True when the broker returned the message as unroutable (rather than nacking it)."""
    frame = getattr(exc, "frame", None)
    return frame is not None and type(frame).__name__ == "Return"


def _carried_headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    # The broker's own bookkeeping starts again on the copy.
    return {
        k: v
        for k, v in (message.headers or {}).items()
        if k
        not in (
            H_DELIVERY_COUNT,
            H_REDELIVERIES,
            "x-death",
            "x-first-death-queue",
            "x-first-death-reason",
            "x-first-death-exchange",
            "x-last-death-queue",
            "x-last-death-reason",
            "x-last-death-exchange",
        )
    }


def copy_request(
    message: AbstractIncomingMessage, *, message_id: str | None, headers: dict[str, Any]
) -> aio_pika.Message:
    """A persistent copy of a delivered request with other headers, to publish again."""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=message.expiration,
        message_id=message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )
