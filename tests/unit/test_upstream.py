"""The upstream client over a swapped transport: headers, status mapping, SSE parsing."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import aiohttp.web
import httpx
import orjson
import pytest

from worker.errors import (
    AuthenticationFailed,
    InvalidRequest,
    JobError,
    NotFound,
    QuotaExceeded,
    RateLimited,
    UpstreamError,
)
from worker.limits.headers import retry_after_seconds
from worker.upstream.client import Completion, Upstream, transport_cause

URL = "http://upstream.test/v1/chat/completions"
KEY = "sk-test-key"
BODY = orjson.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "top_k": 3}
)
COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1732500000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
}
ERROR_BODY = {"error": {"message": "bad things", "type": "invalid_request_error", "code": None}}

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


class Seen:
    """The requests a mock transport received."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []


def upstream_with(handler: Handler, seen: Seen | None = None) -> Upstream:
    async def record(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.requests.append(request)
        response = handler(request)
        return await response if isinstance(response, Awaitable) else response

    return Upstream(URL, KEY, transport=httpx.MockTransport(record))


@pytest.fixture
async def closing() -> AsyncIterator[list[Upstream]]:
    """Upstreams to close after the test."""
    opened: list[Upstream] = []
    yield opened
    for upstream in opened:
        await upstream.aclose()


def sse(*events: str | dict[str, Any], done: bool = True) -> bytes:
    lines = []
    for event in events:
        if isinstance(event, dict):
            lines.append(b"data: " + orjson.dumps(event) + b"\n\n")
        else:
            lines.append(event.encode())
    if done:
        lines.append(b"data: [DONE]\n\n")
    return b"".join(lines)


def sse_response(payload: bytes, status: int = 200, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, headers={"content-type": "text/event-stream", **headers}, content=payload
    )


def chunk(content: str | None = None, finish_reason: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        "usage": None,
    }


USAGE_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
}


async def collect(upstream: Upstream, meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    meta = {} if meta is None else meta
    return [c async for c in upstream.stream(BODY, {}, meta)]


async def collect_until_error(upstream: Upstream) -> tuple[list[dict[str, Any]], JobError]:
    """The chunks a stream yields before it fails, and how it fails."""
    got: list[dict[str, Any]] = []
    try:
        async for c in upstream.stream(BODY, {}, {}):
            got.append(c)
    except JobError as exc:
        return got, exc
    raise AssertionError(f"the stream ended without an error after {got}")


# --- plain calls --------------------------------------------------------------------------------


async def test_sends_key_headers_and_body_unchanged(closing: list[Upstream]) -> None:
    seen = Seen()
    upstream = upstream_with(
        lambda request: httpx.Response(200, json=COMPLETION, headers={"x-request-id": "req-1"}),
        seen,
    )
    closing.append(upstream)
    completion = await upstream.complete(BODY, {"traceparent": "00-abc-def-01"})
    assert completion == Completion(200, "req-1", COMPLETION)
    (request,) = seen.requests
    assert request.method == "POST"
    assert str(request.url) == URL
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["traceparent"] == "00-abc-def-01"
    assert request.content == BODY


async def test_no_key_no_authorization_header(closing: list[Upstream]) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=COMPLETION)

    upstream = Upstream(URL, None, transport=httpx.MockTransport(handler))
    closing.append(upstream)
    await upstream.complete(BODY, {})
    assert "authorization" not in seen[0].headers


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, InvalidRequest),
        (422, InvalidRequest),
        (401, AuthenticationFailed),
        (403, AuthenticationFailed),
        (404, NotFound),
        (408, UpstreamError),
        (409, UpstreamError),
        (429, RateLimited),
        (500, UpstreamError),
        (502, UpstreamError),
        (503, UpstreamError),
    ],
)
async def test_status_mapping(closing: list[Upstream], status: int, cls: type[JobError]) -> None:
    upstream = upstream_with(
        lambda request: httpx.Response(status, json=ERROR_BODY, headers={"x-request-id": "req-9"})
    )
    closing.append(upstream)
    with pytest.raises(cls) as caught:
        await upstream.complete(BODY, {})
    error = caught.value
    assert type(error) is cls
    assert error.status_code == status
    assert error.response == ERROR_BODY
    assert error.request_id == "req-9"
    assert "bad things" in error.message
    assert error.retry_after is None


