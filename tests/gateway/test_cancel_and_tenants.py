"""Cancelling a running batch, and tenants that cannot see each other (contract §15)."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Awaitable, Callable

import openai
import pytest
from aio_pika.abc import AbstractConnection

from worker.amqp.cancellations import CancelledBatches, follow_cancellations
from worker.gateway.app import Gateway
from worker.gateway.keys import Keys
from worker.mock.upstream import MockUpstream
from worker.service import Worker
from worker.settings import Settings

from .conftest import chat_line, client_for, file_lines, jsonl, wait_batch

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Awaitable[Gateway]]


async def test_cancel_mid_batch_ends_every_line_and_tells_the_workers(
    start_gateway: StartGateway,
    start_worker: Callable[..., Awaitable[Worker]],
    mock: MockUpstream,
    connection: AbstractConnection,
    settings: Settings,
) -> None:
    cancelled = CancelledBatches()
    stop_following = await follow_cancellations(connection, settings.events_exchange, cancelled)
    gateway = await start_gateway()
    await start_worker(concurrency=4)
    lines = [chat_line(f"c-{n}", mock={"latency": 0.3}) for n in range(60)]
    async with client_for(gateway) as client:
        uploaded = await client.files.create(
            file=("c.jsonl", io.BytesIO(jsonl(lines))), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1h"
        )
        async with asyncio.timeout(30):
            while True:
                seen = await client.batches.retrieve(batch.id)
                if seen.request_counts is not None and seen.request_counts.completed >= 4:
                    break
                await asyncio.sleep(0.05)
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        async with asyncio.timeout(5):
            while batch.id not in cancelled:
                await asyncio.sleep(0.05)
        done = await wait_batch(client, batch.id, {"cancelled"}, timeout=30)
        output = await file_lines(client, done.output_file_id)
        errors = await file_lines(client, done.error_file_id)
    await stop_following()
    counts = done.request_counts
    assert counts is not None and counts.total == 60
    assert counts.completed + counts.failed == 60
    assert counts.failed > 0 and counts.completed >= 4
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert {line["error"]["code"] for line in errors} == {"cancelled"}
    # The workers skipped the lines not yet called: the calls made are the completed lines
    # and at most the worker's four in flight when it learnt of the cancel (their answers
    # may come after the gateway's grace and count as cancelled).
    calls = sum(1 for r in mock.requests if r.path.endswith("/chat/completions"))
    assert counts.completed <= calls <= counts.completed + 4
    everything = sorted(
        (line["custom_id"] for line in output + errors), key=lambda c: int(c.split("-")[1])
    )
    assert everything == [f"c-{n}" for n in range(60)]
    assert done.cancelled_at is not None


async def test_tenants_see_only_their_own_files_and_batches(
    start_gateway: StartGateway, mock: MockUpstream
) -> None:
    keys = Keys(
        (
            (hashlib.sha256(b"key-a").digest(), "team-a"),
            (hashlib.sha256(b"key-b").digest(), "team-b"),
        )
    )
    gateway = await start_gateway(keys=keys)
    raw = jsonl([chat_line("x")])
    async with (
        client_for(gateway, "key-a") as team_a,
        client_for(gateway, "key-b") as team_b,
        client_for(gateway, "wrong") as stranger,
    ):
        mine = await team_a.files.create(file=("a.jsonl", io.BytesIO(raw)), purpose="batch")
        batch = await team_a.batches.create(
            input_file_id=mine.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        with pytest.raises(openai.NotFoundError):
            await team_b.files.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            await team_b.files.content(mine.id)
        with pytest.raises(openai.NotFoundError):
            await team_b.files.delete(mine.id)
        with pytest.raises(openai.NotFoundError):
            await team_b.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            await team_b.batches.cancel(batch.id)
        with pytest.raises(openai.NotFoundError):
            await team_b.batches.create(
                input_file_id=mine.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert [f.id async for f in team_b.files.list()] == []
        assert [b.id async for b in team_b.batches.list()] == []
        assert [f.id async for f in team_a.files.list()] == [mine.id]
        assert [b.id async for b in team_a.batches.list()] == [batch.id]
        with pytest.raises(openai.AuthenticationError) as refused:
            await stranger.files.list()
        assert refused.value.code == "invalid_api_key"


async def test_uploads_over_the_limits_are_refused(
    start_gateway: StartGateway, mock: MockUpstream
) -> None:
    gateway = await start_gateway(gateway_max_file_lines=3, gateway_max_file_bytes=4000)
    async with client_for(gateway) as client:
        with pytest.raises(openai.BadRequestError, match="request lines"):
            await client.files.create(
                file=("a.jsonl", io.BytesIO(jsonl([chat_line(str(n)) for n in range(4)]))),
                purpose="batch",
            )
        with pytest.raises(openai.BadRequestError, match="larger than"):
            await client.files.create(file=("b.jsonl", io.BytesIO(b"x" * 5000)), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            await client.files.create(
                file=("c.jsonl", io.BytesIO(b"{}\n")),
                purpose="fine-tune",  # type: ignore[arg-type]
            )
        assert [f.id async for f in client.files.list()] == []


async def test_batches_list_newest_first_with_cursor(
    start_gateway: StartGateway, mock: MockUpstream
) -> None:
    gateway = await start_gateway()
    async with client_for(gateway) as client:
        uploaded = await client.files.create(
            file=("l.jsonl", io.BytesIO(jsonl([chat_line("x", mock={"latency": 5})]))),
            purpose="batch",
        )
        ids = [
            (
                await client.batches.create(
                    input_file_id=uploaded.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                )
            ).id
            for _ in range(5)
        ]
        first = await client.batches.list(limit=2)
        assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
        assert [b.id async for b in client.batches.list(limit=2)] == ids[::-1]
        with pytest.raises(openai.NotFoundError):
            await client.batches.retrieve("batch_nope")
