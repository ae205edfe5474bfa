"""The HTTP client for the OpenAI-compatible upstream: one call, one stream.

An answer's body checked and its errors mapped: :mod:`worker.upstream.answers`.

Timeouts are not left to the transport: callers bound a plain call with
``WORKER_REQUEST_TIMEOUT`` and a stream with ``WORKER_STREAM_IDLE_TIMEOUT`` between chunks
(see :mod:`worker.runner`), so ``timeout`` means the same thing whichever transport runs.

With the default transport (httpx-aiohttp) requests go to its ``aiohttp.ClientSession``
directly, and a stream is read off aiohttp's body buffer into :mod:`worker.upstream.sse`: httpx's
request and response objects and its byte iterators cost more CPU per streamed chunk than
everything else the worker does for it. Any other httpx transport (``httpx.MockTransport``
in the unit tests) goes through httpx, into the same parser and the same checks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import httpx
import orjson
import yarl
from httpx_aiohttp import AiohttpTransport

from worker.errors import UpstreamError
from worker.messages import Endpoint
from worker.upstream.answers import (
    CONNECT_TIMEOUT,
    completion_body,
    connection_failed,
    status_error,
    transport_cause,
)
from worker.upstream.chunks import TRANSPORT_ERRORS, ChunkStream
from worker.version import __version__

__all__ = [
    "ENDPOINT_PATHS",
    "AuthStyle",
    "Completion",
    "Upstream",
    "default_transport",
    "transport_cause",  # from worker.upstream.answers, where it lives
]

#: each endpoint's path under an upstream's base URL (OpenAI's, which compatible servers share)
ENDPOINT_PATHS: dict[Endpoint, str] = {"chat": "/chat/completions", "embeddings": "/embeddings"}
# What may follow a stream's `[DONE]` before the body ends, read to keep the connection.
BODY_END_WAIT = 0.1
BODY_END_BYTES = 65536


@dataclass(frozen=True, slots=True)
class Completion:
    """A successful non-streamed answer; ``headers`` are the answer's (rate-limit budget)."""

    status_code: int
    request_id: str | None
    body: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict, compare=False)


