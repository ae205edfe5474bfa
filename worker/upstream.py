"""The HTTP client for the OpenAI-compatible upstream: one call, one stream, error mapping.

Timeouts are not left to the transport: callers bound a plain call with
``WORKER_REQUEST_TIMEOUT`` and a stream with ``WORKER_STREAM_IDLE_TIMEOUT`` between chunks
(see :mod:`worker.jobs`), so ``timeout`` means the same thing whichever transport runs.
"""

from __future__ import annotations

import contextlib
import email.utils
import math
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport
from httpx_sse import EventSource, SSEError

from worker import __version__
from worker.errors import JobError, QuotaExceeded, UpstreamError, error_for_status

__all__ = ["AuthStyle", "Completion", "Upstream", "default_transport", "retry_after_seconds"]

# Connecting is the one phase the transport times itself: a host that does not answer a
# SYN should fail fast and be retried, not eat the whole request timeout.
CONNECT_TIMEOUT = 10.0

# What a broken connection or a malformed HTTP answer raises. httpx-aiohttp maps most aiohttp
# errors to httpx ones but lets others through (a bad status line or chunk size raises
# aiohttp's ClientResponseError): every one is an upstream_error, to retry.
TRANSPORT_ERRORS = (httpx.HTTPError, aiohttp.ClientError)
INSUFFICIENT_QUOTA = "insufficient_quota"


@dataclass(frozen=True, slots=True)
class Completion:
    """A successful non-streamed answer."""

    status_code: int
    request_id: str | None
    body: dict[str, Any]


def default_transport(max_connections: int) -> httpx.AsyncBaseTransport:
    """httpx over aiohttp: measured about 3x the requests/s of httpx's own transport here
    (README, Performance), keeping the httpx API and its ``MockTransport`` for tests."""
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    return AiohttpTransport(limits=limits)


AuthStyle = Literal["bearer", "api-key", "none"]


class Upstream:
    """POSTs chat-completion bodies to ``url`` with the configured key, query and headers.

    ``auth``: ``bearer`` sends ``Authorization: Bearer <key>``, ``api-key`` sends
    ``api-key: <key>`` (Azure OpenAI), ``none`` sends no key. Each instance owns its
    connection pool, so one slow upstream cannot starve another's connections.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        auth: AuthStyle = "bearer",
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        fixed = {
            "content-type": "application/json",
            "accept": "application/json",
            "user-agent": f"chat-worker/{__version__}",
            **{name.lower(): value for name, value in (headers or {}).items()},
        }
        if api_key and auth == "bearer":
            fixed["authorization"] = f"Bearer {api_key}"
        elif api_key and auth == "api-key":
            fixed["api-key"] = api_key
        self._headers = fixed
        self._url = httpx.URL(url).copy_merge_params(dict(query)) if query else httpx.URL(url)
        self._extensions = {
            "timeout": {"connect": CONNECT_TIMEOUT, "read": None, "write": None, "pool": None}
        }
        # Requests go straight to the transport: an AsyncClient's cookie jar, redirects,
        # auth flow and URL merging cost about a tenth of a job's CPU and do nothing here.
        self._transport = transport or default_transport(max_connections)
        #: told every answer's status and headers as they arrive (a rate-limit gate reads them)
        self.on_answer: Callable[[int, Mapping[str, str]], None] | None = None

    async def aclose(self) -> None:
        await self._transport.aclose()

    def _request(self, body: bytes, headers: Mapping[str, str]) -> httpx.Request:
        return httpx.Request(
            "POST",
            self._url,
            headers={**self._headers, **headers} if headers else self._headers,
            content=body,
            extensions=self._extensions,
        )

    async def complete(self, body: bytes, headers: Mapping[str, str]) -> Completion:
        """One non-streamed call; raises a :class:`JobError` for anything but a 2xx JSON."""
        try:
            response = await self._transport.handle_async_request(self._request(body, headers))
            try:
                await response.aread()
            finally:
                await response.aclose()
        except TRANSPORT_ERRORS as exc:
            raise UpstreamError(f"upstream connection failed: {type(exc).__name__}") from exc
        if self.on_answer is not None:
            self.on_answer(response.status_code, response.headers)
        request_id = response.headers.get("x-request-id")
        if response.status_code >= 300:
            raise _status_error(response)
        try:
            parsed = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("usage") or {}, dict):
            raise UpstreamError(
                "upstream sent a body that is not a chat completion object",
                status_code=response.status_code,
                request_id=request_id,
            )
        return Completion(response.status_code, request_id, parsed)

    async def stream(
        self, body: bytes, headers: Mapping[str, str], meta: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield the JSON chunks of a streamed call until ``[DONE]`` or the end of the body.

        ``meta`` receives ``status_code`` and ``request_id`` as soon as the headers arrive.
        """
        try:
            response = await self._transport.handle_async_request(self._request(body, headers))
            async with contextlib.aclosing(response):
                meta["status_code"] = response.status_code
                meta["request_id"] = response.headers.get("x-request-id")
                if self.on_answer is not None:
                    self.on_answer(response.status_code, response.headers)
                if response.status_code >= 300:
                    await response.aread()
                    raise _status_error(response)
                async for event in EventSource(response).aiter_sse():
                    if event.data == "[DONE]":
                        return
                    if not event.data:
                        continue
                    yield _parse_chunk(event.event, event.data, meta)
        except TRANSPORT_ERRORS as exc:
            raise UpstreamError(f"upstream stream broke: {type(exc).__name__}") from exc
        except SSEError as exc:
            raise UpstreamError(f"upstream stream is not server-sent events: {exc}") from exc


