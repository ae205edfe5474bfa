"""Configured limits of one upstream (rpm, tpm, max_concurrency): in the process, or in Redis.

Both stores keep rpm and tpm as token buckets that refill continuously and hold at most one
second of budget, so calls are spread over the minute the way providers enforce their own
limits (quantised over short windows), never bursted at its start. A reservation may run
into the future (the bucket goes negative): the caller is told how long to wait and its
place is kept, so waiters are served in order without polling. Tokens are estimated before
the call and corrected with the usage after it, refunds included.

The Redis store does each step in one Lua script on the server's clock, so every replica
sees one exact budget; concurrency is a sorted set of leases that expire, so a replica
that dies without releasing its slots gives them back.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["ConfiguredLimits", "LocalQuota", "Quota", "RedisQuota"]

# How long a Redis concurrency lease lives without a release: past the longest call the
# worker makes, so only a dead replica's leases ever expire.
LEASE_MARGIN = 60.0
SLOT_POLL = (0.005, 0.05)  # seconds between tries for a shared slot: first, longest


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

    async def reserve(self, tokens: int, horizon: float) -> float:
        """Seconds until a call of ``tokens`` may go. At most ``horizon``: the budget is
        taken (the caller must wait that long, then call). Over it: nothing is taken."""

    async def correct(self, tokens: int) -> None:
        """Add ``tokens`` (negative: give back) to the tokens spent."""

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
        # A call dearer than the whole bucket waits for a full one (not for ever), then
        # overdraws it: the calls after it wait for the debt, so the rate holds.
        cost = min(cost, self.capacity)
        return 0.0 if self.level >= cost else (cost - self.level) / self.rate


class LocalQuota:
    """Configured limits of this process alone."""

    def __init__(self, limits: ConfiguredLimits, clock: Any = time.monotonic) -> None:
        self._rpm = None if limits.rpm is None else _Bucket(limits.rpm, clock)
        self._tpm = None if limits.tpm is None else _Bucket(limits.tpm, clock)
        self._slots = (
            None if limits.max_concurrency is None else asyncio.Semaphore(limits.max_concurrency)
        )

    async def reserve(self, tokens: int, horizon: float) -> float:
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

    async def correct(self, tokens: int) -> None:
        if self._tpm is not None:
            self._tpm.refill()
            self._tpm.level = min(self._tpm.capacity, self._tpm.level - tokens)

    async def acquire_slot(self, within: float) -> str | None:
        if self._slots is None:
            return ""
        try:
            async with asyncio.timeout(within):
                await self._slots.acquire()
        except TimeoutError:
            return None
        return "local"

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
    levels[i] = l - s[4]
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

# KEYS: tpm bucket. ARGV: rate, capacity, tokens to add to the spent.
_CORRECT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'level', 'at')
local l = cap
if v[1] then l = math.min(cap, tonumber(v[1]) + (now - tonumber(v[2])) * rate) end
redis.call('HSET', KEYS[1], 'level', math.min(cap, l - tonumber(ARGV[3])), 'at', now)
redis.call('EXPIRE', KEYS[1], 3600)
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


class RedisQuota:
    """Configured limits shared exactly by every replica through one Redis server."""

    def __init__(
        self, url: str, upstream: str, limits: ConfiguredLimits, *, lease_seconds: float
    ) -> None:
        import redis.asyncio as redis  # only deployments that share limits need it

        self._redis: Any = redis.Redis.from_url(url)
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

    async def reserve(self, tokens: int, horizon: float) -> float:
        if not self._rpm[0] and not self._tpm[0]:
            return 0.0
        args = [*self._rpm, *self._tpm, tokens, horizon]
        return float(await self._reserve(keys=self._keys, args=args))

    async def correct(self, tokens: int) -> None:
        if self._tpm[0] and tokens:
            await self._correct(keys=self._keys[1:], args=[*self._tpm, tokens])

    async def acquire_slot(self, within: float) -> str | None:
        if self._max_concurrency is None:
            return ""
        slot = uuid.uuid4().hex
        args: list[int | float | str] = [self._max_concurrency, self._lease, slot]
        deadline = time.monotonic() + within
        pause = SLOT_POLL[0]
        while True:
            if await self._acquire(keys=[self._slots_key], args=args):
                return slot
            if time.monotonic() + pause > deadline:
                return None
            # Jitter keeps replicas that wait together from asking together.
            await asyncio.sleep(pause * random.uniform(0.5, 1.0))
            pause = min(pause * 2, SLOT_POLL[1])

    async def release_slot(self, slot: str) -> None:
        if slot:
            await self._redis.zrem(self._slots_key, slot)

    async def aclose(self) -> None:
        await self._redis.aclose()
