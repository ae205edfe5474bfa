"""An upstream over HTTPS, as every hosted provider is: a worker process that trusts the
mock's certificate authority through ``SSL_CERT_FILE`` (OpenSSL's own variable), with
streamed and plain jobs. Over TLS the stream still rests between deltas (the TLS
transport is paused, not the socket) and connections still go back to the pool."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from aio_pika.abc import AbstractConnection
from support.broker import Replies, publish
from support.process import WorkerProcess

from worker.amqp.topology import declare
from worker.messages import JobDelta, JobResult
from worker.mock.upstream import MockConfig, MockUpstream
from worker.settings import Settings

CHUNKS = 60
CHUNK_INTERVAL = 0.005  # 60 chunks in about 0.3 s: a dozen 20 ms flushes at most


@pytest.fixture
def authority(tmp_path: Path) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    return ca, pem


@pytest.fixture
async def tls_mock(authority: tuple[trustme.CA, Path]) -> AsyncIterator[MockUpstream]:
    ca, _ = authority
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = MockUpstream(MockConfig(chunks=CHUNKS, chunk_interval=CHUNK_INTERVAL))
    await server.start(ssl_context=context)
    yield server
    await server.stop()


def chat(stream: bool) -> dict[str, object]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"tls {uuid.uuid4().hex}"}],
        "stream": stream,
    }


async def test_streamed_and_plain_jobs_over_tls(
    connection: AbstractConnection,
    settings: Settings,
    replies: Replies,
    authority: tuple[trustme.CA, Path],
    tls_mock: MockUpstream,
) -> None:
    _, ca_pem = authority
    assert tls_mock.base_url.startswith("https://")
    await declare(connection, settings)
    worker = WorkerProcess(
        settings,
        upstream_base_url=tls_mock.base_url,
        stream_flush_interval=0.02,
        extra_env={"SSL_CERT_FILE": str(ca_pem)},
    )
    try:
        # One job at a time: each call finds the connection the last one gave back.
        jobs = [chat(stream=True) for _ in range(3)] + [chat(stream=False) for _ in range(2)]
        messages = []
        for index, body in enumerate(jobs):
            await publish(
                connection,
                settings.request_queue,
                {"custom_id": f"job-{index}", "body": body},
                reply_to=replies.name,
            )
            messages += await replies.until_results(1, timeout=30)
    finally:
        worker.process.terminate()
        await worker.wait(timeout=30)

    results: dict[str, JobResult] = {}
    deltas: dict[str, list[JobDelta]] = {}
    for message in messages:
        if message.type == "chat.result":
            result = JobResult.model_validate_json(message.body)
            results[str(result.custom_id)] = result
        else:
            delta = JobDelta.model_validate_json(message.body)
            deltas.setdefault(str(delta.custom_id), []).append(delta)

    assert sorted(results) == [f"job-{i}" for i in range(len(jobs))]
    for custom_id, result in results.items():
        assert result.error is None, (custom_id, result.error)
        assert result.usage is not None and result.usage.completion_tokens
        assert result.response is not None and result.response.body is not None
    for index in range(3):  # the streamed jobs
        custom_id = f"job-{index}"
        mine = deltas[custom_id]
        assert [d.seq for d in mine] == list(range(len(mine)))
        text = "".join(c.delta.get("content") or "" for d in mine for c in d.choices)
        completion = results[custom_id].response.body  # type: ignore[union-attr]
        assert text and text == completion["choices"][0]["message"]["content"]  # type: ignore[index]
        # Coalesced over TLS as over plain TCP: far fewer deltas than chunks.
        assert 1 < len(mine) <= CHUNKS // 3, len(mine)
    assert not deltas.keys() - {"job-0", "job-1", "job-2"}, "a plain job sent deltas"
    # Every call, streamed or not, on the one connection the pool kept.
    assert len(tls_mock.requests) == len(jobs)
    assert len({r.peer for r in tls_mock.requests}) == 1, [r.peer for r in tls_mock.requests]
