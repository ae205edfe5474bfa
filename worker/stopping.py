"""Stopping the worker: a first signal drains within a grace period, a second ends it at once.

A drain waits on a broker that may answer nothing: while a resource alarm blocks the
connection, RabbitMQ reads nothing from it, so a consumer's cancel or a channel's close
gets no reply. Every wait of a stop is therefore bounded, by the deadline the first
signal set (``WORKER_SHUTDOWN_GRACE`` away) and by the second signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable
from typing import Any

import structlog

__all__ = ["Stop"]

log = structlog.get_logger(__name__)


class Stop:
    """The stop signals of one worker and the bounded waits of its drain."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.requested = asyncio.Event()  # the first signal
        self._now = asyncio.Event()  # the second
        #: ``time.monotonic()`` when the grace ends (after the first signal)
        self.deadline = math.inf

    def signal(self) -> None:
        """The first call starts the grace period; the second ends every wait at once."""
        if self.requested.is_set():
            log.warning("second stop signal: ending now, unfinished jobs return to the queue")
            self._now.set()
            return
        self.deadline = time.monotonic() + self.grace
        self.requested.set()

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if a stop comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.requested.wait(), seconds)

    async def until(self, deadline: float, tasks: set[asyncio.Future[Any]]) -> None:
        """Wait for all of ``tasks`` until ``deadline`` (``time.monotonic``) or the second
        signal, whichever comes first."""
        now = asyncio.ensure_future(self._now.wait())
        pending = set(tasks)
        try:
            while pending and not now.done() and (left := deadline - time.monotonic()) > 0:
                await asyncio.wait({*pending, now}, timeout=left, return_when=FIRST_COMPLETED)
                pending = {task for task in pending if not task.done()}
        finally:
            now.cancel()

    async def within(self, deadline: float, what: str, step: Awaitable[Any]) -> None:
        """Run one step of a stop; give it up (cancelled, not awaited) at ``deadline`` or
        the second signal."""
        task = asyncio.ensure_future(step)
        await self.until(deadline, {task})
        if not task.done():
            log.warning("gave up waiting for the broker", step=what)
            task.cancel()
        elif not task.cancelled() and (exc := task.exception()) is not None:
            log.info("stop step failed", step=what, error=repr(exc))
