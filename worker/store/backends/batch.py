"""Auto-pipelining: the commands that concurrent callers issue together, sent as one batch.

Why: against a zero-latency upstream a Redis command cost the worker about 250 µs of CPU
on a small VM, nearly all of it per command and not per byte (redis-py's asyncio
machinery, and one loopback ``send`` and one wake-up for the reply), and a job with the
result store on issues two. Commands batched N to a pipeline share that cost, as the
AMQP outbox's publishes share one write (:mod:`worker.amqp.outbox`).

A :class:`Coalescer` queues each command with a future for its reply. The first command
queued while no batch is being sent schedules a flush (``loop.call_soon``), so every
command queued in the same loop iteration, and in the iterations the tasks woken before
the flush run in, leaves in the same batch. At most ``in_flight`` batches are sent at a
time: the commands queued while they are answered wait and leave together when one is
answered (Nagle's algorithm, with the round trip as the timer). Under load a batch
gathers whatever the jobs asked during the previous round trip; a lone command still
leaves in the next iteration, so an idle worker pays no delay for it.

Each command's future gets its own reply, or its own error (one command failing does not
fail its batch-mates); an error of the whole batch (the connection) reaches every command
of it. A caller that stops waiting (its timeout, its task cancelled) cancels its future:
the command is dropped if its batch has not left yet, and its reply is ignored if it has.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Generic, TypeVar

__all__ = ["Coalescer", "Execute"]

C = TypeVar("C")

#: Sends a batch and returns one reply per command, in order: a value, or the exception
#: that command alone ended in. Raising fails every command of the batch.
Execute = Callable[[Sequence[C]], Awaitable[Sequence[object]]]

DEFAULT_LIMIT = 256  # commands a batch; beyond, the rest waits for the next one
DEFAULT_IN_FLIGHT = 1


class Coalescer(Generic[C]):
    """Commands of type ``C`` queued by concurrent callers, sent by ``execute`` in batches
    of at most ``limit``, at most ``in_flight`` batches at a time (see the module).

    ``batches`` and ``commands`` count what was sent (a debug counter: their ratio is the
    mean batch size).
    """

    __slots__ = (
        "_closed",
        "_execute",
        "_flush",
        "_in_flight",
        "_limit",
        "_pending",
        "_sending",
        "_tasks",
        "batches",
        "commands",
    )

    def __init__(
        self,
        execute: Execute[C],
        *,
        limit: int = DEFAULT_LIMIT,
        in_flight: int = DEFAULT_IN_FLIGHT,
    ) -> None:
        if limit < 1 or in_flight < 1:
            raise ValueError("a coalescer sends at least one command, one batch at a time")
        self._execute = execute
        self._limit = limit
        self._in_flight = in_flight
        self._pending: list[tuple[C, asyncio.Future[Any]]] = []
        self._flush: asyncio.Handle | None = None
        self._sending = 0  # batches sent and not answered yet
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed: Exception | None = None
        self.batches = 0
        self.commands = 0

    def submit(self, command: C) -> asyncio.Future[Any]:
        """Queue ``command``; its future resolves to its reply (or raises its error)."""
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        self._pending.append((command, reply))
        if self._flush is None and self._sending < self._in_flight:
            self._flush = loop.call_soon(self._send_pending)
        return reply

    def _send_pending(self) -> None:
        """Start a batch per free slot, each of the commands still awaited."""
        self._flush = None
        while self._pending and self._sending < self._in_flight:
            batch = [item for item in self._pending[: self._limit] if not item[1].done()]
            del self._pending[: self._limit]
            if not batch:
                continue
            self._sending += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(partial(self._sent, batch))

    async def _send(self, batch: list[tuple[C, asyncio.Future[Any]]]) -> None:
        self.batches += 1
        self.commands += len(batch)
        try:
            replies = await self._execute([command for command, _ in batch])
            if len(replies) != len(batch):
                raise RuntimeError(f"{len(replies)} replies to a batch of {len(batch)}")
        except Exception as exc:
            for _, reply in batch:
                if not reply.done():
                    reply.set_exception(exc)
        else:
            for (_, reply), value in zip(batch, replies, strict=True):
                if reply.done():  # its caller stopped waiting
                    continue
                if isinstance(value, BaseException):
                    reply.set_exception(value)
                else:
                    reply.set_result(value)

    def _sent(self, batch: list[tuple[C, asyncio.Future[Any]]], task: asyncio.Task[None]) -> None:
        """A batch's end, even cancelled before it started (aclose, or the loop's end)."""
        self._tasks.discard(task)
        self._sending -= 1
        for _, reply in batch:
            if reply.done():
                continue
            if self._closed is None:
                reply.cancel()
            else:
                reply.set_exception(self._closed)
        if self._pending and self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._send_pending)

    async def aclose(self, error: Exception) -> None:
        """The commands queued or in flight fail with ``error``. (A command submitted later
        is sent as usual: the redis-py client too reconnects after ``aclose``.)"""
        self._closed = error
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        pending, self._pending = self._pending, []
        for _, reply in pending:
            if not reply.done():
                reply.set_exception(error)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._closed = None
