"""A job's attempts: route to an upstream, pass its gate, call, retry, fall back, conclude.

Nothing here touches the broker: :mod:`worker.delivery` hands in a checked job and a sink
for its deltas, and settles what :meth:`JobRunner.run` returns.

A delivery is held while its job runs, and the broker closes the channel of a delivery
held past its consumer timeout (``WORKER_CONSUMER_TIMEOUT``, RabbitMQ's 30 minutes by
default), cancelling every job on it. So before each further attempt the runner checks
the worst case: the time held so far, the wait before the attempt, a rate-limit wait and
a whole ``WORKER_REQUEST_TIMEOUT``. Past :data:`~worker.retry.HOLD_SHARE` of the consumer
timeout the job leaves through a delay queue instead (a :class:`~worker.job.Deferral`), and
the next delivery starts a fresh hold (:mod:`worker.retry`: these waits and deferrals).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from typing import Any

import orjson
import structlog

from worker import retry
from worker.errors import BudgetError, JobError, ModelNotAllowed, UpstreamError, UpstreamTimeout
from worker.job import Deferral, Job, JobOutcome, failed
from worker.limits.configured import ConfiguredLimits
from worker.limits.gate import Gate, Wait, estimate_tokens
from worker.messages import Endpoint
from worker.retry import backoff
from worker.settings import Settings
from worker.stream.relay import DeltaSink, relay_stream, stream_body
from worker.telemetry import Telemetry
from worker.upstream.client import Upstream
from worker.upstream.lease import Lease
from worker.upstream.pool import Member, UpstreamPool
from worker.upstreams_file import UpstreamSpec

__all__ = ["JobRunner", "backoff", "gate_for"]  # backoff: from worker.retry, re-exported

log = structlog.get_logger(__name__)


class JobRunner:
    """Calls the upstreams for a :class:`Job` as contract §6 and §11 say.

    Each attempt goes to the pool's choice for the job's model (lowest priority with budget,
    by weight), through that upstream's rate-limit gate. A retryable failure moves on to the
    next candidate at once; only when every candidate has failed in a row does the job back
    off (in the process, or through a delay queue). A 429 is no attempt: the job goes to
    another upstream of its model with budget, or waits for budget at the best one.
    """

    def __init__(
        self,
        settings: Settings,
        upstream: UpstreamPool | Upstream,
        telemetry: Telemetry,
        gate: Gate | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry
        if isinstance(upstream, UpstreamPool):
            self.pool = upstream
        else:
            self.pool = UpstreamPool.of_client(upstream, settings)
        self._lane_exclusions: dict[str | None, list[Member]] = {}
        for member in self.pool.members:
            if member.gate is None:
                member.gate = gate if gate is not None else gate_for(settings, member.spec)
            member.client.on_answer = member.gate.observe
            telemetry.watch_gate(member.gate)

    @property
    def gate(self) -> Gate:
        """The first upstream's gate (the only one of a pool of one)."""
        return _gate_of(self.pool.members[0])

    async def aclose(self) -> None:
        for member in self.pool.members:
            await _gate_of(member).aclose()

    async def run(
        self, job: Job, send_delta: DeltaSink, held_since: float | None = None
    ) -> JobOutcome | Deferral:
        """Run the job's attempts: its outcome, or its deferral; either counts the upstream
        calls made for it, 429s included, across deliveries (``metadata.calls``, §4).
        ``held_since``: when its delivery arrived (``time.monotonic``), now by default (see
        the module docstring)."""
        held_since = time.monotonic() if held_since is None else held_since
        calls = [job.envelope.prior_calls]
        concluded = await self._run(job, send_delta, calls, held_since)
        concluded.calls = calls[0]
        return concluded

    async def _run(
        self, job: Job, send_delta: DeltaSink, calls: list[int], held_since: float
    ) -> JobOutcome | Deferral:
        attempt = job.envelope.prior_attempts
        waited = job.envelope.rate_limit_wait_ms / 1000  # seconds, across deliveries
        if attempt >= self.settings.max_attempts:
            error = UpstreamError(
                f"gave up after {attempt} attempts or deliveries without a result"
            )
            return self._finish(failed(error, attempt), waited, None)
        tokens = estimate_tokens(job.body, job.endpoint)
        try:
            lease = self._lease(job, tokens)
        except ModelNotAllowed as unserved:
            return self._finish(failed(unserved, attempt), waited, None)
        bodies: dict[str, bytes] = {}
        tried: list[Member] = []  # failed in a row since the last backoff
        short: list[Member] = []  # had no budget within the wait offered, this delivery
        last: str | None = None  # the upstream of the last attempt
        refused: JobError | None = None  # the last 429, for the result if waiting fails
        while True:
            if lease is None:
                attempt += 1
                exc: JobError = self._all_cooling(job)
            else:
                # Everything the lease takes (a probe, budget, a slot) it gives back as the
                # block ends, however it ends; it reports the attempt to the pool.
                outcome: JobOutcome | Wait
                try:
                    async with lease:
                        left = retry.wait_left(self.settings, job, waited)
                        admitted = await lease.admit(min(retry.RATE_LIMIT_INLINE_WAIT, left))
                        if admitted.waited > 0:
                            self.telemetry.rate_limit_wait.record(
                                admitted.waited, {"upstream": lease.name}
                            )
                        waited += admitted.waited
                        if isinstance(admitted, Wait):
                            outcome = admitted
                        else:
                            attempt += 1
                            structlog.contextvars.bind_contextvars(attempt=attempt)
                            last = lease.name
                            calls[0] += 1
                            outcome = await self._attempt(
                                job, lease.member, bodies, attempt, send_delta
                            )
                            lease.answered(_total_tokens(outcome.usage))
                except BudgetError as budget:
                    # A call refused for budget is not an attempt (§11): the job goes to an
                    # upstream with budget, or waits, bounded by WORKER_RATE_LIMIT_MAX_WAIT.
                    attempt -= 1
                    refused = budget
                    self.telemetry.rate_limited.add(
                        1, {"upstream": lease.name, "error_code": budget.code.value}
                    )
                    if retry.overstays(self.settings, held_since, 0.0):
                        return retry.leave(budget, attempt, waited, 0.0)
                    lease = self._lease(job, tokens)
                    continue
                except JobError as error:
                    exc = error
                else:
                    if isinstance(outcome, JobOutcome):
                        return self._finish(outcome, waited, last)
                    # No budget here soon: another upstream of the model may have some.
                    short.append(closed := lease.member)
                    lease = self._lease(job, tokens, [*tried, *short], ready=True)
                    if lease is not None:
                        log.info("upstream has no budget", upstream=closed.name, to=lease.name)
                        continue
                    # Budget further away than the job may wait here: fail, or defer it.
                    later = retry.wait_longer(self.settings, job, outcome, waited, attempt, refused)
                    if isinstance(later, Deferral):
                        return later
                    return self._finish(failed(later, attempt), waited, last)
            if not exc.retryable or attempt >= self.settings.max_attempts:
                return self._finish(failed(exc, attempt), waited, last)
            if lease is not None:
                tried.append(lease.member)
                if retry.overstays(self.settings, held_since, 0.0):
                    return retry.leave(exc, attempt, waited, 0.0)
                lease = self._lease(job, tokens, tried)
                if lease is not None:
                    self.telemetry.retries.add(
                        1, {"error_code": exc.code.value, "upstream": tried[-1].name}
                    )
                    log.info(
                        "falling back",
                        error_code=exc.code.value,
                        error=exc.message,
                        upstream=tried[-1].name,
                        to=lease.name,
                    )
                    continue
            wait = backoff(attempt, exc.retry_after)
            self.telemetry.retries.add(1, {"error_code": exc.code.value, "upstream": last or ""})
            log.info("retrying", error_code=exc.code.value, error=exc.message, wait_s=wait)
            if wait > retry.INLINE_RETRY_LIMIT:
                return Deferral(
                    wait=wait, attempts=attempt, error=exc, rate_limit_wait_ms=waited * 1000
                )
            if retry.overstays(self.settings, held_since, wait):
                return retry.leave(exc, attempt, waited, wait)
            await asyncio.sleep(wait)
            tried.clear()
            lease = self._lease(job, tokens)

    def _lease(
        self, job: Job, tokens: int, exclude: list[Member] | None = None, *, ready: bool = False
    ) -> Lease | None:
        """A lease on the pool's choice for the job's model and endpoint among the upstreams
        that serve its lane (``lanes`` in the file, §17), entered at once by the caller."""
        elsewhere = self._not_serving(job.envelope.lane)
        if elsewhere:
            exclude = [*(exclude or ()), *elsewhere]
        return self.pool.lease(job.model, tokens, exclude or (), ready=ready, endpoint=job.endpoint)

    def _not_serving(self, lane: str | None) -> list[Member]:
        """The members kept for other lanes than ``lane`` (computed once per lane)."""
        found = self._lane_exclusions.get(lane)
        if found is None:
            found = [m for m in self.pool.members if not m.spec.serves_lane(lane)]
            self._lane_exclusions[lane] = found
        return found

    def _all_cooling(self, job: Job) -> UpstreamError:
        """The attempt that finds every upstream of the job's model resting: it waits for
        the first to come back (counted as an attempt, so a dead provider fails jobs after
        ``WORKER_MAX_ATTEMPTS`` instead of holding them for ever)."""
        wait = self.pool.cooling_wait(job.model, endpoint=job.endpoint)
        cause = self.pool.cooling_cause(job.model, job.endpoint)
        return UpstreamError(
            f"every upstream of model {job.model!r} is cooling down"
            + (f" (last failure: {cause})" if cause else ""),
            cause=cause,
            retry_after=wait or None,  # 0: another job is probing; back off as usual
        )

    @staticmethod
    def _finish(outcome: JobOutcome, waited: float, upstream: str | None) -> JobOutcome:
        outcome.upstream = upstream
        outcome.rate_limit_wait_ms = round(waited * 1000, 1)
        return outcome

    async def _attempt(
        self,
        job: Job,
        member: Member,
        bodies: dict[str, bytes],
        attempt: int,
        send_delta: DeltaSink,
    ) -> JobOutcome:
        """One upstream call inside its CLIENT span, recorded in the metrics."""
        spec = member.spec
        sent_model = spec.upstream_model(job.model)
        upstream_body = job.body if sent_model == job.model else {**job.body, "model": sent_model}
        if spec.defaults:  # body fields the entry sends when the request does not (§17)
            upstream_body = {**spec.defaults, **upstream_body}
        body = bodies.get(member.name)
        if body is None:
            dumped = stream_body(upstream_body) if job.stream else orjson.dumps(upstream_body)
            body = bodies[member.name] = dumped
        client = member.client
        operation = job.endpoint  # also its gen_ai.operation.name
        with self.telemetry.upstream_span(
            client.url_for(job.endpoint),
            upstream_body,
            attempt,
            upstream=member.name,
            provider=member.provider,
            operation=operation,
        ) as span:
            headers = self.telemetry.outgoing_headers()
            started = time.perf_counter()
            try:
                if job.stream:
                    outcome = await self._stream_once(client, body, attempt, send_delta, headers)
                else:
                    outcome = await self._call_once(client, body, attempt, headers, job.endpoint)
            except JobError as failure:
                exc = retry.capacity_wait(failure, upstream_body)
                self.telemetry.record_attempt(
                    span,
                    job.model,
                    seconds=time.perf_counter() - started,
                    body=exc.response,
                    error_type=exc.code.value,
                    upstream=member.name,
                    provider=member.provider,
                    operation=operation,
                )
                if exc is failure:
                    raise
                raise exc from None
            self.telemetry.record_attempt(
                span,
                job.model,
                seconds=time.perf_counter() - started,
                body=outcome.body,
                ttft_seconds=None if outcome.ttft_ms is None else outcome.ttft_ms / 1000,
                upstream=member.name,
                provider=member.provider,
                operation=operation,
            )
            return outcome

    async def _stream_once(
        self,
        client: Upstream,
        body: bytes,
        attempt: int,
        send_delta: DeltaSink,
        headers: Mapping[str, str],
    ) -> JobOutcome:
        answer = await relay_stream(
            client,
            body,
            headers,
            attempt,
            send_delta,
            idle=self.settings.stream_idle_timeout,
            interval=self.settings.stream_flush_interval,
        )
        return JobOutcome(
            attempts=attempt,
            status_code=answer.status_code,
            request_id=answer.request_id,
            body=answer.body,
            usage=answer.usage,
            latency_ms=answer.latency_ms,
            ttft_ms=answer.ttft_ms,
        )

    async def _call_once(
        self,
        client: Upstream,
        body: bytes,
        attempt: int,
        headers: Mapping[str, str],
        endpoint: Endpoint = "chat",
    ) -> JobOutcome:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                completion = await client.complete(body, headers, endpoint=endpoint)
        except TimeoutError:
            raise UpstreamTimeout(
                f"no answer within WORKER_REQUEST_TIMEOUT ({self.settings.request_timeout:g}s)"
            ) from None
        return JobOutcome(
            attempts=attempt,
            status_code=completion.status_code,
            request_id=completion.request_id,
            body=completion.body,
            usage=completion.body.get("usage"),
            latency_ms=_ms_since(started),
        )


def gate_for(settings: Settings, spec: UpstreamSpec) -> Gate:
    """The rate-limit gate of one upstream, with its configured limits (local, or shared in
    Redis by replicas that call the same endpoint under the same name)."""
    limits = ConfiguredLimits(spec.limits.rpm, spec.limits.tpm, spec.limits.max_concurrency)
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
    lease = max(settings.request_timeout, settings.stream_idle_timeout)
    query = "&".join(f"{k}={v}" for k, v in sorted(spec.query.items()))
    url = f"{spec.url}?{query}" if query else spec.url
    endpoint = hashlib.sha256(url.encode()).hexdigest()[:12]
    return Gate.from_limits(
        spec.name,
        limits,
        redis_url=redis_url,
        shared_as=f"{spec.name}:{endpoint}",
        lease_seconds=lease,
    )


def _gate_of(member: Member) -> Gate:
    if member.gate is None:  # every member gets one in JobRunner.__init__
        raise RuntimeError(f"upstream {member.name!r} has no gate")
    return member.gate


def _total_tokens(usage: dict[str, Any] | None) -> int | None:
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) else None


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
