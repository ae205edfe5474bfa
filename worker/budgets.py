"""Spending limits per tenant (contract §17): the budgets file, and one ledger in Redis.

Before a call the worker reserves the job's estimated cost and tokens; after it, the
reservation is settled with the answer's cost (or released when no call was made). Each
step is one Lua script, so every replica sees one ledger: a reservation that would pass any
of the tenant's limits for the current UTC day or month is refused whole, else taken
whole. Reservations count at once, so the overshoot across replicas is bounded by what the
estimates in flight under-estimate (the maximum output is an upper bound; the prompt
estimate may be a little short).

A tenant's counters live in one hash per period (``usd``, ``tokens``), which expires a day
after its period ends; a settlement that comes after that changes nothing. A replica that
dies between reserve and settle leaves its estimate counted: the error is on the side of
the budget.

**When Redis fails** (unreachable, timeout), the ledger fails open: the call goes ahead
unrecorded, a warning is logged and :attr:`Ledger.unavailable` counts it (the metric
``chat_worker_budget_unavailable_total``). A budget is a cost control, not a security
boundary, and stopping every tenant's work because the ledger is down is the worse outage.
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker.upstreams_file import SettingsError, _line_of

__all__ = [
    "ANY_TENANT",
    "NO_TENANT",
    "BudgetRule",
    "BudgetsFile",
    "BudgetsFileError",
    "Exceeded",
    "Ledger",
    "Reservation",
    "Spend",
    "load_budgets",
]

log = structlog.get_logger(__name__)

ANY_TENANT = "*"  # the rule of every tenant without an entry of its own, each apart
NO_TENANT = "(none)"  # the name a job without a tenant is counted under
DEFAULT_PREFIX = "chat-worker:budget"
KEY_MARGIN = 86400  # seconds a period's counters outlive it, for late settlements

Usd = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Tokens = Annotated[int, Field(gt=0)]
Limit = Literal["usd_per_month", "tokens_per_month", "usd_per_day", "tokens_per_day"]
# Month limits first: when both periods are spent, the job waits for the month to turn.
LIMITS: tuple[Limit, ...] = ("usd_per_month", "tokens_per_month", "usd_per_day", "tokens_per_day")


# --- the budgets file ----------------------------------------------------------------------


class BudgetRule(BaseModel):
    """One entry of ``WORKER_BUDGETS_FILE``: a tenant's limits (each optional, one at
    least) and what a job that would pass one gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = Field(min_length=1, max_length=256)
    usd_per_day: Usd | None = None
    usd_per_month: Usd | None = None
    tokens_per_day: Tokens | None = None
    tokens_per_month: Tokens | None = None
    on_exceed: Literal["fail", "wait"] = "fail"

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetRule:
        if all(getattr(self, name) is None for name in LIMITS):
            raise ValueError(f"give at least one of {', '.join(sorted(LIMITS))}")
        return self

    def limit(self, name: Limit) -> float | None:
        value: float | None = getattr(self, name)
        return value


class BudgetsFile(BaseModel):
    """The document of ``WORKER_BUDGETS_FILE``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budgets: list[BudgetRule] = Field(min_length=1)

    @field_validator("budgets")
    @classmethod
    def _unique_tenants(cls, value: list[BudgetRule]) -> list[BudgetRule]:
        tenants = [rule.tenant for rule in value]
        if dupes := sorted({t for t in tenants if tenants.count(t) > 1}):
            raise ValueError(f"tenants must be unique: {', '.join(dupes)} repeated")
        return value

    def rule_for(self, tenant: str | None) -> BudgetRule | None:
        """The tenant's own rule, else the ``*`` rule, else none (no limit)."""
        rules = {rule.tenant: rule for rule in self.budgets}
        if tenant is not None and tenant != ANY_TENANT and tenant in rules:
            return rules[tenant]
        return rules.get(ANY_TENANT)


class BudgetsFileError(SettingsError):
    """The budgets file cannot be read or is invalid; one line naming the file and place."""


