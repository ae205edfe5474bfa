"""Wiring: one backend, one circuit and one set of counts shared by the store and cache."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from worker.store.backend import StoreBackend
from worker.store.cache import DEFAULT_CACHE_TTL, AnswerCache
from worker.store.circuit import DEFAULT_TIMEOUT, Circuit, CircuitState, StateChange
from worker.store.metrics import StoreMetrics
from worker.store.results import DEFAULT_MAX_BYTES, DEFAULT_RESULT_TTL, ResultStore

__all__ = ["Store", "StoreConfig", "open_store"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """The settings the store reads (``WORKER_RESULT_TTL``, ``WORKER_CACHE_TTL``) and its
    own bounds. ``WORKER_CACHE`` is not here: it is a per-job default, for
    :func:`~worker.store.cache.enabled_for`, since a header can turn the cache on."""

    result_ttl: float = DEFAULT_RESULT_TTL  # 0: no result store
    cache_ttl: float = DEFAULT_CACHE_TTL  # 0: no cache
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = DEFAULT_TIMEOUT
    prefix: str = "cw"


@dataclass(slots=True)
class Store:
    """The result store and the cache of one process (either None when turned off)."""

    results: ResultStore | None
    cache: AnswerCache | None
    metrics: StoreMetrics
    circuit: Circuit
    backend: StoreBackend

    async def aclose(self) -> None:
        await self.backend.aclose()


def _log_change(old: CircuitState, new: CircuitState, reason: str) -> None:
    if new is CircuitState.CLOSED:
        log.info("store available again", circuit=new.value, reason=reason)
    else:
        log.warning("store unavailable: skipping it", circuit=new.value, reason=reason)


def open_store(
    redis_url: str | None,
    config: StoreConfig | None = None,
    *,
    backend: StoreBackend | None = None,
    on_change: StateChange | None = None,
) -> Store | None:
    """The store for ``redis_url``; None without one (contract §16: no Redis, no store and
    no cache). ``backend`` replaces Redis (tests pass a MemoryBackend and any URL).
    ``on_change`` hears of outages in addition to the log line and the gauge."""
    if redis_url is None and backend is None:
        return None
    config = config or StoreConfig()
    if backend is None:
        from worker.store.backends.redis import RedisBackend

        assert redis_url is not None
        backend = RedisBackend(redis_url, connect_timeout=config.timeout, timeout=config.timeout)
    metrics = StoreMetrics()

    def changed(old: CircuitState, new: CircuitState, reason: str) -> None:
        metrics.circuit_changed(old, new, reason)
        _log_change(old, new, reason)
        if on_change is not None:
            on_change(old, new, reason)

    circuit = Circuit(timeout=config.timeout, errors=backend.errors, on_change=changed)
    results = None
    if config.result_ttl > 0:
        results = ResultStore(
            backend,
            circuit,
            ttl=config.result_ttl,
            max_bytes=config.max_bytes,
            prefix=config.prefix,
            metrics=metrics,
        )
    cache = None
    if config.cache_ttl > 0:
        cache = AnswerCache(
            backend,
            circuit,
            ttl=config.cache_ttl,
            max_bytes=config.max_bytes,
            prefix=config.prefix,
            metrics=metrics,
        )
    return Store(results, cache, metrics, circuit, backend)
