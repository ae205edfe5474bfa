"""When a job's next attempt waits, and when it leaves through a delay queue instead."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from worker.amqp.topology import DELAY_TIERS
from worker.errors import BudgetError, JobError, QuotaExceeded, RateLimited
from worker.job import Deferral, Job
from worker.limits.gate import Wait
from worker.settings import Settings

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "HOLD_SHARE",
    "INLINE_RETRY_LIMIT",
    "RATE_LIMIT_INLINE_WAIT",
    "backoff",
    "capacity_wait",
    "leave",
    "overstays",
    "wait_left",
    "wait_longer",
]

log = structlog.get_logger(__name__)

# Retries that wait longer than this leave the process through a delay queue, so a long
# Retry-After does not hold a consumer slot that other jobs could use.
INLINE_RETRY_LIMIT = 5.0
BACKOFF_BASE = 0.5
BACKOFF_CAP = 60.0
# Waiting for rate-limit budget holds the consumer slot up to this long (well inside the
# broker's 30-minute consumer timeout); a longer wait goes round a delay queue.
RATE_LIMIT_INLINE_WAIT = 30.0
# The share of WORKER_CONSUMER_TIMEOUT a delivery may be held at worst: the rest is margin
# for settling (publishes, their confirms) and for the clocks' disagreement.
HOLD_SHARE = 0.8


def backoff(attempt: int, retry_after: float | None) -> float:
    """Seconds before attempt ``attempt + 1``: the upstream's ask, else exponential with
    jitter (as OpenAI's own SDK: 0.5 s doubling, 75 to 100 % of it)."""
    if retry_after is not None:
        return retry_after
    exponential: float = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    return exponential * random.uniform(0.75, 1.0)


def overstays(settings: Settings, held_since: float, wait: float) -> bool:
    """Whether one more attempt after ``wait`` seconds could hold the delivery past
    :data:`HOLD_SHARE` of the broker's consumer timeout (see :mod:`worker.runner`)."""
    worst = time.monotonic() - held_since + wait + RATE_LIMIT_INLINE_WAIT + settings.request_timeout
    return worst > HOLD_SHARE * settings.consumer_timeout


def leave(exc: JobError, attempt: int, waited: float, wait: float) -> Deferral:
    """The deferral of a job whose delivery has been held long (:func:`overstays`)."""
    log.info(
        "retrying through a delay queue: the delivery has been held long",
        error_code=exc.code.value,
    )
    return Deferral(wait=wait, attempts=attempt, error=exc, rate_limit_wait_ms=waited * 1000)


def wait_left(settings: Settings, job: Job, waited: float) -> float:
    """Seconds the job may still wait for budget: WORKER_RATE_LIMIT_MAX_WAIT, x-deadline."""
    left = settings.rate_limit_max_wait - waited
    if job.envelope.deadline is not None:
        left = min(left, (job.envelope.deadline - datetime.now(UTC)).total_seconds())
    return max(left, 0.0)


def wait_longer(
    settings: Settings,
    job: Job,
    wait: Wait,
    waited: float,
    attempt: int,
    refused: JobError | None,
) -> JobError | Deferral:
    """Budget is further away than the job may wait here: the error to fail it with, or
    its deferral round a delay queue (a new message: no failed delivery is counted, no slot
    is held)."""
    left = wait_left(settings, job, waited)
    if wait.seconds > left or left <= 0:
        if job.envelope.deadline is not None and (
            settings.rate_limit_max_wait - waited > wait_left(settings, job, waited)
        ):
            bound = f"before x-deadline {job.envelope.deadline.isoformat()}"
        else:
            limit = settings.rate_limit_max_wait
            bound = f"within WORKER_RATE_LIMIT_MAX_WAIT ({limit:g}s)"
        kind: type[JobError] = QuotaExceeded if wait.quota else RateLimited
        what = "the upstream's quota to return" if wait.quota else "rate-limit budget"
        error = kind(
            f"waited {waited:.1f}s for {what}; none expected {bound}",
            status_code=refused.status_code if refused else None,
            response=refused.response if refused else None,
            request_id=refused.request_id if refused else None,
        )
        log.info("gave up waiting for budget", error_code=error.code.value, waited_s=waited)
        return error
    # The longest delay tier that does not overshoot: back in time to take the budget.
    tier = max((t for t in DELAY_TIERS if t <= wait.seconds), default=DELAY_TIERS[0])
    return Deferral(
        wait=float(tier),
        attempts=attempt,
        error=RateLimited(f"waiting {wait.seconds:.1f}s for rate-limit budget"),
        rate_limit_wait_ms=(waited + tier) * 1000,
    )


def capacity_wait(error: JobError, body: Mapping[str, Any]) -> JobError:
    """A ``flex`` call refused for capacity (503) is a wait on that entry, as a 429 is
    (§17): the job waits or goes to another entry, and no attempt is spent."""
    if (
        body.get("service_tier") == "flex"
        and error.status_code == 503
        and not isinstance(error, BudgetError)
    ):
        return RateLimited(
            f"flex capacity unavailable: {error.message}",
            status_code=error.status_code,
            response=error.response,
            request_id=error.request_id,
            retry_after=error.retry_after,
        )
    return error
