"""An open streamed answer, read chunk batch by chunk batch off the network."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import httpx
import orjson

from worker.errors import UpstreamError
from worker.upstream.sse import EventStreamParser

__all__ = ["TRANSPORT_ERRORS", "ChunkStream"]

_DONE = b"[DONE]"

# What a broken connection or a malformed HTTP answer raises. httpx-aiohttp maps most aiohttp
# errors to httpx ones but lets others through (a bad status line or chunk size raises
# aiohttp's ClientResponseError): every one is an upstream_error, to retry.
TRANSPORT_ERRORS = (httpx.HTTPError, aiohttp.ClientError)


class ChunkStream:
    """An open streamed answer: its status and headers, then its chunks read by read.

    :meth:`read` returns the chunks that one network read completed (often one, sometimes
    none or several) and ``None`` once the stream is over: at ``data: [DONE]`` (``done``
    is then True) or at the end of the body. One await per read, no generator per chunk.

    :meth:`rest_until` leaves the connection unread for a while: what the upstream sends
    meanwhile waits in the socket and the next read takes all of it at once.
    """

    __slots__ = (
        "_error",
        "_over",
        "_parser",
        "_read",
        "_resume",
        "_transport",
        "done",
        "headers",
        "request_id",
        "status_code",
    )

    def __init__(
        self,
        read: Callable[[], Awaitable[bytes]],
        status_code: int,
        headers: Mapping[str, str],
        transport: asyncio.Transport | None = None,
    ) -> None:
        self._read = read
        self._transport = transport
        self._resume: asyncio.TimerHandle | None = None
        self._parser = EventStreamParser()
        self._over = False
        self._error: UpstreamError | None = None
        self.done = False
        self.status_code = status_code
        self.headers = headers
        self.request_id = headers.get("x-request-id")

    @property
    def over(self) -> bool:
        """The last read ended the stream: the next returns None."""
        return self._over

    def rest_until(self, when: float) -> None:
        """Read nothing before the loop time ``when``: the socket stops being polled until
        then (``pause_reading``), so chunks that arrive meanwhile cost no wake-up each, and
        the next :meth:`read` takes all of them at once. A plain call: no task waits."""
        transport = self._transport
        if self._over or transport is None or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        if when <= loop.time():
            return
        if self._resume is not None:
            self._resume.cancel()
        # The transport itself, not aiohttp's protocol: the protocol's pause also pauses
        # its parser and its resume feeds the parser again, work for nothing here. Were
        # aiohttp holding the transport for a full buffer, resuming early only means the
        # next read comes sooner.
        transport.pause_reading()
        self._resume = loop.call_at(when, self._wake)

    def _wake(self) -> None:
        self._resume = None
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def stop_resting(self) -> None:
        """Poll the socket again now (the stream is closing)."""
        if self._resume is not None:
            self._resume.cancel()
            self._wake()

    async def read(self, until: float | None = None) -> list[dict[str, Any]] | None:
        """The chunks of the next network read; with ``until`` (a loop time), an empty list
        when nothing came by then."""
        if self._error is not None:
            raise self._error
        if self._over:
            return None
        try:
            if until is None:
                data = await self._read()
            else:
                async with asyncio.timeout_at(until) as deadline:
                    data = await self._read()
        except TimeoutError:
            if until is not None and deadline.expired():
                return []
            raise
        except TRANSPORT_ERRORS as exc:
            raise UpstreamError(
                f"upstream stream broke: {type(exc).__name__}",
                status_code=self.status_code,
                request_id=self.request_id,
            ) from exc
        if data:
            events = self._parser.feed(data)
        else:
            self._over = True
            events = self._parser.close()
        chunks: list[dict[str, Any]] = []
        for event in events:
            payload = event.data
            if payload == _DONE:
                self._over = self.done = True
                break
            if payload:
                try:
                    chunks.append(self._chunk(event.type, payload))
                except UpstreamError as exc:
                    if not chunks:
                        raise
                    # The chunks before it are still the stream's: the error comes next read.
                    self._error = exc
                    break
        return chunks if chunks or not self._over else None

    def _chunk(self, event: str, data: bytes) -> dict[str, Any]:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamError(
                "upstream sent a stream chunk that is not JSON",
                status_code=self.status_code,
                request_id=self.request_id,
            ) from None
        if type(chunk) is not dict:
            raise UpstreamError(
                "upstream sent a stream chunk that is not a JSON object",
                status_code=self.status_code,
                request_id=self.request_id,
            )
        if event != "message" or "error" in chunk:
            _check_error_event(event, chunk, self.status_code, self.request_id)
        return chunk


def _check_error_event(
    event: str, chunk: dict[str, Any], status_code: int, request_id: str | None
) -> None:
    if chunk.get("error") is None and event != "error":
        return
    error = chunk.get("error") if isinstance(chunk.get("error"), dict) else chunk
    message = error.get("message") if isinstance(error, dict) else None
    raise UpstreamError(
        f"upstream error event mid-stream: {message or 'no message'}",
        status_code=status_code,
        response=chunk,
        request_id=request_id,
    )
