"""A circuit breaker round Redis calls: bounded in time, and skipped while Redis is down.

Nothing fails because Redis is down (contract §16): a call that errs or outlasts
``timeout`` comes back as :class:`Skipped`, and the circuit opens: for the next second
every call is skipped at once, without touching the network. Then one call goes through
as a probe (half-open): success closes the circuit, failure opens it again for twice as
long, up to 30 seconds. ``on_change`` hears of each outage twice, when it starts (closed
to open) and when it ends (back to closed); failed probes in between are not news.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

from worker.store.outcomes import Skipped

__all__ = ["Circuit", "CircuitState", "StateChange"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 0.25  # seconds: a store answers in a millisecond or is not worth waiting for
DEFAULT_BACKOFF = (1.0, 30.0)  # seconds open after the first failure; the longest


class CircuitState(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


#: ``(old, new, reason)``: called when the circuit leaves or reaches ``CLOSED``.
StateChange = Callable[[CircuitState, CircuitState, str], None]


class Circuit:
    """One breaker per backend; every call of the result store and the cache goes through."""

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        backoff: tuple[float, float] = DEFAULT_BACKOFF,
        errors: tuple[type[BaseException], ...] = (OSError,),
        on_change: StateChange | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self._first, self._longest = backoff
        self._backoff = self._first
        self._errors = errors
        self._on_change = on_change
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._until = 0.0  # while open: when the next call may probe

    @property
    def state(self) -> CircuitState:
        return self._state

    @property
    def backoff(self) -> float:
        """Seconds the circuit stays open after its next failure."""
        return self._backoff

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T | Skipped:
        """``fn()``'s value, or :class:`Skipped` when the circuit is open, a probe is under
        way, or ``fn`` fails with one of ``errors`` or a timeout."""
        probe = False
        if self._state is CircuitState.OPEN:
            if self._clock() < self._until:
                return Skipped(op, "circuit open")
            self._change(CircuitState.HALF_OPEN, "probing")
            probe = True
        elif self._state is CircuitState.HALF_OPEN:
            return Skipped(op, "circuit half-open: a probe is under way")
        try:
            async with asyncio.timeout(self.timeout):
                value = await fn()
        except TimeoutError:
            return self._failed(op, f"no answer within {self.timeout:g} s", probe)
        except self._errors as exc:
            return self._failed(op, f"{type(exc).__name__}: {exc}", probe)
        except BaseException:
            if probe:  # a cancelled probe proves nothing: let the next call probe again
                self._change(CircuitState.OPEN, "probe cancelled")
            raise
        if probe:
            self._backoff = self._first
            self._change(CircuitState.CLOSED, "probe answered")
        return value

    def _failed(self, op: str, reason: str, probe: bool) -> Skipped:
        # Calls that were in flight when the circuit opened fail too: only the first
        # failure of a closed circuit, or the probe's, changes anything.
        if probe or self._state is CircuitState.CLOSED:
            self._until = self._clock() + self._backoff
            self._change(CircuitState.OPEN, f"{op}: {reason}; retry in {self._backoff:g} s")
            self._backoff = min(self._backoff * 2, self._longest)
        return Skipped(op, reason)

    def _change(self, new: CircuitState, reason: str) -> None:
        old, self._state = self._state, new
        closed = CircuitState.CLOSED
        if (old is closed) != (new is closed) and self._on_change is not None:
            self._on_change(old, new, reason)
