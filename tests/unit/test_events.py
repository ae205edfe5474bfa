"""The worker's job counters and the heartbeat document (§14)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from worker.console.state import Fleet
from worker.heartbeat import (
    MAX_MODELS,
    MAX_TENANTS,
    OTHER_MODEL,
    OTHER_TENANT,
    Heartbeat,
    JobStats,
)
from worker.settings import Settings


def test_stats_count_jobs_errors_tokens_and_tenants() -> None:
    stats = JobStats()
    usage = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
    stats.record(error_code=None, model="m", usage=usage, tenant="team-a")
    stats.record(error_code=None, model="m", usage=usage, tenant=None)
    stats.record(error_code="timeout", model="m", usage=None, tenant="team-a")
    stats.record(error_code="invalid_message", model=None, usage=None, tenant=None)
    assert stats.jobs == {"ok": 2, "error": 2}
    assert stats.errors == {"timeout": 1, "invalid_message": 1}
    assert stats.tokens == {"m": {"input": 20, "output": 8}}
    assert stats.tenants == {"team-a": {"jobs": 2, "input": 10, "output": 4}}


def test_tenants_are_bounded() -> None:
    stats = JobStats()
    for i in range(MAX_TENANTS + 5):
        stats.record(error_code=None, model="m", usage=None, tenant=f"t{i}")
    assert len(stats.tenants) == MAX_TENANTS + 1
    assert stats.tenants[OTHER_TENANT]["jobs"] == 5


def test_heartbeat_body_has_what_the_contract_lists() -> None:
    settings = Settings(_env_file=None, request_queue="chat.interactive:4,chat.batch")  # type: ignore[call-arg]
    stats = JobStats()
    stats.record(error_code=None, model="m", usage={"prompt_tokens": 3}, tenant=None)
    beat = Heartbeat(
        settings,
        "host/42",
        stats,
        ready=lambda: True,
        in_flight=lambda: 5,
        lanes=lambda: {"chat.interactive": 4, "chat.batch": 1},
        upstreams=lambda: {"openai": {"state": "open", "remaining_requests": 7}},
    ).body()
    assert beat["type"] == "heartbeat"
    assert beat["worker"] == "host/42"
    assert datetime.fromisoformat(beat["sent_at"]).tzinfo is not None
    assert beat["ready"] is True
    assert beat["in_flight"] == 5
    assert beat["lanes"] == {
        "chat.interactive": {"weight": 4, "in_flight": 4},
        "chat.batch": {"weight": 1, "in_flight": 1},
    }
    assert beat["jobs"] == {"ok": 1, "error": 0}
    assert beat["errors"] == {}
    assert beat["tokens"] == {"m": {"input": 3, "output": 0}}
    assert beat["tenants"] == {}
    assert beat["upstreams"] == {"openai": {"state": "open", "remaining_requests": 7}}


def test_one_lane_holds_every_job_in_flight_by_default() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    beat = Heartbeat(settings, "h/1", JobStats(), ready=lambda: False, in_flight=lambda: 3)
    body = beat.body()
    assert body["lanes"] == {"chat.requests": {"weight": 1, "in_flight": 3}}
    assert body["upstreams"] == {}


def test_item17_token_counts_by_model_are_bounded_like_the_metric_labels() -> None:
    """Issue 22 item 17: 25,000 model names made a 1.3 MB heartbeat the console dropped."""
    stats = JobStats()
    usage = {"prompt_tokens": 2, "completion_tokens": 1}
    for i in range(25_000):
        stats.record(error_code=None, model=f"model-{i:05d}", usage=usage, tenant=None)
    stats.record(error_code=None, model="m" * 10_000, usage=usage, tenant=None)
    stats.record(error_code=None, model="model-00000", usage=usage, tenant=None)
    assert len(stats.tokens) == MAX_MODELS + 1
    assert stats.tokens["model-00000"] == {"input": 4, "output": 2}, "a known model keeps its own"
    others = 25_000 - MAX_MODELS + 1
    assert stats.tokens[OTHER_MODEL] == {"input": 2 * others, "output": others}
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    body = Heartbeat(settings, "h/1", stats, ready=lambda: True, in_flight=lambda: 0).body()
    assert len(orjson.dumps(body)) < 16_384
    assert Fleet().observe(body, 0.0), "the console takes it"


def test_cost_is_counted_by_model_and_tenant_and_bounded() -> None:
    stats = JobStats()
    usage = {"prompt_tokens": 10, "completion_tokens": 4}
    stats.record(error_code=None, model="m", usage=usage, tenant="a", cost=0.001)
    stats.record(error_code=None, model="m", usage=usage, tenant="b", cost=0.002)
    stats.record(error_code=None, model="n", usage=usage, tenant="a", cost=None)
    assert stats.tokens["m"] == {"input": 20, "output": 8, "cost_usd": 0.003}
    assert stats.tokens["n"] == {"input": 10, "output": 4}, "no price: no cost, never a guess"
    assert stats.tenants["a"]["cost_usd"] == 0.001
    for i in range(MAX_MODELS + 3):
        stats.record(error_code=None, model=f"x{i:03}", usage=usage, tenant=None, cost=0.5)
    assert len(stats.tokens) == MAX_MODELS + 1
    assert stats.tokens[OTHER_MODEL]["cost_usd"] == 2.5  # the five past the bound


def test_the_heartbeat_carries_cost_by_model_and_the_cache_counts_of_a_store() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    stats = JobStats()
    stats.record(error_code=None, model="m", usage={"prompt_tokens": 3}, tenant="t", cost=0.25)
    snapshot = {
        "cache_hits": 7,
        "cache_misses": 3,
        "cache_stored": 3,
        "results_served": 2,
        "skipped": {"lookup": 1, "cache_get": 4},
    }

    def heartbeat(**store: Any) -> dict[str, Any]:
        return Heartbeat(
            settings, "h/1", stats, ready=lambda: True, in_flight=lambda: 0, **store
        ).body()

    beat = heartbeat(store=lambda: snapshot)
    assert beat["tokens"] == {"m": {"input": 3, "output": 0, "cost_usd": 0.25}}
    assert beat["tenants"]["t"]["cost_usd"] == 0.25
    assert beat["cache"] == {"hit": 7, "miss": 3, "stored": 2, "skipped": 5}
    assert "cache" not in heartbeat(), "no store, no cache counts"
    # ... and the console takes it as it is.
    fleet = Fleet()
    assert fleet.observe(orjson.loads(orjson.dumps(beat)), 1_800_000_000.0)