async def test_error_body_not_json(closing: list[Upstream]) -> None:
    upstream = upstream_with(lambda request: httpx.Response(502, text="<html>Bad Gateway</html>"))
    closing.append(upstream)
    with pytest.raises(UpstreamError) as caught:
        await upstream.complete(BODY, {})
    assert caught.value.status_code == 502
    assert caught.value.response is None


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "30"}, 0.25),
        ({"retry-after": "30"}, 30.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"Retry-After": "7"}, 7.0),
    ],
)
async def test_retry_after_on_errors(
    closing: list[Upstream], headers: dict[str, str], wait: float
) -> None:
    upstream = upstream_with(lambda request: httpx.Response(429, json=ERROR_BODY, headers=headers))
    closing.append(upstream)
    with pytest.raises(RateLimited) as caught:
        await upstream.complete(BODY, {})
    assert caught.value.retry_after == pytest.approx(wait)


def test_retry_after_seconds() -> None:
    assert retry_after_seconds(httpx.Headers()) is None
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "2000"})) == 2.0
    assert retry_after_seconds(httpx.Headers({"Retry-After": "12"})) == 12.0
    assert retry_after_seconds(httpx.Headers({"retry-after": "-3"})) == 0.0
    assert retry_after_seconds(httpx.Headers({"retry-after": "soon"})) is None
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "x", "retry-after": "4"})) == 4.0


def test_retry_after_http_date() -> None:
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    wait = retry_after_seconds(httpx.Headers({"Retry-After": later}))
    assert wait is not None
    assert 115 <= wait <= 121
    past = email.utils.formatdate(time.time() - 3600, usegmt=True)
    assert retry_after_seconds(httpx.Headers({"Retry-After": past})) == 0.0


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_retry_after_not_finite_is_ignored(value: str) -> None:
    assert retry_after_seconds(httpx.Headers({"retry-after": value})) is None
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": value})) is None


@pytest.mark.parametrize(
    "content", [b"<html>hello</html>", b"", b"[1, 2]", b'"text"', b'{"truncated": ']
)
async def test_ok_status_without_json_object(closing: list[Upstream], content: bytes) -> None:
    upstream = upstream_with(
        lambda request: httpx.Response(
            200, content=content, headers={"content-type": "application/json"}
        )
    )
    closing.append(upstream)
    with pytest.raises(UpstreamError) as caught:
        await upstream.complete(BODY, {})
    assert caught.value.status_code == 200


