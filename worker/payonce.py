"""Pay once (contract §16): answer a job from the result store or the cache, else run it.

Between :mod:`worker.delivery` and :class:`~worker.runner.JobRunner`, for a job that passed
its checks:

1. The job id's lease, in one round trip that looks up a stored result first. A stored
   result is published again (``metadata.cache: "stored"``) without a call; a lease held
   by another delivery is waited for (at most two seconds), then the job goes round a
   delay queue; a dead letter replayed on purpose (``x-replayed``) ignores the store. The
   lease lives 10 s and is renewed while the call runs.
2. With the cache on for the job (``WORKER_CACHE`` or its ``x-cache`` header), looked up
   in the same write to Redis as the lease, a stored answer to the same tenant, model and
   body is served (``"hit"``: no call, cost 0; a
   streamed job gets its deltas); a miss is called and its successful answer kept.
3. :meth:`PayOnce.keep` stores the final result before it is published and ends the
   lease in the same round trip; :meth:`PayOnce.done` ends it when nothing was stored.

Redis away or slow: the store's circuit skips every step within its timeout and the job is
called as if there were no store (the metrics count what was skipped).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from worker.errors import UpstreamError, error_for_code
from worker.job import Deferral, Job, JobOutcome
from worker.settings import Settings
from worker.store import (
    H_CACHE,
    Acquired,
    CachedAnswer,
    Held,
    Skipped,
    Store,
    StoreConfig,
    Stored,
    cache_key,
    deltas_from_completion,
    enabled_for,
    open_store,
    restamp,
)
from worker.stream.relay import DeltaSink

__all__ = ["H_CACHE", "H_REPLAYED", "Call", "PayOnce", "Ticket", "open_pay_once", "stored_outcome"]

log = structlog.get_logger(__name__)

Call = Callable[[Job, DeltaSink], Awaitable[JobOutcome | Deferral]]

H_REPLAYED = "x-replayed"  # set by `dlq replay` and the console: run again, do not answer
# A lease is short and renewed while its call runs: a worker killed mid-call (kill -9)
# holds the job id for at most LEASE_TTL, not for the call's whole timeout.
LEASE_TTL = 10.0
RENEW_EVERY = 1 / 3  # of the lease's time to live
# A copy that finds the lease held waits this long in the worker for the result (a
# duplicate whose call is about to end), then goes round a delay queue (HELD_RETRY): a
# copy waiting in a worker holds a delivery, and every lost connection meanwhile counts
# one more delivery of it toward WORKER_MAX_ATTEMPTS (the soak measured 126 jobs of 5,000
# failing so with a 10 s wait and a 30 s lease).
HELD_WAIT = 2.0
HELD_RETRY = 5.0


@dataclass(slots=True)
class Ticket:
    """One delivery's hold on its job id: what :meth:`PayOnce.done` gives back."""

    job_id: str
    holder: str
    renew_at: asyncio.TimerHandle | None = None  # when the lease's renewals start
    renewal: asyncio.Task[None] | None = None
    stored: bytes | None = None  # the stored result to publish again, when there is one
    leased: bool = False
    orphaned: bool = False  # its connection was lost mid-call: store the result, then stop
    document: bytes | None = None  # the final result, once rendered and kept right after the call
    extra: dict[str, Any] = field(default_factory=dict)


