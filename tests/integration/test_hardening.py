"""Issue 10: every path that lost a job or reported a wrong result, against the real broker.

Each ``test_itemN_...`` failed on the code before the fix and passes now.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq
import orjson
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from amqp_proxy import AmqpProxy, publish_raw
from support.broker import (
    Replies,
    depth,
    drain,
    fresh_telemetry,
    get_one,
    make_settings,
    publish,
)
from support.jobs import calls
from support.jobs import chat_job as job

from worker.amqp.dlq import ReplayFailed, list_dead_letters, replay_dead_letters
from worker.amqp.publish import render_result
from worker.amqp.topology import (
    H_CUSTOM_ID,
    H_ERROR_CODE,
    H_UNROUTABLE_RESULT,
    TYPE_RESULT,
    declare,
    delay_queue_name,
)
from worker.health import HealthServer
from worker.job import Envelope, JobOutcome
from worker.messages import MAX_CUSTOM_ID, JobResult
from worker.mock.upstream import MockUpstream
from worker.producer.client import ChatClient, UnreadableResult
from worker.producer.submit import UNREADABLE_RESULT, journal_path, reply_queue_name, submit_file
from worker.service import Worker
from worker.settings import Settings

StartWorker = Callable[..., Awaitable[Worker]]


# --- 1. mandatory copies: a return leaves the request unacknowledged ---------------------


async def test_item1_a_missing_delay_queue_does_not_lose_the_job(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
) -> None:
    worker = await start_worker()
    channel = await connection.channel()
    settings = worker.settings
    # an operator did:
    await channel.queue_delete(delay_queue_name(settings.request_queue, 30, settings.queue_type))
    request = job(mock={"fault": "429", "retry_after": 10, "times": 1})
    await publish(connection, worker.settings.request_queue, request, reply_to=replies.name)
    result = JobResult.model_validate_json((await replies.until_results(1, timeout=20))[-1].body)
    assert result.error is None, "the unroutable delay copy left the request unacknowledged"
    assert calls(mock, request) == 2


async def test_item1_a_missing_dead_letter_queue_costs_the_letter_not_the_result(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
) -> None:
    """Issue 22 item 4 changed this rule: a failed job's dead letter goes first, and a
    dead-letter queue that is not there loses the letter (logged, counted), not the one
    result (before, the request was kept and every redelivery published a result again)."""
    worker = await start_worker()
    channel = await connection.channel()
    await channel.queue_delete(worker.settings.dead_letter_queue)
    request = job(mock={"fault": "400"})
    await publish(connection, worker.settings.request_queue, request, reply_to=replies.name)
    first = await replies.until_results(1)
    await asyncio.sleep(1.5)
    assert len([m for m in [*first, *replies.drain()] if m.type == TYPE_RESULT]) == 1
    assert await depth(connection, worker.settings.request_queue) == 0, "acknowledged"
    assert calls(mock, request) == 1


# --- 2. an unroutable result is kept, with its completion --------------------------------


async def test_item2_an_unroutable_result_goes_to_the_dead_letter_queue(
    start_worker: StartWorker, connection: AbstractConnection, mock: MockUpstream
) -> None:
    worker = await start_worker(result_queue="")  # nothing bound to the result exchange
    request = job()
    await publish(connection, worker.settings.request_queue, request, message_id="paid-1")
    kept = await get_one(connection, worker.settings.dead_letter_queue)
    assert kept.type == TYPE_RESULT
    assert (kept.headers or {})[H_UNROUTABLE_RESULT] == (
        f"{worker.settings.result_exchange}/result.ok"
    )
    result = JobResult.model_validate_json(kept.body)
    assert result.id == "paid-1" and result.error is None
    assert result.response is not None and result.response.body is not None
    assert result.response.body["choices"][0]["message"]["content"], "the completion is there"
    await asyncio.sleep(0.3)
    assert await depth(connection, worker.settings.request_queue) == 0, "request acknowledged"
    letters = await list_dead_letters(worker.settings)
    assert letters == [], "get_one took it; nothing else was dead-lettered"
    assert calls(mock, request) == 1


async def test_item2_an_unroutable_result_is_listed_and_never_replayed_as_a_request(
    start_worker: StartWorker, connection: AbstractConnection
) -> None:
    worker = await start_worker(result_queue="")
    await publish(connection, worker.settings.request_queue, job(), message_id="paid-2")
    async with asyncio.timeout(15):
        while not (letters := await list_dead_letters(worker.settings)):
            await asyncio.sleep(0.05)
    assert [(x.job_id, x.reason) for x in letters] == [("paid-2", "result_unroutable")]
    assert await replay_dead_letters(worker.settings) == 0
    # Left where it was: back to ready once the broker has taken the replay's release.
    async with asyncio.timeout(5):
        while await depth(connection, worker.settings.dead_letter_queue) != 1:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert await depth(connection, worker.settings.dead_letter_queue) == 1


# --- 3. copies never inherit the request's expiration ------------------------------------


async def test_item3_a_dead_letter_outlives_the_request_ttl(
    start_worker: StartWorker, connection: AbstractConnection, replies: Replies
) -> None:
    worker = await start_worker()
    request = job(mock={"fault": "400"})
    await publish(
        connection,
        worker.settings.request_queue,
        request,
        reply_to=replies.name,
        expiration=2,  # seconds
    )
    await replies.until_results(1)
    await asyncio.sleep(3)
    letter = await get_one(connection, worker.settings.dead_letter_queue, timeout=2)
    assert (letter.headers or {})[H_ERROR_CODE] == "invalid_request"
    assert letter.expiration is None


# --- 4. dlq replay acknowledges only a routed, confirmed copy ----------------------------


async def test_item4_replay_to_a_missing_request_queue_keeps_the_dead_letter(
    settings: Settings, connection: AbstractConnection
) -> None:
    channel = await connection.channel()
    await channel.declare_queue(
        settings.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await publish(
        connection,
        settings.dead_letter_queue,
        job(),
        message_id="dead-1",
        headers={H_ERROR_CODE: "upstream_error"},
    )
    mistyped = settings.model_copy(update={"request_queue": f"{settings.request_queue}.typo"})
    with pytest.raises(ReplayFailed) as failed:
        await replay_dead_letters(mistyped)
    assert failed.value.replayed == 0
    assert [x.job_id for x in await list_dead_letters(settings)] == ["dead-1"]

    env = {**os.environ, **mistyped.to_env()}
    replay = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker", "dlq", "replay", "--all"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert replay.returncode == 1
    assert "typo" in replay.stderr and "stay in the dead-letter queue" in replay.stderr
    assert [x.job_id for x in await list_dead_letters(settings)] == ["dead-1"]


# --- 5. the producer side reads what the worker publishes --------------------------------


def worker_result(job_id: str, custom_id: str | None, usage: dict[str, Any] | None) -> bytes:
    """A result as the worker renders it (its own serializer), e.g. with null usage counts."""
    envelope = Envelope(
        job_id=job_id,
        correlation_id=job_id,
        reply_to=None,
        reply_to_forbidden=False,
        deadline=None,
        bad_deadline=None,
        prior_attempts=0,
        redeliveries=0,
        headers={},
    )
    outcome = JobOutcome(
        attempts=1,
        status_code=200,
        body={"object": "chat.completion", "choices": [], "usage": usage},
        usage=usage,
    )
    return render_result(envelope, custom_id, "m", outcome, "test/1")


@contextlib.asynccontextmanager
async def answering(
    connection: AbstractConnection,
    settings: Settings,
    reply: Callable[[dict[str, Any], AbstractIncomingMessage], bytes],
) -> AsyncIterator[None]:
    """Play a worker: answer each request with ``reply(line, message)``."""
    await declare(connection, settings)
    channel = await connection.channel()
    source = await channel.get_queue(settings.request_queue)

    async def on_request(message: AbstractIncomingMessage) -> None:
        body = reply(orjson.loads(message.body), message)
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                type=TYPE_RESULT,
                correlation_id=message.correlation_id or message.message_id,
                headers={"x-job-id": message.message_id},
            ),
            message.reply_to or "",
        )
        await message.ack()

    tag = await source.consume(on_request)
    try:
        yield
    finally:
        await source.cancel(tag)
        await channel.close()


async def test_item5_client_accepts_null_usage_and_reports_an_unreadable_result(
    settings: Settings, connection: AbstractConnection
) -> None:
    def reply(line: dict[str, Any], message: AbstractIncomingMessage) -> bytes:
        if line["custom_id"] == "bad":
            return orjson.dumps({"id": message.message_id, "type": "result", "metadata": {}})
        usage = {"prompt_tokens": None, "completion_tokens": 3, "total_tokens": None}
        return worker_result(str(message.message_id), line["custom_id"], usage)

    async with (
        answering(connection, settings, reply),
        ChatClient(connection, settings=settings) as client,
    ):
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        result = await client.complete(body, custom_id="nulls", timeout=10)
        assert result.usage is not None and result.usage.prompt_tokens is None
        assert result.usage.completion_tokens == 3
        async with asyncio.timeout(10):  # reported at once, not after the job's timeout
            with pytest.raises(UnreadableResult) as unreadable:
                await client.complete(body, custom_id="bad", job_id="job-bad", timeout=60)
        assert unreadable.value.job_id == "job-bad"
        assert "metadata" in unreadable.value.problem


async def test_item5_submit_writes_unreadable_results_and_resume_finishes(
    settings: Settings, connection: AbstractConnection, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    output = tmp_path / "in.out.jsonl"
    lines = [job("nulls"), job("bad"), job("fine")]
    source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))

    def reply(line: dict[str, Any], message: AbstractIncomingMessage) -> bytes:
        job_id = str(message.message_id)
        if line["custom_id"] == "bad":
            return orjson.dumps({"id": job_id, "custom_id": "bad", "type": "result"})
        usage = None if line["custom_id"] == "fine" else {"prompt_tokens": None}
        return worker_result(job_id, line["custom_id"], usage)

    # First run: publishes every line, then stops before any answer (no worker yet; the
    # queues are there, as a worker that started once leaves them: a producer declares none).
    await declare(connection, settings)
    stop = asyncio.Event()

    async def stop_when_published() -> None:
        journal = journal_path(output)
        while not journal.exists() or len(journal.read_bytes().splitlines()) < len(lines):
            await asyncio.sleep(0.02)
        stop.set()

    async with asyncio.timeout(30):
        stopper = asyncio.create_task(stop_when_published())
        first = await submit_file(settings, source, output, stop=stop)
        await stopper
    assert not first.complete
    try:
        async with answering(connection, settings, reply), asyncio.timeout(30):
            tally = await submit_file(settings, source, output, resume=True)
    finally:
        channel = await connection.channel()
        await channel.queue_delete(reply_queue_name(output))
    assert tally.complete
    written = {doc["custom_id"]: doc for doc in map(orjson.loads, output.read_bytes().splitlines())}
    assert set(written) == {"nulls", "bad", "fine"}
    assert written["nulls"]["error"] is None
    assert written["bad"]["error"]["code"] == UNREADABLE_RESULT
    assert tally.exit_code == 1


async def test_item5_submit_exits_2_when_the_reply_pattern_forbids_its_queue(
    settings: Settings, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(orjson.dumps(job("x")) + b"\n")
    env = {**os.environ, **settings.to_env(), "WORKER_REPLY_TO_PATTERN": "amq\\.gen-.*"}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker", "submit", str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "WORKER_REPLY_TO_PATTERN" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- 6. bounded headers: one huge custom_id fails alone ----------------------------------


async def test_item6_a_200kb_custom_id_fails_alone(
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
    huge = job("x" * 200_000)
    await publish(connection, queue, huge, reply_to=replies.name, message_id="huge")
    messages = await replies.until_results(5, timeout=30)
    results = {
        r.id: (r, m)
        for m in messages
        if m.type == TYPE_RESULT
        for r in [JobResult.model_validate_json(m.body)]
    }
    bad, bad_message = results.pop("huge")
    assert bad.error is not None and bad.error.code == "invalid_message"
    assert str(MAX_CUSTOM_ID) in bad.error.message
    assert bad.custom_id == huge["custom_id"], "the body still echoes it"
    assert H_CUSTOM_ID not in (bad_message.headers or {}), "never into a header"
    assert len(results) == 4
    for result, message in results.values():
        assert result.error is None and result.metadata.attempts == 1
        assert (message.headers or {})[H_CUSTOM_ID] == result.custom_id
    assert all(calls(mock, request) == 1 for request in healthy)
    assert calls(mock, huge) == 0


# --- 7. a reply_to that refuses (nack) ends in a bounded way -----------------------------


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_item7_a_full_reject_publish_reply_queue_is_not_a_hot_loop(
    start_worker: StartWorker,
    connection: AbstractConnection,
    names: dict[str, str],
    mock: MockUpstream,
    queue_type: str,
) -> None:
    worker = await start_worker(queue_type=queue_type)
    channel = await connection.channel()
    full = f"{names['request_queue']}.full-reply"
    await channel.declare_queue(
        full,
        durable=True,
        arguments={"x-queue-type": queue_type, "x-max-length": 1, "x-overflow": "reject-publish"},
    )
    try:
        # Fill it until the broker refuses (a quorum queue takes one past its limit).
        filler = await connection.channel(publisher_confirms=True)
        refused = False
        for _ in range(5):
            try:
                await filler.default_exchange.publish(aio_pika.Message(b"{}"), full)
            except aiormq.exceptions.DeliveryError:
                refused = True
                break
        assert refused, "the reply queue refuses publishes"
        failing = job(mock={"fault": "400"})
        succeeding = job()
        for request in (failing, succeeding):
            await publish(connection, worker.settings.request_queue, request, reply_to=full)
        await asyncio.sleep(4)
        results = await drain(connection, worker.settings.result_queue)
        letters = await drain(connection, worker.settings.dead_letter_queue)
    finally:
        await channel.queue_delete(full)
    by_custom_id = {JobResult.model_validate_json(m.body).custom_id: m for m in results}
    assert sorted(by_custom_id) == sorted([failing["custom_id"], succeeding["custom_id"]])
    assert len(results) == 2, "each result once, on the result exchange"
    assert len(letters) == 1, "the failed job dead-lettered once"
    assert calls(mock, failing) == 1 and calls(mock, succeeding) == 1
    assert await depth(connection, worker.settings.request_queue) == 0


# --- also: connection.blocked -----------------------------------------------------------


async def test_blocked_connection_takes_no_new_job_and_is_not_ready(
    amqp_url: str,
    names: dict[str, str],
    mock: MockUpstream,
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    async with AmqpProxy(amqp_url) as proxy:
        settings = make_settings(proxy.url, names, mock, stream_idle_timeout=1.0)
        worker = Worker(settings, telemetry=fresh_telemetry())
        health = HealthServer(
            lambda: worker.ready, 0, readiness=lambda: worker.readiness, host="127.0.0.1"
        )
        await health.start()
        task = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(15):
                await worker.wait_ready()
            readyz = f"http://127.0.0.1:{health.port}/readyz"
            async with aiohttp.ClientSession() as http:
                proxy.block("memory alarm (test)")
                async with asyncio.timeout(5):
                    while worker.ready:
                        await asyncio.sleep(0.01)
                async with http.get(readyz) as answer:
                    assert answer.status == 503
                    assert "blocked: memory alarm (test)" in (await answer.json())["status"]
                held = job()
                await publish(connection, settings.request_queue, held, reply_to=replies.name)
                await asyncio.sleep(1.0)
                assert calls(mock, held) == 0, "no new job starts while blocked"
                proxy.unblock()
                await replies.until_results(1)
                assert calls(mock, held) == 1
                async with http.get(readyz) as answer:
                    assert answer.status == 200

                # A stream in flight when the broker blocks: its delta confirms stop, and the
                # wait must not count as upstream silence (idle timeout 1 s, confirms held
                # 3 s from before the first delta, which is published inline).
                streamed = job(mock={"latency": 0.5, "chunks": 5}, stream=True)
                await publish(connection, settings.request_queue, streamed, reply_to=replies.name)
                async with asyncio.timeout(10):
                    while not calls(mock, streamed):
                        await asyncio.sleep(0.01)
                proxy.block("memory alarm (test)", hold=True)
                await asyncio.sleep(3)
                proxy.unblock()
                messages = await replies.until_results(1, timeout=20)
                result = JobResult.model_validate_json(messages[-1].body)
                assert result.error is None, result.error
                assert result.metadata.attempts == 1, "the blocked wait was not a timeout"
                assert calls(mock, streamed) == 1
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
            await health.stop()


async def test_blocked_handlers_are_where_aiormq_keeps_them(amqp_url: str) -> None:
    """The blocked state rides on two private handlers of aiormq: pin them."""
    from worker.amqp.blocked import BLOCKED_HANDLER, UNBLOCKED_HANDLER

    connection = await aio_pika.connect(amqp_url)
    try:
        underlay = connection.transport.connection  # type: ignore[union-attr]
        assert callable(getattr(underlay, BLOCKED_HANDLER))
        assert callable(getattr(underlay, UNBLOCKED_HANDLER))
    finally:
        await connection.close()


async def test_stable_id_for_a_job_without_message_id(start_worker: StartWorker) -> None:
    worker = await start_worker()
    queue = worker.settings.request_queue
    request = job()
    request["body"]["mock"]["fault"] = "400"  # a failure: the DLQ copy shows the id too
    for _ in range(2):  # a producer's retry of one publish, without message_id
        await publish_raw(worker.settings.amqp_url.get_secret_value(), queue, orjson.dumps(request))
    async with asyncio.timeout(15):
        while len(letters := await list_dead_letters(worker.settings)) < 2:
            await asyncio.sleep(0.05)
    ids = {letter.job_id for letter in letters}
    assert len(ids) == 1 and None not in ids
