"""Everything the worker publishes: deltas, results, delay-queue retries, dead letters.

Every publish waits for the broker's confirm, and every copy the worker relies on (result,
dead letter, delay, counted requeue) is published ``mandatory``: a copy the broker returns
(no queue) or keeps nacking raises :class:`CopyRefused` instead of passing for delivered.
The caller settles the request by the rules in :mod:`worker.delivery`.

A nack is taken as transient: a quorum queue nacks while it elects a leader (a node lost),
for seconds. A nacked copy is published again, after a pause that doubles (0.1 s up to
2 s), until ``WORKER_PUBLISH_RETRY_WINDOW`` (60 s) has passed; only then is it refused (a
full ``reject-publish`` queue stays full). A return (no queue to route to) is final at
once. On the result exchange a retry may reach a second bound queue twice (the one that
took the first copy): at least once, as always.

A result goes to ``reply_to``; if that queue returns or nacks it, to the result exchange
(a reply queue is the producer's: it is not waited for); if nothing takes it there either,
the result document itself goes to the dead-letter queue (AMQP type ``chat.result``,
header ``x-unroutable-result``), so a paid completion is never thrown away. Only when that
fails too does the request stay unacknowledged.

A copy of the request (dead letter, delay, requeue) is made by
:func:`~worker.amqp.copies.copy_request`: bounded, bytes kept, the tenant kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import aiormq
import orjson
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pamqp.commands import Basic

from worker.amqp.blocked import BlockedState
from worker.amqp.copies import Republisher, copy_request
from worker.amqp.deltas import JobDeltas, ReplyRoutes
from worker.amqp.outbox import Outbox, refusal, returned
from worker.amqp.topology import (
    APP_ID,
    H_ATTEMPTS,
    H_CALLS,
    H_COST,
    H_CUSTOM_ID,
    H_ERROR_CODE,
    H_ERROR_MESSAGE,
    H_JOB_ID,
    H_RATE_LIMIT_WAIT,
    H_REDELIVERIES,
    H_STATUS,
    H_UNROUTABLE_RESULT,
    H_USAGE_COMPLETION,
    H_USAGE_PROMPT,
    H_USAGE_TOTAL,
    RESULT_ERROR,
    RESULT_OK,
    TYPE_RESULT,
    dead_letter_queue_for,
    delay_queue_name,
    delay_tier,
)
from worker.errors import JobError
from worker.job import Deferral, Envelope, JobOutcome
from worker.messages import MAX_CUSTOM_ID
from worker.settings import Settings

__all__ = [
    "MAX_HEADER_TEXT",
    "CopyRefused",
    "JobDeltas",
    "Publisher",
    "render_result",
]

log = structlog.get_logger(__name__)

Properties = Basic.Properties

# Header values are free text (an upstream's message, a producer's custom_id): all headers
# of one message must fit in one frame (128 KiB by default), or the broker closes the
# whole connection and every job on it. Longer values are cut (messages) or left out (ids).
MAX_HEADER_TEXT = 1000
# Pauses between publishes of a nacked copy: doubling from the first to the last.
NACK_RETRY_FIRST = 0.1
NACK_RETRY_MAX = 2.0


class CopyRefused(aiormq.exceptions.AMQPError):
    """The broker returned (unroutable) or kept nacking a copy the request depends on."""

    def __init__(self, what: str, destination: str, exc: aiormq.exceptions.DeliveryError) -> None:
        self.reason = refusal(exc)
        super().__init__(f"{what} to {destination!r} {self.reason}")
        self.what = what
        self.destination = destination
        self.returned = returned(exc)


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
            "calls": outcome.calls,
            "cache": outcome.cache,
            "cost": outcome.cost,
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
        self._by = Republisher.of(channel)
        # aiormq matches a basic.return to its publish by message_id: two mandatory publishes
        # with one id in flight at once (copies of duplicate jobs) could swap a return for a
        # confirm. One publish per message_id at a time keeps the match exact.
        self._id_locks: dict[str, asyncio.Lock] = {}
        self._outbox: Outbox | None = None
        self.routes = ReplyRoutes()

    @classmethod
    async def open(cls, channel: AbstractChannel, settings: Settings) -> Publisher:
        return cls(await channel.get_underlay_channel(), settings)

    @property
    def outbox(self) -> Outbox:
        """Deltas' way out: pre-encoded, a loop iteration's publishes in one write."""
        if self._outbox is None:
            channel = self._channel
            if not isinstance(channel, aiormq.Channel):
                raise TypeError(f"an aiormq channel is needed, not {type(channel).__name__}")
            self._outbox = Outbox(channel)
        return self._outbox

    @property
    def result_exchange(self) -> str:
        return self._settings.result_exchange

    async def _send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Properties,
        *,
        mandatory: bool = False,
    ) -> None:
        """Publish and wait for the broker's confirm (a nack raises ``DeliveryError``, a
        return of a ``mandatory`` publish ``PublishError``)."""
        message_id = properties.message_id
        if not mandatory or not message_id:
            await self._channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
            )
            return
        lock = self._id_locks.setdefault(message_id, asyncio.Lock())
        try:
            async with lock:
                await self._channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=True,
                )
        finally:
            if not lock.locked() and self._id_locks.get(message_id) is lock:
                del self._id_locks[message_id]

    async def _send_held(
        self, what: str, exchange: str, routing_key: str, body: bytes, properties: Properties
    ) -> None:
        """Publish ``mandatory`` a message the request depends on; a nack is published again
        until the retry window has passed (see the module docstring). Raises
        :class:`CopyRefused` on a return, or on a nack past the window."""
        deadline = time.monotonic() + self._settings.publish_retry_window
        pause = NACK_RETRY_FIRST
        while True:
            try:
                await self._send(exchange, routing_key, body, properties, mandatory=True)
                return
            except aiormq.exceptions.DeliveryError as exc:
                left = deadline - time.monotonic()
                if returned(exc) or left <= 0:
                    raise CopyRefused(what, exchange or routing_key, exc) from None
                log.info(
                    "the broker refused a copy (nack); publishing it again",
                    what=what,
                    exchange=exchange,
                    routing_key=routing_key,
                    retry_in=round(min(pause, left), 3),
                )
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, NACK_RETRY_MAX)

    def deltas(
        self,
        envelope: Envelope,
        custom_id: str | None,
        trace: Mapping[str, str],
        blocking: BlockedState | None = None,
    ) -> JobDeltas:
        """The publisher of one job's deltas (see :class:`JobDeltas`)."""
        return JobDeltas(
            self.outbox, self.result_exchange, self.routes, envelope, custom_id, trace, blocking
        )

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
        if custom_id is not None and len(custom_id) <= MAX_CUSTOM_ID:
            headers[H_CUSTOM_ID] = custom_id  # a longer one is in the body only
        if outcome.error is not None:
            headers[H_ERROR_CODE] = outcome.error.code.value
        if outcome.cost is not None:
            headers[H_COST] = f"{outcome.cost['total']:.10f}".rstrip("0").rstrip(".") or "0"
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
        try:
            if await self._reply(envelope, document, properties, routing_key):
                return
        finally:
            self.routes.forget(envelope)
        # Nothing takes the result (WORKER_RESULT_QUEUE empty and no binding, or queues that
        # refuse it): keep the document itself in the dead-letter queue rather than drop a
        # paid completion. A refusal there raises: the request then stays unacknowledged.
        exchange = self._settings.result_exchange
        log.error(
            "result unroutable; keeping it in the dead-letter queue",
            job_id=envelope.job_id,
            exchange=exchange,
            routing_key=routing_key,
        )
        headers[H_UNROUTABLE_RESULT] = f"{exchange}/{routing_key}"[:MAX_HEADER_TEXT]
        queue = dead_letter_queue_for(self._settings, self._lane(envelope))
        await self._send_held("the unroutable result", "", queue, document, properties)

    async def _reply(
        self, envelope: Envelope, body: bytes, properties: Properties, routing_key: str
    ) -> bool:
        """Send to ``reply_to``, else to the result exchange; False when nothing took it.

        A ``reply_to`` queue that is missing (return) or refuses the message (nack: full
        with ``overflow=reject-publish``, …) is given up for the rest of the job: retrying
        into it would only loop. The result exchange is retried on a nack (a quorum result
        queue electing a leader) for the retry window.
        """
        if reply_to := self.routes.reply_to(envelope):
            try:
                await self._send("", reply_to, body, properties, mandatory=True)
                return True
            except aiormq.exceptions.DeliveryError as exc:
                log.warning(
                    "reply_to queue did not take a message; using the result exchange",
                    job_id=envelope.job_id,
                    reply_to=reply_to,
                    reason=refusal(exc),
                )
                # Later messages of this job go straight to the exchange.
                self.routes.give_up(envelope)
        exchange = self._settings.result_exchange
        try:
            await self._send_held("the result", exchange, routing_key, body, properties)
        except CopyRefused as refused:
            log.warning(
                "result exchange did not take a result",
                job_id=envelope.job_id,
                exchange=exchange,
                routing_key=routing_key,
                reason=refused.reason,
            )
            return False
        return True

    async def dead_letter(
        self, message: AbstractIncomingMessage, envelope: Envelope, error: JobError, attempts: int
    ) -> None:
        """Keep the original request, with why it failed, in the dead-letter queue."""
        headers = {
            H_ERROR_CODE: error.code.value,
            H_ERROR_MESSAGE: error.message[:MAX_HEADER_TEXT],
            H_ATTEMPTS: attempts,
            H_JOB_ID: envelope.job_id,
        }
        queue = dead_letter_queue_for(self._settings, self._lane(envelope))
        await self._send_copy("the dead letter", message, envelope, headers, queue)

    async def defer(
        self, message: AbstractIncomingMessage, envelope: Envelope, deferral: Deferral
    ) -> int:
        """Send the request round a delay queue; returns the tier's seconds."""
        tier = delay_tier(deferral.wait)
        headers: dict[str, Any] = {H_ATTEMPTS: deferral.attempts, H_CALLS: deferral.calls}
        if deferral.rate_limit_wait_ms:
            headers[H_RATE_LIMIT_WAIT] = round(deferral.rate_limit_wait_ms)
        queue = delay_queue_name(self._lane(envelope), tier, self._settings.queue_type)
        await self._send_copy("the delayed retry", message, envelope, headers, queue)
        return tier

    async def requeue_counted(
        self, message: AbstractIncomingMessage, envelope: Envelope, redeliveries: int
    ) -> None:
        """Put a redelivered request back with its redelivery count (classic queues keep
        none, and without one a message that crashes workers would loop for ever)."""
        await self._send_copy(
            "the counted requeue",
            message,
            envelope,
            {H_REDELIVERIES: redeliveries},
            self._lane(envelope),
        )

    def _lane(self, envelope: Envelope) -> str:
        """The request queue the job came from: its copies go back to the same lane."""
        return envelope.lane or self._settings.lanes[0].queue

    async def _send_copy(
        self,
        what: str,
        message: AbstractIncomingMessage,
        envelope: Envelope,
        headers: dict[str, Any],
        queue: str,
    ) -> None:
        copy = copy_request(message, message_id=envelope.job_id, headers=headers, by=self._by)
        await self._send_held(what, "", queue, copy.body, copy.properties)
