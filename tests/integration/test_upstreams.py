"""Several upstreams (contract §11) end to end: the real broker, two bundled mock upstreams
on loopback, the worker reading ``WORKER_UPSTREAMS_FILE``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aio_pika.abc import AbstractConnection
from structlog.testing import capture_logs
from support.broker import Replies, publish

from worker.messages import JobResult
from worker.mock.upstream import MockConfig, MockUpstream
from worker.service import Worker

BACKUP_KEY = "sk-backup-0123456789"
ALWAYS_500 = MockConfig(fault_rate=1.0, random_faults=("500",))
ALWAYS_429 = MockConfig(fault_rate=1.0, random_faults=("429",))


@pytest.fixture
async def backup() -> AsyncIterator[MockUpstream]:
    """A second mock upstream, with its own key."""
    async with MockUpstream(MockConfig(api_key=BACKUP_KEY)) as server:
        yield server


@pytest.fixture
def key_files(tmp_path: Path, mock: MockUpstream) -> dict[str, Path]:
    files = {"primary": tmp_path / "primary-key", "backup": tmp_path / "backup-key"}
    files["primary"].write_text(f"{mock.config.api_key}\n")
    files["backup"].write_text(BACKUP_KEY)
    return files


StartPool = Callable[..., Awaitable[Worker]]


@pytest.fixture
def start_pool(start_worker: Callable[..., Awaitable[Worker]], tmp_path: Path) -> StartPool:
    """Start a worker on an upstreams file made of ``upstreams`` (a list of dicts)."""

    async def start(upstreams: list[dict[str, Any]], **overrides: Any) -> Worker:
        path = tmp_path / "upstreams.yaml"
        path.write_text(yaml.safe_dump({"upstreams": upstreams}))
        return await start_worker(upstreams_file=path, upstream_base_url=None, **overrides)

    return start


def two(
    mock: MockUpstream, backup: MockUpstream, keys: dict[str, Path], **primary: Any
) -> list[dict[str, Any]]:
    return [
        {
            "name": "primary",
            "base_url": mock.base_url,
            "api_key_file": str(keys["primary"]),
            "models": ["gpt-4o-mini"],
            **primary,
        },
        {
            "name": "backup",
            "base_url": backup.base_url,
            "api_key_file": str(keys["backup"]),
            "models": ["*"],
            "priority": 1,
        },
    ]


async def ask(
    connection: AbstractConnection,
    worker: Worker,
    replies: Replies,
    model: str = "gpt-4o-mini",
    **body: Any,
) -> JobResult:
    request = {"body": {"model": model, "messages": [{"role": "user", "content": "Hi"}], **body}}
    await publish(connection, worker.settings.request_queue, request, reply_to=replies.name)
    return JobResult.model_validate_json((await replies.get(timeout=20)).body)


async def test_fallback_on_5xx_to_the_next_upstream(
    start_pool: StartPool,
    mock: MockUpstream,
    backup: MockUpstream,
    key_files: dict[str, Path],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    mock.config = ALWAYS_500
    worker = await start_pool(two(mock, backup, key_files))
    result = await ask(connection, worker, replies)
    assert result.error is None
    assert result.metadata.upstream == "backup" and result.metadata.attempts == 2
    assert mock.stats.total == 1 and backup.stats.total == 1
    metrics = {
        (sample.labels.get("upstream"), sample.labels.get("error_type"))
        for metric in worker.telemetry.registry.collect()
        for sample in metric.samples
        if sample.name == "gen_ai_client_operation_duration_seconds_count"
    }
    assert metrics == {("primary", "upstream_error"), ("backup", "")}


async def test_a_429_moves_the_job_to_another_upstream_of_its_model(
    start_pool: StartPool,
    mock: MockUpstream,
    backup: MockUpstream,
    key_files: dict[str, Path],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    """A rate-limited key does not hold the job: the other upstream has budget. The 429
    closes the primary's gate, so the next job goes to the backup without knocking."""
    mock.config = ALWAYS_429
    worker = await start_pool(two(mock, backup, key_files))
    # retry_after only shapes the primary's 429 (the backup answers without a fault).
    first = await ask(connection, worker, replies, mock={"retry_after": 60})
    assert first.error is None and first.metadata.upstream == "backup"
    assert first.metadata.attempts == 1  # a call refused for budget is no attempt (§11)
    second = await ask(connection, worker, replies)
    assert second.error is None and second.metadata.upstream == "backup"
    assert mock.stats.faults["429"] == 1 and backup.stats.total == 2
    states = {
        (sample.labels["upstream"], sample.labels["state"]): sample.value
        for metric in worker.telemetry.registry.collect()
        for sample in metric.samples
        if sample.name == "chat_worker_upstream_state"
    }
    assert states[("primary", "closed")] == 1 and states[("backup", "open")] == 1


