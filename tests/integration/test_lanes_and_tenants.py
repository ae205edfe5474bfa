"""Lanes and tenants (contract §12) against the real broker and the mock upstream."""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import orjson
import prometheus_client
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import SecretStr
from support.broker import Replies, get_one, publish

from worker.amqp.dlq import list_dead_letters, replay_dead_letters
from worker.amqp.topology import DELAY_TIERS, delay_queue_name
from worker.messages import JobResult
from worker.producer.client import ChatClient
from worker.producer.progress import PlainReporter
from worker.producer.submit import submit_file
from worker.service import Worker

QUEUE_TYPES = ("quorum", "classic")


# Each job takes this long upstream, so that jobs overlap and shares can be seen.
LATENCY = 0.2


def job(n: int = 0, latency: float = LATENCY) -> dict[str, Any]:
    return {
        "custom_id": f"job-{n}",
        "body": {
            "model": "m",
            "messages": [{"role": "user", "content": f"job {n}"}],
            "mock": {"latency": latency},
        },
    }


@pytest.fixture
def lanes(names: dict[str, str]) -> tuple[str, str]:
    """Two lane queues of this test alone: (fast, slow)."""
    base = names["request_queue"]
    return f"{base}.interactive", f"{base}.batch"


@pytest.fixture
async def lane_cleanup(
    connection: AbstractConnection, lanes: tuple[str, str]
) -> AsyncIterator[None]:
    yield
    channel = await connection.channel()
    for lane in lanes:
        delays = [delay_queue_name(lane, s, t) for s in DELAY_TIERS for t in QUEUE_TYPES]
        for name in (lane, f"{lane}.dlq", *delays):
            await channel.queue_delete(name)


async def fill(connection: AbstractConnection, queue: str, count: int, **properties: Any) -> None:
    """Publish ``count`` jobs on one confirmed channel."""
    channel = await connection.channel()
    for n in range(count):
        await channel.default_exchange.publish(
            aio_pika.Message(orjson.dumps(job(n)), **properties), queue
        )
    await channel.close()


async def results_by_lane(replies: Replies, count: int, timeout: float = 60) -> list[JobResult]:
    return [
        JobResult.model_validate_json(m.body)
        for m in await replies.until_results(count, timeout=timeout)
        if m.type == "chat.result"
    ]


async def test_both_lanes_saturated_share_slots_by_weight(
    lane_cleanup: None,
    start_worker: Callable[..., Awaitable[Worker]],
    connection: AbstractConnection,
    replies: Replies,
    lanes: tuple[str, str],
) -> None:
    fast, slow = lanes
    running = await start_worker(request_queue=f"{fast}:3,{slow}:1", concurrency=8)
    await fill(connection, fast, 150, reply_to=replies.name)
    await fill(connection, slow, 150, reply_to=replies.name)
    # Let the slots settle on the plan, then count what the next jobs were.
    await replies.until_results(24, timeout=30)
    samples: list[dict[str, int]] = []
    finished = await asyncio.gather(
        results_by_lane(replies, 120), _sample(running, samples, seconds=2.0)
    )
    split = Counter(result.metadata.lane for result in finished[0])
    share = split[fast] / (split[fast] + split[slow])
    assert abs(share - 0.75) <= 0.075, split  # within 10 % of the weights' 3 : 1
    assert all(sum(sample.values()) <= 8 for sample in samples)
    assert max(sample[fast] for sample in samples) == 6


