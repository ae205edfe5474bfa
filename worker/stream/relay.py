"""Relay one upstream stream: read its chunks, assemble the completion, pace deltas out.

Pacing (contract §5): the first content of an attempt leaves at once, later content at most
once per ``WORKER_STREAM_FLUSH_INTERVAL``. Between two deltas the socket is left unread, so
what arrives meanwhile is read at once and leaves as one delta (one wake-up per delta, not
per chunk).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from worker.errors import UpstreamError, UpstreamTimeout
from worker.stream.assemble import CompletionAssembler, MalformedChunk
from worker.upstream.client import Upstream

__all__ = ["DeltaSink", "DeltaStream", "StreamedAnswer", "relay_stream", "stream_body"]

# The longest a stream is left unread between two reads (see relay_stream).
MAX_REST = 0.05
# A grid point this much before a delta's due time still counts (see DeltaStream._on_grid).
GRID_SLACK = 0.01


@dataclass(slots=True)
class StreamedAnswer:
    """What a stream added up to."""

    status_code: int
    request_id: str | None
    body: dict[str, Any]
    usage: dict[str, Any] | None
    latency_ms: float
    ttft_ms: float | None


class DeltaSink(Protocol):
    """Where an attempt's deltas go (the worker's is :class:`worker.amqp.publish.JobDeltas`)."""

    async def send(self, attempt: int, seq: int, choices: list[dict[str, Any]]) -> None:
        """Publish one delta; a refusal may surface here or at the next call."""

    async def settle(self) -> None:
        """Return once every delta sent is confirmed; raise the first refusal."""


class DeltaStream:
    """An attempt's deltas (contract §5): ``seq`` 0, 1, 2, … without gaps, the first output
    at once, later output at most once per ``interval``.

    It keeps no timer: the reader flushes what it read when :meth:`due` says so, reads no
    later than :attr:`next_at` while output waits, and between two deltas leaves the stream
    unread (see ``JobRunner._stream_once``), so the chunks of one interval are read
    together and leave as one delta, at one wake-up instead of one per chunk.
    """

    __slots__ = ("_assembler", "_attempt", "_grid", "_interval", "_seq", "_sink", "next_at")

    def __init__(
        self,
        sink: DeltaSink,
        attempt: int,
        interval: float,
        assembler: CompletionAssembler,
        grid: float = 0.0,
    ) -> None:
        self._sink = sink
        self._attempt = attempt
        self._interval = max(interval, 0.0)
        self._grid = max(grid, 0.0)
        self._assembler = assembler
        self._seq = 0
        #: loop time before which no further delta goes (None until the first one)
        self.next_at: float | None = None

    def _after(self, now: float) -> float:
        """An interval after ``now``; with a grid, the grid's point nearest to that, unless
        it is more than GRID_SLACK early (then the next one). A delta published a few
        milliseconds after a tick (the time that tick's reads took) keeps to the grid, so
        every stream of the process reads, and publishes, on the same ticks."""
        target = now + self._interval
        if not self._grid:
            return target
        point = round(target / self._grid) * self._grid
        return point if point >= target - GRID_SLACK else point + self._grid

    def due(self, now: float) -> bool:
        """Output read at ``now`` goes now: the first output, or an interval on (a
        millisecond early is on time: a timer may fire that much before its time)."""
        return self.next_at is None or now >= self.next_at - 0.001

    async def flush(self, now: float) -> None:
        """Publish the output gathered since the last delta, if any."""
        choices = self._assembler.take_delta()
        if not choices:
            return
        seq, self._seq = self._seq, self._seq + 1
        self.next_at = self._after(now)
        await self._sink.send(self._attempt, seq, choices)

    async def close(self, now: float) -> None:
        """The stream ended well: publish what is left, then wait for every confirm."""
        await self.flush(now)
        await self._sink.settle()


async def relay_stream(
    client: Upstream,
    body: bytes,
    headers: Mapping[str, str],
    attempt: int,
    send_delta: DeltaSink,
    *,
    idle: float,
    interval: float,
) -> StreamedAnswer:
    """One streamed call: read its chunks, fold them into the completion, pace its deltas
    out; raise :class:`~worker.errors.JobError` when the stream fails."""
    loop = asyncio.get_running_loop()
    assembler = CompletionAssembler()
    unbuffered = interval <= 0
    grid = 0.0 if unbuffered else min(interval, MAX_REST)
    deltas = DeltaStream(send_delta, attempt, interval, assembler, grid)
    meta: dict[str, Any] = {}
    started = time.perf_counter()
    ttft_ms: float | None = None
    # Moving the deadline costs a timer per chunk; moving it when a tenth of it has
    # gone keeps the bound (never early, at most 10 % late) at a fraction of the cost.
    slack = idle / 10
    try:
        async with asyncio.timeout(idle) as silence:
            rescheduled = loop.time()
            async with client.open_stream(body, headers, meta) as chunks:
                pending = False  # output read whose delta may not go yet
                # One await per network read; the chunks it completed are plain calls.
                while (
                    batch := await chunks.read(until=deltas.next_at if pending else None)
                ) is not None:
                    now = loop.time()
                    if batch:  # else a comment, a keep-alive, half an event or `until`
                        if now - rescheduled > slack:
                            silence.reschedule(now + idle + slack)
                            rescheduled = now
                        for chunk in batch:
                            if assembler.add(chunk):
                                if ttft_ms is None:
                                    ttft_ms = _ms_since(started)
                                if unbuffered:  # a zero interval: a delta per chunk
                                    await deltas.flush(now)
                                else:
                                    pending = True
                    if pending and deltas.due(now):
                        await deltas.flush(now)
                        pending = False
                    # Until the next delta may go, leave the socket unread: what comes
                    # meanwhile is read at once and leaves as one delta (one wake-up
                    # per delta, not per chunk). Never longer than MAX_REST: the end of
                    # the stream, and so the result, waits for the next read. Rests end
                    # on a grid every stream of the process shares (the flush interval,
                    # at most MAX_REST): the streams read, and publish their deltas, in
                    # the same loop iterations, and the deltas leave in one write
                    # (worker.amqp.outbox.Outbox).
                    if deltas.next_at is not None and not unbuffered:
                        chunks.rest_until(_on_grid(min(deltas.next_at, now + MAX_REST), grid))
                done = chunks.done
        if not done and not assembler.finished:
            raise UpstreamError(
                "upstream stream ended without [DONE] and without a finish_reason",
                status_code=meta.get("status_code"),
                request_id=meta.get("request_id"),
            )
        await deltas.close(loop.time())
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
    return StreamedAnswer(
        status_code=meta.get("status_code", 200),
        request_id=meta.get("request_id"),
        body=assembler.completion(),
        usage=assembler.usage,
        latency_ms=_ms_since(started),
        ttft_ms=ttft_ms,
    )


def _on_grid(moment: float, grid: float) -> float:
    """The first point of ``grid`` at or after ``moment`` (a loop time), give or take half
    a millisecond (DeltaStream.due allows one)."""
    return math.ceil((moment - 0.0005) / grid) * grid


def stream_body(body: dict[str, Any]) -> bytes:
    """The body with the usage chunk asked for (the result must carry usage)."""
    options = body.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    options["include_usage"] = True
    return orjson.dumps({**body, "stream_options": options})


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
