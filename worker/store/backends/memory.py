"""An in-process backend: a dict with expiry, for unit tests (never a deployment's store)."""

from __future__ import annotations

import time
from collections.abc import Callable

from worker.store.outcomes import Acquired, Held, Stored

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """The semantics of :class:`~worker.store.backends.redis.RedisBackend` in one process.

    ``clock`` is injectable so tests can expire leases without sleeping; ``fail`` makes
    every call raise ``ConnectionError`` (Redis down) until it is set back to False.
    """

    errors: tuple[type[BaseException], ...] = (ConnectionError,)

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._items: dict[str, tuple[bytes, float]] = {}  # key: (value, expires at)
        self.fail = False

    def _live(self, key: str) -> bytes | None:
        if self.fail:
            raise ConnectionError("the memory backend is set to fail")
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._items[key]
            return None
        return item[0]

    def _set(self, key: str, value: bytes, ttl: float) -> None:
        self._items[key] = (value, self._clock() + ttl)

    def keys(self) -> list[str]:
        """The keys alive now (for tests)."""
        return [key for key in list(self._items) if self._live(key) is not None]

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        self._live(key)
        self._set(key, value, ttl)

    async def put_and_release(
        self, key: str, value: bytes, ttl: float, lease_key: str, holder: str
    ) -> None:
        await self.put(key, value, ttl)
        await self.release(lease_key, holder)

    async def acquire(
        self, result_key: str, lease_key: str, holder: str, ttl: float, *, reuse: bool
    ) -> Acquired | Held | Stored:
        result = self._live(result_key)
        if reuse and result is not None:
            return Stored(result)
        current = self._live(lease_key)
        if current is not None and current != holder.encode():
            return Held(self._items[lease_key][1] - self._clock())
        self._set(lease_key, holder.encode(), ttl)
        return Acquired()

    async def release(self, lease_key: str, holder: str) -> bool:
        if self._live(lease_key) != holder.encode():
            return False
        del self._items[lease_key]
        return True

    async def renew(self, lease_key: str, holder: str, ttl: float) -> bool:
        if self._live(lease_key) != holder.encode():
            return False
        self._set(lease_key, holder.encode(), ttl)
        return True

    async def aclose(self) -> None:
        self._items.clear()
