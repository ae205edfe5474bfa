"""``chat-worker dlq``: list dead letters without removing them, replay a selection."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import orjson
from aio_pika.abc import AbstractConnection
from support.broker import Replies, get_one, publish

from worker.amqp.dlq import list_dead_letters, replay_dead_letters
from worker.amqp.topology import (
    H_ATTEMPTS,
    H_DELIVERY_COUNT,
    H_ERROR_CODE,
    H_ERROR_MESSAGE,
    H_RATE_LIMIT_WAIT,
    H_REDELIVERIES,
    declare,
)
from worker.messages import JobResult
from worker.service import Worker
from worker.settings import Settings


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker", "dlq", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def failing(key: str, fault: str, times: int | None = None) -> dict[str, object]:
    mock: dict[str, object] = {"fault": fault, "key": key}
    if times is not None:
        mock["times"] = times
    return {
        "custom_id": key,
        "body": {"model": "m", "mock": mock, "messages": [{"role": "user", "content": key}]},
    }


async def test_list_then_replay_one_error_code(
    worker: Worker, connection: AbstractConnection, replies: Replies
) -> None:
    settings = worker.settings
    await publish(
        connection,
        settings.request_queue,
        failing("a", "400"),
        message_id="a",
        reply_to=replies.name,
    )
    await publish(
        connection,
        settings.request_queue,
        failing("b", "400"),
        message_id="b",
        reply_to=replies.name,
    )
    await publish(
        connection,
        settings.request_queue,
        failing("c", "404", times=1),
        message_id="c",
        reply_to=replies.name,
    )
    await replies.until_results(3)
    async with asyncio.timeout(10):
        while len(letters := await list_dead_letters(settings)) < 3:
            await asyncio.sleep(0.05)
    assert sorted((x.job_id, x.error_code, x.attempts) for x in letters) == [
        ("a", "invalid_request", 1),
        ("b", "invalid_request", 1),
        ("c", "not_found", 1),
    ]
    assert all(x.reason == "worker" for x in letters)
    assert len(await list_dead_letters(settings)) == 3, "listing leaves them in place"
    assert [x.job_id for x in await list_dead_letters(settings, codes=["not_found"])] == ["c"]

    env = {**os.environ, **settings.to_env()}
    listed = await cli(env, "list", "--json")
    assert listed.returncode == 0
    assert sorted(orjson.loads(line)["job_id"] for line in listed.stdout.splitlines()) == [
        "a",
        "b",
        "c",
    ]

    assert await replay_dead_letters(settings, codes=["not_found"]) == 1
    result = JobResult.model_validate_json((await replies.get()).body)
    assert result.id == "c"
    assert result.error is None, "the replayed job ran again with fresh attempts"
    assert result.metadata.attempts == 1
    assert sorted(x.job_id for x in await list_dead_letters(settings)) == ["a", "b"]

    replayed = await cli(env, "replay", "--all", "--limit", "1")
    assert replayed.returncode == 0
    assert "replayed 1" in replayed.stdout
    await replies.until_results(1)
    refused = await cli(env, "replay")
    assert refused.returncode == 2
    assert "--code" in refused.stderr


async def test_a_replay_takes_only_the_letters_there_when_it_began(
    worker: Worker, connection: AbstractConnection, replies: Replies
) -> None:
    """Jobs that fail again at once come back to the dead-letter queue while the replay
    is still walking it: the replay must not take them a second time (before, a fast
    failure went round and round for as long as the walk kept finding it)."""
    settings = worker.settings
    keys = [f"again-{n}" for n in range(30)]
    for key in keys:
        await publish(
            connection,
            settings.request_queue,
            failing(key, "400"),
            message_id=key,
            reply_to=replies.name,
        )
    await replies.until_results(len(keys))
    async with asyncio.timeout(10):
        while len(await list_dead_letters(settings)) < len(keys):
            await asyncio.sleep(0.05)

    seen: list[str] = []
    replayed = await replay_dead_letters(
        settings, on_replay=lambda letter: seen.append(letter.job_id)
    )
    assert replayed == len(keys)
    assert sorted(seen) == sorted(keys), "each letter replayed exactly once"
    # Each replay ran and failed again: every job is back, once, in the dead-letter queue.
    await replies.until_results(len(keys))
    async with asyncio.timeout(10):
        while len(letters := await list_dead_letters(settings)) < len(keys):
            await asyncio.sleep(0.05)
    assert sorted(x.job_id for x in letters) == sorted(keys)


async def test_item15_dlq_list_prints_producer_text_as_text(
    settings: Settings, connection: AbstractConnection
) -> None:
    """A job id (the producer's message_id), custom id or error message holding rich
    markup or terminal escapes is printed as the characters it is: before, ``[/]`` crashed
    the listing and ``[link=…]`` or an escape sequence reached the operator's terminal."""
    await declare(connection, settings)
    await publish(
        connection,
        settings.dead_letter_queue,
        orjson.dumps({"custom_id": "[bold]loud[/bold]", "body": {}}),
        message_id="[/]",
        headers={
            H_ERROR_CODE: "invalid_request",
            H_ERROR_MESSAGE: "[link=https://evil.test]x[/link] \x1b[31mred",
        },
    )
    env = {**os.environ, **settings.to_env(), "COLUMNS": "300"}
    listed = await cli(env, "list")
    assert listed.returncode == 0, listed.stderr
    for text in ("[/]", "[bold]loud[/bold]", "[link=https://evil.test]x[/link]", "\\x1b[31mred"):
        assert text in listed.stdout
    assert "\x1b" not in listed.stdout


async def test_item11_a_replay_starts_clean_and_is_marked_replayed(
    settings: Settings, connection: AbstractConnection
) -> None:
    await declare(connection, settings)
    past = {
        H_ERROR_CODE: "rate_limited",
        H_ERROR_MESSAGE: "waited 3600.0s for rate-limit budget",
        H_ATTEMPTS: 4,
        H_RATE_LIMIT_WAIT: 3_600_000,
        H_DELIVERY_COUNT: 2,
        H_REDELIVERIES: 1,
        "x-producer-note": "kept",
    }
    await publish(
        connection,
        settings.dead_letter_queue,
        failing("clean", "400"),
        message_id="clean",
        headers=past,
    )
    assert await replay_dead_letters(settings) == 1
    copy = await get_one(connection, settings.request_queue)
    headers = copy.headers or {}
    assert headers["x-producer-note"] == "kept"
    assert headers["x-replayed"] is True
    assert headers["x-replays"] == 1
    # (a quorum queue writes its own x-delivery-count: 0 on a first delivery)
    assert headers.get(H_DELIVERY_COUNT, 0) == 0
    assert not set(past) - {"x-producer-note", H_DELIVERY_COUNT} & set(headers), headers


async def test_item11_a_replayed_job_gets_its_rate_limit_wait_again(
    worker: Worker, connection: AbstractConnection, replies: Replies
) -> None:
    """Its dead letter says it waited all of WORKER_RATE_LIMIT_MAX_WAIT: replayed with that
    header, it failed ``rate_limited`` at the first 429."""
    settings = worker.settings
    request = failing("waited", "429", times=1)
    request["body"]["mock"]["retry_after"] = 0.2  # type: ignore[index]
    await publish(
        connection,
        settings.dead_letter_queue,
        request,
        message_id="waited",
        reply_to=replies.name,
        headers={
            H_ERROR_CODE: "rate_limited",
            H_RATE_LIMIT_WAIT: round(settings.rate_limit_max_wait * 1000),
        },
    )
    assert await replay_dead_letters(settings) == 1
    result = JobResult.model_validate_json((await replies.until_results(1)).pop().body)
    assert result.error is None, result.error
