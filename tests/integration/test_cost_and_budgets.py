"""Cost and budgets (contract §17) through a worker on the real broker and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aio_pika.abc import AbstractConnection
from support.broker import Replies, publish

from worker.messages import JobResult
from worker.mock.upstream import MockUpstream
from worker.service import Worker

StartWorker = Callable[..., Awaitable[Worker]]


def line(**body: Any) -> dict[str, Any]:
    return {
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"price me {uuid.uuid4().hex}"}],
            **body,
        }
    }


def results_of(messages: list[Any]) -> list[JobResult]:
    return [JobResult.model_validate_json(m.body) for m in messages if m.type == "chat.result"]


def chat_calls(mock: MockUpstream) -> int:
    return sum(1 for r in mock.requests if r.path.endswith("/chat/completions"))


@pytest.fixture
def upstreams_file(tmp_path: Path, mock: MockUpstream) -> Path:
    key = tmp_path / "key"
    key.write_text(mock.config.api_key or "")
    path = tmp_path / "upstreams.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "upstreams": [
                    {
                        "name": "priced",
                        "base_url": mock.base_url,
                        "api_key_file": str(key),
                        "models": ["gpt-4o-mini"],
                        "prices": {
                            "gpt-4o-mini": {
                                "input_per_mtok": 2.0,
                                "output_per_mtok": 8.0,
                                "cached_input_per_mtok": 0.5,
                            }
                        },
                    }
                ]
            }
        )
    )
    return path


async def test_cost_from_the_files_prices_with_cached_tokens(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    upstreams_file: Path,
    settings: Any,
) -> None:
    await start_worker(upstreams_file=upstreams_file, upstream_base_url=None)
    await publish(
        connection, settings.request_queue, line(mock={"cached_tokens": 2}), reply_to=replies.name
    )
    (message,) = [m for m in await replies.until_results(1) if m.type == "chat.result"]
    result = JobResult.model_validate_json(message.body)
    assert result.usage is not None and result.metadata.cost is not None
    prompt, completion = result.usage.prompt_tokens, result.usage.completion_tokens
    cached = min(2, prompt)
    expected_input = ((prompt - cached) * 2.0 + cached * 0.5) / 1e6
    expected_output = completion * 8.0 / 1e6
    assert result.metadata.cost.input == pytest.approx(expected_input, rel=1e-12)
    assert result.metadata.cost.output == pytest.approx(expected_output, rel=1e-12)
    assert result.metadata.cost.source == "upstreams-file"
    assert float(message.headers["x-cost-usd"]) == pytest.approx(
        expected_input + expected_output, rel=1e-9
    )


async def test_cost_from_genai_prices_for_a_known_provider_and_null_for_an_unknown_model(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    settings: Any,
) -> None:
    await start_worker(upstream_provider="openai")
    await publish(connection, settings.request_queue, line(), reply_to=replies.name)
    await publish(
        connection,
        settings.request_queue,
        {"body": {"model": "no-such-model-x", "messages": [{"role": "user", "content": "hi"}]}},
        reply_to=replies.name,
    )
    results = {r.metadata.model: r for r in results_of(await replies.until_results(2))}
    known = results["gpt-4o-mini"].metadata.cost
    assert known is not None and known.source == "genai-prices" and known.total > 0
    assert results["no-such-model-x"].metadata.cost is None


def budgets(tmp_path: Path, **rule: Any) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump({"budgets": [{"tenant": "team-a", **rule}]}))
    return path


async def test_calls_stop_at_the_tenants_limit_and_other_tenants_go_on(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
    settings: Any,
) -> None:
    # A dollar a token: a job costs about $20 and reserves about $30 (prompt estimate plus
    # max_tokens) before its call; team-a may spend $70 a day.
    key = tmp_path / "key"
    key.write_text(mock.config.api_key or "")
    upstreams = tmp_path / "upstreams.yaml"
    dear = {"input_per_mtok": 1e6, "output_per_mtok": 1e6}
    upstreams.write_text(
        yaml.safe_dump(
            {
                "upstreams": [
                    {
                        "name": "dear",
                        "base_url": mock.base_url,
                        "api_key_file": str(key),
                        "models": ["gpt-4o-mini"],
                        "prices": {"gpt-4o-mini": dear},
                    }
                ]
            }
        )
    )
    worker = await start_worker(
        redis_url=redis_url,
        result_ttl=0,
        trust_tenant_header=True,
        concurrency=1,
        upstreams_file=upstreams,
        upstream_base_url=None,
        budgets_file=budgets(tmp_path, usd_per_day=70),
    )
    assert worker.spending.ledger is not None
    worker.spending.ledger.prefix = redis_prefix
    for tenant in ["team-a"] * 5 + ["team-b"] * 2:
        await publish(
            connection,
            settings.request_queue,
            line(max_tokens=20),
            reply_to=replies.name,
            headers={"x-tenant": tenant},
        )
    results = results_of(await replies.until_results(7))
    team_a = [r for r in results if r.metadata.tenant == "team-a"]
    paid = [r for r in team_a if r.ok]
    refused = [r for r in team_a if not r.ok]
    assert len(paid) >= 2 and len(refused) >= 2
    assert all(r.error is not None and r.error.code.value == "budget_exceeded" for r in refused)
    assert all(r.metadata.calls == 0 for r in refused)
    assert sum(r.metadata.cost.total for r in paid if r.metadata.cost) <= 70
    assert [r.ok for r in results if r.metadata.tenant == "team-b"] == [True, True]
    assert chat_calls(mock) == len(paid) + 2


async def test_wait_resumes_when_the_period_turns(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
    settings: Any,
) -> None:
    worker = await start_worker(
        redis_url=redis_url,
        result_ttl=0,
        trust_tenant_header=True,
        budgets_file=budgets(tmp_path, tokens_per_day=1500, on_exceed="wait"),
    )
    ledger = worker.spending.ledger
    assert ledger is not None
    ledger.prefix = redis_prefix
    # One second before midnight, UTC, with most of the day's tokens spent already: the job
    # waits (round the delay queues) for the day to turn.
    day = datetime(2030, 1, 1, 23, 59, 59, tzinfo=UTC)
    ledger.clock = lambda: day
    spent = await ledger.reserve("team-a", 0.0, 1400)
    assert not hasattr(spent, "rule")
    await publish(
        connection,
        settings.request_queue,
        line(max_tokens=1000),
        reply_to=replies.name,
        headers={"x-tenant": "team-a"},
    )
    await asyncio.sleep(1.5)
    assert results_of(await replies.until_results(0)) == []
    ledger.clock = lambda: day + timedelta(seconds=2)  # the next day
    (result,) = results_of(await replies.until_results(1, timeout=20))
    assert result.ok
    assert result.metadata.rate_limit_wait_ms >= 1000


async def test_flex_refused_for_capacity_falls_back_to_the_default_tier(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    tmp_path: Path,
    settings: Any,
) -> None:
    from worker.mock.upstream import MockConfig

    key = tmp_path / "key"
    key.write_text(mock.config.api_key or "")
    # The flex entry's provider has no flex capacity: every call there answers 503.
    async with MockUpstream(
        MockConfig(api_key=mock.config.api_key, fault_rate=1.0, random_faults=("503",))
    ) as busy:
        entries = [
            {
                "name": "flex",
                "base_url": busy.base_url,
                "api_key_file": str(key),
                "models": ["gpt-4o-mini"],
                "defaults": {"service_tier": "flex"},
                "priority": 0,
            },
            {
                "name": "standard",
                "base_url": mock.base_url,
                "api_key_file": str(key),
                "models": ["gpt-4o-mini"],
                "priority": 1,
            },
        ]
        path = tmp_path / "upstreams.yaml"
        path.write_text(yaml.safe_dump({"upstreams": entries}))
        await start_worker(upstreams_file=path, upstream_base_url=None)
        await publish(connection, settings.request_queue, line(), reply_to=replies.name)
        (result,) = results_of(await replies.until_results(1, timeout=30))
    assert result.ok and result.metadata.upstream == "standard"
    assert result.metadata.attempts == 1  # the 503 on flex was a wait, not an attempt
    assert result.metadata.calls == 2
    flex_bodies = [r.body for r in busy.requests if r.path.endswith("/chat/completions")]
    standard_bodies = [r.body for r in mock.requests if r.path.endswith("/chat/completions")]
    assert [b.get("service_tier") for b in flex_bodies] == ["flex"]
    assert [b.get("service_tier") for b in standard_bodies] == [None]  # only where set


async def test_an_upstream_kept_for_one_lane(
    start_worker: StartWorker,
    connection: AbstractConnection,
    replies: Replies,
    mock: MockUpstream,
    tmp_path: Path,
    names: dict[str, str],
) -> None:
    from worker.mock.upstream import MockConfig

    key = tmp_path / "key"
    key.write_text(mock.config.api_key or "")
    interactive, batch = names["request_queue"], names["request_queue"] + ".batch"
    async with MockUpstream(MockConfig(api_key=mock.config.api_key)) as cheap:
        entries = [
            {
                "name": "cheap",
                "base_url": cheap.base_url,
                "api_key_file": str(key),
                "models": ["gpt-4o-mini"],
                "lanes": [batch],
                "priority": 0,
            },
            {
                "name": "standard",
                "base_url": mock.base_url,
                "api_key_file": str(key),
                "models": ["gpt-4o-mini"],
                "priority": 1,
            },
        ]
        path = tmp_path / "upstreams.yaml"
        path.write_text(yaml.safe_dump({"upstreams": entries}))
        await start_worker(
            upstreams_file=path,
            upstream_base_url=None,
            request_queue=f"{interactive}:1,{batch}:1",
        )
        try:
            await publish(connection, interactive, line(), reply_to=replies.name)
            await publish(connection, batch, line(), reply_to=replies.name)
            results = results_of(await replies.until_results(2, timeout=30))
        finally:
            channel = await connection.channel()
            for queue in (batch, f"{batch}.dlq", f"{interactive}.dlq"):
                await channel.queue_delete(queue)
    upstream_of = {r.metadata.lane: r.metadata.upstream for r in results}
    assert upstream_of == {interactive: "standard", batch: "cheap"}