async def _sample(running: Worker, into: list[dict[str, int]], seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        into.append(running.in_flight_by_lane())
        await asyncio.sleep(0.01)


async def test_an_empty_lane_lends_every_slot_and_takes_them_back(
    lane_cleanup: None,
    start_worker: Callable[..., Awaitable[Worker]],
    connection: AbstractConnection,
    replies: Replies,
    lanes: tuple[str, str],
) -> None:
    fast, slow = lanes
    running = await start_worker(request_queue=f"{fast}:4,{slow}:1", concurrency=8)
    await fill(connection, slow, 200, reply_to=replies.name)
    samples: list[dict[str, int]] = []
    async with asyncio.timeout(15):
        while not samples or samples[-1][slow] < 8:
            await _sample(running, samples, seconds=0.1)
    assert samples[-1] == {fast: 0, slow: 8}  # the lane of weight 1 holds every slot

    # Work appears in the heavy lane: it gets its jobs through at once, not after the
    # backlog, and never more than WORKER_CONCURRENCY run in all.
    started = time.monotonic()
    await publish(connection, fast, job(1000, latency=0.05), reply_to=replies.name)
    sampler = asyncio.create_task(_sample(running, samples, seconds=1.5))
    async with asyncio.timeout(10):
        while True:
            result = JobResult.model_validate_json((await replies.get()).body)
            if result.metadata.lane == fast:
                break
    assert time.monotonic() - started < 1.5
    await sampler
    assert all(sum(sample.values()) <= 8 for sample in samples)


async def test_lane_and_tenant_in_result_metadata_and_metrics(
    lane_cleanup: None,
    start_worker: Callable[..., Awaitable[Worker]],
    connection: AbstractConnection,
    replies: Replies,
    lanes: tuple[str, str],
) -> None:
    fast, slow = lanes
    running = await start_worker(
        request_queue=f"{fast}:4,{slow}", trust_tenant_header=True, concurrency=4
    )
    await publish(
        connection, slow, job(latency=0), reply_to=replies.name, headers={"x-tenant": "team-b"}
    )
    result = JobResult.model_validate_json((await replies.get()).body)
    assert result.error is None
    assert (result.metadata.lane, result.metadata.tenant) == (slow, "team-b")
    registry: prometheus_client.CollectorRegistry = running.telemetry.registry
    owner = {"lane": slow, "tenant": "team-b", "gen_ai_request_model": "m"}
    jobs = {**owner, "outcome": "ok", "error_code": ""}
    assert await _sample_value(registry, "chat_worker_jobs_total", jobs) == 1
    assert result.usage is not None
    for kind, count in (
        ("input", result.usage.prompt_tokens),
        ("output", result.usage.completion_tokens),
    ):
        labels = {**owner, "gen_ai_token_type": kind}
        assert await _sample_value(registry, "chat_worker_tokens_total", labels) == count


async def _sample_value(
    registry: prometheus_client.CollectorRegistry, name: str, labels: dict[str, str]
) -> float | None:
    """The sample with these labels (among others) once the worker has recorded it, just
    after it settles the job."""

    def find() -> float | None:
        for family in registry.collect():
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    return float(sample.value)
        return None

    async with asyncio.timeout(5):
        while (value := find()) is None:
            await asyncio.sleep(0.01)
    return value


@pytest.mark.parametrize("trusted", [False, True])
async def test_x_tenant_counts_only_when_trusted(
    start_worker: Callable[..., Awaitable[Worker]],
    connection: AbstractConnection,
    replies: Replies,
    trusted: bool,
) -> None:
    running = await start_worker(trust_tenant_header=trusted)
    await publish(
        connection,
        running.settings.request_queue,
        job(latency=0),
        reply_to=replies.name,
        headers={"x-tenant": "claimed-team"},
    )
    result = JobResult.model_validate_json((await replies.get()).body)
    assert result.metadata.lane == running.settings.request_queue
    assert result.metadata.tenant == ("claimed-team" if trusted else None)


async def test_user_id_of_a_client_becomes_the_tenant(
    worker: Worker,
    replies: Replies,
    broker_user: tuple[str, str],
) -> None:
    name, url = broker_user
    async with ChatClient.connect(
        url, settings=worker.settings, tenant_from_connection=True
    ) as client:
        result = await client.complete(job(latency=0)["body"], timeout=15)
    assert result.metadata.tenant == name
    assert result.metadata.lane == worker.settings.request_queue


async def test_a_forged_user_id_is_refused_by_the_broker(
    worker: Worker, connection: AbstractConnection
) -> None:
    channel = await connection.channel()
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="user_id"):
        await channel.default_exchange.publish(
            aio_pika.Message(orjson.dumps(job()), user_id="someone-else"),
            worker.settings.request_queue,
        )


