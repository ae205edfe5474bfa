"""The broker's ``connection.blocked`` / ``unblocked`` notifications, as a state to follow.

RabbitMQ blocks a publishing connection while a resource alarm (memory, disk) is on: it
stops reading from the socket, so no publish is confirmed until the alarm clears. The
worker then takes no new job (its result could not be published), reports not ready, and
does not charge the wait for confirms to the upstream.

aiormq handles the two frames but exposes only a ``ready()`` coroutine, no callback and no
state; :func:`follow_blocking` wraps its two frame handlers on the connection instance, so
the real frames, read by aiormq's own reader, drive the state. A test pins the names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aio_pika.abc import AbstractConnection

__all__ = ["BlockedState", "follow_blocking"]

log = structlog.get_logger(__name__)

# aiormq's handlers of the two frames (name-mangled private methods of aiormq.Connection).
BLOCKED_HANDLER = "_Connection__handle_connection_blocked"
UNBLOCKED_HANDLER = "_Connection__handle_connection_unblocked"


class BlockedState:
    """Whether the broker blocks the worker's connection, and why."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._unblocked = asyncio.Event()
        self._unblocked.set()
        self._blocked = asyncio.Event()
        self._next_block: asyncio.Future[None] | None = None

    @property
    def blocked(self) -> bool:
        return not self._unblocked.is_set()

    def block(self, reason: str) -> None:
        if not self.blocked:
            log.warning("broker blocked the connection: taking no new jobs", reason=reason)
        self.reason = reason
        self._unblocked.clear()
        self._blocked.set()
        if self._next_block is not None and not self._next_block.done():
            self._next_block.set_result(None)
        self._next_block = None

    def unblock(self) -> None:
        if self.blocked:
            log.info("broker unblocked the connection")
        self.reason = None
        self._blocked.clear()
        self._unblocked.set()

    async def wait_unblocked(self) -> None:
        await self._unblocked.wait()

    async def wait_blocked(self) -> None:
        await self._blocked.wait()

    def next_block(self) -> asyncio.Future[None]:
        """A future done when the connection is next blocked, shared by every waiter: one
        per delta would cost a task per message on the stream path. Never cancel it."""
        if self._next_block is None:
            self._next_block = asyncio.get_running_loop().create_future()
        return self._next_block


def follow_blocking(connection: AbstractConnection, state: BlockedState) -> bool:
    """Drive ``state`` from ``connection``'s blocked/unblocked frames; False if aiormq's
    handlers are not where expected (the worker then runs without the state)."""
    transport = getattr(connection, "transport", None)
    underlay = getattr(transport, "connection", None)
    if underlay is None or not all(
        callable(getattr(underlay, name, None)) for name in (BLOCKED_HANDLER, UNBLOCKED_HANDLER)
    ):
        log.warning("cannot follow connection.blocked with this aiormq version")
        return False
    state.unblock()  # a new connection starts unblocked
    on_blocked: Callable[[Any], Awaitable[None]] = getattr(underlay, BLOCKED_HANDLER)
    on_unblocked: Callable[[Any], Awaitable[None]] = getattr(underlay, UNBLOCKED_HANDLER)

    async def blocked(frame: Any) -> None:
        await on_blocked(frame)
        state.block(str(getattr(frame, "reason", "") or "unknown"))

    async def unblocked(frame: Any) -> None:
        await on_unblocked(frame)
        state.unblock()

    setattr(underlay, BLOCKED_HANDLER, blocked)
    setattr(underlay, UNBLOCKED_HANDLER, unblocked)
    return True
