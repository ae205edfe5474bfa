"""The connection watchdog without a broker: probes confirmed, unanswered, or blocked."""

from __future__ import annotations

import asyncio
from typing import Any

from worker.amqp.blocked import BlockedState
from worker.amqp.watchdog import PROBE_ROUTING_KEY, ConfirmWatchdog

HEARTBEAT = 0.1


class Channel:
    """Confirms each probe after ``delay`` seconds (None: never)."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay
        self.probes: list[str] = []

    async def basic_publish(self, body: bytes, *, exchange: str, routing_key: str) -> Any:
        self.probes.append(routing_key)
        if self.delay is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay or 0)


async def watch(channel: Channel, blocking: BlockedState, seconds: float) -> list[float]:
    """When on_silent was called (seconds after the start), watching for ``seconds``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    silent: list[float] = []
    watchdog = ConfirmWatchdog(HEARTBEAT, blocking, lambda: silent.append(loop.time() - started))
    task = asyncio.create_task(watchdog.watch(channel))  # type: ignore[arg-type]
    await asyncio.wait({task}, timeout=seconds)
    task.cancel()
    return silent


async def test_item20_confirmed_probes_keep_the_connection() -> None:
    channel = Channel(delay=HEARTBEAT / 4)
    assert await watch(channel, BlockedState(), 10 * HEARTBEAT) == []
    assert len(channel.probes) >= 8
    assert set(channel.probes) == {PROBE_ROUTING_KEY}


async def test_item20_an_unconfirmed_probe_is_a_silent_connection() -> None:
    silent = await watch(Channel(delay=None), BlockedState(), 10 * HEARTBEAT)
    assert len(silent) == 1, "said once; the worker drops the connection"
    assert silent[0] < 2 * HEARTBEAT + 0.05


async def test_item20_a_blocked_connection_is_not_silent() -> None:
    blocking = BlockedState()
    blocking.block("memory alarm (test)")
    channel = Channel(delay=None)
    assert await watch(channel, blocking, 10 * HEARTBEAT) == []
    assert channel.probes == [], "no probe while blocked"


async def test_item20_a_block_during_a_probe_is_not_held_against_the_connection() -> None:
    blocking = BlockedState()
    channel = Channel(delay=None)
    loop = asyncio.get_running_loop()
    loop.call_later(HEARTBEAT * 0.75, blocking.block, "disk alarm (test)")
    assert await watch(channel, blocking, 10 * HEARTBEAT) == []
    assert len(channel.probes) == 1
