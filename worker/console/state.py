"""The fleet as the console sees it: heartbeats folded into workers, rates and totals.

Pure bookkeeping, no I/O: :meth:`Fleet.observe` takes one heartbeat body and the time it
arrived; :meth:`Fleet.snapshot` renders what the page and ``/api/state`` show. Rates come
from the difference between a worker's successive counters, put in fixed time buckets. A
worker's counters run from its process start (§14), so a restarted worker (new
``started_at``, or any counter lower than before) starts again from zero: its first
counters after the restart count as new work, never as a negative rate.

A heartbeat is foreign input (anything may publish to the events exchange): it is checked
against :class:`HeartbeatBody`, numbers bounded and names short, and one that does not fit
is dropped (and counted) before it reaches the fleet, so it can neither break ``/api/state``
nor the page's tables.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "BUCKET_SECONDS",
    "SILENT_AFTER",
    "WINDOW_SECONDS",
    "Fleet",
    "HeartbeatBody",
    "WorkerView",
    "spend",
]

SILENT_AFTER = 10.0  # a worker not heard from for this long is shown as silent
FORGET_AFTER = 600.0  # and dropped from the list after this long
JUST_STARTED = 3.0  # a first heartbeat sent this soon after its process started
WINDOW_SECONDS = 600  # the charts' span
# One chart point; three heartbeat periods, so that each live worker adds three
# heartbeats' worth of counts to every bucket and the rate does not saw up and down.
BUCKET_SECONDS = 6
_BUCKETS = WINDOW_SECONDS // BUCKET_SECONDS

# --- what a heartbeat may hold (contract §14) ------------------------------------------------

MAX_COUNT = 2**53  # counters: exact in a JavaScript number, far below orjson's 64-bit limit
MAX_AMOUNT = 1e15  # budgets, seconds, costs
MAX_NAME = 256  # a worker, lane, model, tenant, upstream or error code name
MAX_ENTRIES = 1000  # entries of one map (the worker bounds models and tenants to 101)

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Amount = (
    Annotated[int, Field(ge=0, le=MAX_COUNT)]
    | Annotated[float, Field(ge=0, le=MAX_AMOUNT, allow_inf_nan=False)]
)
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Entries = Field(max_length=MAX_ENTRIES)


class _Part(BaseModel):
    # Strict: "3" is not 3 and true is not 1; fields a newer worker adds are left out.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class LaneBeat(_Part):
    weight: int = Field(1, ge=1, le=1_000_000)
    in_flight: Count | None = None  # None: several lanes without a count of their own


class JobsBeat(_Part):
    ok: Count = 0
    error: Count = 0


class TokensBeat(_Part):
    input: Count = 0
    output: Count = 0
    cost_usd: Amount | None = None  # once a job of the model had a price (§17)


class CacheBeat(_Part):
    """The worker's result store and cache (§16), when it has one."""

    hit: Count = 0
    miss: Count = 0
    stored: Count = 0
    skipped: Count = 0


class TenantBeat(_Part):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    __pydantic_extra__: dict[str, Amount]  # e.g. its cost (§17): numbers only

    jobs: Count = 0
    input: Count = 0
    output: Count = 0


class UpstreamBeat(_Part):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    # remaining_requests, remaining_tokens, cooldown_s, ...: numbers only
    __pydantic_extra__: dict[str, Amount | None]

    state: Annotated[str, Field(max_length=32, pattern=r"^[a-z_]+$")] | None = None


class HeartbeatBody(_Part):
    """One heartbeat as the console accepts it; anything else is dropped."""

    type: Literal["heartbeat"] = "heartbeat"
    worker: Name
    sent_at: str | None = Field(None, max_length=64)
    started_at: str | None = Field(None, max_length=64)
    ready: bool = False
    concurrency: int | None = Field(None, ge=0, le=1_000_000)
    lanes: Annotated[dict[Name, LaneBeat], Entries] = {}
    in_flight: Count = 0
    jobs: JobsBeat = JobsBeat()
    errors: Annotated[dict[Name, Count], Entries] = {}
    tokens: Annotated[dict[Name, TokensBeat], Entries] = {}
    tenants: Annotated[dict[Name, TenantBeat], Entries] = {}
    upstreams: Annotated[dict[Name, UpstreamBeat], Entries] = {}
    cache: CacheBeat | None = None

    @field_validator("sent_at", "started_at")
    @classmethod
    def _a_time(cls, value: str | None) -> str | None:
        if value is not None:
            datetime.fromisoformat(value)  # ValueError: not an RFC 3339 time
        return value


