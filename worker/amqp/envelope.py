"""A delivery's AMQP properties and headers read into a job's :class:`~worker.job.Envelope`."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from worker.amqp.topology import (
    H_ATTEMPTS,
    H_CALLS,
    H_DEADLINE,
    H_DELIVERY_COUNT,
    H_RATE_LIMIT_WAIT,
    H_REDELIVERIES,
)
from worker.job import Envelope
from worker.settings import Settings

__all__ = ["header_text", "read_envelope", "stable_job_id"]


def read_envelope(
    *,
    message_id: str | None,
    correlation_id: str | None,
    reply_to: str | None,
    headers: Mapping[str, Any] | None,
    redelivered: bool,
    settings: Settings,
    body: bytes | None = None,
    lane: str | None = None,
    tenant: str | None = None,
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
        lane=lane,
        rate_limit_wait_ms=float(_int(headers.get(H_RATE_LIMIT_WAIT))),
        tenant=tenant,
        prior_calls=_int(headers.get(H_CALLS)) + _redeliveries(headers),
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


def header_text(value: Any) -> str | None:
    """A header value as text to show or log. Some clients send strings as bytes (a byte
    array, or a long string that is not UTF-8, which arrives as ``bytes``): decoded with
    replacement characters, never an error."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return value.decode(errors="replace")
    return str(value)


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
    if value is None:
        return 0
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
    text = header_text(value) or ""
    try:
        deadline = datetime.fromisoformat(text)
    except ValueError:
        return None, text
    if deadline.tzinfo is None:
        return None, text
    return deadline, None
