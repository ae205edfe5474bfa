"""The rate-limit budget an upstream reports in its answers' headers, read into numbers.

Formats read (contract §11):

- OpenAI: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, resets as Go
  durations (``1s``, ``6m0s``, ``120ms``, ``1h2m3.5s``);
- ``retry-after-ms`` (milliseconds), ``retry-after`` (seconds or an HTTP date);
- Anthropic: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
  {limit,remaining,reset}``, resets as RFC 3339 times.

Garbage in any header is ignored, as if the header were missing: a budget is advice, and a
wrong number must never stop a job.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import httpx
import multidict

__all__ = ["Budget", "Dimension", "parse_duration", "read_budget", "retry_after_seconds"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_ANTHROPIC_TOKENS = ("tokens", "input-tokens", "output-tokens")
_CASELESS = (multidict.CIMultiDictProxy, multidict.CIMultiDict, httpx.Headers)


@dataclass(frozen=True, slots=True)
class Dimension:
    """One budget (requests or tokens) as last read: ``remaining`` of ``limit``, full
    again in ``reset`` seconds (None when not said)."""

    limit: float
    remaining: float
    reset: float | None

    @property
    def fraction(self) -> float:
        return self.remaining / self.limit if self.limit > 0 else 0.0

    @property
    def refill_rate(self) -> float:
        """Units a second the budget refills at. Both providers state per-minute limits;
        the reset is rounded too coarsely (``1s``) to measure a rate from."""
        return self.limit / 60.0


@dataclass(frozen=True, slots=True)
class Budget:
    """What one answer says about the budget; every part optional."""

    requests: Dimension | None = None
    tokens: Dimension | None = None
    retry_after: float | None = None

    @property
    def empty(self) -> bool:
        return self.requests is None and self.tokens is None and self.retry_after is None


def read_budget(headers: Mapping[str, str], now: float | None = None) -> Budget:
    """The budget in ``headers`` (any case of names); ``now`` is the wall clock (tests)."""
    wall = time.time() if now is None else now
    # aiohttp's and httpx's headers answer any case already; a plain mapping is lowered.
    lower = (
        headers if isinstance(headers, _CASELESS) else {k.lower(): v for k, v in headers.items()}
    )
    requests = _openai(lower, "requests") or _anthropic(lower, "requests", wall)
    tokens = _openai(lower, "tokens") or _tightest(
        [_anthropic(lower, kind, wall) for kind in _ANTHROPIC_TOKENS]
    )
    return Budget(requests, tokens, retry_after_seconds(lower, wall))


def _openai(headers: Mapping[str, str], kind: str) -> Dimension | None:
    limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
    remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
    if limit is None or remaining is None or limit <= 0:
        return None
    reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
    return Dimension(limit, min(max(remaining, 0.0), limit), reset)


def _anthropic(headers: Mapping[str, str], kind: str, wall: float) -> Dimension | None:
    prefix = f"anthropic-ratelimit-{kind}-"
    limit = _number(headers.get(prefix + "limit"))
    remaining = _number(headers.get(prefix + "remaining"))
    if limit is None or remaining is None or limit <= 0:
        return None
    reset = None
    if when := _rfc3339(headers.get(prefix + "reset")):
        reset = max(when - wall, 0.0)
    return Dimension(limit, min(max(remaining, 0.0), limit), reset)


def _tightest(dimensions: list[Dimension | None]) -> Dimension | None:
    """Of Anthropic's token budgets (total, input, output), the one nearest to spent."""
    known = [d for d in dimensions if d is not None]
    return min(known, key=lambda d: d.fraction) if known else None


def parse_duration(text: str | None) -> float | None:
    """A Go duration (``6m0s``, ``120ms``, ``1h2m3.5s``) or bare seconds, in seconds."""
    if not text:
        return None
    text = text.strip()
    if (seconds := _number(text)) is not None:
        return max(seconds, 0.0)
    total, end = 0.0, 0
    for match in _DURATION.finditer(text):
        if match.start() != end:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        end = match.end()
    return total if end == len(text) and end > 0 else None


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait an upstream asks for: ``retry-after-ms``, else ``retry-after`` (seconds or
    an HTTP date). ``headers`` must answer lower-case names (httpx's do)."""
    # A negative retry-after-ms is nonsense: it must not hide a valid retry-after.
    if (millis := _number(headers.get("retry-after-ms"))) is not None and millis >= 0:
        return millis / 1000
    value = headers.get("retry-after")
    if not value:
        return None
    if (seconds := _number(value)) is not None:
        return max(seconds, 0.0)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    wall = time.time() if now is None else now
    return max(when.timestamp() - wall, 0.0)


def _rfc3339(text: str | None) -> float | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None


def _number(value: str | None) -> float | None:
    """``value`` as a finite number, else None: a NaN would reach ``asyncio.sleep``."""
    try:
        number = float(value) if value else math.nan
    except ValueError:
        return None
    return number if math.isfinite(number) else None