@dataclass
class _Counters:
    """The monotonic parts of one heartbeat, flattened: ("jobs", "ok") → 120."""

    values: dict[tuple[str, str], int]

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> _Counters:
        values: dict[tuple[str, str], int] = {}
        for kind in ("ok", "error"):
            values[("jobs", kind)] = _int(_map(body.get("jobs")).get(kind))
        for code, count in _map(body.get("errors")).items():
            values[("errors", str(code))] = _int(count)
        for model, tokens in _map(body.get("tokens")).items():
            tokens = _map(tokens)
            values[("tokens", str(model))] = _int(tokens.get("input")) + _int(tokens.get("output"))
        cache = _map(body.get("cache"))
        for kind in ("hit", "miss"):
            if kind in cache:
                values[("cache", kind)] = _int(cache.get(kind))
        return cls(values)

    def went_back(self, before: _Counters) -> bool:
        """True when a counter is lower than before: the process restarted."""
        return any(v < before.values.get(k, 0) for k, v in self.values.items())

    def since(self, before: _Counters | None) -> dict[tuple[str, str], int]:
        """What happened after ``before``; everything counted, with no ``before``."""
        base = before.values if before is not None else {}
        return {k: v - base.get(k, 0) for k, v in self.values.items() if v > base.get(k, 0)}


@dataclass
class WorkerView:
    """The latest heartbeat of one worker and when it came."""

    worker: str
    body: dict[str, Any]
    last_seen: float  # wall clock, seconds since the epoch
    counters: _Counters
    restarts: int = 0

    def alive(self, now: float) -> bool:
        return now - self.last_seen < SILENT_AFTER

    def as_dict(self, now: float) -> dict[str, Any]:
        body = self.body
        return {
            "worker": self.worker,
            "alive": self.alive(now),
            "ready": bool(body.get("ready")),
            "in_flight": _int(body.get("in_flight")),
            "concurrency": _int(body.get("concurrency")) or None,
            "lanes": _map(body.get("lanes")),
            "jobs": _map(body.get("jobs")),
            "errors": _map(body.get("errors")),
            "tokens": _map(body.get("tokens")),
            "tenants": _map(body.get("tenants")),
            "upstreams": _map(body.get("upstreams")),
            "started_at": body.get("started_at"),
            "last_seen": _iso(self.last_seen),
            "seconds_since_seen": round(max(now - self.last_seen, 0.0), 1),
            "restarts": self.restarts,
        }


@dataclass
class _Bucket:
    start: int
    counts: dict[tuple[str, str], int] = field(default_factory=dict)


