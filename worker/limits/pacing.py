"""Pacing one budget an upstream reports (requests or tokens), without a shared store.

Every replica reads the same organisation-wide figures (``remaining`` of ``limit``).
Between two readings a second or more apart, the budget fell by what everybody spent less
what refilled, so a replica measures everybody's spending and knows its own, hence its
share. It then spends at its share of :data:`TARGET` of the refill rate, less when the
remaining budget runs low. Replicas that all do this add up to the target whatever their
number, without talking to each other, and a replica alone (or the only busy one) gets it
all. While the budget reads full there is nothing to measure: each replica then grows its
rate by a third a second until the budget starts to fall.

Some providers quantise and report the bucket that enforces the budget rather than the
minute (3,000 requests a minute as 50 a second, ``remaining`` that bucket's share of the
minute's limit: 60 a call). ``reset`` tells the two apart (:attr:`Pacer.scale`); such a
bucket is a second deep, so a reading counts as full while it is nearly so
(:data:`WINDOW_FULL`).
"""

from __future__ import annotations

import math

import structlog

from worker.limits.headers import Dimension

__all__ = ["MAX_CHARGE", "Pacer"]

log = structlog.get_logger(__name__)

TARGET = 0.95  # of the refill rate, for all replicas together: room for jitter in windows
SETPOINT = 0.3  # remaining fraction below which every replica slows down
START_SHARE = 0.25  # of the refill rate, before a replica has measured its share
GROWTH = 0.3  # relative growth a second while the budget reads full
WINDOW = 1.0  # seconds between the two readings a share is measured over
FULL = 0.995  # a remaining fraction at or above this reads as full (no spending seen)
MIN_SHARE = 0.02
FAIRNESS = 0.01  # of the refill rate, added to each replica's share per window
BACKOFF_ON_429 = 0.7  # a 429 cuts a replica's paced rate by this factor
# A call is charged at most this many seconds of the budget's refill: providers enforce
# their limits over windows about a second long (a dearer call waits for a full window,
# then goes), and one request's estimate must not space the next calls by minutes.
MAX_CHARGE = 1.0
# A provider that reports its enforcing window's bucket (see Pacer.scale): a scale below
# QUANTISED reads as the minute's figures; deficits below SCALE_MIN_DEFICIT of the limit
# are not measured; such a bucket at WINDOW_FULL or more reads as full.
QUANTISED = 2.0
SCALE_MAX = 3600.0
SCALE_MIN_DEFICIT = 0.01
SCALE_SMOOTHING = 0.2
WINDOW_FULL = 0.9


