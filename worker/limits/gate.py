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

Open, it paces calls on each budget it reads (requests, tokens) with a
:class:`~worker.limits.pacing.Pacer`, by the estimated cost of each call, capped
(:func:`estimate_tokens`, :data:`~worker.limits.pacing.MAX_CHARGE`) so that no single
request can hold the gate: a call that fails without usage (otherwise than for budget:
:meth:`Gate.release`'s ``failed``) gives its cost back.

Configured limits (rpm, tpm, max_concurrency) are a :class:`~worker.limits.configured.Quota`, local
or in Redis, checked after the gate lets a call through.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from worker.limits.configured import ConfiguredLimits, LocalQuota, Quota, RedisQuota
from worker.limits.headers import Budget, read_budget
from worker.limits.pacing import Pacer
from worker.messages import Endpoint

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
MIN_CLOSE = 0.05
NOT_A_WAIT = 0.01
PROBE_WAIT = 0.5  # poll while another call probes a cooled upstream
SCOUT_WAIT = 1.0  # the others wait this long at most for the first answer (a slow one)
PACE_RECHECK = 0.25  # a paced caller looks again this often (the rate may have grown)
CHARS_PER_TOKEN = 4  # the providers' own rule of thumb for an estimate before the call

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


def estimate_tokens(body: Mapping[str, Any], endpoint: Endpoint = "chat") -> int:
    """Tokens a request may use, before the call: its text at four characters a token,
    plus the completion it allows (``max_completion_tokens``/``max_tokens``, per choice),
    at most :data:`MAX_CALL_TOKENS` (the schema bounds neither). An embeddings request has
    no completion: its ``input``, strings at four characters a token and token arrays at
    their length."""
    if endpoint == "embeddings":
        return min(_input_tokens(body.get("input")), MAX_CALL_TOKENS)
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
        self._requests = Pacer()
        self._tokens = Pacer()
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
        call that ``failed`` without usage gives back the tokens it was charged (a call
        refused for budget is not ``failed`` so: the refusal says the budget is spent)."""
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
