"""One job, from delivery to result: read, check, call the upstream with retries, conclude.

Nothing here touches the broker: :mod:`worker.service` hands in the delivery's body and
properties, a callable that publishes deltas, and settles what :meth:`JobRunner.run` returns.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from pydantic import ValidationError

from worker.errors import (
    Expired,
    ForbiddenReplyTo,
    InvalidMessage,
    InvalidRequest,
    JobError,
    ModelNotAllowed,
    UpstreamError,
    UpstreamTimeout,
)
from worker.messages import CHAT_COMPLETIONS_PATHS, BatchRequest
from worker.settings import Settings
from worker.streaming import CompletionAssembler, DeltaStream, MalformedChunk
from worker.telemetry import Telemetry
from worker.topology import H_ATTEMPTS, H_DEADLINE, H_DELIVERY_COUNT, H_REDELIVERIES
from worker.upstream import Upstream

__all__ = [
    "Deferral",
    "Envelope",
    "Job",
    "JobOutcome",
    "JobRunner",
    "Rejection",
    "decode_job",
    "read_envelope",
    "stable_job_id",
]

log = structlog.get_logger(__name__)

# Retries that wait longer than this leave the process through a delay queue, so a long
# Retry-After does not hold a consumer slot that other jobs could use.
INLINE_RETRY_LIMIT = 5.0
BACKOFF_BASE = 0.5
BACKOFF_CAP = 60.0

SendDelta = Callable[[int, int, list[dict[str, Any]]], Awaitable[None]]
"""``send(attempt, seq, choices)``: publish one delta message."""


@dataclass(slots=True)
class Envelope:
    """What a delivery says about its job before its body is read (AMQP properties)."""

    job_id: str
    correlation_id: str
    reply_to: str | None
    reply_to_forbidden: bool
    deadline: datetime | None
    bad_deadline: str | None
    prior_attempts: int
    redeliveries: int
    headers: Mapping[str, Any]
    lane: str | None = None  # the request queue it came from (§12)
    tenant: str | None = None  # who the job belongs to (§12)


def read_envelope(
    *,
    message_id: str | None,
    correlation_id: str | None,
    reply_to: str | None,
    headers: Mapping[str, Any] | None,
    redelivered: bool,
    settings: Settings,
    body: bytes | None = None,
) -> Envelope:
    headers = headers or {}
    job_id = message_id or stable_job_id(body or b"", correlation_id, reply_to, headers)
    forbidden = bool(
        reply_to
        and settings.reply_to_pattern is not None
        and not settings.reply_to_pattern.fullmatch(reply_to)
    )
    deadline, bad_deadline = _parse_deadline(headers.get(H_DEADLINE))
    return Envelope(
        job_id=job_id,
        correlation_id=correlation_id or job_id,
        reply_to=None if forbidden else reply_to or None,
        reply_to_forbidden=forbidden,
        deadline=deadline,
        bad_deadline=bad_deadline,
        prior_attempts=_prior_attempts(headers, redelivered),
        redeliveries=_redeliveries(headers),
        headers=headers,
    )


def stable_job_id(
    body: bytes, correlation_id: str | None, reply_to: str | None, headers: Mapping[str, Any]
) -> str:
    """The id of a job published without ``message_id``: a hash of what stays the same on
    every delivery of one publish (body, ``correlation_id``, ``reply_to``, ``x-deadline``),
    so a redelivery or a duplicate carries the same id. Two identical publishes are one job
    to the worker's id; a producer that wants them told apart sets ``message_id``."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (correlation_id, reply_to, headers.get(H_DEADLINE)):
        digest.update(repr(part).encode())
        digest.update(b"\0")
    digest.update(body)
    return digest.hexdigest()


def _prior_attempts(headers: Mapping[str, Any], redelivered: bool) -> int:
    """Upstream attempts this job may already have had, counted across redeliveries.

    ``x-attempts`` is exact (the worker sets it when it sends a job round a delay queue);
    a redelivery after a crash or a lost connection counts as one attempt, since the
    worker that lost the job may have called the upstream before it went.
    """
    crashes = _redeliveries(headers)
    if not crashes and redelivered:
        crashes = 1
    return _int(headers.get(H_ATTEMPTS)) + crashes


def _redeliveries(headers: Mapping[str, Any]) -> int:
    """Deliveries that ended without a result: the quorum queue's count, else our own."""
    return _int(headers.get(H_DELIVERY_COUNT)) or _int(headers.get(H_REDELIVERIES))


