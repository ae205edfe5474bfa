"""Configured limits of one upstream (rpm, tpm, max_concurrency): in the process, or in Redis.

Both stores keep rpm and tpm as token buckets that refill continuously and hold at most one
second of budget, so calls are spread over the minute the way providers enforce their own
limits (quantised over short windows), never bursted at its start. A reservation may run
into the future (the bucket goes negative): the caller is told how long to wait and its
place is kept, so waiters are served in order without polling. Tokens are estimated before
the call and corrected with the usage after it, refunds included.

One call is charged at most one bucket up front (:meth:`Quota.charge`): an estimate is a
guess, and a request that asks for a billion tokens must not hold every later call for
hours. The usage the answer reports corrects the charge; a call that fails without one
(otherwise than for budget) gives its charge back.

The Redis store does each step in one Lua script on the server's clock, so every replica
sees one exact budget; concurrency is a sorted set of leases that expire, so a replica
that dies without releasing its slots gives them back, and that a replica renews while its
call runs (a stream may outlast any fixed lease). While Redis is away (down, cut, too slow)
the store keeps the same limits in the process, says so once in the log and in
:attr:`RedisQuota.degraded`, and goes back to Redis by itself when it answers again.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from worker.store.circuit import Circuit, CircuitState
from worker.store.outcomes import Skipped

__all__ = ["ConfiguredLimits", "LocalQuota", "Quota", "RedisQuota"]

log = structlog.get_logger(__name__)

# How long a Redis concurrency lease lives without a release or a renewal: past the longest
# silence of a call, so only a dead replica's leases expire. A held lease is renewed every
# third of it.
LEASE_MARGIN = 60.0
RENEW_EVERY = 1 / 3
SLOT_POLL = (0.005, 0.05)  # seconds between tries for a shared slot: first, longest
# Redis answers a limit's script in a millisecond; past this (a loaded event loop included)
# it is away, and the limits are kept in the process. Then it is asked again after the
# back-off (doubling from the first to the longest) until it answers.
REDIS_TIMEOUT = 2.0
REDIS_BACKOFF = (0.5, 5.0)
LOCAL_SLOT = "local"  # the id of a slot held in the process, not in Redis


@dataclass(frozen=True, slots=True)
class ConfiguredLimits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.max_concurrency))


class Quota(Protocol):
    """What :class:`worker.limits.gate.Gate` asks of a store of configured limits."""

    @property
    def degraded(self) -> bool | None:
        """True while limits meant to be shared are kept in the process alone; None for a
        store that is never shared."""

    def charge(self, tokens: int) -> int:
        """The tokens a call estimated at ``tokens`` is charged up front: at most a full
        bucket (:meth:`reserve` takes no more, whatever it is asked)."""

    async def reserve(self, tokens: int, horizon: float) -> float:
        """Seconds until a call of ``tokens`` may go. At most ``horizon``: the budget is
        taken (the caller must wait that long, then call). Over it: nothing is taken."""

    async def correct(self, tokens: int, requests: int = 0) -> None:
        """Add ``tokens`` and ``requests`` (negative: give back) to what was spent."""

    async def acquire_slot(self, within: float) -> str | None:
        """A concurrency slot's id, or None when none freed within ``within`` seconds."""

    async def release_slot(self, slot: str) -> None: ...

    async def aclose(self) -> None: ...


def _bucket(limit: int | None) -> tuple[float, float]:
    """(rate a second, capacity) of a per-minute limit; (0, 0) when there is none."""
    if limit is None:
        return 0.0, 0.0
    rate = limit / 60.0
    return rate, max(rate, 1.0)


class _Bucket:
    """A continuous token bucket that may be overdrawn by reservations."""

    def __init__(self, limit: int, clock: Any) -> None:
        self.rate, self.capacity = _bucket(limit)
        self.level = self.capacity
        self.clock = clock
        self.updated = clock()

    def refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, cost: float) -> float:
        # A call is charged at most a full bucket (``charge``): it waits for a full one,
        # not for ever; its usage, once known, may overdraw the bucket, and the calls after
        # it then wait for the debt, so the rate holds.
        cost = min(cost, self.capacity)
        return 0.0 if self.level >= cost else (cost - self.level) / self.rate


def _charge(tokens: int, capacity: float) -> int:
    return min(tokens, int(capacity)) if capacity else tokens


