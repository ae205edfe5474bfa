"""The gateway's results queue: each result recorded as its line's outcome, acknowledged
after the commit; a batch whose lines all have outcomes is finalized."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from worker.amqp.topology import H_JOB_ID, TYPE_DELTA
from worker.gateway.ledger import Ledger
from worker.gateway.metrics import GatewayMetrics
from worker.gateway.output import Outcome, outcome_from_result

__all__ = ["ResultConsumer"]

log = structlog.get_logger(__name__)

#: results written in one transaction at most; a flush also happens every FLUSH_INTERVAL
FLUSH_SIZE = 500
FLUSH_INTERVAL = 0.02
PREFETCH = 2000
RETRY_AFTER_FAILURE = 1.0


class ResultConsumer:
    """Consumes ``queue`` (every replica does: whoever takes a result records it)."""

    def __init__(
        self,
        ledger: Ledger,
        metrics: GatewayMetrics,
        on_full: Callable[[str], Awaitable[None]],
    ) -> None:
        self.ledger, self.metrics, self.on_full = ledger, metrics, on_full
        self._buffer: list[AbstractIncomingMessage] = []
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self, channel: AbstractChannel, queue: str, queue_type: str) -> None:
        await channel.set_qos(prefetch_count=PREFETCH)
        self._queue = await channel.declare_queue(
            queue, durable=True, arguments={"x-queue-type": queue_type}
        )
        self._tag = await self._queue.consume(self._on_message)

    async def stop(self) -> None:
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush()

    @property
    def consuming(self) -> bool:
        return (
            self._tag is not None and self._queue is not None and not self._queue.channel.is_closed
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.append(message)
        if len(self._buffer) >= FLUSH_SIZE:
            self._spawn()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._spawn)

    def _spawn(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = asyncio.create_task(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Record the buffered results in one transaction, then settle them in one frame."""
        async with self._lock:
            messages, self._buffer = self._buffer, []
            if not messages:
                return
            outcomes = [o for o in map(_outcome, messages) if o is not None]
            try:
                recorded = await self.ledger.record(outcomes)
            except Exception:
                log.exception("recording results failed; they go back to the queue")
                with contextlib.suppress(Exception):
                    await messages[-1].nack(multiple=True, requeue=True)
                await asyncio.sleep(RETRY_AFTER_FAILURE)
                return
            try:
                # Deliveries of one consumer arrive in tag order and flushes take turns:
                # one ack with `multiple` settles exactly this flush's messages.
                await messages[-1].ack(multiple=True)
            except Exception as exc:  # the channel was lost: they come again, and are ignored
                log.warning("could not acknowledge results", error=repr(exc))
        for outcome in recorded.added:
            self.metrics.ended(outcome.code or "ok")
        for batch_id in recorded.full:
            try:
                await self.on_full(batch_id)
            except Exception:
                log.exception("finalizing failed; the sweep tries again", batch_id=batch_id)


def _outcome(message: AbstractIncomingMessage) -> Outcome | None:
    if message.type == TYPE_DELTA:
        return None
    headers: dict[str, Any] = dict(message.headers or {})
    fallback = message.correlation_id or headers.get(H_JOB_ID)
    outcome = outcome_from_result(message.body, fallback)
    if outcome is None:
        log.warning("dropped a message that names no batch line", message_id=message.message_id)
    return outcome
