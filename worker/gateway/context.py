"""What the HTTP handlers share: the store, the batch life cycle, the settings."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from worker.gateway.batchstore import BatchStore
from worker.gateway.lifecycle import Lifecycle
from worker.gateway.store import Store
from worker.settings import Settings

__all__ = ["CONTEXT", "GatewayContext"]


@dataclass(frozen=True, slots=True)
class GatewayContext:
    store: Store
    batches: BatchStore
    lifecycle: Lifecycle
    settings: Settings
    max_line_bytes: int
    wake_runner: object  # Callable[[], None]; kept loose to avoid a cycle with runner

    @staticmethod
    def of(request: web.Request) -> GatewayContext:
        return request.app[CONTEXT]


CONTEXT = web.AppKey("gateway", GatewayContext)
