"""An organisation-wide rate-limit budget, as a provider keeps one: for the mock upstream.

Requests and tokens per minute, each a bucket that refills continuously. Providers state
limits per minute but enforce them over short windows ("quantised": 60,000 a minute may be
enforced as 1,000 a second), so a call must also fit a bucket holding ``window`` seconds of
budget. The headers report either the per-minute figures, as OpenAI's do
(``report="minute"``), or the enforcing bucket itself (``report="window"``), as providers
that quantise do: ``remaining`` is the bucket's level as a share of the minute's limit (a
bucket of one second's budget that holds 50 requests reports 3,000 when full, and each call
takes 60 from it), and ``reset`` is the time until the bucket is full again. A call's tokens
are counted when it is admitted, as OpenAI counts them: its text at four characters a
token plus its ``max_tokens``. With ``max_concurrent``, calls past that many at once are
refused with a 429 and no rate-limit headers (a server that only sheds load).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["REPORTS", "BudgetConfig", "OrgBudget", "go_duration"]

Report = Literal["minute", "window"]
REPORTS: tuple[Report, ...] = ("minute", "window")


@dataclass(frozen=True)
class BudgetConfig:
    rpm: int | None = None
    tpm: int | None = None
    window: float = 1.0  # seconds over which the per-minute limits are enforced
    retry_after: bool = True  # send retry-after-ms and retry-after on 429s
    max_concurrent: int | None = None
    report: Report = "minute"  # what the headers say: the minute's figures, or the window's

    def __post_init__(self) -> None:
        if self.report not in REPORTS:
            raise ValueError(f"report must be one of {REPORTS}, not {self.report!r}")

    @property
    def enabled(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None


class _Bucket:
    def __init__(self, limit: int, window: float, now: float, report: Report) -> None:
        self.report = report
        self.limit = float(limit)
        self.rate = limit / 60.0
        self.minute = self.limit  # what the headers report
        self.short = max(self.rate * window, 1.0)  # what is enforced
        self.short_cap = self.short
        self.at = now

    def refill(self, now: float) -> None:
        gained = (now - self.at) * self.rate
        self.minute = min(self.limit, self.minute + gained)
        self.short = min(self.short_cap, self.short + gained)
        self.at = now

    def shortfall(self, cost: float) -> float:
        """Seconds until ``cost`` fits; 0 when it does now."""
        need = min(cost, self.short_cap)
        return 0.0 if self.short >= need else (need - self.short) / self.rate

    def take(self, cost: float) -> None:
        self.minute = max(self.minute - cost, 0.0)
        self.short -= cost

    def headers(self, kind: str) -> dict[str, str]:
        if self.report == "window":
            remaining = max(self.short, 0.0) * self.limit / self.short_cap
            reset = (self.short_cap - self.short) / self.rate
        else:
            remaining, reset = self.minute, (self.limit - self.minute) / self.rate
        return {
            f"x-ratelimit-limit-{kind}": str(int(self.limit)),
            f"x-ratelimit-remaining-{kind}": str(int(remaining)),
            f"x-ratelimit-reset-{kind}": go_duration(reset),
        }


@dataclass
class Verdict:
    """Admitted (``refused`` None) or a 429: which budget ran out, and the headers to send."""

    headers: dict[str, str]
    refused: str | None = None
    message: str = ""


class OrgBudget:
    """One budget shared by every caller of the server (see the module docstring)."""

    def __init__(self, config: BudgetConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        now = clock()
        self._requests = (
            None if config.rpm is None else _Bucket(config.rpm, config.window, now, config.report)
        )
        self._tokens = (
            None if config.tpm is None else _Bucket(config.tpm, config.window, now, config.report)
        )
        self.in_flight = 0
        self.admitted = 0
        self.refused = 0
        self.tokens_admitted = 0

    def admit(self, body: dict[str, Any]) -> Verdict:
        """Count a call in, or refuse it. An admitted call must be :meth:`done` after."""
        if self.config.max_concurrent is not None and self.in_flight >= self.config.max_concurrent:
            self.refused += 1
            return Verdict({}, "concurrency", "Too many concurrent requests")
        now = self._clock()
        cost = float(request_tokens(body))
        waits = {}
        for kind, bucket, units in (
            ("requests", self._requests, 1.0),
            ("tokens", self._tokens, cost),
        ):
            if bucket is not None:
                bucket.refill(now)
                waits[kind] = bucket.shortfall(units)
        headers = self._headers()
        spent = max(waits, key=lambda kind: waits[kind], default=None)
        if spent is not None and waits[spent] > 0:
            self.refused += 1
            if self.config.retry_after:
                headers["retry-after-ms"] = str(math.ceil(waits[spent] * 1000))
                headers["retry-after"] = str(math.ceil(waits[spent]))
            limit = self.config.rpm if spent == "requests" else self.config.tpm
            message = f"Rate limit reached on {spent} per min (RPM/TPM): Limit {limit}"
            return Verdict(headers, spent, message)
        if self._requests is not None:
            self._requests.take(1.0)
        if self._tokens is not None:
            self._tokens.take(cost)
        self.in_flight += 1
        self.admitted += 1
        self.tokens_admitted += int(cost)
        return Verdict(self._headers())

    def done(self) -> None:
        self.in_flight -= 1

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for kind, bucket in (("requests", self._requests), ("tokens", self._tokens)):
            if bucket is not None:
                headers.update(bucket.headers(kind))
        return headers


def request_tokens(body: dict[str, Any]) -> int:
    """Tokens a provider counts for a call when it admits it (OpenAI's documented rule); an
    embeddings call's ``input`` too (strings by characters, token arrays by length)."""
    chars = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
    given = body.get("input")
    items = [given] if isinstance(given, str) else given if isinstance(given, list) else []
    for item in items:
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, list):
            chars += 4 * len(item)
        elif isinstance(item, int):
            chars += 4  # one token of a single token array
    completion = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return chars // 4 + (completion if isinstance(completion, int) else 0)


def go_duration(seconds: float) -> str:
    """``6m0s``, ``1s``, ``120ms``: how OpenAI writes its resets."""
    if seconds < 1:
        return f"{max(round(seconds * 1000), 0)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3g}s" if rest != int(rest) else f"{int(rest)}s"
    return f"{int(minutes)}m{text}" if minutes >= 1 else text
