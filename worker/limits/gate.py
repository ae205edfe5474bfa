"""One upstream's gate: whether a call may go now, from the budget it reports and its limits.

A :class:`Gate` knows no broker and no job: it is asked for a :class:`Permit` with a call's
estimated tokens, and fed every answer's status and headers. It is

- ``closed`` after a 429 (or a budget read as spent) until the budget returns: the
  ``retry-after`` asked for, else the time the spent budget needs to refill, else a
  backoff of its own that doubles while 429s go on. No header closes it for more than
  :data:`MAX_CLOSE`: after a longer ask, one call probes it (the others wait for its
  answer), and a success reopens it, as does any success of a call let through after the
  gate closed;
- ``cooling`` for :data:`QUOTA_COOLDOWN` after ``insufficient_quota``; then one call
  probes it, and the others wait for that probe's answer;
- ``open`` otherwise, and then it paces calls.

Pacing without a shared store: every replica reads the same organisation-wide figures
(``remaining`` of ``limit``). Between two readings a second or more apart, the budget
fell by what everybody spent less what refilled, so a replica measures everybody's
spending and knows its own, hence its share. It then spends at its share of
:data:`TARGET` of the refill rate, less when the remaining budget runs low. Replicas that
all do this add up to the target whatever their number, without talking to each other,
and a replica alone (or the only busy one) gets it all. While the budget reads full there
is nothing to measure: each replica then grows its rate by half a second until the
budget starts to fall. Tokens are paced the same way, by the estimated cost of each call,
capped (:func:`estimate_tokens`, :data:`MAX_CHARGE`) so that no single request can hold
the gate: a call that fails without usage gives its cost back.

Configured limits (rpm, tpm, max_concurrency) are a :class:`~worker.limits.configured.Quota`, local
or in Redis, checked after the gate lets a call through.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from worker.limits.configured import ConfiguredLimits, LocalQuota, Quota, RedisQuota
from worker.limits.headers import Budget, Dimension, read_budget

__all__ = ["Gate", "GateState", "Permit", "Wait", "estimate_tokens"]

log = structlog.get_logger(__name__)

QUOTA_COOLDOWN = 300.0  # contract §11: insufficient_quota cools an upstream for 5 minutes
CLOSE_BACKOFF = (1.0, 60.0)  # a 429 that says nothing: first close, longest close
# The longest a header closes the gate for (a retry-after of a year is a bug, not a plan);
# past it, one call finds out whether the budget is back.
MAX_CLOSE = 60.0
# No model takes more tokens in one call (context and completion together): the most a
# request's estimate can be, whatever max_tokens it asks for.
MAX_CALL_TOKENS = 1_000_000
# A call is charged at most this many seconds of the budget's refill when pacing: providers
# enforce their limits over windows about a second long (a dearer call waits for a full
# window, then goes), and one request's estimate must not space the next calls by minutes.
MAX_CHARGE = 1.0
MIN_CLOSE = 0.05
NOT_A_WAIT = 0.01
PROBE_WAIT = 0.5  # poll while another call probes a cooled upstream
# Pacing (see the module docstring).
TARGET = 0.95  # of the refill rate, for all replicas together: room for jitter in windows
SETPOINT = 0.3  # remaining fraction below which every replica slows down
START_SHARE = 0.25  # of the refill rate, before a replica has measured its share
GROWTH = 0.3  # relative growth a second while the budget reads full
WINDOW = 1.0  # seconds between the two readings a share is measured over
FULL = 0.995  # a remaining fraction at or above this reads as full (no spending seen)
MIN_SHARE = 0.02
FAIRNESS = 0.01  # of the refill rate, added to each replica's share per window
SCOUT_WAIT = 1.0  # the others wait this long at most for the first answer (a slow one)
PACE_RECHECK = 0.25  # a paced caller looks again this often (the rate may have grown)
BACKOFF_ON_429 = 0.7  # a 429 cuts a replica's paced rate by this factor
CHARS_PER_TOKEN = 4  # the providers' own rule of thumb for an estimate before the call
# A provider that reports its enforcing window's bucket (see _Pacer.scale): a scale below
# QUANTISED reads as the minute's figures; deficits below SCALE_MIN_DEFICIT of the limit
# are not measured.
QUANTISED = 2.0
SCALE_MAX = 3600.0
SCALE_MIN_DEFICIT = 0.01
SCALE_SMOOTHING = 0.2
WINDOW_FULL = 0.9

Sleep = Callable[[float], Awaitable[None]]

# When the current task's call was let through, what this replica had spent by then
# (requests, tokens), and the call's own tokens. A provider's figures describe the budget
# when it admitted the call, not when its answer arrived: timing a reading by its call's
# start keeps the latency (which varies from call to call) out of the spending measured
# between two readings.
_CALL: contextvars.ContextVar[tuple[float, float, float, float] | None] = contextvars.ContextVar(
    "gate_call", default=None
)


class GateState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    COOLING = "cooling"


@dataclass(slots=True)
class Permit:
    """Leave to make one call; hand it back to :meth:`Gate.release` after the answer.
    ``tokens``: charged to the configured limits; ``at`` and ``paced``: when the call was
    let through, and the tokens the pacer charged it."""

    tokens: int
    slot: str | None
    waited: float
    probe: bool = False
    at: float = 0.0
    paced: float = 0.0


@dataclass(frozen=True, slots=True)
class Wait:
    """No leave within the time offered: budget is expected in ``seconds``."""

    seconds: float
    waited: float
    quota: bool  # waiting for a spent quota (insufficient_quota), not for a rate limit


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Tokens a request may use, before the call: its text at four characters a token,
    plus the completion it allows (``max_completion_tokens``/``max_tokens``, per choice),
    at most :data:`MAX_CALL_TOKENS` (the schema bounds neither)."""
    chars = 0
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            chars += _chars(message.get("content")) + 4 * CHARS_PER_TOKEN
    for extra in ("tools", "response_format"):
        if body.get(extra):
            chars += len(str(body[extra]))
    completion = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    choices = body.get("n") or 1
    if not isinstance(completion, int) or not isinstance(choices, int):
        completion, choices = 0, 1
    estimate = chars // CHARS_PER_TOKEN + max(completion, 0) * max(choices, 1)
    return min(estimate, MAX_CALL_TOKENS)