class PayOnce:
    """The result store and the cache around one process's runner (see the module)."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.cache_default = settings.cache
        self.lease_ttl = LEASE_TTL
        self._holder = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._deliveries = 0

    async def run(
        self, job: Job, deltas: DeltaSink, ticket: Ticket, call: Call
    ) -> JobOutcome | Deferral | None:
        """The job's outcome (``call(job, deltas)``, or served from the cache), a deferral,
        or None when ``ticket.stored`` holds a stored result to publish again instead."""
        results, cache = self.store.results, self.store.cache
        digest = None
        if cache is not None and enabled_for(job.envelope.headers.get(H_CACHE), self.cache_default):
            digest = cache_key(job.envelope.tenant, job.body)
        hit: CachedAnswer | Skipped | None = None
        looked = False  # whether `hit` answers for this delivery
        if results is not None:
            replayed = _truthy(job.envelope.headers.get(H_REPLAYED))
            take = results.acquire(ticket.job_id, ticket.holder, self.lease_ttl, reuse=not replayed)
            if digest is not None and cache is not None:
                # The lease and the cache's answer in one write to Redis (the store's
                # commands are pipelined); the answer counts only if the lease is taken.
                lease, hit = await asyncio.gather(take, cache.get(digest, counted=False))
                looked = isinstance(lease, Acquired | Skipped)
            else:
                lease = await take
            if isinstance(lease, Held):
                lease = await results.wait_for(
                    ticket.job_id,
                    ticket.holder,
                    self.lease_ttl,
                    within=min(lease.remaining, HELD_WAIT),
                    reuse=not replayed,
                )
            if isinstance(lease, Stored):
                ticket.stored = restamp(lease.body, "stored")
                return None
            if isinstance(lease, Held):
                log.info("another delivery still calls for this job; deferring")
                return Deferral(
                    wait=HELD_RETRY,
                    attempts=job.envelope.prior_attempts,
                    error=UpstreamError("another delivery of this job is still being called"),
                    rate_limit_wait_ms=job.envelope.rate_limit_wait_ms,
                )
            if isinstance(lease, Acquired):
                ticket.leased = True
                # Most calls end long before a renewal is due: a timer, not a task a job.
                ticket.renew_at = asyncio.get_running_loop().call_later(
                    self.lease_ttl * RENEW_EVERY, self._start_renewing, ticket
                )
        if digest is not None and cache is not None:
            if looked:
                cache.count(hit)
            else:
                hit = await cache.get(digest)
            if isinstance(hit, CachedAnswer):
                return await self._serve(job, hit, deltas)
            if isinstance(hit, Skipped):
                digest = None  # Redis away: neither a hit nor a miss
        outcome = await call(job, deltas)
        if digest is not None and cache is not None and isinstance(outcome, JobOutcome):
            outcome.cache = "miss"
            answer = _answer_of(outcome)
            if answer is not None:
                await cache.put(digest, answer)
        return outcome

    async def keep(self, ticket: Ticket, document: bytes) -> None:
        """Store a final result under its job id, before it is published."""
        if self.store.results is not None and ticket.leased:
            stored = await self.store.results.store(ticket.job_id, document, holder=ticket.holder)
            if stored:  # the lease ended with it: nothing left for done() to give back
                ticket.leased = False

    async def done(self, ticket: Ticket) -> None:
        """End the delivery's lease (the job settled, or will be delivered again)."""
        # Stop the renewals first, at once: a delivery cancelled while it releases must not
        # leave a lease renewed forever. A renewal still on its way finds the lease gone.
        if ticket.renew_at is not None:
            ticket.renew_at.cancel()
        if ticket.renewal is not None:
            ticket.renewal.cancel()
        if ticket.leased and self.store.results is not None:
            await self.store.results.release(ticket.job_id, ticket.holder)

    def ticket(self, job_id: str) -> Ticket:
        """A holder name of this delivery's own: two copies in one process are two holders."""
        self._deliveries += 1
        return Ticket(job_id, f"{self._holder}-{self._deliveries}")

    def _start_renewing(self, ticket: Ticket) -> None:
        if ticket.leased:
            ticket.renewal = asyncio.create_task(self._renew(ticket))

    async def _renew(self, ticket: Ticket) -> None:
        """Keep the lease while the call runs (a stream may outlast one time to live)."""
        assert self.store.results is not None
        while True:
            await self.store.results.renew(ticket.job_id, ticket.holder, self.lease_ttl)
            await asyncio.sleep(self.lease_ttl * RENEW_EVERY)

    async def _serve(self, job: Job, answer: CachedAnswer, deltas: DeltaSink) -> JobOutcome:
        """A cache hit: the stored answer as this job's outcome, with its deltas if asked."""
        if job.stream:
            await deltas.send(1, 0, deltas_from_completion(answer.body))
        return JobOutcome(
            attempts=0,
            status_code=answer.status_code,
            request_id=answer.request_id,
            body=answer.body,
            usage=answer.usage,
            latency_ms=0.0,
            calls=0,
            cache="hit",
            cost={"input": 0.0, "output": 0.0, "total": 0.0, "currency": "USD", "source": "cache"},
        )


def open_pay_once(settings: Settings) -> PayOnce | None:
    """The result store and the cache for these settings; None without Redis (§16)."""
    if settings.redis_url is None or (settings.result_ttl <= 0 and settings.cache_ttl <= 0):
        return None
    store = open_store(
        settings.redis_url.get_secret_value(),
        StoreConfig(result_ttl=settings.result_ttl, cache_ttl=settings.cache_ttl),
    )
    return None if store is None else PayOnce(store, settings)


def stored_outcome(document: bytes) -> JobOutcome:
    """The parts of a stored result the publisher needs for its headers."""
    value = orjson.loads(document)
    error = value.get("error")
    response = value.get("response") or {}
    metadata = value.get("metadata") or {}
    return JobOutcome(
        attempts=int(metadata.get("attempts") or 0),
        error=None
        if not error
        else error_for_code(
            error.get("code"), error.get("message") or "", error.get("status_code")
        ),
        status_code=response.get("status_code"),
        request_id=response.get("request_id"),
        usage=value.get("usage"),
    )


def _answer_of(outcome: JobOutcome) -> CachedAnswer | None:
    if outcome.error is not None or outcome.status_code is None or outcome.body is None:
        return None
    answer = CachedAnswer(outcome.status_code, outcome.request_id, outcome.body)
    return answer if answer.succeeded else None


def _truthy(value: Any) -> bool:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value is True or (isinstance(value, str) and value.lower() in ("true", "1", "yes"))
