"""LiteLLM's proxy as one upstream of the pool, next to the bundled mock (contract §11).

LiteLLM answers from ``mock_response`` (no provider is called); a model whose mock response
is ``litellm.InternalServerError`` makes the proxy answer 5xx, so the job falls back.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aio_pika.abc import AbstractConnection
from support.broker import Replies, publish
from support.process import free_port

from worker.messages import JobResult
from worker.mock.upstream import MockUpstream
from worker.service import Worker

MASTER_KEY = "sk-litellm-interop-0123"
STARTUP_LIMIT = 240.0  # LiteLLM imports a lot; a shared 2-core machine takes about a minute
GREETING = "Hello from LiteLLM"


@pytest.fixture(scope="module")
def litellm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A LiteLLM proxy on loopback; yields its OpenAI-compatible base URL."""
    folder = tmp_path_factory.mktemp("litellm")
    config = {
        "model_list": [
            {
                "model_name": "gpt-4o-mini",
                "litellm_params": {
                    "model": "openai/gpt-4o-mini",
                    "api_key": "sk-never-used",
                    "mock_response": GREETING,
                },
            },
            {
                "model_name": "broken",
                "litellm_params": {
                    "model": "openai/broken",
                    "api_key": "sk-never-used",
                    "mock_response": "litellm.InternalServerError",
                },
            },
        ],
        "general_settings": {"master_key": MASTER_KEY},
        "litellm_settings": {"telemetry": False, "num_retries": 0},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    log = (folder / "litellm.log").open("wb")
    process = subprocess.Popen(
        [
            os.environ["LITELLM_BIN"],
            "--config",
            "config.yaml",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + STARTUP_LIMIT
        while True:
            if process.poll() is not None:
                pytest.fail(f"litellm exited {process.returncode}: see {folder / 'litellm.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"litellm not up within {STARTUP_LIMIT:g}s")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


@pytest.fixture
async def pooled(
    litellm: str,
    mock: MockUpstream,
    start_worker: Callable[..., Awaitable[Worker]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Worker:
    monkeypatch.setenv("INTEROP_LITELLM_KEY", MASTER_KEY)
    (tmp_path / "mock-key").write_text(str(mock.config.api_key))
    upstreams = [
        {
            "name": "litellm",
            "base_url": litellm,
            "api_key_env": "INTEROP_LITELLM_KEY",
            "models": ["gpt-4o-mini", "broken"],
        },
        {
            "name": "mock",
            "base_url": mock.base_url,
            "api_key_file": str(tmp_path / "mock-key"),
            "models": ["*"],
            "priority": 1,
        },
    ]
    path = tmp_path / "upstreams.yaml"
    path.write_text(yaml.safe_dump({"upstreams": upstreams}))
    return await start_worker(upstreams_file=path, upstream_base_url=None)


async def ask(
    connection: AbstractConnection, worker: Worker, replies: Replies, **body: Any
) -> list[bytes]:
    request = {"body": {"messages": [{"role": "user", "content": "Hi"}], **body}}
    await publish(connection, worker.settings.request_queue, request, reply_to=replies.name)
    return [m.body for m in await replies.until_results(1, timeout=60)]


async def test_plain_and_streamed_jobs_through_litellm(
    pooled: Worker, connection: AbstractConnection, replies: Replies, mock: MockUpstream
) -> None:
    for stream in (False, True):
        *_, last = await ask(connection, pooled, replies, model="gpt-4o-mini", stream=stream)
        result = JobResult.model_validate_json(last)
        assert result.error is None, result.error
        assert result.metadata.upstream == "litellm" and result.metadata.attempts == 1
        body = result.response.body if result.response else None
        assert body is not None
        assert body["choices"][0]["message"]["content"] == GREETING
        assert result.usage is not None and result.usage.total_tokens > 0
    assert mock.stats.total == 0


async def test_a_5xx_from_litellm_falls_back_to_the_mock(
    pooled: Worker, connection: AbstractConnection, replies: Replies, mock: MockUpstream
) -> None:
    *_, last = await ask(connection, pooled, replies, model="broken")
    result = JobResult.model_validate_json(last)
    assert result.error is None, result.error
    assert result.metadata.upstream == "mock" and result.metadata.attempts == 2
    assert mock.stats.total == 1 and mock.requests[0].body["model"] == "broken"


async def test_a_wrong_key_at_litellm_is_not_retried_elsewhere(
    litellm: str,
    mock: MockUpstream,
    start_worker: Callable[..., Awaitable[Worker]],
    tmp_path: Path,
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    (tmp_path / "wrong").write_text("sk-wrong")
    (tmp_path / "mock-key").write_text(str(mock.config.api_key))
    upstreams = [
        {
            "name": "litellm",
            "base_url": litellm,
            "api_key_file": str(tmp_path / "wrong"),
            "models": ["*"],
        },
        {
            "name": "mock",
            "base_url": mock.base_url,
            "models": ["*"],
            "priority": 1,
            "api_key_file": str(tmp_path / "mock-key"),
        },
    ]
    (tmp_path / "upstreams.yaml").write_text(yaml.safe_dump({"upstreams": upstreams}))
    worker = await start_worker(upstreams_file=tmp_path / "upstreams.yaml", upstream_base_url=None)
    *_, last = await ask(connection, worker, replies, model="gpt-4o-mini")
    result = JobResult.model_validate_json(last)
    # LiteLLM without a database answers an unknown key 400 "No connected db", with one 401.
    assert result.error is not None
    assert (result.error.status_code, result.error.code.value) in {
        (400, "invalid_request"),
        (401, "authentication_error"),
    }, result.error
    assert result.metadata.attempts == 1
    assert result.metadata.upstream == "litellm" and mock.stats.total == 0
