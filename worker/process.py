"""``chat-worker run``: one worker process, its HTTP endpoints, until SIGTERM/SIGINT."""

from __future__ import annotations

from worker.health import HealthServer
from worker.service import Worker
from worker.settings import Settings
from worker.upstream.client import Upstream
from worker.upstream.pool import UpstreamPool

__all__ = ["serve"]


async def serve(settings: Settings, *, upstream: Upstream | UpstreamPool | None = None) -> None:
    """``chat-worker run``: the worker and its HTTP endpoints until SIGTERM/SIGINT."""
    worker = Worker(settings, upstream=upstream)
    worker.install_signal_handlers()
    health = None
    if settings.http_port:
        health = HealthServer(
            lambda: worker.ready,
            settings.http_port,
            registry=worker.telemetry.registry,
            readiness=lambda: worker.readiness,
            details=worker.readiness_details,
        )
        await health.start()
    try:
        await worker.run()
    finally:
        if health is not None:
            await health.stop()
        worker.telemetry.shutdown()  # flushes spans still waiting for export