class Pacer:
    """One budget (requests or tokens) read from headers, and this replica's rate on it."""

    __slots__ = ("anchor", "last", "last_call", "log_scale", "rate", "reading", "slowed", "spent")

    def __init__(self) -> None:
        self.log_scale = 0.0  # of the units ``remaining`` counts in (see ``scale``)
        self.rate: float | None = None  # units a second this replica may spend
        self.last_call = (0.0, 0.0)  # (when, cost) of the last call let through
        self.spent = 0.0  # units this replica has spent, ever
        self.reading: Dimension | None = None
        self.anchor: tuple[float, float, float] | None = None  # (time, remaining, spent)
        self.last = 0.0
        self.slowed = -WINDOW  # when a 429 last cut the rate

    @property
    def scale(self) -> float:
        """Units of ``remaining`` one unit of budget takes: 1 for the minute's figures; the
        minute over the window for a provider that reports its enforcing window's bucket as
        a share of the minute's limit (3,000 a minute as 50 a second: 60 a call)."""
        scale = math.exp(self.log_scale)
        return scale if scale >= QUANTISED else 1.0

    def _learn_scale(self, dim: Dimension) -> None:
        # ``reset`` is the time until the budget is full: (limit - remaining) / reset is the
        # rate ``remaining`` refills at, in its own units; over the budget's refill rate,
        # the units one call's unit takes. Small deficits say nothing (whole numbers, resets
        # rounded to the millisecond); estimates are smoothed in log space.
        deficit = dim.limit - dim.remaining
        if dim.reset is None or dim.reset <= 0 or deficit < dim.limit * SCALE_MIN_DEFICIT:
            return
        seen = min(max(deficit / dim.reset / dim.refill_rate, 1.0), SCALE_MAX)
        self.log_scale += SCALE_SMOOTHING * (math.log(seen) - self.log_scale)

    def read(
        self, dim: Dimension, sent: float, mine_now: float, now: float, own: float = 0.0
    ) -> None:
        """A reading of the budget as it was at ``sent``, when this replica had spent
        ``mine_now``; ``now`` is when it arrived, ``own`` the cost of the call it came
        with (which the reading includes)."""
        self._learn_scale(dim)
        refill = dim.refill_rate
        self.reading = dim
        if self.rate is None or self.anchor is None:
            self.rate = refill * START_SHARE
            self.anchor, self.last = (sent, dim.remaining, mine_now), now
            return
        if sent <= self.anchor[0]:
            return  # older than the anchor (answers arrive out of order): nothing to learn
        if self._full(dim, own):
            # Nothing spent that we can see: the others are idle, or we all are too slow.
            self.rate = min(refill * TARGET, self.rate * (1 + GROWTH * (now - self.last)))
            self.anchor = (sent, dim.remaining, mine_now)
        elif sent - self.anchor[0] >= WINDOW:
            then, remaining, mine_then = self.anchor
            if remaining < dim.limit * FULL:
                fell = (remaining - dim.remaining) / self.scale
                everybody = refill * (sent - then) + fell
                mine = mine_now - mine_then
                if everybody > 0:
                    share = min(max(mine / everybody, MIN_SHARE), 1.0)
                    level = min(1.0, TARGET + (dim.fraction - SETPOINT))
                    # The additive part makes shares fair over time (a replica that started
                    # late or was slowed by a 429 gains on the others), as in TCP's AIMD.
                    wanted = refill * (share * max(level, 0.2) + FAIRNESS)
                    self.rate = (self.rate + wanted) / 2  # halfway: readings are noisy
                    log.debug(
                        "pace",
                        share=round(share, 3),
                        rate=round(self.rate, 2),
                        fraction=round(dim.fraction, 3),
                        refill=refill,
                    )
            self.anchor = (sent, dim.remaining, mine_now)
        self.last = now

    def _full(self, dim: Dimension, own: float) -> bool:
        """The reading shows no spending but the call it came with. A window's bucket
        (scale above 1) is a second deep: one call is a visible part of it."""
        scale = self.scale
        if scale == 1.0:
            return dim.fraction >= FULL
        if dim.fraction >= WINDOW_FULL:
            return True
        return dim.limit - dim.remaining <= own * scale + dim.limit * (1 - FULL)

    def slowdown(self, now: float) -> None:
        # Once a window: the 429s of one burst are one signal, not one each.
        if self.rate is not None and now - self.slowed >= WINDOW:
            self.rate *= BACKOFF_ON_429
            self.slowed = now

    def next_start(self, now: float) -> float:
        """When the next call may go, at the rate as it is now (not as it was when the
        caller started to wait: a rate that grows is used at once)."""
        if not self.rate:
            return now
        when, cost = self.last_call
        return max(now, when + self._capped(cost) / self.rate)

    def _capped(self, cost: float) -> float:
        """At most :data:`MAX_CHARGE` seconds of the budget (cost as it is, unread)."""
        if self.reading is None:
            return cost
        return min(cost, self.reading.refill_rate * MAX_CHARGE)

    def take(self, cost: float, at: float) -> float:
        """Charge a call let through at ``at``; returns what was charged."""
        cost = self._capped(cost)
        self.spent += cost
        self.last_call = (at, cost)
        return cost

    def refund(self, cost: float, at: float) -> None:
        """Give back what the call let through at ``at`` was charged: it did not spend it."""
        self.spent -= cost
        when, last = self.last_call
        if when == at:
            self.last_call = (when, max(last - cost, 0.0))

    def one_call(self) -> float:
        """Seconds the budget takes to refill the last call's cost (0 when unknown)."""
        if self.reading is None:
            return 0.0
        return min(self._capped(self.last_call[1]) / self.reading.refill_rate, 5.0)

    def spent_out(self, cost: float) -> float:
        """Seconds until the last reading's budget covers ``cost``; 0 when it does."""
        dim = self.reading
        if dim is None:
            return 0.0
        need = min(cost * self.scale, dim.limit)
        if dim.remaining >= need:
            return 0.0
        return (need - dim.remaining) / (dim.refill_rate * self.scale)