@pytest.mark.parametrize(
    "exc", [httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectTimeout]
)
async def test_transport_failure_is_upstream_error(
    closing: list[Upstream], exc: type[httpx.TransportError]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("connection refused", request=request)

    upstream = upstream_with(handler)
    closing.append(upstream)
    with pytest.raises(UpstreamError) as caught:
        await upstream.complete(BODY, {})
    assert caught.value.status_code is None
    assert caught.value.retryable
    with pytest.raises(UpstreamError):
        await collect(upstream)


# --- streams ------------------------------------------------------------------------------------


async def test_stream_parses_events(closing: list[Upstream]) -> None:
    seen = Seen()
    payload = sse(
        ": OPENROUTER PROCESSING\n\n",
        chunk("Hel"),
        ":keep-alive\n\n",
        "data:\n\n",
        chunk("lo"),
        chunk(finish_reason="stop"),
        USAGE_CHUNK,
    )
    upstream = upstream_with(lambda request: sse_response(payload, **{"x-request-id": "r-1"}), seen)
    closing.append(upstream)
    meta: dict[str, Any] = {}
    chunks = await collect(upstream, meta)
    assert chunks == [chunk("Hel"), chunk("lo"), chunk(finish_reason="stop"), USAGE_CHUNK]
    assert meta["status_code"] == 200
    assert meta["request_id"] == "r-1"
    assert meta["headers"]["x-request-id"] == "r-1"
    assert meta["done"] is True
    assert seen.requests[0].content == BODY
    assert seen.requests[0].headers["authorization"] == f"Bearer {KEY}"


async def test_stream_stops_at_done(closing: list[Upstream]) -> None:
    payload = sse(chunk("a"), "data: [DONE]\n\n", chunk("after done"), done=False)
    upstream = upstream_with(lambda request: sse_response(payload))
    closing.append(upstream)
    assert await collect(upstream) == [chunk("a")]


async def test_stream_without_done_ends_cleanly(closing: list[Upstream]) -> None:
    payload = sse(chunk("a"), chunk("b"), done=False)
    upstream = upstream_with(lambda request: sse_response(payload))
    closing.append(upstream)
    assert await collect(upstream) == [chunk("a"), chunk("b")]


async def test_stream_crlf_lines(closing: list[Upstream]) -> None:
    payload = b"data: " + orjson.dumps(chunk("x")) + b"\r\n\r\ndata: [DONE]\r\n\r\n"
    upstream = upstream_with(lambda request: sse_response(payload))
    closing.append(upstream)
    assert await collect(upstream) == [chunk("x")]


async def test_error_event_mid_stream(closing: list[Upstream]) -> None:
    error = {"error": {"message": "model overloaded", "type": "server_error"}}
    payload = sse(chunk("Hel"), error, chunk("never"))
    upstream = upstream_with(lambda request: sse_response(payload, **{"x-request-id": "r-2"}))
    closing.append(upstream)
    got, exc = await collect_until_error(upstream)
    assert got == [chunk("Hel")]
    assert type(exc) is UpstreamError
    assert exc.response == error
    assert exc.status_code == 200
    assert exc.request_id == "r-2"
    assert "model overloaded" in exc.message


async def test_error_typed_event_mid_stream(closing: list[Upstream]) -> None:
    payload = sse(chunk("a"), 'event: error\ndata: {"message": "boom"}\n\n')
    upstream = upstream_with(lambda request: sse_response(payload))
    closing.append(upstream)
    with pytest.raises(UpstreamError, match="boom"):
        await collect(upstream)


@pytest.mark.parametrize("data", ["not json", "[1, 2]", '"a string"', '{"choices": '])
async def test_malformed_chunk(closing: list[Upstream], data: str) -> None:
    payload = sse(chunk("a"), f"data: {data}\n\n")
    upstream = upstream_with(lambda request: sse_response(payload))
    closing.append(upstream)
    with pytest.raises(UpstreamError):
        await collect(upstream)


async def test_stream_that_is_not_event_stream(closing: list[Upstream]) -> None:
    upstream = upstream_with(lambda request: httpx.Response(200, json=COMPLETION))
    closing.append(upstream)
    with pytest.raises(UpstreamError):
        await collect(upstream)


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, InvalidRequest), (401, AuthenticationFailed), (404, NotFound), (503, UpstreamError)],
)
async def test_stream_status_mapping(
    closing: list[Upstream], status: int, cls: type[JobError]
) -> None:
    upstream = upstream_with(
        lambda request: httpx.Response(status, json=ERROR_BODY, headers={"x-request-id": "r-3"})
    )
    closing.append(upstream)
    meta: dict[str, Any] = {}
    with pytest.raises(cls) as caught:
        await collect(upstream, meta)
    assert type(caught.value) is cls
    assert caught.value.status_code == status
    assert caught.value.response == ERROR_BODY
    assert caught.value.request_id == "r-3"
    assert meta["status_code"] == status


async def test_stream_rate_limited_keeps_retry_after(closing: list[Upstream]) -> None:
    upstream = upstream_with(
        lambda request: httpx.Response(429, json=ERROR_BODY, headers={"retry-after": "30"})
    )
    closing.append(upstream)
    with pytest.raises(RateLimited) as caught:
        await collect(upstream)
    assert caught.value.retry_after == 30.0
    assert caught.value.response == ERROR_BODY


async def test_stream_body_breaks(closing: list[Upstream]) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield sse(chunk("a"), done=False)
        raise httpx.ReadError("connection reset")

    upstream = upstream_with(
        lambda request: httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=broken()
        )
    )
    closing.append(upstream)
    got, exc = await collect_until_error(upstream)
    assert got == [chunk("a")]
    assert type(exc) is UpstreamError


# --- the real (aiohttp-based) transport over loopback --------------------------------------------


@pytest.fixture
def server_requests() -> list[dict[str, Any]]:
    return []


@pytest.fixture
async def loopback(server_requests: list[dict[str, Any]]) -> AsyncIterator[str]:
    """A tiny OpenAI-compatible server on 127.0.0.1, an ephemeral port; yields its endpoint."""

    async def completions(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw)
        server_requests.append({"headers": dict(request.headers), "raw": raw})
        if body["model"] == "missing":
            return aiohttp.web.json_response(ERROR_BODY, status=404)
        if not body.get("stream"):
            return aiohttp.web.json_response(COMPLETION, headers={"x-request-id": "srv-1"})
        response = aiohttp.web.StreamResponse(
            headers={"content-type": "text/event-stream", "x-request-id": "srv-2"}
        )
        await response.prepare(request)
        for event in (": hello\n\n", chunk("Hel"), chunk("lo", "stop"), USAGE_CHUNK):
            await response.write(sse(event, done=False))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = aiohttp.web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/v1/chat/completions"
    finally:
        await runner.cleanup()