class Fleet:
    """Every worker heard from, and the fleet's recent activity in short time buckets."""

    def __init__(self) -> None:
        self.workers: dict[str, WorkerView] = {}
        self._buckets: dict[int, _Bucket] = {}
        self.dropped = 0  # heartbeats refused: not JSON, too large, or not a heartbeat
        self.last_drop: str | None = None  # why the last one was

    def drop(self, reason: str) -> None:
        """Count a heartbeat refused (here or by the reader: not JSON, too large)."""
        self.dropped += 1
        self.last_drop = reason[:300]

    def observe(self, raw: Mapping[str, Any], now: float) -> bool:
        """Fold one heartbeat in; one that does not fit :class:`HeartbeatBody` is dropped
        and counted. True when it was taken."""
        try:
            beat = HeartbeatBody.model_validate(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            place = ".".join(str(part) for part in error["loc"]) or "heartbeat"
            self.drop(f"{place}: {error['msg']}")
            return False
        body = beat.model_dump()
        name = beat.worker
        counters = _Counters.of(body)
        known = self.workers.get(name)
        if known is None:
            # A worker first seen mid-life: its counters so far are history, not a rate;
            # one that has just started did all of it in the last heartbeat period.
            self.workers[name] = WorkerView(name, body, now, counters)
            if _just_started(body):
                self._add(counters.since(None), now)
            return True
        restarted = body.get("started_at") != known.body.get("started_at") or counters.went_back(
            known.counters
        )
        delta = counters.since(None if restarted else known.counters)
        self._add(delta, now)
        known.restarts += restarted
        known.body = body
        known.counters = counters
        known.last_seen = max(known.last_seen, now)
        return True

    def _add(self, delta: Mapping[tuple[str, str], int], now: float) -> None:
        if not delta:
            return
        start = int(now // BUCKET_SECONDS) * BUCKET_SECONDS
        bucket = self._buckets.get(start)
        if bucket is None:
            bucket = self._buckets[start] = _Bucket(start)
            for old in [s for s in self._buckets if s <= start - WINDOW_SECONDS]:
                del self._buckets[old]
        for key, value in delta.items():
            bucket.counts[key] = bucket.counts.get(key, 0) + value

    def forget_silent(self, now: float) -> None:
        for name in [n for n, w in self.workers.items() if now - w.last_seen > FORGET_AFTER]:
            del self.workers[name]

    def series(self, now: float) -> dict[str, Any]:
        """Per-second rates over the last ten minutes, oldest first, one point a complete bucket."""
        # The bucket in progress is left out: half-filled, it would read as a drop.
        last = int(now // BUCKET_SECONDS) * BUCKET_SECONDS - BUCKET_SECONDS
        starts = [last - BUCKET_SECONDS * i for i in range(_BUCKETS - 1, -1, -1)]
        models = sorted(
            {k[1] for b in self._buckets.values() for k in b.counts if k[0] == "tokens"}
        )
        codes = sorted({k[1] for b in self._buckets.values() for k in b.counts if k[0] == "errors"})

        def rate(key: tuple[str, str]) -> list[float]:
            out = []
            for start in starts:
                bucket = self._buckets.get(start)
                value = bucket.counts.get(key, 0) if bucket else 0
                out.append(round(value / BUCKET_SECONDS, 3))
            return out

        return {
            "bucket_seconds": BUCKET_SECONDS,
            "start": _iso(starts[0]),
            "jobs_ok": rate(("jobs", "ok")),
            "jobs_error": rate(("jobs", "error")),
            "tokens": {model: rate(("tokens", model)) for model in models},
            "errors": {code: rate(("errors", code)) for code in codes},
        }

    def _counts(self, now: float, seconds: float) -> dict[tuple[str, str], int]:
        """Counts over the last ``seconds`` of complete buckets."""
        # Complete buckets only, as many as fill ``seconds``: a rate is then exact.
        last = int(now // BUCKET_SECONDS) * BUCKET_SECONDS - BUCKET_SECONDS
        counts: dict[tuple[str, str], int] = {}
        for bucket in self._buckets.values():
            if last - seconds < bucket.start <= last:
                for key, value in bucket.counts.items():
                    counts[key] = counts.get(key, 0) + value
        return counts

    def totals(self, now: float, seconds: float = 60.0) -> dict[str, Any]:
        """Counts over the last ``seconds`` of complete buckets, and their rates."""
        counts = self._counts(now, seconds)
        jobs = counts.get(("jobs", "ok"), 0) + counts.get(("jobs", "error"), 0)
        tokens = sum(v for k, v in counts.items() if k[0] == "tokens")
        return {
            "window_seconds": seconds,
            "jobs_per_s": round(jobs / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 3),
            "error_ratio": round(counts.get(("jobs", "error"), 0) / jobs, 4) if jobs else 0.0,
            "errors_per_min": {
                k[1]: round(v * 60 / seconds, 2)
                for k, v in sorted(counts.items())
                if k[0] == "errors"
            },
        }

    def snapshot(self, now: float) -> dict[str, Any]:
        self.forget_silent(now)
        workers = sorted(self.workers.values(), key=lambda w: w.worker)
        alive = [w for w in workers if w.alive(now)]
        jobs = {"ok": 0, "error": 0}
        errors: dict[str, int] = {}
        for view in workers:
            for kind in jobs:
                jobs[kind] += _int(_map(view.body.get("jobs")).get(kind))
            for code, count in _map(view.body.get("errors")).items():
                errors[str(code)] = errors.get(str(code), 0) + _int(count)
        return {
            "workers": [w.as_dict(now) for w in workers],
            "alive": len(alive),
            "in_flight": sum(_int(w.body.get("in_flight")) for w in alive),
            "jobs": jobs,
            "errors": dict(sorted(errors.items())),
            "upstreams": upstream_gates(workers, now),
            "recent": self.totals(now),
            "series": self.series(now),
            "spend": spend(workers),
            "cache": self.cache(workers, now),
            "heartbeats_dropped": self.dropped,
            "last_drop": self.last_drop,
        }

    def cache(self, workers: Iterable[WorkerView], now: float) -> dict[str, Any]:
        """The fleet's cache (§16): counts since each worker started, summed, and the hit
        rate (hits over lookups) since then and over the last ten minutes; ``None`` for a
        rate without a lookup, ``workers`` 0 when no worker has a store."""
        counts = {"hit": 0, "miss": 0, "stored": 0, "skipped": 0}
        reporting = 0
        for view in workers:
            cache = _map(view.body.get("cache"))
            if cache:
                reporting += 1
                for kind in counts:
                    counts[kind] += _int(cache.get(kind))
        recent = self._counts(now, WINDOW_SECONDS)
        recent_hit, recent_miss = recent.get(("cache", "hit"), 0), recent.get(("cache", "miss"), 0)
        return {
            **counts,
            "workers": reporting,
            "hit_rate": _ratio(counts["hit"], counts["hit"] + counts["miss"]),
            "recent_hit_rate": _ratio(recent_hit, recent_hit + recent_miss),
            "recent_window_seconds": WINDOW_SECONDS,
        }


def spend(workers: Iterable[WorkerView]) -> dict[str, Any]:
    """Spend in USD by tenant and by model (§17), summed over the workers' heartbeats: what
    each worker has counted since it started (a restarted worker counts from zero)."""
    tenants: dict[str, float] = {}
    models: dict[str, float] = {}
    for view in workers:
        for into, part in ((tenants, "tenants"), (models, "tokens")):
            for name, counts in _map(view.body.get(part)).items():
                cost = _amount(_map(counts).get("cost_usd"))
                if cost:
                    into[str(name)] = into.get(str(name), 0.0) + cost

    def ranked(costs: dict[str, float]) -> dict[str, float]:
        return {k: round(v, 6) for k, v in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0]))}

    return {
        "total_usd": round(sum(models.values()), 6),
        "tenants": ranked(tenants),
        "models": ranked(models),
    }


def upstream_gates(workers: Iterable[WorkerView], now: float) -> dict[str, Any]:
    """Each upstream as the live workers last saw it: the most cautious view wins (a gate
    any worker reports cooling is shown cooling; the lowest remaining budget is shown)."""
    rank = {"closed": 2, "cooling": 1, "open": 0}
    gates: dict[str, dict[str, Any]] = {}
    for view in workers:
        if not view.alive(now):
            continue
        for name, raw in _map(view.body.get("upstreams")).items():
            report = _map(raw)
            gate = gates.setdefault(str(name), {"workers": 0})
            gate["workers"] += 1
            state = report.get("state")
            if isinstance(state, str) and rank.get(state, 3) >= rank.get(gate.get("state", ""), -1):
                gate["state"] = state
            for key, value in report.items():
                if key == "state" or not isinstance(value, int | float) or isinstance(value, bool):
                    continue
                current = gate.get(key)
                better = max if key.startswith("cooldown") else min
                gate[key] = value if current is None else better(current, value)
    return dict(sorted(gates.items()))


def _just_started(body: Mapping[str, Any]) -> bool:
    try:
        started = datetime.fromisoformat(str(body.get("started_at")))
        sent = datetime.fromisoformat(str(body.get("sent_at")))
    except ValueError:
        return False
    return (sent - started).total_seconds() < JUST_STARTED


def _map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _amount(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return max(float(value), 0.0)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    return max(int(value), 0)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
