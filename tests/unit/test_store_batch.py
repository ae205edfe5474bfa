"""The store's auto-pipelining (worker/store/backends/batch.py) over a fake ``execute``: what
goes in one batch, each caller's own reply or error, cancelled callers, the bounds."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from worker.store.backends.batch import Coalescer

pytestmark = pytest.mark.unit


class Sender:
    """An ``execute`` that records its batches; each reply is the command doubled, or the
    exception the command names. ``gate``, when set, holds every batch until it is set."""

    def __init__(self) -> None:
        self.batches: list[list[object]] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def __call__(self, commands: Sequence[object]) -> list[object]:
        self.batches.append(list(commands))
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(0)  # a reply comes in a later iteration, as from a socket
        if self.fail is not None:
            raise self.fail
        return [c if isinstance(c, Exception) else 2 * c for c in commands]  # type: ignore[operator]


async def test_the_commands_of_one_iteration_leave_in_one_batch() -> None:
    sender = Sender()
    batch: Coalescer[object] = Coalescer(sender)
    replies = await asyncio.gather(*(batch.submit(i) for i in range(100)))
    assert replies == [2 * i for i in range(100)]
    assert sender.batches == [list(range(100))]
    assert (batch.batches, batch.commands) == (1, 100)


async def test_concurrent_tasks_share_a_batch() -> None:
    sender = Sender()
    batch: Coalescer[object] = Coalescer(sender)

    async def job(i: int) -> int:
        first: int = await batch.submit(i)
        second: int = await batch.submit(first + 1)
        return second

    assert await asyncio.gather(*(job(i) for i in range(50))) == [4 * i + 2 for i in range(50)]
    assert [len(b) for b in sender.batches] == [50, 50]


async def turns(n: int = 3) -> None:
    """Let the loop run ``n`` iterations (a flush, then its batch's task, starts)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_commands_queued_while_a_batch_is_in_flight_leave_together() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()
    batch: Coalescer[object] = Coalescer(sender, in_flight=1)
    first = batch.submit(1)
    await turns()
    assert sender.batches == [[1]]
    later = [batch.submit(i) for i in range(2, 5)]
    await turns()
    more = batch.submit(5)  # another iteration, still while the first batch is out
    await asyncio.sleep(0.01)
    assert sender.batches == [[1]]
    sender.gate.set()
    assert await asyncio.gather(first, *later, more) == [2, 4, 6, 8, 10]
    assert sender.batches == [[1], [2, 3, 4, 5]]


async def test_in_flight_lets_several_batches_out_at_once() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()
    batch: Coalescer[object] = Coalescer(sender, in_flight=2)
    replies = [batch.submit(1)]
    await turns()
    replies.append(batch.submit(2))
    await turns()
    replies.append(batch.submit(3))
    await turns()
    assert sender.batches == [[1], [2]]
    sender.gate.set()
    assert await asyncio.gather(*replies) == [2, 4, 6]
    assert sender.batches == [[1], [2], [3]]


async def test_a_batch_holds_at_most_limit_commands() -> None:
    sender = Sender()
    batch: Coalescer[object] = Coalescer(sender, limit=256)
    replies = await asyncio.gather(*(batch.submit(i) for i in range(600)))
    assert replies == [2 * i for i in range(600)]
    assert [len(b) for b in sender.batches] == [256, 256, 88]


async def test_a_command_that_fails_fails_alone() -> None:
    sender = Sender()
    batch: Coalescer[object] = Coalescer(sender)
    futures = [batch.submit(1), batch.submit(ValueError("this one")), batch.submit(3)]
    replies = await asyncio.gather(*futures, return_exceptions=True)
    assert replies[0] == 2 and replies[2] == 6
    assert isinstance(replies[1], ValueError) and str(replies[1]) == "this one"
    assert len(sender.batches) == 1


async def test_a_batch_that_fails_fails_every_command_of_it_and_the_next_one_goes() -> None:
    sender = Sender()
    sender.fail = ConnectionError("gone")
    batch: Coalescer[object] = Coalescer(sender)
    replies = await asyncio.gather(*(batch.submit(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in replies)
    sender.fail = None
    assert await batch.submit(7) == 14


async def test_a_batch_of_the_wrong_length_is_an_error_for_all() -> None:
    async def short(commands: Sequence[object]) -> list[object]:
        return [1]

    batch: Coalescer[object] = Coalescer(short)
    replies = await asyncio.gather(batch.submit(1), batch.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in replies)


async def test_a_caller_cancelled_before_its_batch_leaves_is_not_sent() -> None:
    sender = Sender()
    batch: Coalescer[object] = Coalescer(sender)
    kept, dropped = batch.submit(1), batch.submit(2)
    dropped.cancel()
    assert await kept == 2
    assert sender.batches == [[1]]


async def test_a_caller_cancelled_while_its_batch_is_out_does_not_break_it() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()
    batch: Coalescer[object] = Coalescer(sender)

    async def call(i: int) -> int:
        reply: int = await batch.submit(i)
        return reply

    tasks = [asyncio.create_task(call(i)) for i in range(6)]
    await asyncio.sleep(0.01)
    assert sender.batches == [list(range(6))]
    for task in tasks[::2]:
        task.cancel()
    # A timeout's cancellation too (the circuit's): the caller stops waiting, nothing else.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await batch.submit(100)
    sender.gate.set()
    replies = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in replies[::2])
    assert replies[1::2] == [2, 6, 10]
    assert await batch.submit(8) == 16
    assert sender.batches[-1] == [8]  # the timed-out command left with none of the others


async def test_aclose_fails_what_is_queued_and_in_flight_then_sends_again() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()
    batch: Coalescer[object] = Coalescer(sender)
    out = batch.submit(1)
    await turns()
    queued = batch.submit(2)
    gone = ConnectionError("closed")
    await batch.aclose(gone)
    for future in (out, queued):
        with pytest.raises(ConnectionError):
            await future
    sender.gate.set()
    assert await batch.submit(3) == 6  # as redis-py reconnects after aclose


async def test_aclose_before_a_batch_started() -> None:
    sender = Sender()
    batch: Coalescer[object] = Coalescer(sender)
    first = batch.submit(1)
    await asyncio.sleep(0)  # the flush ran: the batch's task exists and has not started
    await batch.aclose(ConnectionError("closed"))
    with pytest.raises(ConnectionError):
        await first
    assert await batch.submit(2) == 4


def test_bounds_are_checked() -> None:
    async def execute(commands: Sequence[object]) -> list[object]:
        return []

    with pytest.raises(ValueError, match="at least one"):
        Coalescer(execute, limit=0)
    with pytest.raises(ValueError, match="at least one"):
        Coalescer(execute, in_flight=0)