async def test_default_transport_plain_and_streamed(
    loopback: str, server_requests: list[dict[str, Any]]
) -> None:
    upstream = Upstream(loopback, KEY)
    try:
        completion = await upstream.complete(BODY, {"traceparent": "00-aa-bb-01"})
        assert completion == Completion(200, "srv-1", COMPLETION)
        assert completion.headers["x-request-id"] == "srv-1"
        assert server_requests[0]["raw"] == BODY
        assert server_requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
        assert server_requests[0]["headers"]["traceparent"] == "00-aa-bb-01"

        meta: dict[str, Any] = {}
        streamed = orjson.dumps({**orjson.loads(BODY), "stream": True})
        chunks = [c async for c in upstream.stream(streamed, {}, meta)]
        assert chunks == [chunk("Hel"), chunk("lo", "stop"), USAGE_CHUNK]
        assert (meta["status_code"], meta["request_id"], meta["done"]) == (200, "srv-2", True)
        assert meta["headers"]["X-Request-Id"] == "srv-2"  # case-insensitive, as httpx's

        missing = orjson.dumps({"model": "missing", "messages": []})
        with pytest.raises(NotFound) as caught:
            await upstream.complete(missing, {})
        assert caught.value.response == ERROR_BODY
    finally:
        await upstream.aclose()


async def test_default_transport_connection_refused() -> None:
    # Bind a port, then close it: nothing listens there now.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    upstream = Upstream(f"http://127.0.0.1:{port}/v1/chat/completions", KEY)
    try:
        with pytest.raises(UpstreamError):
            await upstream.complete(BODY, {})
        with pytest.raises(UpstreamError):
            await collect(upstream)
    finally:
        await upstream.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        b"HELLO WORLD\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type application/json\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{",
        b"",
    ],
    ids=["bad-status-line", "bad-chunk-size", "bad-header", "short-body", "closed"],
)
async def test_default_transport_malformed_http_is_upstream_error(answer: bytes) -> None:
    async def answer_badly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(answer_badly, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = Upstream(f"http://127.0.0.1:{port}/v1/chat/completions", KEY)
    try:
        with pytest.raises(UpstreamError):
            await upstream.complete(BODY, {})
        with pytest.raises(UpstreamError):
            await collect(upstream)
    finally:
        await upstream.aclose()
        server.close()
        await server.wait_closed()


async def test_usage_not_an_object_in_plain_answer(closing: list[Upstream]) -> None:
    upstream = upstream_with(lambda request: httpx.Response(200, json={**COMPLETION, "usage": 5}))
    closing.append(upstream)
    with pytest.raises(UpstreamError):
        await upstream.complete(BODY, {})


@pytest.mark.parametrize(
    "body",
    [ERROR_BODY, {"error": "quota", "choices": None}, {"object": "chat.completion"}],
    ids=["error-object", "error-string", "no-choices"],
)
async def test_item11_ok_status_without_choices_is_upstream_error(
    closing: list[Upstream], body: dict[str, Any]
) -> None:
    upstream = upstream_with(
        lambda request: httpx.Response(200, json=body, headers={"x-request-id": "r-9"})
    )
    closing.append(upstream)
    with pytest.raises(UpstreamError) as caught:
        await upstream.complete(BODY, {})
    assert type(caught.value) is UpstreamError  # retryable
    assert caught.value.status_code == 200
    assert caught.value.request_id == "r-9"
    if "error" in body:
        assert caught.value.response == body


async def test_answer_headers_are_exposed(closing: list[Upstream]) -> None:
    """The rate-limit budget is read from them: the plain answer's and the stream's."""
    limits = {"x-ratelimit-remaining-requests": "41", "x-ratelimit-remaining-tokens": "9000"}
    upstream = upstream_with(lambda request: httpx.Response(200, json=COMPLETION, headers=limits))
    closing.append(upstream)
    completion = await upstream.complete(BODY, {})
    assert completion.headers["X-RateLimit-Remaining-Requests"] == "41"
    streamed = upstream_with(lambda request: sse_response(sse(chunk("a", "stop")), **limits))
    closing.append(streamed)
    meta: dict[str, Any] = {}
    await collect(streamed, meta)
    assert meta["headers"]["x-ratelimit-remaining-tokens"] == "9000"
    limited = upstream_with(lambda request: httpx.Response(429, json=ERROR_BODY, headers=limits))
    closing.append(limited)
    meta = {}
    with pytest.raises(RateLimited):
        await limited.complete(BODY, {}, meta)
    assert (meta["status_code"], meta["headers"]["x-ratelimit-remaining-tokens"]) == (429, "9000")
    async with streamed.open_stream(BODY, {}) as chunks:
        assert chunks.headers["x-ratelimit-remaining-requests"] == "41"
        assert await chunks.read() == [chunk("a", "stop")]
        assert await chunks.read() is None
        assert chunks.done


QUOTA_BODY = {
    "error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
              "code": "insufficient_quota", "param": None}
}  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
async def test_insufficient_quota_is_told_apart_from_a_rate_limit(
    closing: list[Upstream], stream: bool
) -> None:
    upstream = upstream_with(lambda request: httpx.Response(429, json=QUOTA_BODY))
    closing.append(upstream)
    call = collect(upstream) if stream else upstream.complete(BODY, {})
    with pytest.raises(QuotaExceeded) as caught:
        await call
    assert caught.value.code.value == "quota_exceeded"
    assert caught.value.status_code == 429


