"""The Redis backend: plain GET/SET with expiry, and the lease steps as Lua scripts, every
command auto-pipelined (:mod:`worker.store.backends.batch`).

The commands of concurrent jobs leave together: one write of all their requests, then
their replies read in order, so a job's two round trips cost a share of one. On the hot
path this is written by hand over a redis-py connection (which still connects,
authenticates, selects the database, speaks TLS and parses replies with hiredis):

- each command is packed here (:func:`pack`, the RESP that redis-py's ``pack_command``
  writes for the same arguments: strings, bytes and ints), not by a ``Pipeline``, whose
  command stack, response callbacks and generic encoder cost about as much again as the
  packing (``tests/unit/test_store_pack.py`` checks the bytes equal redis-py's;
  ``tests/integration/test_store_pipeline.py`` checks the answers equal plain redis-py
  calls', one at a time);
- the scripts run by EVALSHA with their SHA-1 computed here: redis-py's ``Script`` objects
  make every pipeline ask ``SCRIPT EXISTS`` first, a round trip more. The first batch
  loads them (SCRIPT LOAD in the same write, ahead of its commands); a Redis that lost them
  since (a restart, a ``SCRIPT FLUSH``) answers ``NOSCRIPT``, and those commands alone go
  again, after a load, in one more write;
- a batch holds its connection until its last reply is read; one that fails or is
  cancelled midway (a timeout) drops it, so no reply is ever read by the wrong batch, and
  the next batch connects again.
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
from redis.exceptions import NoScriptError, ResponseError

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


def pack(*args: str | bytes | int) -> bytes:
    """One command in RESP, an array of bulk strings, as redis-py packs it: ``str`` in
    UTF-8, ``int`` in decimal, ``bytes`` as they are."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


_LOAD = tuple(pack("SCRIPT", "LOAD", script) for script in _SCRIPTS)


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
        self._idle: list[Any] = []  # connections between batches (one a batch in flight)
        self._batch: Coalescer[bytes] = Coalescer(self._execute, limit=limit, in_flight=in_flight)

    @property
    def pipelines(self) -> int:
        """Pipelines sent so far (a debug counter: ``commands / pipelines`` per batch)."""
        return self._batch.batches

    @property
    def commands(self) -> int:
        """Commands sent so far, in :attr:`pipelines` (NOSCRIPT retries and loads aside)."""
        return self._batch.commands

    async def _execute(self, commands: Sequence[bytes]) -> list[object]:
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

    async def _pipeline(self, commands: Sequence[bytes], *, load: bool) -> list[object]:
        """Write ``commands`` (after the scripts' loads when ``load``) in one go on one
        connection, and read a reply for each: a value, or an error reply's exception."""
        requests = [*_LOAD, *commands] if load else commands
        conn = self._idle.pop() if self._idle else self._redis.connection_pool.make_connection()
        try:
            await conn.send_packed_command(requests, check_health=False)
            replies: list[object] = []
            for _ in requests:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:  # this command's own error: read on
                    replies.append(exc)
        except BaseException:
            await conn.disconnect(nowait=True)  # replies may be left unread on it
            raise
        finally:
            self._idle.append(conn)  # (a dropped connection connects again when used)
        if load:
            loads, replies = replies[: len(_LOAD)], replies[len(_LOAD) :]
            self._loaded = not any(isinstance(reply, BaseException) for reply in loads)
        return replies

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._batch.submit(pack("GET", key))
        return value

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        await self._batch.submit(pack("SET", key, value, "PX", _ms(ttl)))

    async def put_and_release(
        self, key: str, value: bytes, ttl: float, lease_key: str, holder: str
    ) -> None:
        await self._batch.submit(
            pack("EVALSHA", _KEEP_SHA, 2, key, lease_key, value, _ms(ttl), holder)
        )

    async def acquire(
        self, result_key: str, lease_key: str, holder: str, ttl: float, *, reuse: bool
    ) -> Acquired | Held | Stored:
        answer = await self._batch.submit(
            pack("EVALSHA", _ACQUIRE_SHA, 2, result_key, lease_key, holder, _ms(ttl), int(reuse))
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
        return bool(await self._batch.submit(pack("EVALSHA", _RELEASE_SHA, 1, lease_key, holder)))

    async def renew(self, lease_key: str, holder: str, ttl: float) -> bool:
        return bool(
            await self._batch.submit(pack("EVALSHA", _RENEW_SHA, 1, lease_key, holder, _ms(ttl)))
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
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()
        await self._redis.aclose()
