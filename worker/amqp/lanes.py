"""Consuming several request queues (lanes) with weighted, work-conserving shares.

The worker's ``WORKER_CONCURRENCY`` slots are consumers of prefetch 1: a lane holds as many
slots as it has consumers on its queue, so a message is delivered only to a slot that is
free, runs at once, and never waits in the process for a slot (where another worker might
have run it sooner). RabbitMQ applies a consumer's prefetch when it starts consuming, and
quorum queues refuse a channel-wide (global) prefetch, so a lane grows by adding consumers
and shrinks by cancelling them: an idle one at once, else whichever busy one finishes first.

Every delivery, completion and poll re-plans the slots (:func:`plan`): weighted max-min
fairness over what each lane wants. A lane with jobs waiting in the broker is owed its
whole share; otherwise it wants its recent peak of jobs in flight plus some headroom, so a
lane with a trickle of jobs does not lend its slots out between two jobs. Slots nobody
wants are spread by weight. A lane with no free slot learns its backlog from a passive
declare every :data:`POLL_INTERVAL`; a lane with an idle slot has no backlog, or the
broker would have delivered it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from worker.settings import Lane

__all__ = ["LaneConsumer", "plan"]

log = structlog.get_logger(__name__)

#: seconds between two reads of the backlog of lanes that have no idle slot
POLL_INTERVAL = 0.05
#: seconds a lane keeps the slots of its recent peak demand before lending them out
HOLD = 1.0
#: slots over its peak demand a busy lane asks for, so that its next jobs start without
#: waiting for another lane's job to end: a quarter of the peak, at least one
HEADROOM_SHARE = 0.25

Handler = Callable[[AbstractIncomingMessage, str], Awaitable[None]]


def plan(capacity: int, weights: Mapping[str, int], wants: Mapping[str, int]) -> dict[str, int]:
    """Slots per lane: weighted max-min fair shares of ``capacity`` for what each lane wants;
    slots nobody wants are spread by weight too (an idle lane then has some to listen with).
    Integer shares by largest remainder, ties to the heavier lane; the sum is ``capacity``.
    """
    given = dict.fromkeys(weights, 0)
    remaining = capacity
    hungry = [name for name in weights if wants.get(name, 0) > 0]
    while hungry and remaining > 0:
        total = sum(weights[name] for name in hungry)
        content = [
            name
            for name in hungry
            if wants[name] - given[name] <= remaining * weights[name] / total
        ]
        if not content:
            _split(remaining, hungry, weights, given)
            return given
        for name in content:
            remaining -= wants[name] - given[name]
            given[name] = wants[name]
        hungry = [name for name in hungry if name not in content]
    # Slots nobody wants: one at a time to the lane furthest below its weighted share
    # (Sainte-Laguë divisors, so 64 slots at 4 : 1 are 51 : 13, as the hungry split).
    heap = [((given[n] + 0.5) / weights[n], -weights[n], n) for n in weights]
    heapq.heapify(heap)
    for _ in range(remaining):
        _, negative_weight, name = heapq.heappop(heap)
        given[name] += 1
        heapq.heappush(heap, ((given[name] + 0.5) / -negative_weight, negative_weight, name))
    return given


@functools.lru_cache(maxsize=1024)
def _cached_plan(
    capacity: int, weights: tuple[tuple[str, int], ...], wants: tuple[tuple[str, int], ...]
) -> dict[str, int]:
    # The plan runs on every delivery and completion; what lanes want changes far less often.
    return plan(capacity, dict(weights), dict(wants))


def _split(
    amount: int, names: Sequence[str], weights: Mapping[str, int], into: dict[str, int]
) -> None:
    total = sum(weights[name] for name in names)
    quotas = {name: amount * weights[name] / total for name in names}
    floors = {name: math.floor(quota) for name, quota in quotas.items()}
    left = amount - sum(floors.values())
    order = sorted(names, key=lambda n: (floors[n] - quotas[n], -weights[n], n))
    for name in order[:left]:
        floors[name] += 1
    for name, share in floors.items():
        into[name] += share


@dataclass(slots=True)
class _Slot:
    """One consumer of prefetch 1 on a lane's queue: one job at most."""

    busy: bool = False
    cancelled: bool = False