class LocalQuota:
    """Configured limits of this process alone."""

    def __init__(self, limits: ConfiguredLimits, clock: Any = time.monotonic) -> None:
        self._rpm = None if limits.rpm is None else _Bucket(limits.rpm, clock)
        self._tpm = None if limits.tpm is None else _Bucket(limits.tpm, clock)
        self._slots = (
            None if limits.max_concurrency is None else asyncio.Semaphore(limits.max_concurrency)
        )

    @property
    def degraded(self) -> bool | None:
        return None

    def charge(self, tokens: int) -> int:
        return tokens if self._tpm is None else _charge(tokens, self._tpm.capacity)

    async def reserve(self, tokens: int, horizon: float) -> float:
        tokens = self.charge(tokens)
        wait = 0.0
        for bucket, cost in ((self._rpm, 1.0), (self._tpm, float(tokens))):
            if bucket is not None:
                bucket.refill()
                wait = max(wait, bucket.wait_for(cost))
        if wait > horizon:
            return wait
        if self._rpm is not None:
            self._rpm.level -= 1
        if self._tpm is not None:
            self._tpm.level -= tokens
        return wait

    async def correct(self, tokens: int, requests: int = 0) -> None:
        for bucket, spent in ((self._tpm, tokens), (self._rpm, requests)):
            if bucket is not None and spent:
                bucket.refill()
                bucket.level = min(bucket.capacity, bucket.level - spent)

    async def acquire_slot(self, within: float) -> str | None:
        if self._slots is None:
            return ""
        try:
            async with asyncio.timeout(within):
                await self._slots.acquire()
        except TimeoutError:
            return None
        return LOCAL_SLOT

    async def release_slot(self, slot: str) -> None:
        if self._slots is not None and slot:
            self._slots.release()

    async def aclose(self) -> None:
        return None


# KEYS: rpm bucket, tpm bucket. ARGV: rpm rate, rpm capacity, tpm rate, tpm capacity,
# tokens, horizon. A rate of 0 means no such limit. Returns the wait, as a string (Lua
# numbers become integers on the way out).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function level(key, rate, cap)
  local v = redis.call('HMGET', key, 'level', 'at')
  if not v[1] then return cap end
  return math.min(cap, tonumber(v[1]) + (now - tonumber(v[2])) * rate)
end
local specs = {
  {KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), 1},
  {KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])},
}
local wait, levels = 0, {}
for i, s in ipairs(specs) do
  if s[2] > 0 then
    local cost = math.min(s[4], s[3])
    local l = level(s[1], s[2], s[3])
    levels[i] = l - cost
    if l < cost then wait = math.max(wait, (cost - l) / s[2]) end
  end
end
if wait <= tonumber(ARGV[6]) then
  for i, s in ipairs(specs) do
    if s[2] > 0 then
      redis.call('HSET', s[1], 'level', levels[i], 'at', now)
      redis.call('EXPIRE', s[1], 3600)
    end
  end
end
return tostring(wait)
"""

# KEYS: rpm bucket, tpm bucket. ARGV: rpm rate, rpm capacity, tpm rate, tpm capacity,
# requests and tokens to add to the spent (negative: given back).
_CORRECT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i = 1, 2 do
  local rate, cap, spent = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i]), tonumber(ARGV[4 + i])
  if rate > 0 and spent ~= 0 then
    local v = redis.call('HMGET', KEYS[i], 'level', 'at')
    local l = cap
    if v[1] then l = math.min(cap, tonumber(v[1]) + (now - tonumber(v[2])) * rate) end
    redis.call('HSET', KEYS[i], 'level', math.min(cap, l - spent), 'at', now)
    redis.call('EXPIRE', KEYS[i], 3600)
  end
end
return 1
"""

# KEYS: the lease set. ARGV: max concurrency, lease seconds, lease id. 1 if taken.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 60)
  return 1
