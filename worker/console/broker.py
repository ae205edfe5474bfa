"""What the console reads from the broker: heartbeats, queue depths, dead letters, batches.

One connection, four uses. Heartbeats (and the gateways' status reports) arrive on an
exclusive, auto-deleted queue bound to the fanout events exchange (the console leaves
nothing behind when it stops). Queue depths come from passive declares every two
seconds: they create nothing and cost the broker one round trip each. Dead letters are
read with ``worker.amqp.dlq``'s walk: fetched unacknowledged on a channel of their own
and all returned when that channel closes, so reading them never removes one. They are
read by one consumer whose prefetch covers the queue (``worker.amqp.dlq.snapshot``): the
broker streams them, rather than one round trip each. The listing is kept until a
dead-letter queue's depth changes (or 15 s pass, or ten times as long as the listing
took to read), so a page left open does not drain the queue through the network again
and again; requests that arrive during a scan wait for it and share it. A replay reuses
``worker.amqp.dlq.replay_from``: a dead letter is acknowledged only after its copy is
routed to the request queue and confirmed. A batch cancel is a request to the gateways
on their control exchange (``worker.amqp.control``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import orjson
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from worker.amqp.control import EVENT_GATEWAY, publish_cancel_request
from worker.amqp.dlq import DeadLetter, describe, replay_from, snapshot
from worker.amqp.topology import DELAY_TIERS, dead_letter_queue_for, delay_queue_name
from worker.console.batches import GatewayBatches
from worker.console.state import Fleet
from worker.settings import Settings

__all__ = ["ConsoleBroker", "LaneQueue", "lane_queues"]

log = structlog.get_logger(__name__)

POLL_INTERVAL = 2.0
LISTING_MAX_AGE = 15.0
# ... or ten times as long as the last listing took to read: a queue that takes seconds to
# read is not read again every 15 s while its depth stays the same.
LISTING_AGE_PER_SCAN = 10.0
MAX_SCAN = 10_000  # dead letters read per queue for one listing; the page says when cut
MAX_HEARTBEAT_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class LaneQueue:
    """One queue the console watches: its lane, its role and its name."""

    lane: str
    kind: str  # "requests", "delay" or "dead letters"
    name: str
    delay_s: int | None = None


def lane_queues(settings: Settings) -> list[LaneQueue]:
    """Every lane's request queue, its delay queues and its dead-letter queue (§12)."""
    found: list[LaneQueue] = []
    for lane in settings.lanes:
        found.append(LaneQueue(lane.queue, "requests", lane.queue))
        found.extend(
            LaneQueue(
                lane.queue,
                "delay",
                delay_queue_name(lane.queue, seconds, settings.queue_type),
                seconds,
            )
            for seconds in DELAY_TIERS
        )
        found.append(
            LaneQueue(lane.queue, "dead letters", dead_letter_queue_for(settings, lane.queue))
        )
    return found


