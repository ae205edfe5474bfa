"""What the worker publishes, without a broker: the result document and reply routing."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from worker.amqp.deltas import ReplyRoutes
from worker.amqp.publish import render_result
from worker.errors import RateLimited
from worker.job import Envelope, JobOutcome, failed
from worker.messages import JobResult


def envelope(**fields: object) -> Envelope:
    values: dict[str, object] = {
        "job_id": "job-1",
        "correlation_id": "corr-1",
        "reply_to": "replies",
        "reply_to_forbidden": False,
        "deadline": None,
        "bad_deadline": None,
        "prior_attempts": 0,
        "redeliveries": 0,
        "headers": {},
        "lane": "chat.requests",
        "tenant": "team-a",
    }
    values.update(fields)
    return Envelope(**values)  # type: ignore[arg-type]


def test_a_successful_result_carries_every_metadata_field_of_the_contract() -> None:
    outcome = JobOutcome(
        attempts=1,
        status_code=200,
        request_id="req-1",
        body={"object": "chat.completion", "choices": []},
        usage={"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
        latency_ms=812.4,
        finished_at=datetime(2026, 12, 7, tzinfo=UTC),
        upstream="openai",
        calls=2,
        cache="miss",
        cost={"input": 1e-6, "output": 2e-6, "total": 3e-6, "currency": "USD", "source": "x"},
    )
    document = orjson.loads(render_result(envelope(), "order-42", "gpt-4o-mini", outcome, "h/1"))
    assert set(document["metadata"]) == {
        "attempts",
        "calls",
        "model",
        "latency_ms",
        "ttft_ms",
        "worker",
        "finished_at",
        "upstream",
        "lane",
        "tenant",
        "rate_limit_wait_ms",
        "cache",
        "cost",
    }
    assert document["metadata"]["finished_at"] == "2026-12-07T00:00:00Z"
    result = JobResult.model_validate(document)
    assert result.ok and result.metadata.calls == 2 and result.metadata.cache == "miss"
    assert result.metadata.cost is not None and result.metadata.cost.total == 3e-6


def test_a_failed_result_has_the_error_and_no_response_without_an_upstream_answer() -> None:
    outcome = failed(RateLimited("waited 3600s for budget"), attempts=0)
    document = orjson.loads(render_result(envelope(), None, None, outcome, "h/1"))
    assert document["error"] == {
        "code": "rate_limited",
        "message": "waited 3600s for budget",
        "status_code": None,
    }
    assert document["response"] is None and document["usage"] is None
    assert document["metadata"]["cost"] is None


def test_reply_routes_give_up_a_refusing_reply_to_for_the_rest_of_the_job_only() -> None:
    routes = ReplyRoutes()
    first, other = envelope(), envelope(job_id="job-2")
    assert routes.reply_to(first) == "replies"
    routes.give_up(first)
    assert routes.reply_to(first) is None  # later messages of job-1 go to the exchange
    assert routes.reply_to(other) == "replies"
    routes.forget(first)  # the job is over: a new delivery starts clean
    assert routes.reply_to(first) == "replies"
    assert routes.reply_to(envelope(reply_to=None)) is None