end
return 0
"""

# KEYS: the lease set. ARGV: lease seconds, lease id. 1 if renewed, 0 if it is gone.
_RENEW = """
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 60)
return 1
"""


class RedisQuota:
    """Configured limits shared exactly by every replica through one Redis server, kept in
    the process while Redis is away (see the module docstring)."""

    def __init__(
        self,
        url: str,
        upstream: str,
        limits: ConfiguredLimits,
        *,
        lease_seconds: float,
        timeout: float = REDIS_TIMEOUT,
        backoff: tuple[float, float] = REDIS_BACKOFF,
    ) -> None:
        import redis.asyncio as redis  # only deployments that share limits need it
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # redis-py's own retries are off: the circuit bounds each call in time, and retrying
        # inside that bound would only hide that Redis is gone.
        self._redis: Any = redis.Redis.from_url(
            url, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
        self._upstream = upstream
        prefix = f"chat-worker:limits:{upstream}"
        self._keys = [f"{prefix}:rpm", f"{prefix}:tpm"]
        self._slots_key = f"{prefix}:slots"
        self._rpm = _bucket(limits.rpm)
        self._tpm = _bucket(limits.tpm)
        self._max_concurrency = limits.max_concurrency
        self._lease = lease_seconds + LEASE_MARGIN
        self._reserve = self._redis.register_script(_RESERVE)
        self._correct = self._redis.register_script(_CORRECT)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._local = LocalQuota(limits)
        self._renewals: dict[str, asyncio.Task[None]] = {}
        self._circuit = Circuit(
            timeout=timeout,
            backoff=backoff,
            errors=(redis.RedisError, OSError),
            on_change=self._changed,
        )

    @property
    def degraded(self) -> bool | None:
        return self._circuit.state is not CircuitState.CLOSED

    def _changed(self, old: CircuitState, new: CircuitState, reason: str) -> None:
        if new is CircuitState.CLOSED:
            log.info("shared limits back in Redis", upstream=self._upstream)
        else:
            log.warning(
                "Redis unavailable: limits kept per process until it answers",
                upstream=self._upstream,
                reason=reason,
            )

    def charge(self, tokens: int) -> int:
        return _charge(tokens, self._tpm[1])

    async def reserve(self, tokens: int, horizon: float) -> float:
        if not self._rpm[0] and not self._tpm[0]:
            return 0.0
        args = [*self._rpm, *self._tpm, self.charge(tokens), horizon]
        keys = self._keys
        wait = await self._circuit.call("reserve", lambda: self._reserve(keys=keys, args=args))
        if isinstance(wait, Skipped):
            return await self._local.reserve(tokens, horizon)
        return float(wait)

    async def correct(self, tokens: int, requests: int = 0) -> None:
        if not (self._tpm[0] and tokens) and not (self._rpm[0] and requests):
            return
        args = [*self._rpm, *self._tpm, requests, tokens]
        keys = self._keys
        done = await self._circuit.call("correct", lambda: self._correct(keys=keys, args=args))
        if isinstance(done, Skipped):
            await self._local.correct(tokens, requests)

    async def acquire_slot(self, within: float) -> str | None:
        if self._max_concurrency is None:
            return ""
        slot = uuid.uuid4().hex
        args: list[int | float | str] = [self._max_concurrency, self._lease, slot]
        deadline = time.monotonic() + within
        pause = SLOT_POLL[0]
        while True:
            taken = await self._circuit.call(
                "acquire_slot", lambda: self._acquire(keys=[self._slots_key], args=args)
            )
            if isinstance(taken, Skipped):
                return await self._local.acquire_slot(max(deadline - time.monotonic(), 0.0))
            if taken:
                self._renewals[slot] = asyncio.create_task(self._keep(slot))
                return slot
            if time.monotonic() + pause > deadline:
                return None
            # Jitter keeps replicas that wait together from asking together.
            await asyncio.sleep(pause * random.uniform(0.5, 1.0))
            pause = min(pause * 2, SLOT_POLL[1])

    async def _keep(self, slot: str) -> None:
        """Renew a held slot's lease until it is released (the task is then cancelled)."""
        args: list[float | str] = [self._lease, slot]
        while True:
            await asyncio.sleep(self._lease * RENEW_EVERY)
            renewed = await self._circuit.call(
                "renew_slot", lambda: self._renew(keys=[self._slots_key], args=args)
            )
            if renewed == 0:
                log.warning("shared concurrency lease expired", upstream=self._upstream)
                return

    async def release_slot(self, slot: str) -> None:
        if not slot:
            return
        if slot == LOCAL_SLOT:
            await self._local.release_slot(slot)
            return
        if renewal := self._renewals.pop(slot, None):
            renewal.cancel()
        # Skipped (Redis away): the lease, no longer renewed, expires by itself.
        await self._circuit.call("release_slot", lambda: self._redis.zrem(self._slots_key, slot))

    async def aclose(self) -> None:
        renewals = list(self._renewals.values())
        self._renewals.clear()
        for renewal in renewals:
            renewal.cancel()
        await asyncio.gather(*renewals, return_exceptions=True)
        await self._redis.aclose()