@dataclass(slots=True)
class _LaneState:
    lane: Lane
    channel: AbstractChannel
    queue: AbstractQueue
    slots: dict[str, _Slot] = field(default_factory=dict)
    starting: int = 0  # consumers asked for, not yet confirmed
    shrinking: int = 0  # busy slots to give up: the first ones whose job ends
    backlog: int = 0  # ready messages at the last poll (0 while a slot is idle)
    peak: int = 0
    peak_at: float = 0.0
    # Kept as the slots change (the plan reads them on every delivery and completion).
    n_active: int = 0  # slots not cancelled
    n_idle: int = 0  # ... of those, without a job
    n_busy: int = 0  # slots with a job, cancelled or not

    @property
    def held(self) -> int:
        """Slots counted against the capacity: every consumer, and jobs of cancelled ones."""
        return len(self.slots) + self.starting

    @property
    def active(self) -> int:
        return self.n_active + self.starting

    @property
    def in_flight(self) -> int:
        return self.n_busy

    @property
    def idle(self) -> bool:
        return self.n_idle > 0

    def add(self, tag: str) -> _Slot:
        slot = self.slots[tag] = _Slot()
        self.n_active += 1
        self.n_idle += 1
        return slot

    def deliver(self, tag: str) -> _Slot:
        slot = self.slots.get(tag) or self.add(tag)  # or: delivered before consume returned
        slot.busy = True
        self.n_busy += 1
        if not slot.cancelled:
            self.n_idle -= 1
        return slot

    def finish(self, tag: str, slot: _Slot) -> None:
        slot.busy = False
        self.n_busy -= 1
        if slot.cancelled:
            self.slots.pop(tag, None)
        else:
            self.n_idle += 1

    def mark_cancelled(self, slot: _Slot) -> None:
        slot.cancelled = True
        self.n_active -= 1
        if not slot.busy:
            self.n_idle -= 1

    def want(self, now: float, capacity: int) -> int:
        waiting = 0 if self.idle else self.backlog
        demand = self.in_flight + waiting
        if waiting:
            # Jobs wait in the broker for this lane: it is owed its whole weighted share
            # now, not one slot per poll; what it does not use goes back once none wait.
            self.peak, self.peak_at = max(self.peak, demand), now
            return capacity
        if demand >= self.peak:
            self.peak, self.peak_at = demand, now
        elif now - self.peak_at > HOLD:
            # Halve toward the demand, once a HOLD: a lane with a steady trickle keeps its
            # slots between two jobs, an emptied lane lends them all within a few seconds.
            self.peak, self.peak_at = max(demand, self.peak // 2), now
        return self.peak + math.ceil(self.peak * HEADROOM_SHARE) if self.peak else 0


class LaneConsumer:
    """Consumes every lane on channels of its own; see the module docstring.

    ``handler(message, lane)`` runs each job; it must settle the message before returning.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        lanes: Sequence[Lane],
        capacity: int,
        handler: Handler,
        *,
        on_lost: Callable[[], None],
    ) -> None:
        self.connection = connection
        self.capacity = capacity
        self.handler = handler
        self.on_lost = on_lost
        self._lanes_config = list(lanes)
        self._lanes: dict[str, _LaneState] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    async def start(self) -> None:
        """Open a channel per lane and place the first slots (raises on a broker error)."""
        for lane in self._lanes_config:
            channel = await self.connection.channel(publisher_confirms=False)
            channel.close_callbacks.add(lambda *_: self.on_lost())
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(lambda *_: self.on_lost())
            # Applies to each consumer started on this channel afterwards: one job each.
            await channel.set_qos(prefetch_count=1)
            queue = await channel.get_queue(lane.queue, ensure=False)
            self._lanes[lane.queue] = _LaneState(lane, channel, queue)
        # Backlogs are read on a channel of their own: the broker answers a channel's
        # methods in order, so a declare on a lane's channel would hold back its acks, and
        # with them the next deliveries of a saturated lane.
        poll = await self.connection.channel(publisher_confirms=False)
        poll.close_callbacks.add(lambda *_: self.on_lost())
        await self._reconcile()
        self._tasks = [
            asyncio.create_task(self._replan_loop()),
            asyncio.create_task(self._poll_loop(await poll.get_underlay_channel())),
        ]

    async def stop(self, *, cancel_consumers: bool = True) -> None:
        """Stop planning, and every delivery at once; jobs in flight go on (the caller
        drains them). After a lost connection there is nothing left to cancel."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not cancel_consumers:
            return
        for state in self._lanes.values():
            for tag, slot in list(state.slots.items()):
                if not slot.cancelled:
                    state.mark_cancelled(slot)
                    with contextlib.suppress(Exception):
                        await state.queue.cancel(tag)

    def in_flight(self) -> dict[str, int]:
        """Jobs in flight by lane (for heartbeats and tests)."""
        return {name: state.in_flight for name, state in self._lanes.items()}

    def slots(self) -> dict[str, int]:
        """Slots each lane holds now, cancelled ones with a job still running included."""
        return {name: state.held for name, state in self._lanes.items()}

    # --- deliveries ----------------------------------------------------------------------

    async def _on_message(self, state: _LaneState, message: AbstractIncomingMessage) -> None:
        tag = message.consumer_tag or ""
        slot = state.deliver(tag)
        self._wake.set()
        try:
            await self.handler(message, state.lane.queue)
        finally:
            state.finish(tag, slot)
            if not slot.cancelled and state.shrinking > 0 and not self._stopped:
                # The lane gives up whichever slot frees first, not one chosen in advance
                # (that one's job may have most of its time still to run).
                state.shrinking -= 1
                # A closed channel tells the worker through its close callback.
                with contextlib.suppress(
                    aiormq.exceptions.AMQPError, ConnectionError, RuntimeError
                ):
                    await self._cancel(state, tag, slot)
            self._wake.set()

    # --- planning ------------------------------------------------------------------------

    async def _replan_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._reconcile()
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                log.warning("could not move consumer slots between lanes", error=repr(exc))
                self.on_lost()
                return

    async def _poll_loop(self, channel: aiormq.abc.AbstractChannel) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            for state in self._lanes.values():
                if state.idle:
                    state.backlog = 0
                    continue
                try:
                    ok = await channel.queue_declare(state.lane.queue, passive=True)
                except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                    log.warning(
                        "could not read a lane's backlog", lane=state.lane.queue, error=repr(exc)
                    )
                    self.on_lost()
                    return
                state.backlog = ok.message_count or 0
            self._wake.set()  # also lets a held peak expire

    async def _reconcile(self) -> None:
        """Move slots toward :func:`plan`: cancel first (idle slots free at once), then add."""
        if self._stopped:
            return
        now = time.monotonic()
        states = self._lanes.values()
        targets = _cached_plan(
            self.capacity,
            tuple((s.lane.queue, s.lane.weight) for s in states),
            tuple((s.lane.queue, s.want(now, self.capacity)) for s in states),
        )
        for state in states:
            excess = state.active - targets[state.lane.queue]
            if excess > 0:
                await self._shrink(state, excess)
            else:
                state.shrinking = 0
        for state in states:
            free = self.capacity - sum(s.held for s in states)
            wanted = min(targets[state.lane.queue] - state.active, free)
            if wanted > 0 and not self._stopped:
                # Each consumer is a broker round trip (a Raft command on a quorum queue):
                # ask for them together.
                await asyncio.gather(*(self._grow(state) for _ in range(wanted)))

    async def _shrink(self, state: _LaneState, count: int) -> None:
        """Cancel idle slots now; leave the rest to the next jobs of the lane that end."""
        idle = [(t, s) for t, s in state.slots.items() if not s.cancelled and not s.busy]
        state.shrinking = max(0, count - len(idle))
        for tag, slot in idle[:count]:
            await self._cancel(state, tag, slot)

    @staticmethod
    async def _cancel(state: _LaneState, tag: str, slot: _Slot) -> None:
        # The slot counts until the broker confirms the cancel: a delivery already on its
        # way runs, and the slot is released when that job ends instead.
        state.mark_cancelled(slot)
        await state.queue.cancel(tag)
        if not slot.busy:
            state.slots.pop(tag, None)

    async def _grow(self, state: _LaneState) -> None:
        state.starting += 1
        try:
            tag = await state.queue.consume(partial(self._on_message, state))
        finally:
            state.starting -= 1
        if tag not in state.slots:
            state.add(tag)
