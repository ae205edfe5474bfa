"""One delivery: envelope → job → runner → settle. The one place that acknowledges.

Settlement rules, stated once and applied here (a failure of any step ends in
:func:`release`):

- A request is acknowledged only after every copy it depends on is published
  ``mandatory`` and confirmed by the broker (a nack is published again for a while, a
  return is final: :mod:`worker.amqp.publish`):
  - a finished job (ok or error): its result, to ``reply_to``; if that queue is missing or
    refuses it (return or nack), to the result exchange; if nothing takes it there, the
    result document itself to the dead-letter queue (a paid completion is never dropped);
  - a retry that must wait long: the copy in its delay queue;
  - a redelivery on a classic queue: the copy with its redelivery count.
- **Exactly one result per job.** The result is the contract's one message for a job, and
  it is the last thing published before the ack: nothing that could fail after it sends
  the request round again to publish a second one. So a failed job's dead-letter copy goes
  first, and if the dead-letter queue will not take it (missing, or still refusing at the
  end of the retry window), the dead letter is given up, logged as an error and counted
  (``chat_worker_dead_letters_lost_total``), and the result goes out and the request is
  acknowledged all the same: the result says what failed and why; looping the request
  instead would charge it a delivery each round and end with no result at all (the
  broker's delivery limit drops it into the same refusing queue).
- Anything else (a copy returned or nacked with no fallback left, a publish that failed,
  a lost channel, a bug) leaves the request unacknowledged: after a pause that grows with
  its redeliveries (no hot loop), it is nacked back to the queue, and the delivery count
  bounds the loop.
- Copies never inherit the request's ``expiration`` and keep its tenant (see
  :mod:`worker.amqp.copies`).
- A lost connection puts every unacknowledged request back and cancels its deliveries in
  flight. With the result store on, a plain (not streamed) call under way is *orphaned*
  instead (``DeliveryHandler._pay_once``): it runs on in a task of its own, stores its
  final result and stops there, publishing and acknowledging nothing; its redelivered copy
  waits on the job's lease and is answered from the store, so a paid answer is not paid
  again (§16). On a stop (SIGTERM past its grace) nothing is orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage

from worker.amqp.blocked import BlockedState
from worker.amqp.cancellations import H_BATCH_ID, CancelledBatches
from worker.amqp.connect import broker_user
from worker.amqp.envelope import read_envelope
from worker.amqp.publish import CopyRefused, Publisher, render_result
from worker.amqp.topology import H_DELIVERY_COUNT, H_REDELIVERIES
from worker.errors import Cancelled
from worker.heartbeat import JobStats
from worker.job import Deferral, Envelope, Job, JobOutcome, Rejection, decode_job, failed
from worker.messages import ErrorCode
from worker.payonce import Call, PayOnce, Ticket, stored_outcome
from worker.runner import JobRunner
from worker.settings import Settings
from worker.spend import Spending
from worker.stream.relay import DeltaSink
from worker.telemetry import Telemetry
from worker.tenants import tenant_of

__all__ = ["DeliveryHandler", "release"]

log = structlog.get_logger(__name__)

# A request that could not be settled waits this long (doubling with each redelivery, up
# to the cap) before it goes back to the queue: a copy the broker keeps refusing must not
# turn into a hot redelivery loop.
RELEASE_DELAY = 0.5
RELEASE_DELAY_CAP = 30.0


class DeliveryHandler:
    """Handles deliveries for one worker process (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        runner: JobRunner,
        telemetry: Telemetry,
        stats: JobStats,
        blocking: BlockedState,
        identity: str,
        once: PayOnce | None = None,
        spending: Spending | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self.once = once  # the result store and the cache, with Redis (§16)
        self.cancelled = CancelledBatches()  # filled from the gateway's announcements (§15)
        self.spending = spending  # prices and budgets (§17)
        self.settings = settings
        self.runner = runner
        self.telemetry = telemetry
        self.stats = stats
        self.blocking = blocking
        self.identity = identity
        self.stopping = stopping or asyncio.Event()  # set: a cancelled delivery leaves no orphan
        self.orphans: set[asyncio.Future[None]] = set()  # calls kept past a lost connection
        # The worker's own broker users: a message with one of them as user_id is a copy
        # the worker published again, and names its tenant in a header (worker.tenants).
        self.republishers = frozenset(
            user for url in settings.amqp_urls if (user := broker_user(url)) is not None
        )

    async def handle(
        self,
        message: AbstractIncomingMessage,
        lane: str,
        publisher: Publisher,
        received: float | None = None,
    ) -> None:
        """Read, check, run and settle one delivery; raise when it could not be settled.
        ``received``: when the delivery arrived (``time.monotonic``), now by default."""
        received = time.monotonic() if received is None else received
        started = time.perf_counter()
        envelope = read_envelope(
            body=message.body,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            headers=message.headers,
            redelivered=bool(message.redelivered),
            settings=self.settings,
            lane=lane,
            tenant=tenant_of(
                message.user_id,
                message.headers,
                trust_header=self.settings.trust_tenant_header,
                republishers=self.republishers,
            ),
        )
        if (
            message.redelivered
            and H_DELIVERY_COUNT not in envelope.headers
            and envelope.prior_attempts < self.settings.max_attempts
        ):
            # A classic queue counts nothing: count redeliveries ourselves, on a copy.
            await publisher.requeue_counted(message, envelope, envelope.redeliveries + 1)
            await message.ack()
            return
        structlog.contextvars.bind_contextvars(
            job_id=envelope.job_id,
            correlation_id=envelope.correlation_id,
            lane=lane,
            tenant=envelope.tenant,
        )
        with self.telemetry.job_span(
            lane,
            envelope.headers,
            job_id=envelope.job_id,
            correlation_id=envelope.correlation_id,
            delivery_tag=message.delivery_tag,
        ) as span:
            decoded = decode_job(message.body, envelope, self.settings)
            trace = self.telemetry.outgoing_headers()
            ticket: Ticket | None = None
            if isinstance(decoded, Rejection):
                custom_id, model = decoded.custom_id, None
                outcome: JobOutcome | Deferral = JobOutcome(
                    attempts=envelope.prior_attempts, error=decoded.error
                )
            elif (batch := envelope.headers.get(H_BATCH_ID)) and _text(batch) in self.cancelled:
                custom_id, model = decoded.custom_id, decoded.model
                error = Cancelled(f"batch {_text(batch)} was cancelled before this line's call")
                outcome = failed(error, envelope.prior_attempts)
                outcome.calls = envelope.prior_calls
            else:
                custom_id, model = decoded.custom_id, decoded.model
                structlog.contextvars.bind_contextvars(
                    custom_id=custom_id, model=model, endpoint=decoded.endpoint
                )
                deltas = publisher.deltas(envelope, custom_id, trace, self.blocking)
                if self.once is not None:
                    ticket = self.once.ticket(envelope.job_id)
                try:
                    call = functools.partial(self._call, held_since=received)
                    if ticket is None:
                        outcome = await call(decoded, deltas)
                    elif paid := await self._pay_once(decoded, deltas, ticket, call, envelope):
                        outcome = paid
                    else:  # answered from the result store (§16): publish it again
                        assert ticket.stored is not None
                        outcome = stored_outcome(ticket.stored)
                    await deltas.settle()  # the result is the job's last message
                except BaseException:
                    if ticket is not None and not ticket.orphaned and self.once is not None:
                        await self.once.done(ticket)  # the lease, given back at once
                    raise
                finally:
                    deltas.discard()
            dead_lettered = False
            try:
                if ticket is not None and ticket.stored is not None:
                    assert isinstance(outcome, JobOutcome)
                    await publisher.result(envelope, custom_id, outcome, ticket.stored, trace)
                    await message.ack()
                    log.info("job answered from the result store", cache="stored")
                else:
                    dead_lettered = await self._settle(
                        publisher, message, envelope, custom_id, model, outcome, trace, ticket
                    )
            finally:
                if ticket is not None and self.once is not None:
                    await self.once.done(ticket)
            if isinstance(outcome, JobOutcome):
                # A stored result was paid for by the delivery that stored it.
                stored = ticket is not None and ticket.stored is not None
                cost = None if stored or not outcome.cost else float(outcome.cost["total"])
                self.telemetry.record_job(
                    span,
                    model=model,
                    error_code=outcome.error.code.value if outcome.error else None,
                    seconds=time.perf_counter() - started,
                    lane=lane,
                    tenant=envelope.tenant,
                    usage=outcome.usage,
                    cost=cost,
                    upstream=outcome.upstream,
                    dead_lettered=dead_lettered,
                )
                self.stats.record(
                    error_code=outcome.error.code.value if outcome.error else None,
                    model=model,
                    usage=outcome.usage,
                    tenant=envelope.tenant,
                    cost=cost,
                )
            self.telemetry.flush_deferred()  # the job has settled: its attempts' measurements

    async def _pay_once(
        self, job: Job, deltas: DeltaSink, ticket: Ticket, call: Call, envelope: Envelope
    ) -> JobOutcome | Deferral | None:
        """:meth:`PayOnce.run`, and for a plain call, its result kept at once and its
        orphaning: a delivery cancelled mid-call (its connection lost) leaves the call
        running in a task of its own, which stores the result for the redelivered copy
        (the module docstring)."""
        assert self.once is not None
        if job.stream:  # its deltas have nowhere to go: a redelivery streams again
            return await self._run_and_keep(job, deltas, ticket, call, envelope)
        run = asyncio.ensure_future(self._run_and_keep(job, deltas, ticket, call, envelope))
        try:
            return await asyncio.shield(run)
        except asyncio.CancelledError:
            if run.cancelled() or not ticket.leased or self.stopping.is_set():
                run.cancel()
                raise
            ticket.orphaned = True
            orphan = asyncio.ensure_future(self._orphan(run, ticket))
            self.orphans.add(orphan)
            orphan.add_done_callback(self.orphans.discard)
            raise

    async def _run_and_keep(
        self, job: Job, deltas: DeltaSink, ticket: Ticket, call: Call, envelope: Envelope
    ) -> JobOutcome | Deferral | None:
        """The call, then its final result stored at once (§16: before it is published),
        so that a delivery cancelled from here on leaves it stored."""
        assert self.once is not None
        outcome = await self.once.run(job, deltas, ticket, call)
        if isinstance(outcome, JobOutcome) and ticket.leased:
            ticket.document = render_result(
                envelope, job.custom_id, job.model, outcome, self.identity
            )
            await self.once.keep(ticket, ticket.document)
        return outcome

    async def _orphan(
        self, run: asyncio.Future[JobOutcome | Deferral | None], ticket: Ticket
    ) -> None:
        """An orphan's end: its call and the result's storing finish; nothing is published
        or acknowledged (its channel is gone)."""
        assert self.once is not None
        try:
            outcome = await run
            if ticket.document is not None:
                log.info(
                    "connection lost during the call; result stored for the redelivered copy",
                    stored=not ticket.leased,
                )
            else:
                log.info(
                    "connection lost during the call; the redelivered copy runs it",
                    deferred=isinstance(outcome, Deferral),
                )
        except Exception:
            log.exception("connection lost during the call; the call failed after it")
        finally:
            await self.once.done(ticket)

    async def _call(
        self, job: Job, deltas: DeltaSink, *, held_since: float
    ) -> JobOutcome | Deferral:
        """The upstream calls of a job, within its tenant's budget and priced (§17)."""
        run = functools.partial(self.runner.run, held_since=held_since)
        if self.spending is None:
            return await run(job, deltas)
        return await self.spending.run(job, deltas, run)

    async def _settle(
        self,
        publisher: Publisher,
        message: AbstractIncomingMessage,
        envelope: Envelope,
        custom_id: str | None,
        model: str | None,
        outcome: JobOutcome | Deferral,
        trace: dict[str, str],
        ticket: Ticket | None = None,
    ) -> bool:
        """Publish what the outcome needs and acknowledge (the module docstring's rules);
        True when a dead letter was kept."""
        if isinstance(outcome, Deferral):
            tier = await publisher.defer(message, envelope, outcome)
            await message.ack()
            log.info(
                "job deferred",
                error_code=outcome.error.code.value,
                attempts=outcome.attempts,
                retry_in_s=tier,
            )
            return False
        if ticket is not None and ticket.document is not None:
            document = ticket.document  # stored already, right after the call (§16)
        else:
            document = render_result(envelope, custom_id, model, outcome, self.identity)
        error = outcome.error
        dead_lettered = False
        # A cancelled line is no failure to look into: its result says so, and a dead
        # letter for each line of a cancelled batch would only bury the real ones.
        if error is not None and error.code is not ErrorCode.CANCELLED:
            try:
                await publisher.dead_letter(message, envelope, error, outcome.attempts)
                dead_lettered = True
            except CopyRefused as refused:
                log.error(
                    "dead-letter queue did not take the failed request; "
                    "publishing the result all the same",
                    destination=refused.destination,
                    reason=refused.reason,
                    error_code=error.code.value,
                )
                self.telemetry.dead_letters_lost.add(
                    1,
                    {
                        "lane": envelope.lane or "",
                        "reason": "returned" if refused.returned else "refused",
                    },
                )
        await publisher.result(envelope, custom_id, outcome, document, trace)
        await message.ack()
        usage = outcome.usage or {}
        log.info(
            "job finished",
            outcome="ok" if error is None else "error",
            error_code=error.code.value if error else None,
            attempts=outcome.attempts,
            latency_ms=outcome.latency_ms,
            ttft_ms=outcome.ttft_ms,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
        )
        return dead_lettered


async def release(message: AbstractIncomingMessage, stopping: asyncio.Event) -> None:
    """Give an unsettled request back to the queue, after a pause (see RELEASE_DELAY)."""
    headers = message.headers or {}
    count = max(
        _count(headers.get(H_DELIVERY_COUNT)),
        _count(headers.get(H_REDELIVERIES)),
        int(bool(message.redelivered)),
    )
    delay = min(RELEASE_DELAY * 2 ** min(count, 16), RELEASE_DELAY_CAP)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), delay)
    with contextlib.suppress(Exception):
        await message.nack(requeue=True)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