def _parse_chunk(event: str, data: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError(
            "upstream sent a stream chunk that is not JSON", status_code=meta["status_code"]
        ) from None
    if not isinstance(chunk, dict):
        raise UpstreamError(
            "upstream sent a stream chunk that is not a JSON object",
            status_code=meta["status_code"],
        )
    if chunk.get("error") is not None or event == "error":
        error = chunk.get("error") if isinstance(chunk.get("error"), dict) else chunk
        message = error.get("message") if isinstance(error, dict) else None
        raise UpstreamError(
            f"upstream error event mid-stream: {message or 'no message'}",
            status_code=meta["status_code"],
            response=chunk,
            request_id=meta.get("request_id"),
        )
    if problem := _chunk_problem(chunk):
        raise UpstreamError(
            f"upstream sent a malformed stream chunk: {problem}",
            status_code=meta["status_code"],
            request_id=meta.get("request_id"),
        )
    return chunk


def _chunk_problem(chunk: dict[str, Any]) -> str | None:
    """What in a chunk :mod:`worker.streaming` could not use, or None: a malformed stream
    must fail as ``upstream_error``, not crash the job."""
    if not isinstance(chunk.get("usage") or {}, dict):
        return "usage is not an object"
    choices = chunk.get("choices") or []
    if not isinstance(choices, list):
        return "choices is not an array"
    for choice in choices:
        if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
            return "a choice is not an object with an integer index"
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict) or not isinstance(delta.get("content") or "", str):
            return "a delta is not an object with string content"
        calls = delta.get("tool_calls") or []
        if not isinstance(calls, list):
            return "tool_calls is not an array"
        for call in calls:
            if not isinstance(call, dict) or not isinstance(call.get("index", 0), int):
                return "a tool call fragment is not an object with an integer index"
            function = call.get("function") or {}
            if not isinstance(function, dict) or not all(
                isinstance(function.get(key) or "", str) for key in ("name", "arguments")
            ):
                return "a tool call fragment has no function object with string fields"
    return None


def _status_error(response: httpx.Response) -> JobError:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    detail = error.get("message") if isinstance(error, dict) else None
    message = f"upstream answered {response.status_code}"
    if isinstance(detail, str) and detail:
        message += f": {detail[:300]}"
    kind = error_for_status(response.status_code)
    if (
        response.status_code == 429
        and isinstance(error, dict)
        and INSUFFICIENT_QUOTA
        in (
            error.get("code"),
            error.get("type"),
        )
    ):
        kind = QuotaExceeded  # the account's credit is spent: no wait brings it back soon
    return kind(
        message,
        status_code=response.status_code,
        response=body if isinstance(body, dict) else None,
        request_id=response.headers.get("x-request-id"),
        retry_after=retry_after_seconds(response.headers),
    )


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait an upstream asks for: ``retry-after-ms``, else ``Retry-After`` (seconds or
    an HTTP date)."""
    if (millis := _finite(headers.get("retry-after-ms"))) is not None:
        return max(millis / 1000, 0.0)
    value = headers.get("retry-after")
    if not value:
        return None
    if (seconds := _finite(value)) is not None:
        return max(seconds, 0.0)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _finite(value: str | None) -> float | None:
    """``value`` as a finite number, else None: a NaN wait would reach ``asyncio.sleep``."""
    try:
        number = float(value) if value else math.nan
    except ValueError:
        return None
    return number if math.isfinite(number) else None