class ConsoleBroker:
    """Keeps ``fleet`` and :attr:`depths` current while :meth:`run` runs; reconnects."""

    def __init__(
        self, settings: Settings, fleet: Fleet, batches: GatewayBatches | None = None
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self.batches = batches if batches is not None else GatewayBatches()
        self.queues = lane_queues(settings)
        self.depths: dict[str, int | None] = {q.name: None for q in self.queues}
        self.consumers: dict[str, int | None] = {q.name: None for q in self.queues}
        self.connected = False
        self._connection: AbstractConnection | None = None
        self._dlq_lock = asyncio.Lock()
        self._listing: list[dict[str, Any]] = []
        self._listing_meta: dict[str, Any] = {}
        self._listing_key: tuple[int | None, ...] | None = None
        self._listing_at = 0.0
        self._first_seen: dict[str, float] = {}
        self.scans = 0  # dead-letter listings read from the broker
        self._scanning: set[str] = set()  # dead-letter queues a scan holds
        self.scan_seconds = 0.0  # how long the last one took

    @property
    def dead_letter_queues(self) -> list[LaneQueue]:
        return [q for q in self.queues if q.kind == "dead letters"]

    # --- the connection ------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, listen and poll until cancelled; a lost broker is retried every 2 s."""
        while True:
            try:
                connection = await self._connect()
                self._connection = connection
                try:
                    await self._listen(connection)
                    self.connected = True
                    log.info("console connected to the broker", queues=len(self.queues))
                    while not connection.is_closed:
                        await self._poll(connection)
                        await asyncio.sleep(POLL_INTERVAL)
                finally:
                    self.connected = False
                    self._connection = None
                    with contextlib.suppress(Exception):
                        await connection.close()
            except (OSError, RuntimeError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
                # RuntimeError: aio-pika's "channel/connection closed" states.
                log.warning("console lost the broker; retrying", error=repr(exc))
            await asyncio.sleep(POLL_INTERVAL)

    async def _connect(self) -> AbstractConnection:
        urls = self.settings.amqp_urls
        random.shuffle(urls)  # §13: spread consoles and workers over a cluster's nodes
        problem: Exception = OSError("no broker URL")
        for url in urls:
            try:
                return await aio_pika.connect(url, timeout=10)
            except (OSError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
                problem = exc
        raise problem

    async def _listen(self, connection: AbstractConnection) -> None:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            self.settings.events_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        await queue.consume(self._on_heartbeat, no_ack=True)

    async def _on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        # Anything may be published to the exchange: what is not a heartbeat (or a
        # gateway's status) is dropped and counted (the fleet and the batches check the
        # rest), never allowed to break the page.
        if len(message.body) > MAX_HEARTBEAT_BYTES:
            self.fleet.drop(f"{len(message.body)} bytes, over {MAX_HEARTBEAT_BYTES}")
            return
        try:
            body = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            self.fleet.drop("not JSON")
            return
        if not isinstance(body, dict):
            self.fleet.drop("not a JSON object")
            return
        if body.get("type") == EVENT_GATEWAY:
            if not self.batches.observe(body, time.time()) and self.batches.dropped == 1:
                log.warning("gateway status dropped", why=self.batches.last_drop)
            return
        if body.get("type") != "heartbeat":
            return  # another kind of event: not for this page
        if not self.fleet.observe(body, time.time()):
            # The first says why on the log; the rest are counted on the page.
            say = log.warning if self.fleet.dropped == 1 else log.debug
            say("heartbeat dropped", worker=str(body.get("worker"))[:100], why=self.fleet.last_drop)

    async def _poll(self, connection: AbstractConnection) -> None:
        channel: AbstractChannel = await connection.channel()
        try:
            for queue in self.queues:
                if channel.is_closed:
                    channel = await connection.channel()
                try:
                    declared = await channel.declare_queue(queue.name, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    # Not declared (yet): no worker of that lane has started.
                    self.depths[queue.name] = self.consumers[queue.name] = None
                    continue
                if queue.name in self._scanning:
                    # The letters a scan holds unacknowledged are not "ready": the depth
                    # would drop for the scan's length. The last depth stands meanwhile.
                    continue
                result = declared.declaration_result
                self.depths[queue.name] = result.message_count
                self.consumers[queue.name] = result.consumer_count
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    # --- dead letters --------------------------------------------------------------------

    @property
    def dead_letter_count(self) -> int:
        return sum(self.depths.get(q.name) or 0 for q in self.dead_letter_queues)

    def _cached_listing(self) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        key = tuple(self.depths.get(q.name) for q in self.dead_letter_queues)
        max_age = max(LISTING_MAX_AGE, LISTING_AGE_PER_SCAN * self.scan_seconds)
        fresh = time.monotonic() - self._listing_at < max_age
        if self._listing_key == key and fresh:
            return self._listing, self._listing_meta
        return None

    async def dead_letters(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Every dead letter (up to :data:`MAX_SCAN` a queue), described, never its body.

        One scan serves every request waiting for it: the cache is looked at again once the
        lock is held, so requests queued behind a scan take its listing rather than each
        reading the queues again in turn (the depths, the cache's key, hold still while a
        scan holds the letters)."""
        if (cached := self._cached_listing()) is not None:
            return cached
        async with self._dlq_lock:
            if (cached := self._cached_listing()) is not None:
                return cached
            # The key of what is read: depths as of now, before the scan begins.
            key = tuple(self.depths.get(q.name) for q in self.dead_letter_queues)
            connection = self._require_connection()
            listing: list[dict[str, Any]] = []
            truncated = False
            now = time.time()
            started = time.monotonic()
            for queue in self.dead_letter_queues:
                channel = await connection.channel()
                self._scanning.add(queue.name)
                try:
                    count = 0
                    messages = snapshot(channel, queue.name, limit=MAX_SCAN + 1)
                    async with contextlib.aclosing(messages):
                        async for message in messages:
                            if count >= MAX_SCAN:
                                truncated = True
                                break
                            listing.append(self._row(describe(message), queue, now))
                            count += 1
                except aiormq.exceptions.ChannelNotFoundEntity:
                    pass
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()  # every message goes back
                    self._scanning.discard(queue.name)
            seen = {row["key"] for row in listing}
            self._first_seen = {k: v for k, v in self._first_seen.items() if k in seen}
            self._listing = listing
            self._listing_meta = {"truncated": truncated, "listed_at": now}
            self._listing_key = key
            self._listing_at = time.monotonic()
            self.scans += 1
            self.scan_seconds = self._listing_at - started
            log.debug(
                "dead letters listed", letters=len(listing), seconds=round(self.scan_seconds, 3)
            )
            return listing, self._listing_meta

    def _row(self, letter: DeadLetter, queue: LaneQueue, now: float) -> dict[str, Any]:
        row = letter.as_dict()
        row.pop("timestamp")
        key = f"{queue.name}/{letter.job_id}"
        # Without a timestamp on the message, the age is counted from when the console
        # first saw it: an underestimate after a console restart, said so on the page.
        since = letter.timestamp or self._first_seen.setdefault(key, now)
        row.update(
            key=key,
            lane=queue.lane,
            queue=queue.name,
            since=since,
            age_known=letter.timestamp is not None,
        )
        return row

    async def replay(self, select: Callable[[DeadLetter], bool]) -> dict[str, int]:
        """Replay the selected dead letters of every lane to that lane; counts per lane.

        Raises :class:`~worker.amqp.dlq.ReplayFailed` at the first copy the broker refuses
        (that dead letter and the rest stay where they are).
        """
        replayed: dict[str, int] = {}
        async with self._dlq_lock:
            connection = self._require_connection()
            try:
                for queue in self.dead_letter_queues:
                    channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    try:
                        replayed[queue.lane] = await replay_from(
                            channel, queue.name, queue.lane, select
                        )
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        replayed[queue.lane] = 0
                    finally:
                        with contextlib.suppress(Exception):
                            await channel.close()
            finally:
                self._listing_key = None  # the next listing reads the queues again
        return replayed

    async def request_batch_cancel(self, batch_id: str) -> None:
        """Ask the gateways to cancel ``batch_id`` (``worker.amqp.control``), confirmed."""
        channel = await self._require_connection().channel(publisher_confirms=True)
        try:
            await publish_cancel_request(channel, self.settings.events_exchange, batch_id)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    def _require_connection(self) -> AbstractConnection:
        if self._connection is None or self._connection.is_closed:
            raise ConnectionError("the console is not connected to the broker")
        return self._connection
