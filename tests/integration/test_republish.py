"""Copies of a request the worker publishes again (issue 22, items 2, 3 and 7): bounded
headers, headers sent as bytes, the tenant kept; against the real broker.

Each ``test_itemN_...`` failed on the code before the fix and passes now.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from amqp_proxy import publish_raw
from support.broker import Replies, get_one, make_settings, publish
from support.jobs import calls
from support.jobs import chat_job as job

from worker.amqp.dlq import list_dead_letters, replay_dead_letters
from worker.amqp.topology import H_ERROR_CODE, TYPE_RESULT, declare
from worker.messages import JobResult
from worker.mock.upstream import MockUpstream
from worker.service import Worker
from worker.tenants import H_TENANT_USER

StartWorker = Callable[..., Awaitable[Worker]]
FRAME_MAX = 131072  # RabbitMQ's default, which the worker's connection negotiates


def results(messages: list[AbstractIncomingMessage]) -> dict[str, JobResult]:
    found = [JobResult.model_validate_json(m.body) for m in messages if m.type == TYPE_RESULT]
    by_id = {r.id: r for r in found}
    assert len(by_id) == len(found), "one result per job"
    return by_id


# --- 2. a request whose headers nearly fill a frame --------------------------------------


async def test_item2_a_copy_of_a_request_at_the_frame_limit_fits_and_fails_alone(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
) -> None:
    worker = await start_worker()
    queue = worker.settings.request_queue
    healthy = [job(mock={"chunks": 10, "chunk_interval": 0.1}, stream=True) for _ in range(4)]
    for request in healthy:
        await publish(connection, queue, request, reply_to=replies.name)
    await asyncio.sleep(0.3)  # the healthy ones are streaming
    # A header frame just under frame_max: the broker takes it from the producer.
    big = job(mock={"fault": "400"})
    headers = {"x-small": "kept", "x-big": "b" * (FRAME_MAX - 1200)}
    await publish(connection, queue, big, reply_to=replies.name, message_id="big", headers=headers)
    by_id = results(await replies.until_results(5, timeout=30))
    await asyncio.sleep(0.5)  # a second result would be here by now
    by_id = {**by_id, **results(replies.drain())}
    failed = by_id.pop("big")
    assert failed.error is not None and failed.error.code == "invalid_request"
    assert len(by_id) == 4
    assert all(r.error is None and r.metadata.attempts == 1 for r in by_id.values()), (
        "the connection stayed up: no job in flight was cancelled"
    )
    assert calls(mock, big) == 1
    letter = await get_one(connection, worker.settings.dead_letter_queue)
    carried = letter.headers or {}
    assert carried[H_ERROR_CODE] == "invalid_request"
    assert carried["x-small"] == "kept", "what fits is carried"
    assert "x-big" not in carried, "what does not fit is left out"


# --- 3. headers sent as bytes --------------------------------------------------------------


async def test_item3_headers_that_are_not_utf8_are_copied_listed_and_replayed(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
) -> None:
    worker = await start_worker()
    settings = worker.settings
    request = job(mock={"fault": "400"})
    raw = {"x-custom-id": b"\xff\xfe", "x-note": b"caf\xe9"}
    await publish_raw(
        settings.amqp_url.get_secret_value(),
        settings.request_queue,
        orjson.dumps(request),
        raw_headers=raw,
        reply_to=replies.name,
    )
    first = await replies.until_results(1)
    await asyncio.sleep(1.5)  # a redelivery would publish a second result by now
    assert len(results([*first, *replies.drain()])) == 1
    assert calls(mock, request) == 1
    letters = await list_dead_letters(settings)
    assert len(letters) == 1
    assert letters[0].custom_id == "\ufffd\ufffd"
    assert letters[0].error_code == "invalid_request"
    # The copy carried the bytes as bytes (a byte array), and a replay takes it.
    channel = await connection.channel()
    dead = await channel.get_queue(settings.dead_letter_queue)
    message = await dead.get(no_ack=False)
    assert bytes((message.headers or {})["x-note"]) == b"caf\xe9"
    await message.nack(requeue=True)
    await channel.close()
    assert await replay_dead_letters(settings) == 1
    await replies.until_results(1)


# --- 7. the tenant survives a republish ----------------------------------------------------


async def test_item7_the_tenant_survives_a_counted_requeue(
    amqp_url: str,
    names: dict[str, str],
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    broker_user: tuple[str, str],
) -> None:
    settings = make_settings(amqp_url, names, mock, queue_type="classic")
    await declare(connection, settings)
    name, url = broker_user
    request = job()
    producer = await aio_pika.connect(url)
    try:
        channel = await producer.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(
                orjson.dumps(request),
                user_id=name,
                reply_to=replies.name,
                # user_id wins (§12), before and after the copy; a carried tenant is
                # believed only on the worker's own copies.
                headers={"x-tenant": "claimed", H_TENANT_USER: "forged"},
            ),
            settings.request_queue,
        )
    finally:
        await producer.close()
    # Delivered once and not acknowledged: redelivered, the worker requeues a counted copy
    # (a classic queue counts nothing), and runs the job from that copy.
    channel = await connection.channel()
    queue = await channel.get_queue(settings.request_queue)
    assert await queue.get(no_ack=False) is not None
    await channel.close()
    await start_worker(queue_type="classic", trust_tenant_header=True)
    result = JobResult.model_validate_json((await replies.until_results(1))[-1].body)
    assert result.error is None
    assert result.metadata.tenant == name


async def test_item7_the_tenant_survives_a_dead_letter_and_its_replay(
    start_worker: StartWorker,
    replies: Replies,
    broker_user: tuple[str, str],
) -> None:
    worker = await start_worker()
    name, url = broker_user
    request = job(mock={"fault": "400", "times": 1})
    producer = await aio_pika.connect(url)
    try:
        channel = await producer.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(orjson.dumps(request), user_id=name, reply_to=replies.name),
            worker.settings.request_queue,
        )
    finally:
        await producer.close()
    first = JobResult.model_validate_json((await replies.until_results(1))[-1].body)
    assert first.error is not None and first.metadata.tenant == name
    async with asyncio.timeout(10):
        while not await list_dead_letters(worker.settings):
            await asyncio.sleep(0.05)
    assert await replay_dead_letters(worker.settings) == 1
    again = JobResult.model_validate_json((await replies.until_results(1))[-1].body)
    assert again.error is None
    assert again.metadata.tenant == name
