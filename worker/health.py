"""``/healthz``, ``/readyz`` and ``/metrics``, served by aiohttp from the worker's own loop.

Serving from the same event loop is the point of ``/healthz``: a loop blocked by a bug
answers no probe, and the orchestrator restarts the process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import prometheus_client
from aiohttp import web

__all__ = ["HealthServer"]


class HealthServer:
    """Health, readiness and metrics on ``port``; ``is_ready`` decides ``/readyz``."""

    def __init__(
        self,
        is_ready: Callable[[], bool],
        port: int,
        *,
        registry: prometheus_client.CollectorRegistry = prometheus_client.REGISTRY,
        host: str = "0.0.0.0",
        readiness: Callable[[], str] | None = None,
        details: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self._is_ready = is_ready
        self._readiness = readiness
        self._details = details
        self._registry = registry
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = port

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        if self._runner.addresses:  # port 0 in tests: learn the real one
            self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready = self._is_ready()
        body: dict[str, Any] = dict(self._details()) if self._details else {}
        if self._readiness is not None:
            body["status"] = self._readiness()
        body.setdefault("status", "ready" if ready else "not consuming")
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=prometheus_client.generate_latest(self._registry),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )
