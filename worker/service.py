"""The worker's life, top to bottom: connect, declare, consume, drain on a signal, reconnect.

What happens to one delivery, and the settlement rules, are :mod:`worker.delivery`'s.
A drain is bounded as a whole (:mod:`worker.stopping`): the first signal sets a deadline
``WORKER_SHUTDOWN_GRACE`` away, and every step (the heartbeat's channel, the consumers'
cancel, the jobs in flight, the connection's close) gives up when it passes, for a
blocked broker (a resource alarm) reads nothing and answers nothing; a second signal ends
every step at once.

While the broker blocks the connection (a resource alarm, :mod:`worker.amqp.blocked`), no
new job starts, ``/readyz`` answers 503, and deltas stop waiting for their confirms (the
result waits for them), so the wait is not charged to the upstream's idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Awaitable
from functools import partial
from typing import Any

import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from worker.amqp.blocked import BlockedState, follow_blocking
from worker.amqp.cancellations import follow_cancellations
from worker.amqp.connect import Nodes, NoNodeAnswers, connect_any, redact
from worker.amqp.lanes import LaneConsumer
from worker.amqp.publish import Publisher
from worker.amqp.topology import TopologyUnavailable, declare
from worker.amqp.watchdog import ConfirmWatchdog
from worker.delivery import DeliveryHandler, release
from worker.heartbeat import Heartbeat, JobStats
from worker.payonce import open_pay_once
from worker.runner import JobRunner
from worker.settings import Settings
from worker.spend import Spending
from worker.stopping import Stop
from worker.telemetry import Telemetry
from worker.upstream.client import Upstream
from worker.upstream.pool import UpstreamPool

__all__ = ["BrokerUnavailable", "Worker"]

log = structlog.get_logger(__name__)

# Not consuming for this long (at start or after a lost connection) ends the process with
# an error, so that an orchestrator restarts it rather than keeping a silent zombie.
RESUME_DEADLINE = 60.0
RECONNECT_MAX_DELAY = 5.0
# A connection lost within QUICK_LOSS seconds of opening (a message that makes the broker
# close it, a flapping node) is not reopened at once, again and again: from the second
# such loss in a row, the worker pauses first, RECONNECT_PAUSE doubling up to
# RECONNECT_MAX_DELAY (a first loss reconnects at once: a node gone, another one answers).
QUICK_LOSS = 30.0
RECONNECT_PAUSE = 0.5
CONNECT_TIMEOUT = 10.0
# How often queues that were out of reach at start are declared again.
REDECLARE_INTERVAL = 5.0
# How long closing a lost connection (its heartbeat, its consumers) may take: the broker
# may not answer at all.
CLOSE_TIMEOUT = 5.0
# A clean close takes milliseconds; it gets this long even when the grace has run out.
LAST_CLOSE = 1.0


class BrokerUnavailable(RuntimeError):
    """The worker could not (re)start consuming within :data:`RESUME_DEADLINE`."""


class Worker:
    """Consumes the request queue until :meth:`stop`; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        upstream: Upstream | UpstreamPool | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry or Telemetry()
        self.runner = JobRunner(
            settings,
            upstream
            or UpstreamPool.from_specs(settings.upstreams, max_connections=settings.concurrency),
            self.telemetry,
        )
        self.upstreams = self.runner.pool
        self.telemetry.allowed_models = settings.allowed_models
        self.blocking = BlockedState()
        self.identity = f"{socket.gethostname()}/{os.getpid()}"
        self._consuming = asyncio.Event()
        self._stop = Stop(settings.shutdown_grace)
        self._draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._publisher: Publisher | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag = ""
        self._lane_consumer: LaneConsumer | None = None  # with several lanes (§12)
        self._interrupted = asyncio.Event()
        self._not_consuming_since = time.monotonic()
        self._nodes = Nodes(settings.amqp_urls)
        self._node = ""  # the node consumed from, without credentials
        # Queues out of reach (a node down): consuming goes on; they are declared again.
        self._missing: dict[str, str] = {}
        self._redeclare: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.telemetry.watch_in_flight(lambda: len(self._tasks))
        self.stats = JobStats()
        self.once = open_pay_once(settings)
        self.spending = Spending(settings, self.runner.pool)
        if self.once is not None:
            self.telemetry.watch_store(self.once.store.metrics)
        self.delivery = DeliveryHandler(
            settings,
            self.runner,
            self.telemetry,
            self.stats,
            self.blocking,
            self.identity,
            self.once,
            self.spending,
            stopping=self._stop.requested,
        )
        self.heartbeat = Heartbeat(
            settings,
            self.identity,
            self.stats,
            ready=lambda: self.ready,
            in_flight=lambda: self.in_flight,
            lanes=self.in_flight_by_lane,
            upstreams=self.upstreams.gates,
            store=self.once.store.metrics.snapshot if self.once is not None else None,
        )

    @property
    def ready(self) -> bool:
        """Connected to the broker, consuming and not blocked: what ``/readyz`` reports."""
        return self._consuming.is_set() and not self.blocking.blocked

    @property
    def readiness(self) -> str:
        """Why ``/readyz`` answers as it does, in a few words."""
        if not self._consuming.is_set():
            return "not consuming"
        if self.blocking.blocked:
            return f"broker connection blocked: {self.blocking.reason}"
        if self._missing:  # consuming all the same: still ready (§13)
            return "degraded"
        return "ready"

    def readiness_details(self) -> dict[str, Any]:
        """The rest of ``/readyz``'s body: the node in use and, while degraded, the queues
        out of reach (a node down) with why."""
        if not self._consuming.is_set():
            return {}
        details: dict[str, Any] = {"node": self._node}
        if self._missing:
            details["unavailable"] = dict(self._missing)
        return details

    async def wait_ready(self) -> None:
        await self._consuming.wait()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def in_flight_by_lane(self) -> dict[str, int]:
        """Jobs in flight by lane (request queue), every lane named."""
        if self._lane_consumer is not None:
            return self._lane_consumer.in_flight()
        return {self.settings.lanes[0].queue: len(self._tasks)}

    def stop(self) -> None:
        """Stop taking jobs and drain (first call); end at once (second call)."""
        self._stop.signal()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def run(self) -> None:
        """Serve until stopped. Raises :class:`BrokerUnavailable` when consuming cannot
        (re)start within :data:`RESUME_DEADLINE`."""
        quick_losses = 0
        try:
            while not self._stop.requested.is_set():
                self._not_consuming_since = time.monotonic()
                if quick_losses > 1:
                    pause = min(RECONNECT_PAUSE * 2 ** (quick_losses - 2), RECONNECT_MAX_DELAY)
                    log.warning(
                        "connection lost soon after it opened again; pausing first",
                        losses_in_a_row=quick_losses,
                        pause_s=pause,
                    )
                    await self._stop.pause(pause)
                connection = await self._connect()
                if connection is None:
                    break
                opened = time.monotonic()
                await self._serve(connection)
                quick = time.monotonic() - opened < QUICK_LOSS
                quick_losses = quick_losses + 1 if quick else 0
        finally:
            await self.upstreams.aclose()
            await self.runner.aclose()
            if self.once is not None:
                await self.once.store.aclose()
            await self.spending.aclose()
        log.info("worker stopped")

    def _check_deadline(self, problem: object) -> None:
        if time.monotonic() - self._not_consuming_since >= RESUME_DEADLINE:
            raise BrokerUnavailable(f"not consuming for {RESUME_DEADLINE:g}s: {problem!r}")

    async def _connect(self) -> AbstractConnection | None:
        """Connect to a node that answers (§13: the next one after a loss) and consume."""
        delay = 0.2
        while not self._stop.requested.is_set():
            try:
                connection = await connect_any(
                    self._nodes,
                    name=f"chat-worker {self.identity}",
                    wait=CONNECT_TIMEOUT,
                    log_failures=True,
                    heartbeat=self.settings.amqp_heartbeat,
                )
                if await self._start_consuming(connection):
                    return connection
                problem: object = "could not declare the topology or start the consumer"
            except NoNodeAnswers as exc:
                problem = exc
            self._check_deadline(problem)
            log.warning("broker unavailable; retrying", error=repr(problem), retry_in=delay)
            await self._stop.pause(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
        return None

    async def _start_consuming(self, connection: AbstractConnection) -> bool:
        """Declare, open the confirm channel, start the consumer; False if any step failed."""
        self._interrupted = asyncio.Event()
        interrupted = self._interrupted
        try:
            connection.close_callbacks.add(lambda *_: interrupted.set())
            follow_blocking(connection, self.blocking)
            self._missing = await declare(connection, self.settings)
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            channel.close_callbacks.add(lambda *_: interrupted.set())
            underlay = await channel.get_underlay_channel()
            # A broker-side basic.cancel (queue deleted, node down) leaves the connection
            # up and the consumer silently gone: treat it as a loss and start again.
            underlay.on_consumer_cancel_callbacks.add(lambda *_: interrupted.set())
            self._publisher = await Publisher.open(channel, self.settings)
            # Batch cancellations (§15): jobs of a cancelled batch are not called.
            await follow_cancellations(
                connection, self.settings.events_exchange, self.delivery.cancelled
            )
            probes = (
                await ConfirmWatchdog.open(connection) if self.settings.amqp_heartbeat else None
            )
            await self._consume(connection, channel, interrupted)
        except (OSError, aiormq.exceptions.AMQPError, TimeoutError, TopologyUnavailable) as exc:
            log.warning("could not start consuming", error=repr(exc))
            await _close_quietly(connection)
            return False
        self._node = redact(self._nodes.current or "")
        log.info("connected", node=self._node, queues_out_of_reach=len(self._missing))
        if self._missing:
            self._redeclare = asyncio.create_task(self._declare_missing(connection))
        if probes is not None:
            watchdog = ConfirmWatchdog(self.settings.amqp_heartbeat, self.blocking, interrupted.set)
            self._watchdog = asyncio.create_task(watchdog.watch(probes), name="watchdog")
        return True

    async def _declare_missing(self, connection: AbstractConnection) -> None:
        """Declare again, until all is there, what was out of reach at start (§13)."""
        while self._missing and not connection.is_closed:
            await asyncio.sleep(REDECLARE_INTERVAL)
            try:
                self._missing = await declare(connection, self.settings)
            except (OSError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
                log.info("could not declare the missing queues yet", error=repr(exc))
            except TopologyUnavailable as exc:  # the consumer notices on its own
                log.warning("request queue out of reach", error=str(exc))
        if not self._missing:
            log.info("every queue declared again")

    async def _consume(
        self, connection: AbstractConnection, channel: AbstractChannel, interrupted: asyncio.Event
    ) -> None:
        """One lane: one consumer with prefetch ``WORKER_CONCURRENCY`` on the publishing
        channel, as always. Several: :class:`~worker.amqp.lanes.LaneConsumer` shares the slots."""
        lanes = self.settings.lanes
        self._lane_consumer = None
        if len(lanes) == 1:
            await channel.set_qos(prefetch_count=self.settings.concurrency)
            self._queue = await channel.get_queue(lanes[0].queue, ensure=False)
            self._consumer_tag = await self._queue.consume(
                partial(self._on_message, lane=lanes[0].queue)
            )
            return
        self._queue = None
        self._lane_consumer = LaneConsumer(
            connection, lanes, self.settings.concurrency, self._on_message, on_lost=interrupted.set
        )
        await self._lane_consumer.start()

    async def _serve(self, connection: AbstractConnection) -> None:
        """Consume until a stop (drain, then close) or a loss (drop in-flight jobs, return)."""
        self._consuming.set()
        self.heartbeat.start(connection)
        log.info(
            "consuming",
            lanes={lane.queue: lane.weight for lane in self.settings.lanes},
            prefetch=self.settings.concurrency,
            worker=self.identity,
        )
        stop = asyncio.ensure_future(self._stop.requested.wait())
        lost = asyncio.ensure_future(self._interrupted.wait())
        await asyncio.wait({stop, lost}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        lost.cancel()
        self._consuming.clear()
        for task in (self._redeclare, self._watchdog):
            if task is not None:
                task.cancel()
        self._redeclare = self._watchdog = None
        if self._stop.requested.is_set():
            await self._drain(self._queue, self._consumer_tag, self._stop.deadline)
            last = max(self._stop.deadline, time.monotonic() + LAST_CLOSE)
            await self._stop.within(last, "closing the connection", _close_quietly(connection))
            return
        log.warning("broker connection or consumer lost; reconnecting")
        deadline = time.monotonic() + CLOSE_TIMEOUT
        await self._stop.within(deadline, "stopping the heartbeat", self.heartbeat.stop())
        # Jobs in flight cannot be acknowledged on a new channel: the broker has
        # already put them back, so stop paying for their upstream calls.
        for task in list(self._tasks):
            task.cancel()
        if self._lane_consumer is not None:
            await self._lane_consumer.stop(cancel_consumers=False)
        await self._stop.within(deadline, "closing the connection", _close_quietly(connection))

    async def _drain(self, queue: AbstractQueue | None, tag: str, deadline: float) -> None:
        """Stop deliveries and heartbeats at once; give in-flight jobs until ``deadline``;
        cancel the rest. No wait outlasts the deadline or a second signal."""
        self._draining = True  # a delivery still on its way is not started
        pending = set(self._tasks) | self.delivery.orphans
        log.info(
            "draining",
            in_flight=len(pending),
            grace_seconds=round(max(deadline - time.monotonic(), 0.0), 1),
        )
        quiet = asyncio.ensure_future(self._quiet(queue, tag))
        await self._stop.until(deadline, {quiet, *pending})
        if not quiet.done():
            log.warning("gave up waiting for the broker to cancel the consumers")
            quiet.cancel()
        pending = {task for task in pending if not task.done()}
        if pending:
            log.warning("returning unfinished jobs to the queue", jobs=len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=LAST_CLOSE)

    async def _quiet(self, queue: AbstractQueue | None, tag: str) -> None:
        """Cancel the consumers and stop the heartbeat (a blocked broker never answers)."""
        steps: list[Awaitable[Any]] = [self.heartbeat.stop()]
        if queue is not None:
            steps.append(queue.cancel(tag))
        if self._lane_consumer is not None:
            steps.append(self._lane_consumer.stop())
        await asyncio.gather(*steps, return_exceptions=True)

    # --- one delivery ----------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage, lane: str) -> None:
        received = time.monotonic()  # the broker's consumer timeout runs from now
        if self._draining:
            return  # not acknowledged: it goes back to the queue when the channel closes
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.blocking.blocked and not await self._wait_unblocked():
                return  # draining: not acknowledged, it goes back to the queue
            await self._handle(message, lane, received)
        except asyncio.CancelledError:
            raise
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            # A copy was refused, a publish failed or the channel is gone.
            log.warning("could not settle a job; it will be redelivered", error=repr(exc))
            await self._release(message)
        except Exception:
            log.exception("bug while handling a job; it will be redelivered")
            await self._release(message)
        finally:
            self._tasks.discard(task)

    async def _wait_unblocked(self) -> bool:
        """Hold a new delivery while the broker blocks the connection; False on a stop."""
        unblocked = asyncio.ensure_future(self.blocking.wait_unblocked())
        stopping = asyncio.ensure_future(self._stop.requested.wait())
        try:
            await asyncio.wait({unblocked, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            unblocked.cancel()
            stopping.cancel()
        return not self._stop.requested.is_set()

    async def _release(self, message: AbstractIncomingMessage) -> None:
        await release(message, self._stop.requested)

    async def _handle(self, message: AbstractIncomingMessage, lane: str, received: float) -> None:
        assert self._publisher is not None
        await self.delivery.handle(message, lane, self._publisher, received)


async def _close_quietly(connection: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await connection.close()