def _int(value: Any) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def _parse_deadline(value: Any) -> tuple[datetime | None, str | None]:
    """``(deadline, None)``, or ``(None, the bad text)``."""
    if value is None:
        return None, None
    if isinstance(value, datetime):
        # An AMQP timestamp field (some clients send one): seconds since the epoch, UTC.
        return (value if value.tzinfo else value.replace(tzinfo=UTC)), None
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    try:
        deadline = datetime.fromisoformat(text)
    except ValueError:
        return None, text
    if deadline.tzinfo is None:
        return None, text
    return deadline, None


@dataclass(slots=True)
class Job:
    """A request that passed every check and may go upstream."""

    envelope: Envelope
    custom_id: str | None
    model: str
    stream: bool
    body: dict[str, Any]  # exactly as received: unknown fields pass through untouched


@dataclass(slots=True)
class Rejection:
    """A request that fails its checks; ``custom_id`` when the body was readable enough."""

    custom_id: str | None
    error: JobError


def decode_job(data: bytes, envelope: Envelope, settings: Settings) -> Job | Rejection:
    """Check a request body against the contract, before anything goes upstream."""
    custom_id: str | None = None
    try:
        if len(data) > settings.max_message_bytes:
            raise InvalidMessage(
                f"message is {len(data)} bytes, over WORKER_MAX_MESSAGE_BYTES "
                f"({settings.max_message_bytes})"
            )
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidMessage(f"body is not UTF-8 JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise InvalidMessage("body is not a JSON object")
        if isinstance(raw.get("custom_id"), str):
            custom_id = raw["custom_id"]
        if envelope.bad_deadline is not None:
            raise InvalidMessage(
                f"x-deadline is not an RFC 3339 time with a zone: {envelope.bad_deadline!r}"
            )
        try:
            request = BatchRequest.model_validate(raw)
        except ValidationError as exc:
            raise InvalidMessage(_first_error(exc)) from None
        if request.method is not None and request.method.upper() != "POST":
            raise InvalidRequest(f"method must be POST, not {request.method!r}")
        if request.url is not None and request.url not in CHAT_COMPLETIONS_PATHS:
            raise InvalidRequest(f"url must be /v1/chat/completions, not {request.url!r}")
        model = request.body.model
        if settings.allowed_models and model not in settings.allowed_models:
            raise ModelNotAllowed(f"model {model!r} is not in WORKER_ALLOWED_MODELS")
        if envelope.reply_to_forbidden:
            raise ForbiddenReplyTo("reply_to does not match WORKER_REPLY_TO_PATTERN")
        if envelope.deadline is not None and envelope.deadline <= datetime.now(UTC):
            raise Expired(f"x-deadline {envelope.deadline.isoformat()} passed before the call")
    except JobError as exc:
        return Rejection(custom_id, exc)
    return Job(envelope, custom_id, model, bool(request.body.stream), raw["body"])


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "message"
    return f"{where}: {error['msg']} (schema: schemas/request.schema.json)"


# --- running -----------------------------------------------------------------------------


@dataclass(slots=True)
class JobOutcome:
    """How a job ended: the result document's parts, before serialisation."""

    attempts: int
    error: JobError | None = None
    status_code: int | None = None
    request_id: str | None = None
    body: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    finished_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    upstream: str | None = None  # name of the upstream of the last attempt (§11)
    rate_limit_wait_ms: float = 0.0  # time waited for rate-limit budget, across deliveries

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class Deferral:
    """Retry later through a delay queue: the job leaves the process until then."""

    wait: float
    attempts: int
    error: JobError


def backoff(attempt: int, retry_after: float | None) -> float:
    """Seconds before attempt ``attempt + 1``: the upstream's ask, else exponential with
    jitter (as OpenAI's own SDK: 0.5 s doubling, 75 to 100 % of it)."""
    if retry_after is not None:
        return retry_after
    exponential: float = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    return exponential * random.uniform(0.75, 1.0)


class JobRunner:
    """Calls the upstream for a :class:`Job`, retrying as contract §6 says."""

    def __init__(self, settings: Settings, upstream: Upstream, telemetry: Telemetry) -> None:
        self.settings = settings
        self.upstream = upstream
        self.telemetry = telemetry

    async def run(self, job: Job, send_delta: SendDelta) -> JobOutcome | Deferral:
        attempt = job.envelope.prior_attempts
        if attempt >= self.settings.max_attempts:
            return JobOutcome(
                attempts=attempt,
                error=UpstreamError(
                    f"gave up after {attempt} attempts or deliveries without a result"
                ),
            )
        body = _stream_body(job.body) if job.stream else orjson.dumps(job.body)
        while True:
            attempt += 1
            structlog.contextvars.bind_contextvars(attempt=attempt)
            try:
                return await self._attempt(job, body, attempt, send_delta)
            except JobError as exc:
                if not exc.retryable or attempt >= self.settings.max_attempts:
                    return _failed(exc, attempt)
                wait = backoff(attempt, exc.retry_after)
                self.telemetry.retries.add(1, {"error_code": exc.code.value})
                log.info("retrying", error_code=exc.code.value, error=exc.message, wait_s=wait)
                if wait > INLINE_RETRY_LIMIT:
                    return Deferral(wait=wait, attempts=attempt, error=exc)
                await asyncio.sleep(wait)

    async def _attempt(
        self, job: Job, body: bytes, attempt: int, send_delta: SendDelta
    ) -> JobOutcome:
        """One upstream call inside its CLIENT span, recorded in the metrics."""
        with self.telemetry.upstream_span(self.upstream.url, job.body, attempt) as span:
            headers = self.telemetry.outgoing_headers()
            started = time.perf_counter()
            try:
                if job.stream:
                    outcome = await self._stream_once(job, body, attempt, send_delta, headers)
                else:
                    outcome = await self._call_once(body, attempt, headers)
            except JobError as exc:
                self.telemetry.record_attempt(
                    span,
                    job.model,
                    seconds=time.perf_counter() - started,
                    body=exc.response,
                    error_type=exc.code.value,
                )
                raise
            self.telemetry.record_attempt(
                span,
                job.model,
                seconds=time.perf_counter() - started,
                body=outcome.body,
                ttft_seconds=None if outcome.ttft_ms is None else outcome.ttft_ms / 1000,
            )
            return outcome

    async def _call_once(self, body: bytes, attempt: int, headers: Mapping[str, str]) -> JobOutcome:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                completion = await self.upstream.complete(body, headers)
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

    async def _stream_once(
        self,
        job: Job,
        body: bytes,
        attempt: int,
        send_delta: SendDelta,
        headers: Mapping[str, str],
    ) -> JobOutcome:
        idle = self.settings.stream_idle_timeout
        loop = asyncio.get_running_loop()
        assembler = CompletionAssembler()
        deltas = DeltaStream(
            lambda seq, choices: send_delta(attempt, seq, choices),
            self.settings.stream_flush_interval,
            assembler,
        )
        meta: dict[str, Any] = {}
        started = time.perf_counter()
        ttft_ms: float | None = None
        # Moving the deadline costs a timer per chunk; moving it when a tenth of it has
        # gone keeps the bound (never early, at most 10 % late) at a fraction of the cost.
        slack = idle / 10
        try:
            async with asyncio.timeout(idle) as silence:
                rescheduled = loop.time()
                async with self.upstream.open_stream(body, headers, meta) as chunks:
                    # One await per network read; the chunks it completed are plain calls.
                    while (batch := await chunks.read()) is not None:
                        if not batch:
                            continue  # a comment, a keep-alive or half an event
                        now = loop.time()
                        if now - rescheduled > slack:
                            silence.reschedule(now + idle + slack)
                            rescheduled = now
                        for chunk in batch:
                            if assembler.add(chunk):
                                if ttft_ms is None:
                                    ttft_ms = _ms_since(started)
                                if deltas.due():  # at once, or a timer (one per delta)
                                    await deltas.flush()
                        if deltas.failed is not None:
                            raise deltas.failed
                    done = chunks.done
            if not done and not assembler.finished:
                raise UpstreamError(
                    "upstream stream ended without [DONE] and without a finish_reason",
                    status_code=meta.get("status_code"),
                    request_id=meta.get("request_id"),
                )
            await deltas.close()
        except TimeoutError:
            raise UpstreamTimeout(
                f"stream silent for WORKER_STREAM_IDLE_TIMEOUT ({idle:g}s)",
                status_code=meta.get("status_code"),
            ) from None
        except MalformedChunk as exc:
            raise UpstreamError(
                f"upstream sent a malformed stream chunk: {exc}",
                status_code=meta.get("status_code"),
                request_id=meta.get("request_id"),
            ) from None
        finally:
            deltas.discard()
        return JobOutcome(
            attempts=attempt,
            status_code=meta.get("status_code", 200),
            request_id=meta.get("request_id"),
            body=assembler.completion(),
            usage=assembler.usage,
            latency_ms=_ms_since(started),
            ttft_ms=ttft_ms,
        )


def _stream_body(body: dict[str, Any]) -> bytes:
    """The body with the usage chunk asked for (the result must carry usage)."""
    options = body.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    options["include_usage"] = True
    return orjson.dumps({**body, "stream_options": options})


def _failed(exc: JobError, attempts: int) -> JobOutcome:
    return JobOutcome(
        attempts=attempts,
        error=exc,
        status_code=exc.status_code,
        request_id=exc.request_id,
        body=exc.response,
    )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