def _chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return 0


class _Pacer:
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


class Gate:
    """The gate of one upstream (see the module docstring)."""

    def __init__(
        self,
        name: str = "default",
        quota: Quota | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep | None = None,
    ) -> None:
        self.name = name
        self.quota: Quota = quota or LocalQuota(ConfiguredLimits())
        self._clock = clock
        self._sleep: Sleep = sleep or _sleep
        self._requests = _Pacer()
        self._tokens = _Pacer()
        self._closed_until = 0.0
        self._closed = False  # the state last logged: a gate logs its changes only
        self._closed_at = 0.0  # when it last closed: a call let through later proves it open
        self._probe_first = False  # a long close is over: one call finds out before the rest
        self._cool_until = 0.0
        self._cooling = False
        self._probing = False  # a call probes (a cooled upstream, or the end of a long close)
        self._closes = 0  # 429s in a row without a hint: the backoff's exponent
        # Until an answer says what the budget is, one call finds out (for a second at most):
        # a replica starting with a full consumer prefetch would burst past any window.
        self._answered = False
        self._scouting = False
        self._scouted = 0.0  # when the scout went

    @classmethod
    def from_limits(
        cls,
        name: str,
        limits: ConfiguredLimits,
        *,
        redis_url: str | None = None,
        shared_as: str | None = None,
        lease_seconds: float = 600.0,
    ) -> Gate:
        """A gate with its configured limits: in Redis when ``redis_url`` is given, under
        the key ``shared_as`` (the upstream's name by default)."""
        if redis_url and limits.any:
            key = shared_as or name
            quota: Quota = RedisQuota(redis_url, key, limits, lease_seconds=lease_seconds)
        else:
            quota = LocalQuota(limits)
        return cls(name, quota)

    # --- what the metrics read -----------------------------------------------------------

    @property
    def state(self) -> GateState:
        now = self._clock()
        if self._cooling:
            return GateState.COOLING
        self._note_reopened(now)
        return GateState.CLOSED if self._closed else GateState.OPEN

    def remaining(self) -> dict[str, float]:
        """The budget as last read, by kind (``requests``, ``tokens``)."""
        return {
            kind: pacer.reading.remaining
            for kind, pacer in (("requests", self._requests), ("tokens", self._tokens))
            if pacer.reading is not None
        }

    @property
    def shared_limits_degraded(self) -> bool | None:
        """True while configured limits meant to be shared are kept in the process alone
        (Redis is away); None when they are not shared."""
        return self.quota.degraded

    # --- asking --------------------------------------------------------------------------

    async def admit(self, tokens: int, *, limit: float) -> Permit | Wait:
        """Leave for a call of ``tokens`` within ``limit`` seconds, else the :class:`Wait`
        expected. Waiting here holds the caller; longer waits are the caller's to take
        elsewhere (out of the process). Whatever happens on the way (a :class:`Wait`, an
        error, a cancellation), nothing taken for the call stays taken."""
        started = self._clock()
        quota_wait = False
        while True:
            now = self._clock()
            waited = now - started
            blocked, quota_wait = self._blocked(now)
            probe = blocked is None  # the probe of a cooled or long-closed upstream goes now
            if blocked is not None and blocked > 0:
                if waited + blocked > limit:
                    return Wait(blocked, waited, quota_wait)
                await self._sleep(blocked)
                continue
            if not probe:
                at = max(self._requests.next_start(now), self._tokens.next_start(now))
                if not self._answered and self._scouting and now - self._scouted < SCOUT_WAIT:
                    at = now + PACE_RECHECK / 5
                if at > now:
                    if waited + (at - now) > limit:
                        return Wait(at - now, waited, False)
                    await self._sleep(min(at - now, PACE_RECHECK))
                    continue
                if not self._answered and not self._scouting:
                    self._scouting, self._scouted = True, now
            else:
                self._probing = True
            self._requests.take(1, now)
            paced = self._tokens.take(tokens, now)
            _CALL.set((now, self._requests.spent, self._tokens.spent, paced))
            permit = Permit(self.quota.charge(tokens), None, 0.0, probe, now, paced)
            try:
                return await self._configured(permit, started, limit)
            except BaseException:
                self._undo(permit)
                raise

    async def _configured(self, permit: Permit, started: float, limit: float) -> Permit | Wait:
        """``permit`` once the configured limits allow it; a :class:`Wait` (nothing taken)
        when they do not within ``limit``."""
        waited = self._clock() - started
        wait = await self.quota.reserve(permit.tokens, max(limit - waited, 0.0))
        if wait > 0 and wait > limit - waited:
            self._undo(permit)
            return Wait(wait, waited, False)
        try:
            if wait > 0:
                await self._sleep(wait)
            slot = await self.quota.acquire_slot(max(limit - (self._clock() - started), 0.0))
        except BaseException:
            await _shielded(self.quota.correct(-permit.tokens, -1))
            raise
        if slot is None:
            self._undo(permit)
            await self.quota.correct(-permit.tokens, -1)
            return Wait(1.0, self._clock() - started, False)
        waited = self._clock() - started
        permit.slot = slot
        # Below this, the time is the asking itself (a scheduler's tick), not a wait.
        permit.waited = waited if waited >= NOT_A_WAIT else 0.0
        return permit

    def _undo(self, permit: Permit) -> None:
        """The call ``permit`` was made for will not go: give back what the gate took."""
        if permit.probe:
            self._probing = False
        self._scouting = False
        self._requests.refund(1, permit.at)
        self._tokens.refund(permit.paced, permit.at)

    def _blocked(self, now: float) -> tuple[float | None, bool]:
        """(seconds until a call may go, waiting for quota); None: go as the probe."""
        if self._cooling:
            if now < self._cool_until:
                return self._cool_until - now, True
            if self._probing:
                return PROBE_WAIT, True
            return None, True
        self._note_reopened(now)
        if now < self._closed_until:
            return self._closed_until - now, False
        if self._probe_first:
            return (PROBE_WAIT, False) if self._probing else (None, False)
        return 0.0, False

    async def release(
        self,
        permit: Permit,
        *,
        used_tokens: int | None = None,
        quota_spent: bool = False,
        failed: bool = False,
    ) -> None:
        """The call is over: free its slot, correct its tokens with the usage returned. A
        call that ``failed`` without usage gives back the tokens it was charged."""
        if permit.probe:
            self._probing = False
            if not quota_spent and self._cooling:
                self._cooling = False
                log.info("upstream gate open", upstream=self.name, reason="probe answered")
        self._scouting = False  # answered or not, the scout is back
        refund = failed and used_tokens is None
        if refund:
            self._tokens.refund(permit.paced, permit.at)
        try:
            if permit.slot is not None:
                await self.quota.release_slot(permit.slot)
        finally:
            if used_tokens is not None and used_tokens != permit.tokens:
                await self.quota.correct(used_tokens - permit.tokens)
            elif refund and permit.tokens:
                await self.quota.correct(-permit.tokens)

    async def aclose(self) -> None:
        await self.quota.aclose()

    # --- telling -------------------------------------------------------------------------

    def observe(self, status_code: int, headers: Mapping[str, str]) -> None:
        """Read an answer's budget; a 429 closes the gate. Called for every answer."""
        now = self._clock()
        self._answered = True
        budget = read_budget(headers)
        sent, requests, tokens, cost = _CALL.get() or (
            now,
            self._requests.spent,
            self._tokens.spent,
            0.0,
        )
        if budget.requests is not None:
            self._requests.read(budget.requests, sent, requests, now, own=1.0)
        if budget.tokens is not None:
            self._tokens.read(budget.tokens, sent, tokens, now, own=cost)
        if status_code == 429:
            self._requests.slowdown(now)
            self._tokens.slowdown(now)
            self.close(self._close_for(budget), reason="429")
            return
        if 200 <= status_code < 300:
            self._closes = 0
            if (self._closed or self._probe_first) and sent >= self._closed_at:
                self._reopen(now)  # let through after the gate closed, and answered
        if spent := max(self._requests.spent_out(1), self._tokens.spent_out(1)):
            self.close(spent, reason="budget spent")

    def _close_for(self, budget: Budget) -> float:
        if budget.retry_after is not None:
            return budget.retry_after
        if spent := max(self._requests.spent_out(1), self._tokens.spent_out(1)):
            return spent
        if budget.requests is not None or budget.tokens is not None:
            # Budget left for the minute, refused all the same: a short window is full.
            # It refills in about the time one call's cost takes to come back.
            return max(self._requests.one_call(), self._tokens.one_call(), MIN_CLOSE)
        self._closes += 1
        first, longest = CLOSE_BACKOFF
        return float(min(longest, first * 2 ** (self._closes - 1)))

    def close(self, seconds: float, *, reason: str) -> None:
        """Hold every call for ``seconds`` (or longer, if already held longer), at most
        :data:`MAX_CLOSE`: after a longer ask, one call probes before the others go."""
        now = self._clock()
        if seconds > MAX_CLOSE:
            self._probe_first = True
        until = now + min(max(seconds, MIN_CLOSE), MAX_CLOSE)
        if until <= self._closed_until:
            return
        self._closed_until = until
        if not self._closed:
            self._closed, self._closed_at = True, now
            log.info("upstream gate closed", upstream=self.name, reason=reason, seconds=seconds)

    def cool(self, seconds: float = QUOTA_COOLDOWN) -> None:
        """The quota is spent (``insufficient_quota``): hold calls, then let one probe."""
        self._cool_until = self._clock() + seconds
        if not self._cooling:
            self._cooling = True
            log.warning("upstream quota spent; cooling down", upstream=self.name, seconds=seconds)

    def _note_reopened(self, now: float) -> None:
        if self._closed and now >= self._closed_until and not self._probe_first:
            self._closed = False
            log.info("upstream gate open", upstream=self.name)

    def _reopen(self, now: float) -> None:
        self._closed_until = min(self._closed_until, now)
        self._probe_first = False
        if self._closed:
            self._closed = False
            log.info("upstream gate open", upstream=self.name, reason="call answered")


async def _shielded(step: Awaitable[None]) -> None:
    """Run a step that gives something back, even while the caller is being cancelled."""
    with contextlib.suppress(Exception):
        await asyncio.shield(step)