@pytest.mark.parametrize("stream", [False, True])
async def test_every_answer_is_handed_to_the_gate(closing: list[Upstream], stream: bool) -> None:
    answers = iter(
        [
            httpx.Response(429, json=ERROR_BODY, headers={"x-ratelimit-remaining-requests": "0"}),
            httpx.Response(200, json=COMPLETION, headers={"x-ratelimit-remaining-requests": "9"})
            if not stream
            else httpx.Response(200, content=sse(chunk("a")), headers={
                "content-type": "text/event-stream", "x-ratelimit-remaining-requests": "9"}),
        ]
    )  # fmt: skip
    upstream = upstream_with(lambda request: next(answers))
    closing.append(upstream)
    seen: list[tuple[int, str | None]] = []
    upstream.on_answer = lambda status, headers: seen.append(
        (status, headers.get("x-ratelimit-remaining-requests"))
    )
    with pytest.raises(RateLimited):
        await (collect(upstream) if stream else upstream.complete(BODY, {}))
    await (collect(upstream) if stream else upstream.complete(BODY, {}))
    assert seen == [(429, "0"), (200, "9")]


# --- embeddings (contract §18) --------------------------------------------------------------

EMBEDDINGS_BODY = orjson.dumps({"model": "e5", "input": ["a", "b"], "dimensions": 2})
EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}],
    "model": "e5",
    "usage": {"prompt_tokens": 2, "total_tokens": 2},
}


async def test_embeddings_go_beside_chat_with_the_same_query_and_key(
    closing: list[Upstream],
) -> None:
    seen = Seen()

    async def record(request: httpx.Request) -> httpx.Response:
        seen.requests.append(request)
        return httpx.Response(200, json=EMBEDDINGS, headers={"x-request-id": "e-1"})

    azure = "https://contoso.openai.azure.com/openai/deployments/e5/chat/completions"
    upstream = Upstream(
        azure,
        KEY,
        auth="api-key",
        query={"api-version": "2024-10-21"},
        transport=httpx.MockTransport(record),
    )
    closing.append(upstream)
    assert upstream.url_for("chat") == azure
    assert upstream.url_for("embeddings") == azure.replace("/chat/completions", "/embeddings")
    answer = await upstream.complete(EMBEDDINGS_BODY, {}, endpoint="embeddings")
    assert answer == Completion(200, "e-1", EMBEDDINGS)
    (request,) = seen.requests
    assert str(request.url) == (
        "https://contoso.openai.azure.com/openai/deployments/e5/embeddings?api-version=2024-10-21"
    )
    assert request.headers["api-key"] == KEY and request.content == EMBEDDINGS_BODY


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (COMPLETION, "not an embeddings list"),
        ({"object": "list", "data": {}}, "not an embeddings list"),
        ({"error": {"message": "overloaded"}}, "with an error body: overloaded"),
    ],
)
async def test_an_embeddings_answer_without_a_data_list_is_an_upstream_error(
    closing: list[Upstream], answer: dict[str, Any], problem: str
) -> None:
    upstream = upstream_with(lambda _: httpx.Response(200, json=answer))
    closing.append(upstream)
    with pytest.raises(UpstreamError, match=problem):
        await upstream.complete(EMBEDDINGS_BODY, {}, endpoint="embeddings")
    # ... and a chat answer must have choices, not data:
    chat = upstream_with(lambda _: httpx.Response(200, json=EMBEDDINGS))
    closing.append(chat)
    with pytest.raises(UpstreamError, match="not a chat completion"):
        await chat.complete(BODY, {})


