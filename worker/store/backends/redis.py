"""The Redis backend: plain GET/SET with expiry, and the lease steps as Lua scripts."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from worker.store.outcomes import Acquired, Held, Stored

__all__ = ["RedisBackend"]

# KEYS: result, lease. ARGV: holder, lease ms, reuse (1/0).
# {'stored', body} | {'held', pttl ms} | {'acquired'}
_ACQUIRE = """
if ARGV[3] == '1' then
  local r = redis.call('GET', KEYS[1])
  if r then return {'stored', r} end
end
local h = redis.call('GET', KEYS[2])
if h and h ~= ARGV[1] then return {'held', redis.call('PTTL', KEYS[2])} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {'acquired'}
"""

# KEYS: result, lease. ARGV: result, result ms, holder. Keep the result, end the lease.
_KEEP = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: lease. ARGV: holder. Compare and delete: 1 if deleted.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease. ARGV: holder, lease ms. Compare and extend: 1 if extended.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisBackend:
    """One ``redis.asyncio`` client. redis-py's own retries are off: the circuit bounds each
    call in time, and a retry inside that bound only hides that Redis is gone."""

    errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

    def __init__(self, url: str, *, connect_timeout: float = 0.25, **options: Any) -> None:
        self._redis: Any = redis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
            **options,
        )
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._release = self._redis.register_script(_RELEASE)
        self._keep = self._redis.register_script(_KEEP)
        self._renew = self._redis.register_script(_RENEW)

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._redis.get(key)
        return value

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        await self._redis.set(key, value, px=_ms(ttl))

    async def put_and_release(
        self, key: str, value: bytes, ttl: float, lease_key: str, holder: str
    ) -> None:
        await self._keep(keys=[key, lease_key], args=[value, _ms(ttl), holder])

    async def acquire(
        self, result_key: str, lease_key: str, holder: str, ttl: float, *, reuse: bool
    ) -> Acquired | Held | Stored:
        args: list[str | int] = [holder, _ms(ttl), 1 if reuse else 0]
        answer = await self._acquire(keys=[result_key, lease_key], args=args)
        kind = answer[0]
        if kind == b"stored":
            return Stored(answer[1])
        if kind == b"held":
            # PTTL is -1 for a lease without expiry (never written so) and -2 if it just
            # went: either way, worth asking again soon.
            return Held(max(int(answer[1]), 0) / 1000)
        return Acquired()

    async def release(self, lease_key: str, holder: str) -> bool:
        return bool(await self._release(keys=[lease_key], args=[holder]))

    async def renew(self, lease_key: str, holder: str, ttl: float) -> bool:
        return bool(await self._renew(keys=[lease_key], args=[holder, _ms(ttl)]))

    async def aclose(self) -> None:
        await self._redis.aclose()
