"""Noticing a broker connection that went silent: a node cut off without a TCP reset.

A node whose packets are dropped (a partition, a firewall, a dead host) closes nothing:
the socket stays open and every publish waits for a confirm that never comes. The AMQP
heartbeat (``WORKER_AMQP_HEARTBEAT``, 10 s) makes the broker drop its side after two
missed beats, and aiormq its own after three and a second; this watchdog notices sooner.
Every half heartbeat it publishes an empty probe (not persistent, not mandatory, to a
routing key no queue can have: the broker drops it and confirms at once) on a confirm channel
of its own; a probe not confirmed within one heartbeat means the connection is silent:
``on_silent`` is called (the worker drops the connection and connects to the next node),
so a silent node is left within about two heartbeats. While the broker blocks the
connection (a resource alarm) confirms stop by design: no probe is sent, and one in
flight when the block came is not held against the connection.
"""

from __future__ import annotations

import asyncio
from asyncio import FIRST_COMPLETED
from collections.abc import Callable

import aiormq
import structlog
from aio_pika.abc import AbstractConnection

from worker.amqp.blocked import BlockedState

__all__ = ["PROBE_ROUTING_KEY", "ConfirmWatchdog"]

log = structlog.get_logger(__name__)

# On the default exchange: routed to a queue of that name, and ``amq.`` names are reserved
# to the broker, so no queue can ever collect probes.
PROBE_ROUTING_KEY = "amq.chat-worker.probe"


class ConfirmWatchdog:
    """Probes a connection every ``heartbeat / 2`` seconds; ``on_silent()`` when a probe is
    not confirmed within ``heartbeat`` seconds (see the module docstring)."""

    def __init__(
        self, heartbeat: float, blocking: BlockedState, on_silent: Callable[[], None]
    ) -> None:
        self.heartbeat = heartbeat
        self.blocking = blocking
        self.on_silent = on_silent
        self.probes = 0

    @staticmethod
    async def open(connection: AbstractConnection) -> aiormq.abc.AbstractChannel:
        """The probes' confirm channel (opened while the connection is known to answer)."""
        channel = await connection.channel(publisher_confirms=True)
        return await channel.get_underlay_channel()

    async def watch(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Probe on ``channel`` until cancelled, or until the connection is silent or
        closed."""
        try:
            await self._watch(channel)
        except (OSError, aiormq.exceptions.AMQPError, RuntimeError) as exc:
            # A closed connection or channel: the worker's own loss handling sees it.
            log.info("connection watchdog stopped", error=repr(exc))

    async def _watch(self, channel: aiormq.abc.AbstractChannel) -> None:
        while True:
            await asyncio.sleep(self.heartbeat / 2)
            if self.blocking.blocked:
                continue
            if not await self._probe(channel):
                log.error(
                    "broker connection silent: a probe was not confirmed; reconnecting",
                    waited_s=self.heartbeat,
                )
                self.on_silent()
                return

    async def _probe(self, channel: aiormq.abc.AbstractChannel) -> bool:
        """False when the broker did not confirm a probe within one heartbeat."""
        self.probes += 1
        confirmed: asyncio.Future[object] = asyncio.ensure_future(
            channel.basic_publish(b"", exchange="", routing_key=PROBE_ROUTING_KEY)
        )
        blocked: asyncio.Future[object] = asyncio.ensure_future(self.blocking.next_block())
        try:
            await asyncio.wait(
                {confirmed, blocked}, timeout=self.heartbeat, return_when=FIRST_COMPLETED
            )
        finally:
            if not confirmed.done():
                confirmed.cancel()
        if confirmed.done() and not confirmed.cancelled():
            confirmed.result()  # a closed channel raises: the worker sees the loss anyway
            return True
        return blocked.done() or self.blocking.blocked
