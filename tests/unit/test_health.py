"""/healthz, /readyz and /metrics (worker/health.py), through aiohttp's test client."""

from __future__ import annotations

import prometheus_client
from aiohttp.test_utils import TestClient, TestServer

from worker.health import HealthServer


async def client_for(server: HealthServer) -> TestClient:
    client = TestClient(TestServer(server.app()))
    await client.start_server()
    return client


async def test_healthz_is_200_and_readyz_follows_readiness() -> None:
    ready = [False]
    server = HealthServer(
        lambda: ready[0],
        0,
        readiness=lambda: "ready" if ready[0] else "broker blocked",
        details=lambda: {"node": "amqp://n1"},
    )
    client = await client_for(server)
    try:
        assert (await client.get("/healthz")).status == 200
        answer = await client.get("/readyz")
        assert answer.status == 503
        assert await answer.json() == {"node": "amqp://n1", "status": "broker blocked"}
        ready[0] = True
        answer = await client.get("/readyz")
        assert answer.status == 200
        assert (await answer.json())["status"] == "ready"
    finally:
        await client.close()


async def test_metrics_serves_the_registry_given() -> None:
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter("probe_total", "a probe", registry=registry)
    counter.inc(3)
    client = await client_for(HealthServer(lambda: True, 0, registry=registry))
    try:
        answer = await client.get("/metrics")
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        assert "probe_total 3.0" in await answer.text()
    finally:
        await client.close()
