"""A gateway killed mid-batch resumes after a restart; two gateways share one PostgreSQL
database; in both, every line ends exactly once (contract §15)."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from aio_pika.abc import AbstractConnection

from worker.gateway.app import Gateway
from worker.gateway.batchstore import BatchStore
from worker.gateway.store import Store
from worker.mock.upstream import MockUpstream
from worker.service import Worker
from worker.settings import Settings

from .conftest import (
    GatewayProcess,
    chat_line,
    client_for,
    file_lines,
    free_port,
    gateway_settings,
    jsonl,
    wait_batch,
)

pytestmark = pytest.mark.integration

POSTGRES = "postgresql://postgres@127.0.0.1:5432"


def check_every_line_once(
    output: list[dict[str, object]], errors: list[dict[str, object]], n: int
) -> None:
    ids = [line["custom_id"] for line in output + errors]
    assert len(ids) == n and set(ids) == {f"r-{k}" for k in range(n)}


async def test_a_gateway_killed_mid_batch_finishes_after_a_restart(
    settings: Settings,
    names: dict[str, str],
    connection: AbstractConnection,
    start_worker: Callable[..., Awaitable[Worker]],
    mock: MockUpstream,
    tmp_path: Path,
) -> None:
    total = 2000
    url = f"sqlite:///{tmp_path / 'restart.db'}"
    config = gateway_settings(settings, url, gateway_publish_chunk=25, gateway_lease_seconds=1.0)
    port = free_port()
    first = GatewayProcess(config, port)
    second = None
    store = await Store.open(url)
    try:
        await first.wait_ready()
        await start_worker(concurrency=32)
        raw = jsonl([chat_line(f"r-{k}") for k in range(total)])
        async with client_for(port) as client:
            uploaded = await client.files.create(file=("r.jsonl", io.BytesIO(raw)), purpose="batch")
            batch = await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1h"
            )
        async with asyncio.timeout(30):
            while True:
                row = await BatchStore(store.engine).get(batch.id, any_tenant=True)
                assert row is not None
                if 0 < row["published_upto"] < row["last_line"]:
                    break
                await asyncio.sleep(0.005)
        first.kill()
        killed_at = row["published_upto"]
        second = GatewayProcess(config, port)
        await second.wait_ready()
        async with client_for(port) as client:
            done = await wait_batch(client, batch.id, {"completed"}, timeout=90)
            output = await file_lines(client, done.output_file_id)
            errors = await file_lines(client, done.error_file_id)
    finally:
        first.kill()
        if second is not None:
            second.stop()
        await store.close()
        channel = await connection.channel()
        await channel.queue_delete(config.gateway_results_queue)
        await channel.close()
    print(f"\nkilled with {killed_at} of {total} lines published")
    assert done.request_counts is not None
    assert done.request_counts.completed == total and done.request_counts.failed == 0
    check_every_line_once(output, errors, total)
    assert [line["custom_id"] for line in output] == [f"r-{k}" for k in range(total)]


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    name = f"gw_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(f"{POSTGRES}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield f"{POSTGRES}/{name}"
    admin = await asyncpg.connect(f"{POSTGRES}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_two_gateways_on_one_postgresql_database_finish_a_batch_exactly(
    postgres_url: str,
    start_gateway: Callable[..., Awaitable[Gateway]],
    start_worker: Callable[..., Awaitable[Worker]],
    mock: MockUpstream,
) -> None:
    total = 500
    one, two = await asyncio.gather(
        start_gateway(database_url=postgres_url, gateway_publish_chunk=50),
        start_gateway(database_url=postgres_url, gateway_publish_chunk=50),
    )
    await start_worker(concurrency=32)
    await start_worker(concurrency=32)
    lines = [chat_line(f"r-{k}") for k in range(total)]
    for k in range(0, total, 10):
        lines[k]["body"]["mock"] = {"fault": "404"}
    async with client_for(one) as first, client_for(two) as second:
        uploaded = await first.files.create(
            file=("pg.jsonl", io.BytesIO(jsonl(lines))), purpose="batch"
        )
        batches = [
            await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1h"
            )
            for client in (first, second)
        ]
        for batch in batches:
            done = await wait_batch(second, batch.id, {"completed"}, timeout=90)
            assert done.request_counts is not None
            assert done.request_counts.total == total
            assert done.request_counts.failed == total // 10
            assert done.request_counts.completed == total - total // 10
            output = await file_lines(first, done.output_file_id)
            errors = await file_lines(first, done.error_file_id)
            check_every_line_once(output, errors, total)
            assert {line["error"]["code"] for line in errors} == {"not_found"}
