"""Embeddings (contract §18) end to end: the real broker, a worker, the bundled mock
upstream's ``/v1/embeddings``; routing by ``endpoints``; ``ChatClient.embed``; ``submit``."""

from __future__ import annotations

import base64
import io
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import yaml
from aio_pika.abc import AbstractConnection
from support.broker import Replies, get_one, publish

from worker.messages import EmbeddingsRequest, ErrorCode, JobResult
from worker.mock.upstream import MockConfig, MockUpstream
from worker.producer.client import ChatClient, JobFailed
from worker.producer.progress import PlainReporter
from worker.producer.submit import reply_queue_name, submit_file
from worker.service import Worker
from worker.settings import Settings

MODEL = "text-embedding-3-small"
VECTORS_KEY = "sk-vectors-0123456789"


def line(body: dict[str, Any], custom_id: str = "e-1") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}


def embeddings(given: Any = ("a cat", "a dog"), **body: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": list(given) if isinstance(given, tuple) else given, **body}


async def ask(
    connection: AbstractConnection, worker: Worker, replies: Replies, request: dict[str, Any]
) -> tuple[JobResult, aio_pika.abc.AbstractIncomingMessage]:
    await publish(connection, worker.settings.request_queue, request, reply_to=replies.name)
    message = await replies.get(timeout=20)
    return JobResult.model_validate_json(message.body), message


def vectors_of(result: JobResult) -> list[Any]:
    assert result.response is not None and result.response.body is not None
    return [item["embedding"] for item in result.response.body["data"]]


async def test_an_embeddings_job_gets_its_vectors_and_usage(
    worker: Worker, mock: MockUpstream, connection: AbstractConnection, replies: Replies
) -> None:
    result, message = await ask(
        connection, worker, replies, line(embeddings(dimensions=4, truncate="END"))
    )
    assert result.error is None, result.error
    assert result.custom_id == "e-1" and result.metadata.model == MODEL
    assert result.metadata.attempts == 1 and result.metadata.ttft_ms is None
    assert result.response is not None and result.response.status_code == 200
    assert result.response.request_id is not None
    body = result.response.body
    assert body is not None and body["object"] == "list" and body["model"] == MODEL
    assert [len(vector) for vector in vectors_of(result)] == [4, 4]
    usage = orjson.loads(message.body)["usage"]
    assert usage == {"prompt_tokens": 4, "total_tokens": 4}  # the upstream's, whole
    assert message.type == "chat.result" and message.headers is not None
    assert message.headers["x-usage-prompt-tokens"] == 4
    assert "x-usage-completion-tokens" not in message.headers
    (recorded,) = mock.requests
    assert recorded.path == "/v1/embeddings"
    assert recorded.body == embeddings(dimensions=4, truncate="END")  # as received
    durations = {
        sample.labels["gen_ai_operation_name"]
        for metric in worker.telemetry.registry.collect()
        for sample in metric.samples
        if sample.name == "gen_ai_client_operation_duration_seconds_count"
    }
    assert durations == {"embeddings"}


async def test_base64_and_token_arrays_pass_through(
    worker: Worker, mock: MockUpstream, connection: AbstractConnection, replies: Replies
) -> None:
    floats, _ = await ask(connection, worker, replies, line(embeddings([[1, 2, 3], [4]])))
    packed, _ = await ask(
        connection,
        worker,
        replies,
        line(embeddings([[1, 2, 3], [4]], encoding_format="base64"), custom_id="e-2"),
    )
    assert floats.usage is not None and floats.usage.prompt_tokens == 4
    decoded = []
    for text in vectors_of(packed):
        raw = base64.b64decode(text)
        decoded.append(list(struct.unpack(f"<{len(raw) // 4}f", raw)))
    assert decoded == vectors_of(floats)


async def test_a_streamed_embeddings_line_is_refused_without_an_upstream_call(
    worker: Worker,
    mock: MockUpstream,
    settings: Settings,
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    result, message = await ask(connection, worker, replies, line(embeddings(stream=True)))
    assert result.error is not None and result.error.code is ErrorCode.INVALID_MESSAGE
    assert "body.stream" in result.error.message and "never streamed" in result.error.message
    assert result.metadata.attempts == 0 and result.usage is None
    assert message.headers is not None and message.headers["x-error-code"] == "invalid_message"
    dead = await get_one(connection, settings.dead_letter_queue)
    assert orjson.loads(dead.body) == line(embeddings(stream=True))
    assert mock.stats.total == 0 and not mock.requests


# --- routing by endpoints ----------------------------------------------------------------------


@pytest.fixture
async def vectors_only() -> AsyncIterator[MockUpstream]:
    """A second mock upstream, with its own key, named as serving embeddings alone."""
    async with MockUpstream(MockConfig(api_key=VECTORS_KEY)) as server:
        yield server


StartPool = Callable[..., Awaitable[Worker]]


@pytest.fixture
def start_pool(start_worker: Callable[..., Awaitable[Worker]], tmp_path: Path) -> StartPool:
    async def start(upstreams: list[dict[str, Any]]) -> Worker:
        path = tmp_path / "upstreams.yaml"
        path.write_text(yaml.safe_dump({"upstreams": upstreams}))
        return await start_worker(upstreams_file=path, upstream_base_url=None)

    return start


async def test_jobs_go_to_the_upstream_serving_their_endpoint(
    start_pool: StartPool,
    mock: MockUpstream,
    vectors_only: MockUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    monkeypatch.setenv("TEST_CHAT_KEY", str(mock.config.api_key))
    (tmp_path / "vectors-key").write_text(VECTORS_KEY)
    worker = await start_pool(
        [
            {
                "name": "talk",
                "base_url": mock.base_url,
                "api_key_env": "TEST_CHAT_KEY",
                "models": ["*"],
                "endpoints": ["chat"],
            },
            {
                "name": "vectors",
                "base_url": vectors_only.base_url,
                "api_key_file": str(tmp_path / "vectors-key"),
                "models": [MODEL],
                "endpoints": ["embeddings"],
            },
        ]
    )
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    talked, _ = await ask(connection, worker, replies, {"custom_id": "c-1", "body": chat})
    embedded, _ = await ask(connection, worker, replies, line(embeddings()))
    unserved, _ = await ask(
        connection, worker, replies, line(embeddings(model="gpt-4o-mini"), custom_id="e-2")
    )

    assert talked.error is None and talked.metadata.upstream == "talk"
    assert embedded.error is None and embedded.metadata.upstream == "vectors"
    assert len(vectors_of(embedded)) == 2
    # "talk" serves any model, but not embeddings: no upstream for this one, and no call.
    assert unserved.error is not None and unserved.error.code is ErrorCode.MODEL_NOT_ALLOWED
    assert "for embeddings" in unserved.error.message and unserved.metadata.attempts == 0
    assert [r.path for r in mock.requests] == ["/v1/chat/completions"]
    assert [r.path for r in vectors_only.requests] == ["/v1/embeddings"]
    assert vectors_only.requests[0].headers["authorization"] == f"Bearer {VECTORS_KEY}"


# --- producers ---------------------------------------------------------------------------------


async def test_chat_client_embed_and_submit(
    worker: Worker,
    mock: MockUpstream,
    settings: Settings,
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    async with ChatClient(connection, settings=settings) as client:
        result = await client.embed(embeddings("a cat"), custom_id="c-1", timeout=15)
        assert result.ok and len(vectors_of(result)) == 1
        typed = EmbeddingsRequest(model=MODEL, input=[1, 2, 3], dimensions=2)
        assert [len(v) for v in vectors_of(await client.embed(typed, timeout=15))] == [2]
        with pytest.raises(JobFailed) as caught:
            await client.embed(embeddings("a cat", dimensions=0), timeout=15)
        assert caught.value.code is ErrorCode.INVALID_MESSAGE

        # Fire and forget: a model says what it is; a dict needs endpoint="embeddings".
        await client.submit(typed, custom_id="s-1", reply_to=replies.name)
        await client.submit(
            embeddings("a dog"), custom_id="s-2", reply_to=replies.name, endpoint="embeddings"
        )
    results = [JobResult.model_validate_json((await replies.get()).body) for _ in range(2)]
    assert {r.custom_id for r in results} == {"s-1", "s-2"}
    assert all(r.ok for r in results)
    assert [r.path for r in mock.requests] == ["/v1/embeddings"] * 4


async def test_embeddings_lines_through_submit(
    worker: Worker, mock: MockUpstream, settings: Settings, tmp_path: Path, amqp_url: str
) -> None:
    source = tmp_path / "mixed.jsonl"
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
    lines = [
        line(embeddings(["a cat", "a dog"], dimensions=3), custom_id="embed-1"),
        {"custom_id": "chat-1", "url": "/v1/chat/completions", "body": chat},
        line(embeddings("a bird", stream=True), custom_id="embed-bad"),  # refused before publish
    ]
    source.write_bytes(b"".join(orjson.dumps(item) + b"\n" for item in lines))
    out = tmp_path / "mixed.out.jsonl"
    try:
        tally = await submit_file(settings, source, out, reporter=PlainReporter(io.StringIO()))
    finally:
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel()
        await channel.queue_delete(reply_queue_name(out))
        await connection.close()
    assert (tally.ok, tally.failed, tally.invalid) == (2, 0, 1)
    by_id = {item["custom_id"]: item for item in map(orjson.loads, out.read_bytes().splitlines())}
    embedded = by_id["embed-1"]["response"]["body"]
    assert embedded["object"] == "list" and [len(d["embedding"]) for d in embedded["data"]] == [
        3,
        3,
    ]
    assert embedded["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert by_id["chat-1"]["response"]["body"]["object"] == "chat.completion"
    bad = by_id["embed-bad"]
    assert bad["id"] is None and bad["error"]["code"] == "invalid_message"
    assert "never streamed" in bad["error"]["message"]
    assert sorted(r.path for r in mock.requests) == ["/v1/chat/completions", "/v1/embeddings"]
