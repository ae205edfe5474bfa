"""The Redis backend: plain GET/SET with expiry, and the lease steps as Lua scripts, every
command auto-pipelined (:mod:`worker.store.backends.batch`).

The commands of concurrent jobs leave together: one pipeline (``transaction=False``) per
batch, so a job's two round trips cost a share of one. The scripts run by EVALSHA with
their SHA-1 computed here: redis-py's ``Script`` objects would make each pipeline ask
``SCRIPT EXISTS`` first, a round trip more. The first pipeline loads them (SCRIPT LOAD in
the same pipeline, ahead of its commands); a Redis that lost them since (a restart, a
``SCRIPT FLUSH``) answers ``NOSCRIPT``, and those commands alone go again, after a load,
in one more pipeline.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from worker.store.backends.batch import DEFAULT_IN_FLIGHT, DEFAULT_LIMIT, Coalescer
from worker.store.outcomes import Acquired, Held, Stored

__all__ = ["RedisBackend"]

log = structlog.get_logger(__name__)

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


_SCRIPTS = (_ACQUIRE, _KEEP, _RELEASE, _RENEW)


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()  # as Redis names it (and redis-py)


_ACQUIRE_SHA, _KEEP_SHA, _RELEASE_SHA, _RENEW_SHA = (_sha(script) for script in _SCRIPTS)

#: One Redis command, its name first: what a batch is made of.
Command = tuple[str | bytes | int, ...]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisBackend:
    """One ``redis.asyncio`` client, its commands batched (see the module). redis-py's own
    retries are off: the circuit bounds each call in time, and a retry inside that bound
    only hides that Redis is gone.

    ``timeout`` bounds each pipeline (connecting included), as the circuit bounds each
    call: a batch that outlasts it fails with :class:`redis.TimeoutError` and its
    connection is dropped, so a Redis that stopped answering holds up no later batch for
    longer. ``limit`` and ``in_flight`` are the batches' bounds (:class:`Coalescer`).
    """

    errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 0.25,
        timeout: float = 0.25,
        limit: int = DEFAULT_LIMIT,
        in_flight: int = DEFAULT_IN_FLIGHT,
        **options: Any,
    ) -> None:
        self._redis: Any = redis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
            **options,
        )
        self.timeout = timeout
        self._loaded = False  # whether this client has loaded the scripts (see the module)
        self._batch: Coalescer[Command] = Coalescer(self._execute, limit=limit, in_flight=in_flight)

    @property
    def pipelines(self) -> int:
        """Pipelines sent so far (a debug counter: ``commands / pipelines`` per batch)."""
        return self._batch.batches

    @property
    def commands(self) -> int:
        """Commands sent so far, in :attr:`pipelines` (NOSCRIPT retries and loads aside)."""
        return self._batch.commands

    async def _execute(self, commands: Sequence[Command]) -> list[object]:
        """One reply per command (an error reply as its exception), in one pipeline, or two
        when scripts were missing."""
        try:
            async with asyncio.timeout(self.timeout):
                replies = await self._pipeline(commands, load=not self._loaded)
                missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
                if missing:
                    self._loaded = False
                    again = await self._pipeline([commands[i] for i in missing], load=True)
                    for i, reply in zip(missing, again, strict=True):
                        replies[i] = reply
        except TimeoutError as exc:
            raise redis.TimeoutError(f"no reply within {self.timeout:g} s") from exc
        return replies

    async def _pipeline(self, commands: Sequence[Command], *, load: bool) -> list[object]:
        pipe = self._redis.pipeline(transaction=False)
        if load:
            for script in _SCRIPTS:
                pipe.execute_command("SCRIPT LOAD", script)
        for command in commands:
            pipe.execute_command(*command)
        replies: list[object] = await pipe.execute(raise_on_error=False)
        if load:
            loads, replies = replies[: len(_SCRIPTS)], replies[len(_SCRIPTS) :]
            self._loaded = not any(isinstance(reply, BaseException) for reply in loads)
        return replies

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._batch.submit(("GET", key))
        return value

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        await self._batch.submit(("SET", key, value, "PX", _ms(ttl)))

    async def put_and_release(
        self, key: str, value: bytes, ttl: float, lease_key: str, holder: str
    ) -> None:
        await self._batch.submit(("EVALSHA", _KEEP_SHA, 2, key, lease_key, value, _ms(ttl), holder))

    async def acquire(
        self, result_key: str, lease_key: str, holder: str, ttl: float, *, reuse: bool
    ) -> Acquired | Held | Stored:
        answer = await self._batch.submit(
            ("EVALSHA", _ACQUIRE_SHA, 2, result_key, lease_key, holder, _ms(ttl), int(reuse))
        )
        kind = answer[0]
        if kind == b"stored":
            return Stored(answer[1])
        if kind == b"held":
            # PTTL is -1 for a lease without expiry (never written so) and -2 if it just
            # went: either way, worth asking again soon.
            return Held(max(int(answer[1]), 0) / 1000)
        return Acquired()

    async def release(self, lease_key: str, holder: str) -> bool:
        return bool(await self._batch.submit(("EVALSHA", _RELEASE_SHA, 1, lease_key, holder)))

    async def renew(self, lease_key: str, holder: str, ttl: float) -> bool:
        return bool(
            await self._batch.submit(("EVALSHA", _RENEW_SHA, 1, lease_key, holder, _ms(ttl)))
        )

    async def aclose(self) -> None:
        await self._batch.aclose(redis.ConnectionError("the store was closed"))
        if self._batch.batches:
            log.info(
                "redis store closed",
                commands=self._batch.commands,
                pipelines=self._batch.batches,
                per_pipeline=round(self._batch.commands / self._batch.batches, 2),
            )
        await self._redis.aclose()
