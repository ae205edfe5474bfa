"""The store's backends: Redis for deployments, a dict for tests."""

from __future__ import annotations

from worker.store.backends.memory import MemoryBackend
from worker.store.backends.redis import RedisBackend

__all__ = ["MemoryBackend", "RedisBackend"]