async def test_a_lane_keeps_its_jobs_delay_queues_and_dead_letters(
    lane_cleanup: None,
    start_worker: Callable[..., Awaitable[Worker]],
    connection: AbstractConnection,
    replies: Replies,
    lanes: tuple[str, str],
) -> None:
    fast, slow = lanes
    running = await start_worker(request_queue=f"{fast}:4,{slow}:1", concurrency=4)
    # A long Retry-After sends the job round its own lane's delay queue.
    later = job(1, latency=0)
    # (a 503: a 429 now waits for budget inline up to 30 s, contract §11)
    later["body"]["mock"] = {"fault": "503", "retry_after": 20, "times": 1, "key": "lane-later"}
    await publish(connection, slow, later, message_id="later-1", reply_to=replies.name)
    delayed = await get_one(connection, delay_queue_name(slow, 30, running.settings.queue_type))
    assert delayed.message_id == "later-1"
    # A failed job leaves its request in its lane's dead-letter queue, and a replay of that
    # lane sends it back to the same lane.
    failing = job(2, latency=0)
    failing["body"]["mock"] = {"fault": "400"}
    await publish(connection, slow, failing, message_id="failing-1", reply_to=replies.name)
    result = JobResult.model_validate_json((await replies.get()).body)
    assert (result.id, result.metadata.lane) == ("failing-1", slow)
    assert result.error is not None
    letters = await list_dead_letters(running.settings, lane=slow)
    assert [letter.job_id for letter in letters] == ["failing-1"]
    assert await list_dead_letters(running.settings, lane=fast) == []
    with pytest.raises(ValueError, match="not a lane"):
        await list_dead_letters(running.settings, lane="chat.elsewhere")
    assert await replay_dead_letters(running.settings, lane=slow, codes=["invalid_request"]) == 1
    replayed = JobResult.model_validate_json((await replies.get()).body)
    assert (replayed.id, replayed.metadata.lane) == ("failing-1", slow)


async def test_consuming_resumes_when_a_lane_queue_is_deleted_under_the_worker(
    lane_cleanup: None,
    start_worker: Callable[..., Awaitable[Worker]],
    connection: AbstractConnection,
    replies: Replies,
    lanes: tuple[str, str],
) -> None:
    fast, slow = lanes
    running = await start_worker(request_queue=f"{fast}:4,{slow}:1", concurrency=4)
    channel = await connection.channel()
    # The broker cancels the lane's consumers: the worker must notice and consume again.
    await channel.queue_delete(slow)
    async with asyncio.timeout(15):
        while running.ready:
            await asyncio.sleep(0.01)
        await running.wait_ready()
    await publish(connection, slow, job(latency=0), reply_to=replies.name)
    result = JobResult.model_validate_json((await replies.get()).body)
    assert (result.error, result.metadata.lane) == (None, slow)


async def test_submit_publishes_to_a_lane_with_the_connection_user_as_tenant(
    lane_cleanup: None,
    start_worker: Callable[..., Awaitable[Worker]],
    lanes: tuple[str, str],
    broker_user: tuple[str, str],
    tmp_path: Path,
) -> None:
    fast, slow = lanes
    running = await start_worker(request_queue=f"{fast}:4,{slow}:1", concurrency=4)
    name, url = broker_user
    source = tmp_path / "jobs.jsonl"
    source.write_bytes(b"".join(orjson.dumps(job(n, latency=0)) + b"\n" for n in range(5)))
    settings = running.settings.model_copy(update={"amqp_url": SecretStr(url)})
    tally = await submit_file(
        settings,
        source,
        tmp_path / "jobs.out.jsonl",
        reporter=PlainReporter(io.StringIO()),
        lane=slow,
        tenant_from_connection=True,
    )
    assert tally.complete and tally.ok == 5
    registry: prometheus_client.CollectorRegistry = running.telemetry.registry
    labels = {"lane": slow, "tenant": name, "outcome": "ok"}
    assert await _sample_value(registry, "chat_worker_jobs_total", labels) == 5
