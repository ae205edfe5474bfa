"""The surface of ``worker.store``, pinned: what the delivery path may import."""

from __future__ import annotations

import pytest

import worker.store

pytestmark = pytest.mark.unit

PUBLIC = [
    "H_CACHE", "Acquired", "AnswerCache", "CachedAnswer", "Circuit", "CircuitState", "Held",
    "LeaseOutcome", "ResultStore", "Skipped", "StateChange", "Store", "StoreBackend",
    "StoreConfig", "StoreMetrics", "Stored", "cache_key", "deltas_from_completion",
    "enabled_for", "open_store", "restamp",
]  # fmt: skip


def test_all_is_pinned() -> None:
    assert sorted(worker.store.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(worker.store, name) is not None


def test_the_redis_client_is_not_imported_without_a_redis_url() -> None:
    # open_store imports the Redis backend lazily; the memory backend needs no client.
    assert worker.store.open_store(None) is None