async def test_every_gate_closed_the_job_waits_at_the_best_one(
    start_pool: StartPool,
    mock: MockUpstream,
    backup: MockUpstream,
    key_files: dict[str, Path],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    """Both keys answer 429 once with a short retry-after: the job waits for budget (no
    attempt counted) and succeeds where budget returns first."""
    mock.config = MockConfig(api_key=mock.config.api_key, fault_rate=1.0, random_faults=("429",))
    backup.config = MockConfig(api_key=BACKUP_KEY, fault_rate=1.0, random_faults=("429",))
    worker = await start_pool(two(mock, backup, key_files))
    waiting = asyncio.create_task(ask(connection, worker, replies, mock={"retry_after": 1}))
    async with asyncio.timeout(20):
        while mock.stats.total + backup.stats.total < 2:
            await asyncio.sleep(0.05)
    mock.config = MockConfig(api_key=mock.config.api_key)  # the primary's budget returns
    result = await waiting
    assert result.error is None and result.metadata.upstream == "primary"
    assert result.metadata.attempts == 1 and result.metadata.rate_limit_wait_ms > 0


@pytest.mark.parametrize(
    ("fault", "code"), [("400", "invalid_request"), ("401", "authentication_error")]
)
async def test_no_fallback_on_a_permanent_error(
    fault: str,
    code: str,
    start_pool: StartPool,
    mock: MockUpstream,
    backup: MockUpstream,
    key_files: dict[str, Path],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    mock.config = MockConfig(api_key=mock.config.api_key, fault_rate=1.0, random_faults=(fault,))
    worker = await start_pool(two(mock, backup, key_files))
    result = await ask(connection, worker, replies)
    assert result.error is not None and result.error.code.value == code
    assert result.metadata.upstream == "primary" and result.metadata.attempts == 1
    assert backup.stats.total == 0


async def test_a_wrong_key_is_an_authentication_error_without_fallback(
    start_pool: StartPool,
    mock: MockUpstream,
    backup: MockUpstream,
    key_files: dict[str, Path],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    key_files["primary"].write_text("sk-wrong")
    worker = await start_pool(two(mock, backup, key_files))
    result = await ask(connection, worker, replies)
    assert result.error is not None and result.error.code.value == "authentication_error"
    assert result.error.status_code == 401 and result.metadata.upstream == "primary"
    assert backup.stats.total == 0


async def test_azure_style_api_key_query_and_model_map_reach_the_server(
    start_pool: StartPool,
    backup: MockUpstream,
    key_files: dict[str, Path],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    root = backup.base_url.removesuffix("/v1")
    worker = await start_pool(
        [
            {
                "name": "azure",
                "base_url": f"{root}/openai/deployments/gpt-4o-mini",
                "auth": "api-key",
                "api_key_file": str(key_files["backup"]),
                "query": {"api-version": "2024-10-21"},
                "headers": {"x-team": "search"},
                "models": [],
                "model_map": {"fast": "gpt-4o-mini-2024-07-18"},
            }
        ]
    )
    result = await ask(connection, worker, replies, model="fast")
    assert result.error is None, result.error
    assert result.metadata.model == "fast" and result.metadata.upstream == "azure"
    (seen,) = backup.requests
    assert seen.path == "/openai/deployments/gpt-4o-mini/chat/completions"
    assert seen.query == {"api-version": "2024-10-21"}
    assert seen.headers["api-key"] == BACKUP_KEY
    assert "authorization" not in seen.headers
    assert seen.headers["x-team"] == "search"
    assert seen.body["model"] == "gpt-4o-mini-2024-07-18"


async def test_bearer_auth_and_none(
    start_pool: StartPool,
    mock: MockUpstream,
    key_files: dict[str, Path],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    async with MockUpstream() as open_server:
        worker = await start_pool(
            [
                {
                    "name": "openai",
                    "base_url": mock.base_url,
                    "api_key_file": str(key_files["primary"]),
                    "models": ["gpt-4o-mini"],
                },
                {
                    "name": "vllm",
                    "base_url": open_server.base_url,
                    "auth": "none",
                    "models": ["llama"],
                },
            ]
        )
        first = await ask(connection, worker, replies)
        second = await ask(connection, worker, replies, model="llama")
        assert (first.metadata.upstream, second.metadata.upstream) == ("openai", "vllm")
        assert mock.requests[-1].headers["authorization"] == f"Bearer {mock.config.api_key}"
        (anonymous,) = open_server.requests
        assert "authorization" not in anonymous.headers and "api-key" not in anonymous.headers


async def test_a_model_no_upstream_serves_fails_at_once(
    start_pool: StartPool,
    mock: MockUpstream,
    key_files: dict[str, Path],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    worker = await start_pool(two(mock, mock, key_files)[:1])
    result = await ask(connection, worker, replies, model="o3")
    assert result.error is not None and result.error.code.value == "model_not_allowed"
    assert result.metadata.attempts == 0 and mock.stats.total == 0


async def test_cooldown_then_one_probe_and_recovery(
    start_pool: StartPool,
    mock: MockUpstream,
    backup: MockUpstream,
    key_files: dict[str, Path],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    mock.config = ALWAYS_500
    worker = await start_pool(
        two(mock, backup, key_files, cooldown={"failures": 2, "seconds": 1.5})
    )
    with capture_logs() as logs:
        upstreams = [(await ask(connection, worker, replies)).metadata.upstream for _ in range(4)]
        # Two failures in a row cool the primary: the next jobs go straight to the backup.
        assert upstreams == ["backup"] * 4
        assert mock.stats.total == 2
        mock.config = MockConfig(api_key=mock.config.api_key)  # the primary heals
        await asyncio.sleep(1.6)
        probe = await ask(connection, worker, replies)
        after = await ask(connection, worker, replies)
    assert (probe.metadata.upstream, after.metadata.upstream) == ("primary", "primary")
    assert probe.metadata.attempts == 1
    events = [(e["event"], e.get("upstream")) for e in logs if e["event"].startswith("upstream")]
    assert events == [
        ("upstream cooling down", "primary"),
        ("upstream probe", "primary"),
        ("upstream back", "primary"),
    ]


async def test_streamed_job_falls_back_and_keeps_its_deltas_apart(
    start_pool: StartPool,
    mock: MockUpstream,
    backup: MockUpstream,
    key_files: dict[str, Path],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    mock.config = ALWAYS_500
    worker = await start_pool(two(mock, backup, key_files))
    request = {
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
        }
    }
    await publish(connection, worker.settings.request_queue, request, reply_to=replies.name)
    messages = await replies.until_results(1)
    result = JobResult.model_validate_json(messages[-1].body)
    assert result.error is None and result.metadata.upstream == "backup"
    deltas = [orjson.loads(m.body) for m in messages[:-1]]
    assert deltas and {d["attempt"] for d in deltas} == {2}
