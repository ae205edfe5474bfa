"""Pay once (contract §16): the result store and the answer cache, over Redis."""

from __future__ import annotations

from worker.store.backend import StoreBackend
from worker.store.cache import (
    H_CACHE,
    AnswerCache,
    CachedAnswer,
    cache_key,
    deltas_from_completion,
    enabled_for,
)
from worker.store.circuit import Circuit, CircuitState, StateChange
from worker.store.connect import Store, StoreConfig, open_store
from worker.store.metrics import StoreMetrics
from worker.store.outcomes import Acquired, Held, LeaseOutcome, Skipped, Stored
from worker.store.results import ResultStore, restamp

__all__ = [
    "H_CACHE",
    "Acquired",
    "AnswerCache",
    "CachedAnswer",
    "Circuit",
    "CircuitState",
    "Held",
    "LeaseOutcome",
    "ResultStore",
    "Skipped",
    "StateChange",
    "Store",
    "StoreBackend",
    "StoreConfig",
    "StoreMetrics",
    "Stored",
    "cache_key",
    "deltas_from_completion",
    "enabled_for",
    "open_store",
    "restamp",
]