def load_budgets(path: Path) -> BudgetsFile:
    """Read and validate ``WORKER_BUDGETS_FILE``; raise :class:`BudgetsFileError`."""
    where = f"WORKER_BUDGETS_FILE {path}"
    try:
        text = path.read_text(encoding="utf-8")
        document = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise BudgetsFileError(f"{where}: cannot read: {reason or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not YAML"
        raise BudgetsFileError(f"{where}{at}: {problem}") from None
    try:
        return BudgetsFile.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [p for p in error["loc"] if p != "__root__"]
        place = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        line = _line_of(text, loc)
        message = error["msg"].removeprefix("Value error, ")
        raise BudgetsFileError(
            f"{where}{f' line {line}' if line else ''}: {place or 'document'}: {message}"
        ) from None


# --- periods -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Periods:
    """The UTC day and month of ``now``, and when each turns."""

    day: date
    day_end: datetime
    month: str  # YYYY-MM
    month_end: datetime

    @classmethod
    def at(cls, now: datetime) -> Periods:
        now = now.astimezone(UTC)
        day = now.date()
        day_end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
        days_in_month = calendar.monthrange(day.year, day.month)[1]
        month_end = datetime(day.year, day.month, 1, tzinfo=UTC) + timedelta(days=days_in_month)
        return cls(day, day_end, f"{day:%Y-%m}", month_end)

    def end_of(self, limit: Limit) -> datetime:
        return self.day_end if limit.endswith("_day") else self.month_end


# --- the ledger ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reservation:
    """What :meth:`Ledger.reserve` took; ``keys`` empty when nothing was recorded (no rule
    for the tenant, or Redis failed)."""

    tenant: str
    usd: float
    tokens: int
    keys: tuple[str, ...] = ()

    @property
    def recorded(self) -> bool:
        return bool(self.keys)


@dataclass(frozen=True, slots=True)
class Exceeded:
    """A refused reservation: ``rule`` is the limit it would pass. ``retry_at`` is when
    that period turns (UTC), ``None`` when the estimate alone is over the limit, so
    waiting cannot help; ``on_exceed`` is the tenant's rule."""

    tenant: str
    rule: Limit
    limit: float
    spent: float
    on_exceed: Literal["fail", "wait"]
    retry_at: datetime | None


@dataclass(frozen=True, slots=True)
class Spend:
    """A tenant's spend in the current periods."""

    tenant: str
    day: date
    month: str
    usd_day: float = 0.0
    usd_month: float = 0.0
    tokens_day: int = 0
    tokens_month: int = 0

    def of(self, limit: Limit) -> float:
        value: float = {
            "usd_per_day": self.usd_day,
            "usd_per_month": self.usd_month,
            "tokens_per_day": self.tokens_day,
            "tokens_per_month": self.tokens_month,
        }[limit]
        return value


# KEYS: the day hash, the month hash. ARGV: usd, tokens, then the limits in LIMITS order
# (-1: none), then the seconds each hash lives (day, month). Returns {'ok'} or
# {limit name, spent} for the first limit (in LIMITS order) the reservation would pass or
# that is already reached (so a job of unknown price, reserved at $0, stops there too).
_RESERVE = """
local usd, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
local d = redis.call('HMGET', KEYS[1], 'usd', 'tokens')
local m = redis.call('HMGET', KEYS[2], 'usd', 'tokens')
local checks = {
  {'usd_per_month', tonumber(m[1]) or 0, usd, tonumber(ARGV[3])},
  {'tokens_per_month', tonumber(m[2]) or 0, tokens, tonumber(ARGV[4])},
  {'usd_per_day', tonumber(d[1]) or 0, usd, tonumber(ARGV[5])},
  {'tokens_per_day', tonumber(d[2]) or 0, tokens, tonumber(ARGV[6])},
}
for _, c in ipairs(checks) do
  if c[4] >= 0 and (c[2] >= c[4] or c[2] + c[3] > c[4]) then
    return {c[1], string.format('%.17g', c[2])}
  end
end
for i, key in ipairs(KEYS) do
  redis.call('HINCRBYFLOAT', key, 'usd', ARGV[1])
  redis.call('HINCRBY', key, 'tokens', ARGV[2])
  redis.call('EXPIRE', key, ARGV[6 + i])
end
return {'ok'}
"""

# KEYS: the hashes a reservation counted in. ARGV: usd and tokens to add (negative: give
# back). A hash gone (its period long over) is not brought back.
_SETTLE = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    if tonumber(redis.call('HINCRBYFLOAT', key, 'usd', ARGV[1])) < 0 then
      redis.call('HSET', key, 'usd', 0)
    end
    if redis.call('HINCRBY', key, 'tokens', ARGV[2]) < 0 then
      redis.call('HSET', key, 'tokens', 0)
    end
  end
end
return 1
"""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Ledger:
    """Every tenant's spend, shared by all replicas through one Redis server.

    ``client`` is a Redis URL or a ``redis.asyncio.Redis`` (the ledger closes only a
    client it made); ``clock`` gives the current time (aware, any zone) so tests can move it.
    """

    def __init__(
        self,
        client: Any,
        budgets: BudgetsFile,
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], datetime] = _utcnow,
        timeout: float = 2.0,
    ) -> None:
        import redis.asyncio as aioredis  # only deployments with budgets need it

        self._own = isinstance(client, str)
        self._redis: Any = (
            aioredis.Redis.from_url(client, socket_timeout=timeout, socket_connect_timeout=timeout)
            if isinstance(client, str)
            else client
        )
        self._errors: tuple[type[BaseException], ...] = (aioredis.RedisError, OSError)
        self.budgets = budgets
        self.prefix = prefix
        self.clock = clock
        self.unavailable = 0  # reservations and settlements skipped because Redis failed
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)

    def keys(self, tenant: str, periods: Periods) -> tuple[str, str]:
        """The day and month hashes of ``tenant`` (a hash tag keeps both in one slot)."""
        base = f"{self.prefix}:{{{tenant}}}"
        return f"{base}:day:{periods.day.isoformat()}", f"{base}:month:{periods.month}"

    async def reserve(
        self, tenant: str | None, est_usd: float, est_tokens: int, now: datetime | None = None
    ) -> Reservation | Exceeded:
        """Take ``est_usd`` and ``est_tokens`` from the tenant's budgets if every limit of
        its rule still holds with them, else refuse and say which limit and until when."""
        name = NO_TENANT if tenant is None else tenant
        rule = self.budgets.rule_for(tenant)
        usd, tokens = _usd(est_usd), max(int(est_tokens), 0)
        if rule is None:
            return Reservation(name, usd, tokens)
        now = now or self.clock()
        periods = Periods.at(now)
        keys = self.keys(name, periods)
        limits = [-1.0 if (v := rule.limit(limit)) is None else v for limit in LIMITS]
        ttls = [
            int((end - now).total_seconds()) + KEY_MARGIN
            for end in (periods.day_end, periods.month_end)
        ]
        try:
            answer = await self._reserve(keys=keys, args=[repr(usd), tokens, *limits, *ttls])
        except self._errors as exc:
            self._skipped("reserve", name, exc)
            return Reservation(name, usd, tokens)
        verdict = _text(answer[0])
        if verdict == "ok":
            return Reservation(name, usd, tokens, keys)
        if verdict not in LIMITS:
            raise RuntimeError(f"budget script answered {verdict!r}")
        limit_name: Limit = verdict  # narrowed by the test above
        limit = rule.limit(limit_name) or 0.0
        alone = usd if limit_name.startswith("usd") else tokens
        return Exceeded(
            tenant=name,
            rule=limit_name,
            limit=limit,
            spent=float(_text(answer[1])),
            on_exceed=rule.on_exceed,
            retry_at=None if alone > limit else periods.end_of(limit_name),
        )

    async def settle(self, reservation: Reservation, actual_usd: float, actual_tokens: int) -> None:
        """Correct a reservation with what the call cost: the difference is added (or
        given back) in the periods it was taken from."""
        if not reservation.recorded:
            return
        usd = _usd(actual_usd) - reservation.usd
        tokens = max(int(actual_tokens), 0) - reservation.tokens
        if usd == 0 and tokens == 0:
            return
        try:
            await self._settle(keys=list(reservation.keys), args=[repr(usd), tokens])
        except self._errors as exc:
            self._skipped("settle", reservation.tenant, exc)

    async def release(self, reservation: Reservation) -> None:
        """Give a reservation back whole: its call never happened or cost nothing."""
        await self.settle(reservation, 0.0, 0)

    async def spend(self, tenant: str | None, now: datetime | None = None) -> Spend:
        """The tenant's spend in the current UTC day and month (zeros when none)."""
        name = NO_TENANT if tenant is None else tenant
        periods = Periods.at(now or self.clock())
        day_key, month_key = self.keys(name, periods)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(day_key, "usd", "tokens")
            pipe.hmget(month_key, "usd", "tokens")
            (usd_day, tokens_day), (usd_month, tokens_month) = await pipe.execute()
        return Spend(
            name,
            periods.day,
            periods.month,
            usd_day=float(_text(usd_day) or 0),
            usd_month=float(_text(usd_month) or 0),
            tokens_day=int(_text(tokens_day) or 0),
            tokens_month=int(_text(tokens_month) or 0),
        )

    async def tenants(self, now: datetime | None = None) -> list[str]:
        """Tenants with a rule of their own or spend this month, sorted."""
        periods = Periods.at(now or self.clock())
        names = {rule.tenant for rule in self.budgets.budgets if rule.tenant != ANY_TENANT}
        head, tail = f"{self.prefix}:{{", f"}}:month:{periods.month}"
        async for key in self._redis.scan_iter(match=f"{self.prefix}:*:month:{periods.month}"):
            text = _text(key)
            if text.startswith(head) and text.endswith(tail):
                names.add(text[len(head) : -len(tail)])
        return sorted(names)

    async def aclose(self) -> None:
        if self._own:
            await self._redis.aclose()

    def _skipped(self, step: str, tenant: str, exc: BaseException) -> None:
        self.unavailable += 1
        log.warning(
            "budget ledger unavailable: the call goes ahead unrecorded",
            step=step,
            tenant=tenant,
            error=f"{type(exc).__name__}: {exc}",
        )


def _usd(value: float) -> float:
    """A non-negative finite amount; anything else (a NaN from a bad price) counts 0."""
    value = float(value)
    return value if math.isfinite(value) and value > 0 else 0.0


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)
