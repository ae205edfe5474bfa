"""One upstream's gate: whether a call may go now, from the budget it reports and its limits.

A :class:`Gate` knows no broker and no job: it is asked for a :class:`Permit` with a call's
estimated tokens, and fed every answer's status and headers. It is

- ``closed`` after a 429 (or a budget read as spent) until the budget returns: the
  ``retry-after`` asked for, else the time the spent budget needs to refill, else a
  backoff of its own that doubles while 429s go on;
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
budget starts to fall. Tokens are paced the same way, by the estimated cost of each call.

Configured limits (rpm, tpm, max_concurrency) are a :class:`~worker.limits.configured.Quota`, local
or in Redis, checked after the gate lets a call through.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from worker.limits.configured import ConfiguredLimits, LocalQuota, Quota, RedisQuota
from worker.limits.headers import Budget, Dimension, read_budget
from worker.messages import Endpoint

__all__ = ["Gate", "GateState", "Permit", "Wait", "estimate_tokens"]

log = structlog.get_logger(__name__)

QUOTA_COOLDOWN = 300.0  # contract §11: insufficient_quota cools an upstream for 5 minutes
CLOSE_BACKOFF = (1.0, 60.0)  # a 429 that says nothing: first close, longest close
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

Sleep = Callable[[float], Awaitable[None]]

# When the current task's call was let through, and what this replica had spent by then
# (requests, tokens). A provider's figures describe the budget when it admitted the call,
# not when its answer arrived: timing a reading by its call's start keeps the latency
# (which varies from call to call) out of the spending measured between two readings.
_CALL: contextvars.ContextVar[tuple[float, float, float] | None] = contextvars.ContextVar(
    "gate_call", default=None
)


class GateState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    COOLING = "cooling"


@dataclass(slots=True)
class Permit:
    """Leave to make one call; hand it back to :meth:`Gate.release` after the answer."""

    tokens: int
    slot: str | None
    waited: float
    probe: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    """No leave within the time offered: budget is expected in ``seconds``."""

    seconds: float
    waited: float
    quota: bool  # waiting for a spent quota (insufficient_quota), not for a rate limit


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def estimate_tokens(body: Mapping[str, Any], endpoint: Endpoint = "chat") -> int:
    """Tokens a request may use, before the call: its text at four characters a token,
    plus the completion it allows (``max_completion_tokens``/``max_tokens``, per choice).
    An embeddings request has no completion: its ``input``, strings at four characters a
    token and token arrays at their length."""
    if endpoint == "embeddings":
        return _input_tokens(body.get("input"))
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
    return chars // CHARS_PER_TOKEN + max(completion, 0) * max(choices, 1)


def _input_tokens(value: Any) -> int:
    if isinstance(value, str):
        return max(len(value) // CHARS_PER_TOKEN, 1)
    if isinstance(value, list) and value and not isinstance(value[0], str | list):
        return len(value)  # one token array
    if isinstance(value, list):
        return sum(_input_tokens(item) for item in value)
    return 0


def _chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return 0


class _Pacer:
    """One budget (requests or tokens) read from headers, and this replica's rate on it."""

    __slots__ = ("anchor", "last", "last_call", "rate", "reading", "slowed", "spent")

    def __init__(self) -> None:
        self.rate: float | None = None  # units a second this replica may spend
        self.last_call = (0.0, 0.0)  # (when, cost) of the last call let through
        self.spent = 0.0  # units this replica has spent, ever
        self.reading: Dimension | None = None
        self.anchor: tuple[float, float, float] | None = None  # (time, remaining, spent)
        self.last = 0.0
        self.slowed = -WINDOW  # when a 429 last cut the rate

    def read(self, dim: Dimension, sent: float, mine_now: float, now: float) -> None:
        """A reading of the budget as it was at ``sent``, when this replica had spent
        ``mine_now``; ``now`` is when it arrived."""
        refill = dim.refill_rate
        self.reading = dim
        if self.rate is None or self.anchor is None:
            self.rate = refill * START_SHARE
            self.anchor, self.last = (sent, dim.remaining, mine_now), now
            return
        if sent <= self.anchor[0]:
            return  # older than the anchor (answers arrive out of order): nothing to learn
        if dim.fraction >= FULL:
            # Nothing spent that we can see: the others are idle, or we all are too slow.
            self.rate = min(refill * TARGET, self.rate * (1 + GROWTH * (now - self.last)))
            self.anchor = (sent, dim.remaining, mine_now)
        elif sent - self.anchor[0] >= WINDOW:
            then, remaining, mine_then = self.anchor
            if remaining < dim.limit * FULL:
                everybody = refill * (sent - then) - (dim.remaining - remaining)
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
        return max(now, when + cost / self.rate)

    def take(self, cost: float, at: float) -> None:
        self.spent += cost
        self.last_call = (at, cost)

    def one_call(self) -> float:
        """Seconds the budget takes to refill the last call's cost (0 when unknown)."""
        if self.reading is None:
            return 0.0
        return min(self.last_call[1] / self.reading.refill_rate, 5.0)

    def spent_out(self, cost: float) -> float:
        """Seconds until the last reading's budget covers ``cost``; 0 when it does."""
        dim = self.reading
        if dim is None or dim.remaining >= min(cost, dim.limit):
            return 0.0
        return (min(cost, dim.limit) - dim.remaining) / dim.refill_rate


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
        self._cool_until = 0.0
        self._cooling = False
        self._probing = False
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

    # --- asking --------------------------------------------------------------------------

    async def admit(self, tokens: int, *, limit: float) -> Permit | Wait:
        """Leave for a call of ``tokens`` within ``limit`` seconds, else the :class:`Wait`
        expected. Waiting here holds the caller; longer waits are the caller's to take
        elsewhere (out of the process)."""
        started = self._clock()
        quota_wait = False
        while True:
            now = self._clock()
            waited = now - started
            blocked, quota_wait = self._blocked(now)
            if blocked is None:  # the probe of a cooled upstream goes now
                self._probing = True
                return await self._configured(tokens, started, limit, probe=True)
            if blocked > 0:
                if waited + blocked > limit:
                    return Wait(blocked, waited, quota_wait)
                await self._sleep(blocked)
                continue
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
            self._requests.take(1, now)
            self._tokens.take(tokens, now)
            _CALL.set((now, self._requests.spent, self._tokens.spent))
            return await self._configured(tokens, started, limit, probe=False)

    async def _configured(
        self, tokens: int, started: float, limit: float, *, probe: bool
    ) -> Permit | Wait:
        waited = self._clock() - started
        wait = await self.quota.reserve(tokens, max(limit - waited, 0.0))
        if wait > 0 and wait > limit - waited:
            self._probing = self._probing and not probe
            self._scouting = False
            return Wait(wait, waited, False)
        if wait > 0:
            await self._sleep(wait)
        slot = await self.quota.acquire_slot(max(limit - (self._clock() - started), 0.0))
        if slot is None:
            self._probing = self._probing and not probe
            self._scouting = False
            return Wait(1.0, self._clock() - started, False)
        waited = self._clock() - started
        # Below this, the time is the asking itself (a scheduler's tick), not a wait.
        return Permit(tokens, slot, waited if waited >= NOT_A_WAIT else 0.0, probe)

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
        return 0.0, False

    async def release(
        self, permit: Permit, *, used_tokens: int | None = None, quota_spent: bool = False
    ) -> None:
        """The call is over: free its slot, correct its tokens with the usage returned."""
        if permit.probe:
            self._probing = False
            if not quota_spent and self._cooling:
                self._cooling = False
                log.info("upstream gate open", upstream=self.name, reason="probe answered")
        self._scouting = False  # answered or not, the scout is back
        if permit.slot is not None:
            await self.quota.release_slot(permit.slot)
        if used_tokens is not None and used_tokens != permit.tokens:
            await self.quota.correct(used_tokens - permit.tokens)

    async def aclose(self) -> None:
        await self.quota.aclose()

    # --- telling -------------------------------------------------------------------------

    def observe(self, status_code: int, headers: Mapping[str, str]) -> None:
        """Read an answer's budget; a 429 closes the gate. Called for every answer."""
        now = self._clock()
        self._answered = True
        budget = read_budget(headers)
        sent, requests, tokens = _CALL.get() or (now, self._requests.spent, self._tokens.spent)
        if budget.requests is not None:
            self._requests.read(budget.requests, sent, requests, now)
        if budget.tokens is not None:
            self._tokens.read(budget.tokens, sent, tokens, now)
        if status_code == 429:
            self._requests.slowdown(now)
            self._tokens.slowdown(now)
            self.close(self._close_for(budget), reason="429")
            return
        if 200 <= status_code < 300:
            self._closes = 0
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
        """Hold every call for ``seconds`` (or longer, if already held longer)."""
        until = self._clock() + max(seconds, MIN_CLOSE)
        if until <= self._closed_until:
            return
        self._closed_until = until
        if not self._closed:
            self._closed = True
            log.info("upstream gate closed", upstream=self.name, reason=reason, seconds=seconds)

    def cool(self, seconds: float = QUOTA_COOLDOWN) -> None:
        """The quota is spent (``insufficient_quota``): hold calls, then let one probe."""
        self._cool_until = self._clock() + seconds
        if not self._cooling:
            self._cooling = True
            log.warning("upstream quota spent; cooling down", upstream=self.name, seconds=seconds)

    def _note_reopened(self, now: float) -> None:
        if self._closed and now >= self._closed_until:
            self._closed = False
            log.info("upstream gate open", upstream=self.name)
