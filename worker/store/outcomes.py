"""What a lease request can come back with, and the outcome of a call the circuit skipped."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Acquired", "Held", "LeaseOutcome", "Skipped", "Stored"]


@dataclass(frozen=True, slots=True)
class Acquired:
    """The lease is the caller's until ``release`` or its time to live runs out."""


@dataclass(frozen=True, slots=True)
class Held:
    """Another holder has the lease for about ``remaining`` more seconds."""

    remaining: float


@dataclass(frozen=True, slots=True)
class Stored:
    """The job's final result is stored already: ``body`` is it, as it was published."""

    body: bytes


@dataclass(frozen=True, slots=True)
class Skipped:
    """Redis did not answer (``reason``); the caller carries on as if there were no store."""

    op: str
    reason: str


LeaseOutcome = Acquired | Held | Stored | Skipped
