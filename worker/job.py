"""A job's data: its envelope, the checked request, and how it ended. No I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from worker.errors import (
    Expired,
    ForbiddenReplyTo,
    InvalidMessage,
    InvalidRequest,
    JobError,
    ModelNotAllowed,
)
from worker.messages import (
    CHAT_COMPLETIONS_PATHS,
    EMBEDDINGS_PATHS,
    BatchRequest,
    Endpoint,
    custom_id_of,
)
from worker.settings import Settings

__all__ = [
    "Deferral",
    "Envelope",
    "Job",
    "JobOutcome",
    "Rejection",
    "decode_job",
    "failed",
]


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a delivery says about its job before its body is read (AMQP properties; read by
    :func:`worker.amqp.envelope.read_envelope`)."""

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
    rate_limit_wait_ms: float = 0.0  # waited for rate-limit budget on earlier deliveries
    tenant: str | None = None  # who the job belongs to (§12)
    prior_calls: int = 0  # upstream calls made on earlier deliveries (§4 metadata.calls)


@dataclass(slots=True)
class Job:
    """A request that passed every check and may go upstream."""

    envelope: Envelope
    custom_id: str | None
    model: str
    stream: bool
    body: dict[str, Any]  # exactly as received: unknown fields pass through untouched
    endpoint: Endpoint = "chat"  # which upstream call: by the request's url (§18)


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
            # Not parsed whole: its custom_id is looked for in its first bytes only, so that
            # the result can still name the line it answers.
            custom_id = custom_id_of(data, parse_up_to=0)
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
        if request.url is not None and request.url not in CHAT_COMPLETIONS_PATHS | EMBEDDINGS_PATHS:
            raise InvalidRequest(
                f"url must be /v1/chat/completions or /v1/embeddings, not {request.url!r}"
            )
        model = request.body.model
        if settings.allowed_models and model not in settings.allowed_models:
            raise ModelNotAllowed(f"model {model!r} is not in WORKER_ALLOWED_MODELS")
        if envelope.reply_to_forbidden:
            raise ForbiddenReplyTo("reply_to does not match WORKER_REPLY_TO_PATTERN")
        if envelope.deadline is not None and envelope.deadline <= datetime.now(UTC):
            raise Expired(f"x-deadline {envelope.deadline.isoformat()} passed before the call")
    except JobError as exc:
        return Rejection(custom_id, exc)
    stream = bool(request.body.stream)
    return Job(envelope, custom_id, model, stream, raw["body"], request.endpoint)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "message"
    return f"{where}: {error['msg']} (schema: schemas/request.schema.json)"


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
    calls: int = 0  # upstream HTTP calls, 429s included, across deliveries (§4)
    cache: str | None = None  # "hit", "miss" or "stored" (§16)
    cost: dict[str, Any] | None = None  # §17, None when no price is known

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class Deferral:
    """Retry later through a delay queue: the job leaves the process until then."""

    wait: float
    attempts: int
    error: JobError
    rate_limit_wait_ms: float = 0.0  # waited for budget so far, the delay included if for it
    calls: int = 0  # upstream calls so far, across deliveries


def failed(exc: JobError, attempts: int) -> JobOutcome:
    """The outcome of a job that ended with ``exc``."""
    return JobOutcome(
        attempts=attempts,
        error=exc,
        status_code=exc.status_code,
        request_id=exc.request_id,
        body=exc.response,
    )
