"""An upstream's answer read: a 2xx body checked, an error status or a broken connection mapped."""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import httpx
import orjson

from worker.errors import JobError, QuotaExceeded, UpstreamError, error_for_status
from worker.limits.headers import retry_after_seconds
from worker.messages import Endpoint

__all__ = [
    "CONNECT_TIMEOUT",
    "completion_body",
    "connection_failed",
    "status_error",
    "transport_cause",
]

# Connecting is the one phase the transport times itself: a host that does not answer a
# SYN should fail fast and be retried, not eat the whole request timeout.
CONNECT_TIMEOUT = 10.0

#: the key of a 2xx answer's body each endpoint must have, as a list
_ANSWER_LISTS: dict[Endpoint, str] = {"chat": "choices", "embeddings": "data"}

INSUFFICIENT_QUOTA = "insufficient_quota"


def transport_cause(exc: BaseException) -> str:
    """Why a connection to an upstream failed, in a few words: refused, DNS, TLS, timeout,
    a broken answer. Host and port only: never the URL (its query may hold a key)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = getattr(exc.certificate_error, "verify_message", None) or exc.certificate_error
        return f"TLS: certificate of {exc.host}:{exc.port} not trusted ({reason})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        where = f"{exc.host}:{exc.port}"
        cause = exc.os_error
        if isinstance(cause, socket.gaierror):
            return f"DNS: cannot resolve {exc.host} ({cause.strerror})"
        if isinstance(cause, ssl.SSLError):
            return f"TLS: handshake with {where} failed ({cause.reason or cause})"
        if isinstance(cause, ConnectionRefusedError) or cause.errno == errno.ECONNREFUSED:
            return f"connection refused by {where}"
        if isinstance(cause, TimeoutError):
            return f"connect timeout ({CONNECT_TIMEOUT:g}s) to {where}"
        return f"cannot connect to {where}: {cause.strerror or type(cause).__name__}"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return f"TLS: {getattr(exc, 'reason', None) or type(exc).__name__}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError | httpx.ConnectTimeout):
        return f"connect timeout ({CONNECT_TIMEOUT:g}s)"
    if isinstance(exc, aiohttp.ServerTimeoutError | httpx.TimeoutException):
        return "read timeout"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without an answer"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer's body broke off"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"malformed HTTP answer ({exc.message})"
    if isinstance(exc, aiohttp.ClientOSError | httpx.NetworkError):
        text = str(exc).lower()
        if "refused" in text:
            return "connection refused"
        if "name or service not known" in text or "nodename" in text or "resolve" in text:
            return "DNS: cannot resolve the host"
        return f"connection failed ({type(exc).__name__})"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "malformed HTTP answer"
    return type(exc).__name__


def connection_failed(exc: BaseException) -> UpstreamError:
    """The :class:`UpstreamError` of a connection that failed (``exc``), saying why."""
    cause = transport_cause(exc)
    return UpstreamError(f"upstream connection failed: {cause}", cause=cause)


def completion_body(
    status: int, headers: Mapping[str, str], content: bytes, endpoint: Endpoint = "chat"
) -> dict[str, Any]:
    """The chat completion (or embeddings list) of a 2xx answer; an UpstreamError for
    anything else (an answer whose body is ``{"error": ...}`` without ``choices`` or
    ``data``, as some proxies send, included)."""
    request_id = headers.get("x-request-id")
    listed = _ANSWER_LISTS[endpoint]
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and not isinstance(parsed.get(listed), list):
        error = parsed.get("error")
        if error is not None:
            detail = error.get("message") if isinstance(error, dict) else error
            raise UpstreamError(
                f"upstream answered {status} with an error body: "
                f"{str(detail)[:300] if detail else 'no message'}",
                status_code=status,
                response=parsed,
                request_id=request_id,
            )
    if (
        not isinstance(parsed, dict)
        or not isinstance(parsed.get(listed), list)
        or not isinstance(parsed.get("usage") or {}, dict)
    ):
        what = "a chat completion object" if endpoint == "chat" else "an embeddings list"
        raise UpstreamError(
            f"upstream sent a body that is not {what}",
            status_code=status,
            request_id=request_id,
        )
    return parsed


def status_error(status: int, headers: Mapping[str, str], content: bytes) -> JobError:
    """The :class:`JobError` of an answer of status ``status`` (not 2xx)."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    detail = error.get("message") if isinstance(error, dict) else None
    message = f"upstream answered {status}"
    if isinstance(detail, str) and detail:
        message += f": {detail[:300]}"
    kind = error_for_status(status)
    codes = (error.get("code"), error.get("type")) if isinstance(error, dict) else ()
    if status == 429 and INSUFFICIENT_QUOTA in codes:
        kind = QuotaExceeded  # the account's credit is spent: no wait brings it back soon
    return kind(
        message,
        status_code=status,
        response=body if isinstance(body, dict) else None,
        request_id=headers.get("x-request-id"),
        retry_after=retry_after_seconds(headers),
    )