def default_transport(max_connections: int) -> httpx.AsyncBaseTransport:
    """httpx over aiohttp: measured about 3x the requests/s of httpx's own transport here
    (README, Performance), keeping the httpx API and its ``MockTransport`` for tests."""
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )

    def session() -> aiohttp.ClientSession:
        # No cookie jar: a worker is no browser, and an upstream's cookie (a CDN's bot
        # cookie, say) must not travel from one job to the next; it also saves the jar's
        # filtering on every request.
        connector = aiohttp.TCPConnector(
            limit=max_connections, keepalive_timeout=limits.keepalive_expiry
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    return AiohttpTransport(limits=limits, client=session)


AuthStyle = Literal["bearer", "api-key", "none"]


class Upstream:
    """POSTs chat-completion bodies to ``url`` with the configured key, query and headers,
    and embeddings bodies (``endpoint="embeddings"``) beside it, to ``{base_url}/embeddings``.

    ``url`` is the chat-completions endpoint, ``{base_url}/chat/completions``. ``auth``:
    ``bearer`` sends ``Authorization: Bearer <key>``, ``api-key`` sends ``api-key: <key>``
    (Azure OpenAI), ``none`` sends no key. Each instance owns its connection pool, so one
    slow upstream cannot starve another's connections.
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
        self.base_url = url.removesuffix(ENDPOINT_PATHS["chat"])
        self._urls: dict[Endpoint, tuple[httpx.URL, yarl.URL]] = {}
        for endpoint, path in ENDPOINT_PATHS.items():
            at = url if endpoint == "chat" else self.base_url + path
            parsed = httpx.URL(at).copy_merge_params(dict(query)) if query else httpx.URL(at)
            # The same URL for aiohttp, parsed once rather than on every request.
            self._urls[endpoint] = parsed, yarl.URL(str(parsed), encoded=True)
        self._url, self._aiohttp_url = self._urls["chat"]
        self._extensions = {
            "timeout": {"connect": CONNECT_TIMEOUT, "read": None, "write": None, "pool": None}
        }
        self._timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT)
        # Requests go straight to the transport: an AsyncClient's cookie jar, redirects,
        # auth flow and URL merging cost about a tenth of a job's CPU and do nothing here.
        self._transport = transport or default_transport(max_connections)
        #: told every answer's status and headers as they arrive (a rate-limit gate reads them)
        self.on_answer: Callable[[int, Mapping[str, str]], None] | None = None

    async def aclose(self) -> None:
        await self._transport.aclose()

    def _session(self) -> aiohttp.ClientSession | None:
        """The aiohttp session under the default transport (its pool), else None."""
        transport = self._transport
        if not isinstance(transport, AiohttpTransport):
            return None
        if not isinstance(transport.client, aiohttp.ClientSession):
            transport.client = transport.get_client()
        return transport.client

    def url_for(self, endpoint: Endpoint) -> str:
        """The URL an ``endpoint``'s calls go to, without the fixed query parameters."""
        return self.url if endpoint == "chat" else self.base_url + ENDPOINT_PATHS[endpoint]

    def _merged(self, headers: Mapping[str, str]) -> dict[str, str]:
        return {**self._headers, **headers} if headers else self._headers

    def _request(
        self, body: bytes, headers: Mapping[str, str], url: httpx.URL | None = None
    ) -> httpx.Request:
        return httpx.Request(
            "POST",
            url or self._url,
            headers=self._merged(headers),
            content=body,
            extensions=self._extensions,
        )

    async def complete(
        self,
        body: bytes,
        headers: Mapping[str, str],
        meta: dict[str, Any] | None = None,
        *,
        endpoint: Endpoint = "chat",
    ) -> Completion:
        """One non-streamed call to ``endpoint``; raises a :class:`JobError` for anything but
        a 2xx JSON answer of that endpoint (a chat completion, or an embeddings list).
        ``meta`` (when given) receives ``status_code`` and ``headers`` of the answer, an
        error answer's included (a 429's rate-limit headers)."""
        session = self._session()
        url, aiohttp_url = self._urls[endpoint]
        answer_headers: Mapping[str, str]
        try:
            if session is not None:
                async with session.post(
                    aiohttp_url,
                    data=body,
                    headers=self._merged(headers),
                    timeout=self._timeout,
                    allow_redirects=False,
                ) as answer:
                    content = await answer.read()
                    status, answer_headers = answer.status, answer.headers
            else:
                request = self._request(body, headers, url)
                response = await self._transport.handle_async_request(request)
                try:
                    content = await response.aread()
                finally:
                    await response.aclose()
                status, answer_headers = response.status_code, response.headers
        except TRANSPORT_ERRORS as exc:
            raise connection_failed(exc) from exc
        if meta is not None:
            meta["status_code"] = status
            meta["headers"] = answer_headers
        if self.on_answer is not None:
            self.on_answer(status, answer_headers)
        if status >= 300:
            raise status_error(status, answer_headers, content)
        return Completion(
            status,
            answer_headers.get("x-request-id"),
            completion_body(status, answer_headers, content, endpoint),
            answer_headers,
        )

    @contextlib.asynccontextmanager
    async def open_stream(
        self, body: bytes, headers: Mapping[str, str], meta: dict[str, Any] | None = None
    ) -> AsyncIterator[ChunkStream]:
        """POST a streamed call; yields the open :class:`ChunkStream` once a 2xx event
        stream has begun, raises a :class:`JobError` otherwise. ``meta`` (when given)
        receives ``status_code``, ``request_id`` and ``headers`` as soon as they arrive."""
        session = self._session()
        answer_headers: Mapping[str, str]
        try:
            if session is not None:
                answer = await session.post(
                    self._aiohttp_url,
                    data=body,
                    headers=self._merged(headers),
                    timeout=self._timeout,
                    allow_redirects=False,
                )
                close: Callable[[], Awaitable[None]] = _releaser(answer)
                finish: Callable[[], Awaitable[None]] | None = _body_end(answer)
                status, answer_headers = answer.status, answer.headers
                read: Callable[[], Awaitable[bytes]] = answer.content.readany
                read_all: Callable[[], Awaitable[bytes]] = answer.read
                connection = answer.connection
                transport = connection.transport if connection is not None else None
            else:
                response = await self._transport.handle_async_request(self._request(body, headers))
                close = response.aclose
                status, answer_headers = response.status_code, response.headers
                read = _reader(response.aiter_bytes())
                read_all = response.aread
                transport = None
                finish = None
        except TRANSPORT_ERRORS as exc:
            raise connection_failed(exc) from exc
        try:
            if meta is not None:
                meta["status_code"] = status
                meta["request_id"] = answer_headers.get("x-request-id")
                meta["headers"] = answer_headers
            if self.on_answer is not None:
                self.on_answer(status, answer_headers)
            if status >= 300:
                try:
                    content = await read_all()
                except TRANSPORT_ERRORS:
                    content = b""
                raise status_error(status, answer_headers, content)
            kind = answer_headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                raise UpstreamError(
                    f"upstream answered a stream request with {kind or 'no content type'}, "
                    "not server-sent events",
                    status_code=status,
                    request_id=answer_headers.get("x-request-id"),
                )
            stream = ChunkStream(read, status, answer_headers, transport)
            try:
                yield stream
            finally:
                stream.stop_resting()
            if stream.done and finish is not None:
                await finish()
        finally:
            with contextlib.suppress(*TRANSPORT_ERRORS):
                await close()

    async def list_models(self) -> list[str]:
        """The model ids of ``GET {base}/models`` (OpenAI's list), in the order given.

        Raises a :class:`JobError` as a call does: an error status, a failed connection."""
        path = self._url.path.removesuffix("/chat/completions") + "/models"
        headers = {k: v for k, v in self._headers.items() if k != "content-type"}
        request = httpx.Request(
            "GET", self._url.copy_with(path=path), headers=headers, extensions=self._extensions
        )
        try:
            response = await self._transport.handle_async_request(request)
            try:
                content = await response.aread()
            finally:
                await response.aclose()
        except TRANSPORT_ERRORS as exc:
            raise connection_failed(exc) from exc
        if response.status_code >= 300:
            raise status_error(response.status_code, response.headers, content)
        try:
            listed = orjson.loads(content)
        except orjson.JSONDecodeError:
            listed = None
        data = listed.get("data") if isinstance(listed, dict) else None
        if not isinstance(data, list):
            raise UpstreamError(
                "upstream sent a body that is not a list of models",
                status_code=response.status_code,
            )
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    async def stream(
        self, body: bytes, headers: Mapping[str, str], meta: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield the JSON chunks of a streamed call until ``[DONE]`` or the end of the body.

        ``meta`` receives ``status_code``, ``request_id`` and ``headers`` as soon as the
        headers arrive, and ``done`` (``[DONE]`` seen) at the end. The worker's own path
        reads :meth:`open_stream` directly; this generator is the convenient form.
        """
        async with self.open_stream(body, headers, meta) as chunks:
            while (batch := await chunks.read()) is not None:
                for chunk in batch:
                    yield chunk
            meta["done"] = chunks.done


def _body_end(answer: aiohttp.ClientResponse) -> Callable[[], Awaitable[None]]:
    """After ``[DONE]`` only the end of the body is left (the last empty chunk): read it,
    briefly, so that the connection goes back to the pool rather than being closed (a new
    connection per stream costs a handshake and ~2 % of a stream's CPU)."""

    async def read_to_end() -> None:
        content = answer.content
        left = BODY_END_BYTES
        with contextlib.suppress(*TRANSPORT_ERRORS, TimeoutError):
            async with asyncio.timeout(BODY_END_WAIT):
                while left > 0 and not content.at_eof() and (data := await content.readany()):
                    left -= len(data)

    return read_to_end


def _releaser(answer: aiohttp.ClientResponse) -> Callable[[], Awaitable[None]]:
    async def release() -> None:
        # A body read to its end returns the connection to the pool; one left early is closed.
        answer.release()

    return release


def _reader(chunks: AsyncIterator[bytes]) -> Callable[[], Awaitable[bytes]]:
    """``read()`` over an httpx byte iterator. A read given up (``ChunkStream.read``'s
    ``until``) must not cancel the iterator, which would end it: the next read takes over
    the one under way."""
    iterator = chunks.__aiter__()
    under_way: asyncio.Future[bytes] | None = None

    async def next_data() -> bytes:
        try:
            while not (data := await anext(iterator)):
                pass
        except StopAsyncIteration:
            return b""
        return data

    async def read() -> bytes:
        nonlocal under_way
        if under_way is None:
            under_way = asyncio.ensure_future(next_data())
        data = await asyncio.shield(under_way)
        under_way = None
        return data

    return read
