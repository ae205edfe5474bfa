"""The store's counts, kept as plain numbers for the worker's telemetry to read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.store.circuit import CircuitState

__all__ = ["StoreMetrics"]

#: the circuit gauge's value per state
CIRCUIT_GAUGE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


@dataclass(slots=True)
class StoreMetrics:
    """Monotonic counts (and one gauge) of the result store and the cache of one process.

    Adding is a field update, so the hot path pays nothing; the worker's telemetry reports
    them as observable counters (as ``Tally`` does), reading :meth:`snapshot`. Every label
    set is bounded: ``op`` and ``kind`` take the few values named below.
    """

    cache_hits: int = 0
    cache_misses: int = 0
    cache_stored: int = 0  #: answers put into the cache
    results_stored: int = 0  #: final results written to the result store
    results_served: int = 0  #: deliveries answered from the result store ("stored")
    #: results not kept because they were over the size bound, by ``kind`` (result, answer)
    too_large: dict[str, int] = field(default_factory=dict)
    #: operations skipped because Redis was unavailable, by ``op`` (lookup, store, acquire,
    #: release, renew, cache_get, cache_put)
    skipped: dict[str, int] = field(default_factory=dict)
    circuit: int = 0  #: gauge: 0 closed, 1 half-open, 2 open
    circuit_changes: int = 0

    def skip(self, op: str) -> None:
        self.skipped[op] = self.skipped.get(op, 0) + 1

    def oversize(self, kind: str) -> None:
        self.too_large[kind] = self.too_large.get(kind, 0) + 1

    def circuit_changed(self, old: CircuitState, new: CircuitState, reason: str) -> None:
        """A :data:`~worker.store.circuit.StateChange` callback."""
        self.circuit = CIRCUIT_GAUGE[new]
        self.circuit_changes += 1

    def snapshot(self) -> dict[str, Any]:
        """Every count, the labelled ones as copies (a reader may run on another thread)."""
        return {
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "cache_stored": self.cache_stored,
            "results_stored": self.results_stored,
            "results_served": self.results_served,
            "too_large": self.too_large.copy(),
            "skipped": self.skipped.copy(),
            "circuit": self.circuit,
            "circuit_changes": self.circuit_changes,
        }
