"""The gateways' batches on the operator page, and a cancel from it (contract §15).

A gateway, a worker and the console on the real broker: the gateway reports its batches on
the events exchange, the console shows them in ``/api/state``, and a cancel through the
console's API (with its token) ends the batch ``cancelled``, whichever tenant owns it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web
from pydantic import SecretStr

from worker.console import ConsoleApp
from worker.gateway.app import Gateway
from worker.gateway.keys import Keys
from worker.mock.upstream import MockUpstream
from worker.service import Worker
from worker.settings import Settings

from .conftest import chat_line, client_for, jsonl, wait_batch

pytestmark = pytest.mark.integration

TOKEN = "console-batches-token-9d41"
StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def console(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The console over the test's settings, with a token, served on a free port."""
    app = ConsoleApp(settings.model_copy(update={"console_token": SecretStr(TOKEN)}))
    runner = web.AppRunner(app.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield client
    await runner.cleanup()


async def batch_in_state(
    console: httpx.AsyncClient,
    batch_id: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 20,
) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            state = (await console.get("/api/state")).json()
            shown = next((b for b in state["batches"] if b["id"] == batch_id), None)
            if shown is not None and done(shown):
                return shown
            await asyncio.sleep(0.2)


async def test_a_batch_shows_on_the_console_and_its_cancel_needs_the_token(
    start_gateway: StartGateway,
    start_worker: Callable[..., Awaitable[Worker]],
    mock: MockUpstream,
    console: httpx.AsyncClient,
) -> None:
    keys = Keys(((hashlib.sha256(b"key-a").digest(), "team-a"),))
    gateway = await start_gateway(keys=keys)
    await start_worker(concurrency=2)
    lines = [chat_line(f"c-{n}", mock={"latency": 0.5}) for n in range(60)]
    async with client_for(gateway, "key-a") as client:
        uploaded = await client.files.create(
            file=("c.jsonl", io.BytesIO(jsonl(lines))), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1h"
        )
        shown = await batch_in_state(
            console, batch.id, lambda b: b["status"] == "in_progress" and b["completed"] >= 2
        )
        assert shown["tenant"] == "team-a" and shown["total"] == 60
        assert 0 < shown["progress"] < 1 and shown["age_s"] >= 0
        state = (await console.get("/api/state")).json()
        assert [g["gateway"] for g in state["gateways"]] == [gateway.owner]

        path = f"/api/batches/{batch.id}/cancel"
        assert (await console.post(path)).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token"}
        assert (await console.post(path, headers=wrong)).status_code == 401
        unknown = await console.post(
            "/api/batches/batch_unknown/cancel", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert unknown.status_code == 404
        assert (await client.batches.retrieve(batch.id)).status == "in_progress"

        asked = await console.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert asked.status_code == 202, asked.text
        assert asked.json() == {"batch_id": batch.id, "requested": True, "status": "in_progress"}
        done = await wait_batch(client, batch.id, {"cancelled"}, timeout=30)
    counts = done.request_counts
    assert counts is not None and counts.completed + counts.failed == 60
    assert counts.failed > 0, "lines not yet called ended cancelled"
    shown = await batch_in_state(console, batch.id, lambda b: b["status"] == "cancelled")
    assert shown["completed"] + shown["failed"] == 60 and shown["progress"] == 1.0


async def test_cancel_is_off_without_the_console_token(settings: Settings) -> None:
    app = ConsoleApp(settings)
    runner = web.AppRunner(app.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            refused = await client.post(
                "/api/batches/batch_x/cancel", headers={"Authorization": "Bearer anything"}
            )
        assert refused.status_code == 403
    finally:
        await runner.cleanup()
