"""The replies of the gateway's calls: one exclusive reply queue per process, consumed once,
and the table of calls waiting on it, each found by its correlation id.

RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to``) is not used: the broker delivers a
reply published ``mandatory`` to it *and* returns it as unroutable (RabbitMQ 3.10), and a
worker reads that return as a refusal, so it would send the result again to the result
exchange and the job's later deltas there too. A queue of the process's own has neither
problem, and the operator sees it (``rabbitmqctl list_consumers``) under a name that says
whose it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from worker.amqp.topology import TYPE_RESULT

__all__ = ["CallInbox", "CallReplies", "Reply", "reply_queue_name"]

log = structlog.get_logger(__name__)


def reply_queue_name(results_queue: str) -> str:
    """A process's reply queue: ``<WORKER_GATEWAY_RESULTS_QUEUE>.calls.<random>``."""
    return f"{results_queue}.calls.{secrets.token_hex(6)}"


@dataclass(frozen=True, slots=True)
class Reply:
    """One message of a call's job: a delta (§5) or its result (§4), as published."""

    body: bytes
    final: bool  # the result: nothing more comes for this call


class CallInbox:
    """What came back for one call, in the order it came."""

    __slots__ = ("_replies",)

    def __init__(self) -> None:
        self._replies: asyncio.Queue[Reply] = asyncio.Queue()

    def put(self, reply: Reply) -> None:
        self._replies.put_nowait(reply)

    async def get(self, within: float) -> Reply:
        """The next reply; :class:`TimeoutError` after ``within`` seconds without one."""
        async with asyncio.timeout(max(within, 0.0)):
            return await self._replies.get()


class CallReplies:
    """The process's reply queue and the calls waiting on it.

    A call is registered before its job is published and removed when its handler ends,
    however it ends (an answer, a timeout, a client that went away): a reply for a call no
    longer waiting is dropped. Nothing per call is declared on the broker.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._waiting: dict[str, CallInbox] = {}
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self, channel: AbstractChannel) -> None:
        # Exclusive and auto-delete: it lives as long as this connection (a robust
        # connection declares it again, under the same name, after a reconnect).
        self._queue = await channel.declare_queue(
            self.name,
            durable=False,
            exclusive=True,
            auto_delete=True,
            arguments={"x-queue-type": "classic"},
        )
        self._tag = await self._queue.consume(self._on_message, no_ack=True, exclusive=True)

    async def stop(self) -> None:
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag)
        self._tag = None

    @property
    def consuming(self) -> bool:
        return (
            self._tag is not None and self._queue is not None and not self._queue.channel.is_closed
        )

    async def consumers(self) -> int:
        """Consumers of the reply queue as the broker counts them (one while it runs)."""
        if self._queue is None:
            return 0
        declared = await self._queue.declare()
        return int(declared.consumer_count or 0)

    @property
    def pending(self) -> int:
        """Calls waiting for their replies now."""
        return len(self._waiting)

    @contextlib.contextmanager
    def waiting(self, call_id: str) -> Iterator[CallInbox]:
        """The inbox of call ``call_id`` while the block runs; gone when it ends."""
        inbox = self._waiting[call_id] = CallInbox()
        try:
            yield inbox
        finally:
            del self._waiting[call_id]

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        inbox = self._waiting.get(message.correlation_id or "")
        if inbox is None:
            return  # its caller went away, or timed out: nobody to tell
        inbox.put(Reply(message.body, message.type == TYPE_RESULT))
