"""The result store: a job's final result kept under its job id, and a lease per job id.

A delivery takes the lease before it calls the upstream, so while one worker calls for a
job id no other does (contract §16); a second delivery of the id waits for the first's
result with :meth:`ResultStore.wait_for`, or takes the lease over when it ends unanswered
(a crash: the lease's time to live is the call's timeout). Keys are
``{prefix}:result:{<job id>}`` and ``{prefix}:lease:{<job id>}``: the braces are a Redis
Cluster hash tag, so a job's two keys share a slot and one script may touch both.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import orjson

from worker.store.backend import StoreBackend
from worker.store.circuit import Circuit
from worker.store.metrics import StoreMetrics
from worker.store.outcomes import Held, LeaseOutcome, Skipped, Stored

__all__ = ["DEFAULT_MAX_BYTES", "ResultStore", "restamp"]

DEFAULT_MAX_BYTES = 1 << 20  # results above a megabyte are published, not stored
DEFAULT_RESULT_TTL = 86400.0
WAIT_POLL = (0.01, 0.25)  # seconds between a waiter's looks: first, longest


def restamp(result: bytes, cache: str = "stored") -> bytes:
    """A stored result made ready to publish again: ``metadata.cache`` set to ``cache``."""
    value: dict[str, Any] = orjson.loads(result)
    metadata = value.get("metadata")
    if isinstance(metadata, dict):
        metadata["cache"] = cache
    return orjson.dumps(value)


class ResultStore:
    """Final results and leases by job id, every call bounded by ``circuit``.

    ``holder`` names one delivery's attempt at a job (a uuid per delivery), so a lease that
    outlived its holder's call is never released by a later one.
    """

    def __init__(
        self,
        backend: StoreBackend,
        circuit: Circuit,
        *,
        ttl: float = DEFAULT_RESULT_TTL,
        max_bytes: int = DEFAULT_MAX_BYTES,
        prefix: str = "cw",
        metrics: StoreMetrics | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError("a result store needs a positive ttl (WORKER_RESULT_TTL=0: none)")
        self._backend = backend
        self._circuit = circuit
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._prefix = prefix
        self.metrics = metrics if metrics is not None else StoreMetrics()

    def result_key(self, job_id: str) -> str:
        return f"{self._prefix}:result:{{{job_id}}}"

    def lease_key(self, job_id: str) -> str:
        return f"{self._prefix}:lease:{{{job_id}}}"

    def _skipped(self, outcome: Skipped) -> Skipped:
        self.metrics.skip(outcome.op)
        return outcome

    async def lookup(self, job_id: str) -> bytes | None:
        """The job's stored final result, or None (none stored, or Redis unavailable)."""
        key = self.result_key(job_id)
        found = await self._circuit.call("lookup", lambda: self._backend.get(key))
        if isinstance(found, Skipped):
            self._skipped(found)
            return None
        if found is not None:
            self.metrics.results_served += 1
        return found

    async def store(
        self, job_id: str, result: bytes, ttl: float | None = None, *, holder: str | None = None
    ) -> bool:
        """Keep ``result`` (the final result message's body) for ``ttl`` seconds (the
        store's by default). Call it before publishing; False: not stored (over the size
        bound, or Redis unavailable), which the caller may ignore. With ``holder``, its
        lease ends in the same round trip (the stored result answers later deliveries)."""
        if len(result) > self.max_bytes:
            self.metrics.oversize("result")
            return False
        key, seconds = self.result_key(job_id), self.ttl if ttl is None else ttl
        backend = self._backend
        if holder is None:
            done = await self._circuit.call("store", lambda: backend.put(key, result, seconds))
        else:
            lease = self.lease_key(job_id)
            done = await self._circuit.call(
                "store",
                lambda: backend.put_and_release(key, result, seconds, lease, holder),
            )
        if isinstance(done, Skipped):
            self._skipped(done)
            return False
        self.metrics.results_stored += 1
        return True

    async def acquire(
        self, job_id: str, holder: str, ttl: float, *, reuse: bool = True
    ) -> LeaseOutcome:
        """The lease on ``job_id`` for ``ttl`` seconds, in one round trip that looks up the
        result first: :class:`Stored` (answer with it), :class:`Held` (another delivery is
        calling: :meth:`wait_for` it), :class:`Acquired` (call), or :class:`Skipped` (call,
        as if there were no store). ``reuse=False`` ignores a stored result: a dead letter
        replayed on purpose runs again."""
        rkey, lkey = self.result_key(job_id), self.lease_key(job_id)
        outcome = await self._circuit.call(
            "acquire", lambda: self._backend.acquire(rkey, lkey, holder, ttl, reuse=reuse)
        )
        if isinstance(outcome, Skipped):
            return self._skipped(outcome)
        if isinstance(outcome, Stored):
            self.metrics.results_served += 1
        return outcome

    async def release(self, job_id: str, holder: str) -> bool:
        """End ``holder``'s lease (after publishing); False if it was no longer held by it."""
        key = self.lease_key(job_id)
        done = await self._circuit.call("release", lambda: self._backend.release(key, holder))
        if isinstance(done, Skipped):
            self._skipped(done)
            return False
        return done

    async def renew(self, job_id: str, holder: str, ttl: float) -> bool:
        """Extend ``holder``'s lease to ``ttl`` seconds from now (a long stream, a retry)."""
        key = self.lease_key(job_id)
        done = await self._circuit.call("renew", lambda: self._backend.renew(key, holder, ttl))
        if isinstance(done, Skipped):
            self._skipped(done)
            return False
        return done

    async def wait_for(
        self, job_id: str, holder: str, ttl: float, within: float, *, reuse: bool = True
    ) -> LeaseOutcome:
        """Wait, at most ``within`` seconds, until the job's result is stored or its lease
        ends; in the second case take the lease for ``holder``. :class:`Held` when
        ``within`` ran out first; :class:`Skipped` when Redis went away meanwhile.

        It polls with a backoff (10 ms, doubling to 250 ms, never past the lease's end):
        one connection is not tied up per waiter, and waiters are rare (duplicates).
        """
        deadline = time.monotonic() + within
        pause = WAIT_POLL[0]
        while True:
            outcome = await self.acquire(job_id, holder, ttl, reuse=reuse)
            if not isinstance(outcome, Held):
                return outcome
            left = deadline - time.monotonic()
            if left <= 0:
                return outcome
            # Jitter keeps waiters of one job from asking together.
            nap = min(pause * random.uniform(0.5, 1.0), outcome.remaining, left)
            await asyncio.sleep(max(nap, 0.001))
            pause = min(pause * 2, WAIT_POLL[1])
