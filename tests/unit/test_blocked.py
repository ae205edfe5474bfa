"""The broker's connection.blocked notifications, followed as a state (worker/amqp/blocked)."""

from __future__ import annotations

import asyncio

from worker.amqp.blocked import BlockedState


async def test_a_new_state_is_unblocked_and_waiting_for_unblocked_returns_at_once() -> None:
    state = BlockedState()
    assert not state.blocked and state.reason is None
    async with asyncio.timeout(1):
        await state.wait_unblocked()


async def test_block_then_unblock_wakes_the_waiters_and_keeps_the_reason_meanwhile() -> None:
    state = BlockedState()
    state.block("memory alarm")
    assert state.blocked and state.reason == "memory alarm"
    waiter = asyncio.create_task(state.wait_unblocked())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    state.unblock()
    async with asyncio.timeout(1):
        await waiter
    assert not state.blocked and state.reason is None


async def test_next_block_is_one_future_for_every_waiter_and_resolves_on_the_block() -> None:
    state = BlockedState()
    first, second = state.next_block(), state.next_block()
    assert first is second
    assert not first.done()
    state.block("disk alarm")
    assert first.done()
    state.unblock()
    assert state.next_block() is not first  # the next block gets a future of its own


async def test_wait_blocked_returns_once_blocked() -> None:
    state = BlockedState()
    waiter = asyncio.create_task(state.wait_blocked())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    state.block("alarm")
    async with asyncio.timeout(1):
        await waiter
