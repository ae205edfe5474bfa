"""What a job may spend and what it cost (contract §17): budgets before the call, prices after.

Around :meth:`~worker.runner.JobRunner.run`: with ``WORKER_BUDGETS_FILE``, the job's
tenant reserves the most the call can cost (the prompt estimate plus the maximum output at
the model's price) in the ledger every replica shares; a reservation refused fails the job
``budget_exceeded`` (rule ``fail``, or a job that alone is over the limit) or sends it round
the delay queues until the period turns (rule ``wait``, within ``WORKER_RATE_LIMIT_MAX_WAIT``
and ``x-deadline``). After the call the reservation is corrected with what the answer cost;
a call that never happened gives it back. Every successful result gets its price
(``metadata.cost``), null when none is known.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog

from worker.budgets import Exceeded, Ledger, Reservation, load_budgets
from worker.cost import Cost, PriceBook
from worker.errors import BudgetExceeded, ModelNotAllowed
from worker.job import Deferral, Job, JobOutcome, failed
from worker.limits.gate import estimate_tokens
from worker.messages import Usage
from worker.settings import Settings
from worker.stream.relay import DeltaSink
from worker.upstream.pool import UpstreamPool
from worker.upstreams_file import UpstreamSpec

__all__ = ["DEFAULT_MAX_OUTPUT", "Spending"]

log = structlog.get_logger(__name__)

# The output a reservation counts when the request sets no max_tokens: a common model cap.
DEFAULT_MAX_OUTPUT = 4096
LONGEST_DELAY = 600  # seconds: the longest delay tier; a wait for a new period hops by it


class Spending:
    """Prices for results and, with a budgets file, the shared ledger of spend."""

    def __init__(
        self, settings: Settings, pool: UpstreamPool, ledger: Ledger | None = None
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.prices = PriceBook.from_upstreams(m.spec for m in pool.members)
        if ledger is None and settings.budgets_file is not None and settings.redis_url:
            ledger = Ledger(
                settings.redis_url.get_secret_value(), load_budgets(settings.budgets_file)
            )
        self.ledger = ledger

    async def run(self, job: Job, deltas: DeltaSink, call: Any) -> JobOutcome | Deferral:
        """``call(job, deltas)`` within the tenant's budget, the outcome priced."""
        reservation: Reservation | None = None
        if self.ledger is not None:
            verdict = await self._reserve(job)
            if isinstance(verdict, Exceeded):
                return self._over_budget(job, verdict)
            reservation = verdict
        try:
            outcome: JobOutcome | Deferral = await call(job, deltas)
        except BaseException:
            if reservation is not None:
                await self.ledger.release(reservation)  # type: ignore[union-attr]
            raise
        if isinstance(outcome, JobOutcome) and outcome.cost is None and outcome.usage:
            cost = self.price(job, outcome)
            outcome.cost = None if cost is None else cost.model_dump()
        if reservation is not None and self.ledger is not None:
            if isinstance(outcome, JobOutcome) and outcome.usage:
                usd = float(outcome.cost["total"]) if outcome.cost else reservation.usd
                tokens = int(outcome.usage.get("total_tokens") or 0)
                await self.ledger.settle(reservation, usd, tokens)
            else:
                await self.ledger.release(reservation)
        return outcome

    def price(self, job: Job, outcome: JobOutcome) -> Cost | None:
        """What the answer cost at its upstream, for the model sent there."""
        spec = self._spec(outcome.upstream)
        if spec is None or not outcome.usage:
            return None
        try:
            usage = Usage.model_validate(outcome.usage)
        except ValueError:
            return None
        body = outcome.body or {}
        tier = (
            body.get("service_tier")
            or job.body.get("service_tier")
            or spec.defaults.get("service_tier")
        )
        return self.prices.cost(
            spec.price_provider,
            spec.upstream_model(job.model),
            usage,
            tier if isinstance(tier, str) else None,
            upstream=spec.name,
            endpoint=job.endpoint,
        )

    async def _reserve(self, job: Job) -> Reservation | Exceeded:
        assert self.ledger is not None
        # The prompt alone (estimate_tokens counts the allowed completion too), then the
        # most output the request allows, per choice.
        tokens = estimate_tokens({k: v for k, v in job.body.items() if k not in _OUTPUT_KEYS})
        choices = job.body.get("n")
        output = _max_output(job.body) * (
            choices if isinstance(choices, int) and choices > 0 else 1
        )
        usd = 0.0
        spec = self._first(job.model)
        if spec is not None:
            estimate = self.prices.estimate_max_cost(
                spec.price_provider,
                spec.upstream_model(job.model),
                tokens,
                output,
                spec.defaults.get("service_tier"),
                upstream=spec.name,
            )
            usd = estimate or 0.0  # no price known: tokens only
        return await self.ledger.reserve(job.envelope.tenant, usd, tokens + output)

    def _over_budget(self, job: Job, refused: Exceeded) -> JobOutcome | Deferral:
        what = f"{refused.rule} limit {refused.limit:g} of tenant {refused.tenant!r}"
        waited = job.envelope.rate_limit_wait_ms / 1000
        if refused.on_exceed == "wait" and refused.retry_at is not None:
            now = self.ledger.clock() if self.ledger is not None else datetime.now(UTC)
            until = (refused.retry_at - now).total_seconds()
            left = self.settings.rate_limit_max_wait - waited
            if job.envelope.deadline is not None:
                deadline_left = (job.envelope.deadline - datetime.now(UTC)).total_seconds()
                left = min(left, deadline_left)
            if until <= left:
                hop = float(min(max(until, 1.0), LONGEST_DELAY))
                log.info("budget reached; waiting for the period to turn", limit=what)
                return Deferral(
                    wait=hop,
                    attempts=job.envelope.prior_attempts,
                    error=BudgetExceeded(f"waiting for the {what} to renew"),
                    rate_limit_wait_ms=(waited + hop) * 1000,
                    calls=job.envelope.prior_calls,
                )
        error = BudgetExceeded(f"{what} reached (spent {refused.spent:g}); not called")
        outcome = failed(error, job.envelope.prior_attempts)
        outcome.calls = job.envelope.prior_calls
        return outcome

    def _spec(self, name: str | None) -> UpstreamSpec | None:
        for member in self.pool.members:
            if member.name == name:
                return member.spec
        return None

    def _first(self, model: str) -> UpstreamSpec | None:
        try:
            route = self.pool.route(model)
        except ModelNotAllowed:
            return None
        return route.tiers[0][0].spec if route.tiers and route.tiers[0] else None

    async def aclose(self) -> None:
        if self.ledger is not None:
            await self.ledger.aclose()


_OUTPUT_KEYS = ("max_completion_tokens", "max_tokens")


def _max_output(body: dict[str, Any]) -> int:
    for key in _OUTPUT_KEYS:
        value = body.get(key)
        if isinstance(value, int) and value > 0:
            return min(value, 1_000_000)
    return DEFAULT_MAX_OUTPUT
