"""One call's hold on one upstream: the pool's choice, its gate's leave, how the call ended.

:meth:`UpstreamPool.lease <worker.upstream.pool.UpstreamPool.lease>` hands out a
:class:`Lease` per call. Choosing may make the call its upstream's probe; admitting takes
the gate's pacing, configured budget and a concurrency slot. Used as an async context
manager, the lease gives all of it back on the way out, whatever the way: a success, an
error, a wait elsewhere, a cancellation. It reports to the pool (health) and to the gate
(the tokens used; the charge given back when the call failed otherwise than for budget),
and a failure to give back never hides how the call ended.

    async with lease:
        if isinstance(await lease.admit(limit), Wait):
            ...                                   # no call: nothing is reported against it
        outcome = await call(lease.member)        # raises JobError: reported as it ends
        lease.answered(used_tokens)
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

import structlog

from worker.errors import BudgetError, JobError, QuotaExceeded, RateLimited
from worker.limits.gate import Gate, Permit, Wait

if TYPE_CHECKING:
    from worker.upstream.pool import Member, UpstreamPool

__all__ = ["Lease"]

log = structlog.get_logger(__name__)

# Seconds a flex entry refused for capacity (503) rests when it asks for no wait of its own.
NO_CAPACITY_REST = 5.0


class Lease:
    """One call on ``member`` (see the module docstring); ``probe``: the call is the
    member's probe after a cooldown, and frees it however it ends."""

    __slots__ = ("_pool", "member", "permit", "probe", "tokens", "used")

    def __init__(self, pool: UpstreamPool, member: Member, *, probe: bool, tokens: int) -> None:
        self._pool = pool
        self.member = member
        self.probe = probe
        self.tokens = tokens
        self.permit: Permit | None = None  # the gate's leave: a call was made
        self.used: int | None = None  # tokens the answer says the call used

    @property
    def name(self) -> str:
        return self.member.name

    @property
    def gate(self) -> Gate | None:
        return self.member.gate

    async def admit(self, limit: float) -> Permit | Wait:
        """The gate's leave for the call within ``limit`` seconds, or the wait it expects
        (then no call is made under this lease)."""
        gate = self.member.gate
        if gate is None:
            self.permit = Permit(self.tokens, None, 0.0)
            return self.permit
        admitted = await gate.admit(self.tokens, limit=limit)
        if isinstance(admitted, Permit):
            self.permit = admitted
        return admitted

    def answered(self, used_tokens: int | None) -> None:
        """The call succeeded; ``used_tokens`` as its usage says (None: not said)."""
        self.used = used_tokens

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        error = exc if isinstance(exc, JobError) else None
        called = self.permit is not None
        # Health first (no await): whatever follows, the probe is free.
        if not called or (exc is not None and error is None):
            # No call, or one cut short (cancelled, a bug): it proves nothing.
            self._pool.report(self.member, None, probe=self.probe, cancelled=True)
        else:
            self._pool.report(self.member, error, probe=self.probe)
        quota_spent = isinstance(error, QuotaExceeded)
        gate = self.member.gate
        if gate is None or self.permit is None:
            return
        if quota_spent:
            gate.cool()
        elif isinstance(error, RateLimited) and error.status_code == 503:
            # A flex entry without capacity (§17): rest it as a 429 would, so the job and
            # the next ones go to the default tier meanwhile.
            gate.close(error.retry_after or NO_CAPACITY_REST, reason="no capacity (503)")
        try:
            await gate.release(
                self.permit,
                used_tokens=self.used if exc is None else None,
                quota_spent=quota_spent,
                # A call refused for budget keeps its charge: the refusal says the budget
                # is spent, and giving the charge back only brings the next refusal sooner.
                failed=exc is not None and not isinstance(exc, BudgetError),
            )
        except Exception as failure:  # e.g. Redis cut: the call's outcome stands
            log.warning(
                "releasing an upstream's budget failed",
                upstream=self.name,
                error=f"{type(failure).__name__}: {failure}",
            )
