"""The one interface of a store backend: keys with time to live, and per-job leases."""

from __future__ import annotations

from typing import Protocol

from worker.store.outcomes import Acquired, Held, Stored

__all__ = ["StoreBackend"]


class StoreBackend(Protocol):
    """A key-value store with expiry (Redis, or a dict for tests), as Dramatiq's rate-limit
    backends are: the result store and the cache hold no state of their own beyond it.

    Every key given has a time to live, so the store's memory stays bounded. Errors of
    ``errors`` mean "unavailable": the circuit turns them into :class:`Skipped`.
    """

    errors: tuple[type[BaseException], ...]

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        """Set ``key`` to ``value`` for ``ttl`` seconds, replacing what was there."""

    async def put_and_release(
        self, key: str, value: bytes, ttl: float, lease_key: str, holder: str
    ) -> None:
        """:meth:`put`, then :meth:`release`, in one round trip (a stored result answers
        every later delivery: the lease need not outlive it)."""

    async def acquire(
        self, result_key: str, lease_key: str, holder: str, ttl: float, *, reuse: bool
    ) -> Acquired | Held | Stored:
        """In one step: the stored result when there is one (and ``reuse``); else the lease's
        other holder; else the lease, taken (or renewed) by ``holder`` for ``ttl`` seconds."""

    async def release(self, lease_key: str, holder: str) -> bool:
        """Delete the lease if ``holder`` still has it; whether it did."""

    async def renew(self, lease_key: str, holder: str, ttl: float) -> bool:
        """Reset the lease's time to live to ``ttl`` if ``holder`` still has it."""

    async def aclose(self) -> None: ...