async def test_default_transport_embeddings_against_the_bundled_mock() -> None:
    from worker.mock.upstream import MockConfig, MockUpstream

    async with MockUpstream(MockConfig(api_key=KEY)) as mock:
        upstream = Upstream(f"{mock.base_url}/chat/completions", KEY)
        try:
            answer = await upstream.complete(EMBEDDINGS_BODY, {}, endpoint="embeddings")
            assert answer.status_code == 200 and len(answer.body["data"]) == 2
            assert answer.body["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
            bad = orjson.dumps({"model": "e5", "input": []})
            with pytest.raises(InvalidRequest):
                await upstream.complete(bad, {}, endpoint="embeddings")
        finally:
            await upstream.aclose()
    assert [r.path for r in mock.requests] == ["/v1/embeddings", "/v1/embeddings"]


# --- issue 27 item 5: the cause of a failed connection, in words ----------------------------


async def test_item5_a_refused_connection_names_the_cause() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    upstream = Upstream(f"http://127.0.0.1:{port}/v1/chat/completions", KEY)
    try:
        with pytest.raises(UpstreamError) as caught:
            await upstream.complete(BODY, {})
        assert caught.value.message == (
            f"upstream connection failed: connection refused by 127.0.0.1:{port}"
        )
        assert caught.value.cause == f"connection refused by 127.0.0.1:{port}"
        with pytest.raises(UpstreamError, match=f"connection refused by 127.0.0.1:{port}"):
            await collect(upstream)
    finally:
        await upstream.aclose()


async def test_item5_an_untrusted_certificate_is_a_tls_cause() -> None:
    import ssl

    import trustme

    authority = trustme.CA()  # a private authority the system does not trust
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    upstream = Upstream(f"https://127.0.0.1:{port}/v1/chat/completions", KEY)
    try:
        with pytest.raises(UpstreamError) as caught:
            await upstream.complete(BODY, {})
        assert caught.value.cause is not None
        assert caught.value.cause.startswith(f"TLS: certificate of 127.0.0.1:{port} not trusted")
    finally:
        await upstream.aclose()
        server.close()
        await server.wait_closed()


def _connector_error(os_error: OSError) -> aiohttp.ClientConnectorError:
    key = types.SimpleNamespace(host="llm.test", port=443, ssl=True)
    return aiohttp.ClientConnectorError(key, os_error)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (
            _connector_error(socket.gaierror(-2, "Name or service not known")),
            "DNS: cannot resolve llm.test (Name or service not known)",
        ),
        (
            _connector_error(ConnectionRefusedError(111, "refused")),
            "connection refused by llm.test:443",
        ),
        (_connector_error(TimeoutError()), "connect timeout (10s) to llm.test:443"),
        (aiohttp.ConnectionTimeoutError("Connection timeout"), "connect timeout (10s)"),
        (aiohttp.ServerDisconnectedError(), "the server closed the connection without an answer"),
        (
            aiohttp.ClientPayloadError("Response payload is not completed"),
            "the answer's body broke off",
        ),
        (httpx.ConnectTimeout("timed out"), "connect timeout (10s)"),
        (httpx.ConnectError("[Errno 111] Connection refused"), "connection refused"),
        (httpx.ReadTimeout("timed out"), "read timeout"),
        (httpx.RemoteProtocolError("illegal status line"), "malformed HTTP answer"),
    ],
    ids=[
        "dns",
        "refused",
        "connect-timeout",
        "connect-timeout-2",
        "disconnected",
        "payload",
        "httpx-connect-timeout",
        "httpx-refused",
        "httpx-read-timeout",
        "httpx-protocol",
    ],
)
def test_item5_transport_failures_in_words(error: BaseException, cause: str) -> None:
    assert transport_cause(error) == cause


def test_item5_a_status_is_a_cause_too() -> None:
    error = UpstreamError("upstream answered 503: busy", status_code=503)
    assert error.cause == "status 503"
