"""One job without a broker: envelope, checks, and the retrying run against a mock upstream."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import prometheus_client
import pytest
from opentelemetry import context as otel_context
from opentelemetry import propagate

from worker import retry
from worker.amqp.envelope import read_envelope
from worker.amqp.topology import H_RATE_LIMIT_WAIT
from worker.errors import (
    Expired,
    ForbiddenReplyTo,
    InvalidMessage,
    InvalidRequest,
    ModelNotAllowed,
    RateLimited,
    UpstreamError,
)
from worker.job import Deferral, Envelope, Job, JobOutcome, Rejection, decode_job
from worker.limits.configured import ConfiguredLimits, LocalQuota, Quota
from worker.limits.gate import Gate
from worker.messages import ErrorCode
from worker.runner import JobRunner, backoff
from worker.settings import Settings
from worker.telemetry import Telemetry
from worker.upstream.client import Upstream

BASE_URL = "http://upstream.test/v1"
BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Hi", "cache_control": {"type": "ephemeral"}}],
    "temperature": 0.2,
    "top_k": 40,  # not in the API reference: must reach the upstream unchanged
}
USAGE = {
    "prompt_tokens": 9,
    "completion_tokens": 2,
    "total_tokens": 11,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1732500000,
    "model": "gpt-4o-mini",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}
    ],
    "usage": USAGE,
}
ERROR_BODY = {"error": {"message": "nope", "type": "server_error"}}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(autouse=True)
def no_worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("WORKER_"):
            monkeypatch.delenv(name)


def make_settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, upstream_base_url=BASE_URL, **overrides)


def envelope(settings: Settings | None = None, **changes: Any) -> Envelope:
    args: dict[str, Any] = {
        "message_id": "job-1",
        "correlation_id": None,
        "reply_to": None,
        "headers": None,
        "redelivered": False,
    }
    args.update(changes)
    return read_envelope(settings=settings or make_settings(), **args)


def request_line(body: dict[str, Any] | None = None, **fields: Any) -> bytes:
    return orjson.dumps({"custom_id": "order-42", **fields, "body": BODY if body is None else body})


def rfc3339(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat()


# --- read_envelope ----------------------------------------------------------------------------


def test_job_id_and_correlation_id_from_properties() -> None:
    env = envelope(message_id="m-1", correlation_id="c-1", reply_to="replies")
    assert (env.job_id, env.correlation_id, env.reply_to) == ("m-1", "c-1", "replies")
    assert env.reply_to_forbidden is False
    assert env.deadline is None and env.bad_deadline is None
    assert env.prior_attempts == 0


@pytest.mark.parametrize("message_id", [None, ""])
def test_job_id_without_message_id_is_stable_per_delivery(message_id: str | None) -> None:
    """Every delivery (or duplicate) of one publish gets the same id; another job another."""
    line = request_line()
    first = envelope(message_id=message_id, body=line, reply_to="r")
    again = envelope(
        message_id=message_id,
        body=line,
        reply_to="r",
        redelivered=True,
        headers={"x-delivery-count": 2},
    )
    other_body = envelope(message_id=message_id, body=request_line(custom_id="o"), reply_to="r")
    other_reply = envelope(message_id=message_id, body=line, reply_to="s")
    assert first.job_id == again.job_id
    assert len({first.job_id, other_body.job_id, other_reply.job_id}) == 3
    assert uuid.UUID(first.job_id)
    assert first.correlation_id == first.job_id


def test_correlation_id_defaults_to_job_id() -> None:
    assert envelope(message_id="m-7").correlation_id == "m-7"


@pytest.mark.parametrize(
    ("pattern", "reply_to", "kept", "forbidden"),
    [
        (None, "anything.at.all", "anything.at.all", False),
        (r"amq\.gen-[\w-]+|replies\.\w+", "amq.gen-Ab_1-x", "amq.gen-Ab_1-x", False),
        (r"amq\.gen-[\w-]+|replies\.\w+", "replies.alice", "replies.alice", False),
        (r"amq\.gen-[\w-]+|replies\.\w+", "chat.requests", None, True),
        (r"replies\.\w+", "replies.alice.more", None, True),  # must match in full
        (r"replies\.\w+", "xreplies.alice", None, True),
        (r"replies\.\w+", None, None, False),
        (r"replies\.\w+", "", None, False),
    ],
)
def test_reply_to_pattern(
    pattern: str | None, reply_to: str | None, kept: str | None, forbidden: bool
) -> None:
    settings = make_settings(reply_to_pattern=pattern)
    env = envelope(settings, reply_to=reply_to)
    assert env.reply_to == kept
    assert env.reply_to_forbidden is forbidden


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2030-01-02T03:04:05Z", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2030-01-02T05:04:05+02:00", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2030-01-02T03:04:05.250Z", datetime(2030, 1, 2, 3, 4, 5, 250000, tzinfo=UTC)),
        (b"2030-01-02T03:04:05Z", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ],
)
def test_deadline_parsed(value: str | bytes, expected: datetime) -> None:
    env = envelope(headers={"x-deadline": value})
    assert env.deadline == expected
    assert env.bad_deadline is None


@pytest.mark.parametrize("value", ["tomorrow", "2030-01-02T03:04:05", "2030-13-01T00:00:00Z", ""])
def test_bad_deadline_flagged(value: str) -> None:
    env = envelope(headers={"x-deadline": value})
    assert env.deadline is None
    assert env.bad_deadline == value


@pytest.mark.parametrize(
    ("headers", "redelivered", "prior", "redeliveries"),
    [
        (None, False, 0, 0),
        (None, True, 1, 0),
        ({"x-attempts": 2}, False, 2, 0),
        ({"x-attempts": 2}, True, 3, 0),
        ({"x-delivery-count": 3}, True, 3, 3),
        ({"x-attempts": 1, "x-delivery-count": 2}, True, 3, 2),
        ({"x-redeliveries": 2}, True, 2, 2),
        ({"x-attempts": 4, "x-redeliveries": 1}, False, 5, 1),
        ({"x-attempts": "junk", "x-delivery-count": -3}, False, 0, 0),
    ],
)
def test_prior_attempts(
    headers: dict[str, Any] | None, redelivered: bool, prior: int, redeliveries: int
) -> None:
    env = envelope(headers=headers, redelivered=redelivered)
    assert env.prior_attempts == prior
    assert env.redeliveries == redeliveries


# --- decode_job -------------------------------------------------------------------------------


def test_good_request_becomes_a_job() -> None:
    env = envelope()
    job = decode_job(request_line(method="POST", url="/v1/chat/completions"), env, make_settings())
    assert isinstance(job, Job)
    assert job.envelope is env
    assert (job.custom_id, job.model, job.stream) == ("order-42", "gpt-4o-mini", False)
    assert job.body == BODY  # unknown fields included, nothing added
    assert orjson.dumps(job.body) == orjson.dumps(BODY)


@pytest.mark.parametrize(
    "fields",
    [{}, {"method": "post"}, {"url": "/chat/completions"}, {"custom_id": None}],
)
def test_optional_batch_fields(fields: dict[str, Any]) -> None:
    assert isinstance(decode_job(request_line(**fields), envelope(), make_settings()), Job)


def test_stream_flag_and_allowed_model() -> None:
    settings = make_settings(allowed_models="gpt-4o-mini,llama-3")
    job = decode_job(request_line({**BODY, "stream": True}), envelope(settings), settings)
    assert isinstance(job, Job)
    assert job.stream is True


def test_deadline_in_the_future_is_fine() -> None:
    env = envelope(headers={"x-deadline": rfc3339(timedelta(minutes=5))})
    assert isinstance(decode_job(request_line(), env, make_settings()), Job)


def _rejected(
    data: bytes, env: Envelope | None = None, settings: Settings | None = None
) -> Rejection:
    settings = settings or make_settings()
    decoded = decode_job(data, env or envelope(settings), settings)
    assert isinstance(decoded, Rejection), decoded
    return decoded


@pytest.mark.parametrize(
    ("data", "custom_id"),
    [
        (b"{not json", None),
        (b"\xff\xfe{}", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'"a string"', None),
        (b"null", None),
        (b'{"custom_id": "c-1"}', "c-1"),
        (b'{"custom_id": "c-1", "body": []}', "c-1"),
        (request_line({**BODY, "messages": []}), "order-42"),
        (request_line({**BODY, "temperature": 2.5}), "order-42"),
        (request_line({**BODY, "tool_choice": "sometimes"}), "order-42"),
        (request_line({"messages": BODY["messages"]}), "order-42"),
        (orjson.dumps({"custom_id": 42, "body": BODY}), None),
    ],
)
def test_unreadable_or_off_schema_is_invalid_message(data: bytes, custom_id: str | None) -> None:
    rejection = _rejected(data)
    assert type(rejection.error) is InvalidMessage
    assert rejection.error.code is ErrorCode.INVALID_MESSAGE
    assert rejection.custom_id == custom_id


def test_schema_error_names_the_field() -> None:
    rejection = _rejected(request_line({**BODY, "temperature": 2.5}))
    assert "body.temperature" in rejection.error.message


def test_too_large() -> None:
    data = request_line()
    settings = make_settings(max_message_bytes=len(data) - 1)
    rejection = _rejected(data, settings=settings)
    assert type(rejection.error) is InvalidMessage
    assert "WORKER_MAX_MESSAGE_BYTES" in rejection.error.message
    assert isinstance(decode_job(data, envelope(), make_settings(max_message_bytes=len(data))), Job)


def test_item27_an_oversized_message_still_names_its_custom_id() -> None:
    """Issue 27: the result of an 11 MB message echoes its custom_id when it can be read."""
    padding = "x" * (11 * 1024 * 1024)
    body = {**BODY, "messages": [{"role": "user", "content": padding}]}
    data = orjson.dumps({"custom_id": 'big-"1"', "body": body})
    rejection = _rejected(data)
    assert type(rejection.error) is InvalidMessage
    assert "WORKER_MAX_MESSAGE_BYTES" in rejection.error.message
    assert rejection.custom_id == 'big-"1"'
    # custom_id after the body, past the first bytes: not read, and no whole parse for it.
    late = orjson.dumps({"body": body, "custom_id": "late"})
    assert _rejected(late).custom_id is None


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "GET"},
        {"method": "DELETE"},
        {"url": "/v1/completions"},
        {"url": "https://evil.example/v1/chat/completions"},
        {"url": "https://evil.example/v1/embeddings"},
        {"url": "/v1/chat/completions?x=1"},
    ],
)
def test_wrong_method_or_url_is_invalid_request(fields: dict[str, Any]) -> None:
    rejection = _rejected(request_line(**fields))
    assert type(rejection.error) is InvalidRequest
    assert rejection.custom_id == "order-42"


def test_model_not_allowed() -> None:
    settings = make_settings(allowed_models="llama-3")
    rejection = _rejected(request_line(), settings=settings)
    assert type(rejection.error) is ModelNotAllowed
    assert rejection.custom_id == "order-42"


def test_forbidden_reply_to() -> None:
    settings = make_settings(reply_to_pattern=r"replies\..+")
    env = envelope(settings, reply_to="chat.requests")
    rejection = _rejected(request_line(), env, settings)
    assert type(rejection.error) is ForbiddenReplyTo
    assert rejection.custom_id == "order-42"


def test_expired_deadline() -> None:
    env = envelope(headers={"x-deadline": rfc3339(-timedelta(seconds=1))})
    rejection = _rejected(request_line(), env)
    assert type(rejection.error) is Expired
    assert rejection.custom_id == "order-42"


def test_bad_deadline_is_invalid_message() -> None:
    env = envelope(headers={"x-deadline": "next tuesday"})
    rejection = _rejected(request_line(), env)
    assert type(rejection.error) is InvalidMessage
    assert "x-deadline" in rejection.error.message


def test_bad_deadline_keeps_custom_id() -> None:
    # The body is readable: the result must still echo its custom_id (contract §3, §4).
    env = envelope(headers={"x-deadline": "next tuesday"})
    assert _rejected(request_line(), env).custom_id == "order-42"


def test_rejections_are_permanent() -> None:
    settings = make_settings(allowed_models="other", reply_to_pattern="x")
    for data, env in [
        (b"nope", envelope(settings)),
        (request_line(method="GET"), envelope(settings)),
        (request_line(), envelope(settings)),
        (request_line(), envelope(settings, reply_to="y")),
    ]:
        assert not _rejected(data, env, settings).error.retryable


# --- backoff ----------------------------------------------------------------------------------


def test_backoff_honours_retry_after() -> None:
    assert backoff(1, 30.0) == 30.0
    assert backoff(4, 0.0) == 0.0
    assert backoff(2, 1.5) == 1.5


@pytest.mark.parametrize(("attempt", "base"), [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 60.0)])
def test_backoff_grows_exponentially_with_jitter(attempt: int, base: float) -> None:
    waits = [backoff(attempt, None) for _ in range(200)]
    assert all(0.75 * base <= wait <= base for wait in waits)
    assert len(set(waits)) > 1  # jittered


def test_backoff_jitter_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry.random, "uniform", lambda low, high: low)
    assert [backoff(n, None) for n in (1, 2, 3)] == [0.375, 0.75, 1.5]
    monkeypatch.setattr(retry.random, "uniform", lambda low, high: high)
    assert [backoff(n, None) for n in (1, 2, 3, 20)] == [0.5, 1.0, 2.0, 60.0]


# --- JobRunner.run ----------------------------------------------------------------------------

Answer = Callable[[httpx.Request], Awaitable[httpx.Response]]


def respond(status: int = 200, json: Any = COMPLETION, **headers: str) -> Answer:
    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=json, headers=headers)

    return answer


def sse(*events: dict[str, Any], done: bool = True) -> bytes:
    out = b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def stream_of(payload: bytes | Callable[[], AsyncIterator[bytes]]) -> Answer:
    async def answer(request: httpx.Request) -> httpx.Response:
        content = payload if isinstance(payload, bytes) else payload()
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream", "x-request-id": "r-s"},
            content=content,
        )

    return answer


async def hang(request: httpx.Request) -> httpx.Response:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def chunk(content: str | None = None, finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "delta": {} if content is None else {"content": content},
                "finish_reason": finish_reason,
            }
        ],
        "usage": None,
    }


USAGE_CHUNK = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}


class FakeClock:
    """The gate's clock: its waits are recorded and pass at once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


class Upstreams:
    """A scripted upstream: one answer per call, the last one repeated."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.requests: list[httpx.Request] = []
        self._opened: list[Upstream] = []
        self.clock = FakeClock()

    def runner(self, *answers: Answer, quota: Quota | None = None, **settings: Any) -> JobRunner:
        script = list(answers)

        async def handle(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            answer = script.pop(0) if len(script) > 1 else script[0]
            return await answer(request)

        config = make_settings(**settings)
        upstream = Upstream(config.upstream_url, "sk-test", transport=httpx.MockTransport(handle))
        self._opened.append(upstream)
        gate = Gate("default", quota, clock=self.clock.time, sleep=self.clock.sleep)
        return JobRunner(config, upstream, self.telemetry, gate)

    def counter(self, name: str, **labels: str) -> float:
        return sum(
            sample.value
            for metric in self.telemetry.registry.collect()
            for sample in metric.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def retries(self, code: str) -> float:
        """The ``chat_worker.retries`` counter for ``code``, as ``/metrics`` shows it."""
        return sum(
            sample.value
            for metric in self.telemetry.registry.collect()
            for sample in metric.samples
            if sample.name == "chat_worker_retries_total"
            and sample.labels.get("error_code") == code
        )

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [orjson.loads(request.content) for request in self.requests]

    async def aclose(self) -> None:
        for upstream in self._opened:
            await upstream.aclose()


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    # Metrics of this test alone: the process-wide registry would add up across tests.
    telemetry = Telemetry(registry=prometheus_client.CollectorRegistry())
    scripted = Upstreams(telemetry)
    yield scripted
    await scripted.aclose()
    telemetry.shutdown()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The retry waits asked for; none of them actually waited."""
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def no_wait(delay: float, result: Any = None) -> Any:
        waits.append(delay)
        await real_sleep(0)
        return result

    monkeypatch.setattr("worker.runner.asyncio.sleep", no_wait)
    return waits


class Deltas:
    """A fake delta sink recording (attempt, seq, choices) and the settles."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int, list[dict[str, Any]]]] = []
        self.settled = 0

    async def send(self, attempt: int, seq: int, choices: list[dict[str, Any]]) -> None:
        self.sent.append((attempt, seq, choices))

    async def settle(self) -> None:
        self.settled += 1

    def of_attempt(self, attempt: int) -> list[tuple[int, list[dict[str, Any]]]]:
        return [(seq, choices) for a, seq, choices in self.sent if a == attempt]

    def text(self, attempt: int) -> str:
        return "".join(
            c["delta"].get("content", "")
            for _, choices in self.of_attempt(attempt)
            for c in choices
        )


def make_job(body: dict[str, Any] | None = None, **envelope_changes: Any) -> Job:
    settings = make_settings()
    job = decode_job(request_line(body), envelope(settings, **envelope_changes), settings)
    assert isinstance(job, Job)
    return job


async def run(runner: JobRunner, job: Job, deltas: Deltas | None = None) -> JobOutcome | Deferral:
    return await runner.run(job, deltas or Deltas())


async def test_success_first_time(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(respond(**{"x-request-id": "req-1"}))
    # The job's trace context (the service attaches the producer's) goes upstream.
    token = otel_context.attach(propagate.extract({"traceparent": TRACEPARENT}))
    try:
        outcome = await run(runner, make_job())
    finally:
        otel_context.detach(token)
    assert isinstance(outcome, JobOutcome)
    assert outcome.ok
    assert outcome.attempts == 1
    assert (outcome.status_code, outcome.request_id) == (200, "req-1")
    assert outcome.body == COMPLETION
    assert outcome.usage == USAGE
    assert outcome.latency_ms is not None and outcome.latency_ms >= 0
    assert outcome.ttft_ms is None
    assert sleeps == []
    (request,) = upstreams.requests
    assert str(request.url) == f"{BASE_URL}/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]
    assert orjson.loads(request.content) == BODY


async def test_server_error_then_success(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(respond(500, ERROR_BODY), respond())
    outcome = await run(runner, make_job())
    assert isinstance(outcome, JobOutcome)
    assert outcome.ok
    assert outcome.attempts == 2
    assert outcome.usage == USAGE
    assert len(upstreams.requests) == 2
    assert len(sleeps) == 1
    assert 0.375 <= sleeps[0] <= 0.5


async def test_bad_request_fails_at_once(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(respond(400, ERROR_BODY, **{"x-request-id": "req-4"}))
    outcome = await run(runner, make_job())
    assert isinstance(outcome, JobOutcome)
    assert isinstance(outcome.error, InvalidRequest)
    assert outcome.attempts == 1
    assert (outcome.status_code, outcome.request_id, outcome.body) == (400, "req-4", ERROR_BODY)
    assert outcome.usage is None
    assert len(upstreams.requests) == 1
    assert sleeps == []


async def test_server_errors_until_max_attempts(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(respond(500, ERROR_BODY))
    outcome = await run(runner, make_job())
    assert isinstance(outcome, JobOutcome)
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.UPSTREAM_ERROR
    assert outcome.attempts == 5 == len(upstreams.requests)
    assert outcome.status_code == 500
    assert outcome.body == ERROR_BODY
    assert len(sleeps) == 4
    for wait, base in zip(sleeps, (0.5, 1.0, 2.0, 4.0), strict=True):
        assert 0.75 * base <= wait <= base
    assert upstreams.retries("upstream_error") == 4


async def test_max_attempts_setting(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(respond(503, ERROR_BODY), max_attempts=2)
    outcome = await run(runner, make_job())
    assert isinstance(outcome, JobOutcome)
    assert outcome.attempts == 2 == len(upstreams.requests)


async def test_long_retry_after_defers(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(respond(429, ERROR_BODY, **{"Retry-After": "50"}))
    outcome = await run(runner, make_job())
    assert isinstance(outcome, Deferral)
    # The longest delay tier that does not overshoot the budget's return.
    assert outcome.wait == 30
    assert outcome.attempts == 0  # a call refused for budget is not an attempt (§11)
    assert isinstance(outcome.error, RateLimited)
    assert outcome.rate_limit_wait_ms == 30_000  # carried to the next delivery
    assert len(upstreams.requests) == 1
    assert sleeps == [] and upstreams.clock.slept == []
    assert (
        upstreams.counter("chat_worker_upstream_rate_limited_total", error_code="rate_limited") == 1
    )
    # The gate's state is a metric: closed now, with the upstream's name.
    assert upstreams.counter("chat_worker_upstream_state", upstream="default", state="closed") == 1
    assert upstreams.counter("chat_worker_upstream_state", upstream="default", state="open") == 0


async def test_short_retry_after_waits_inline(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(respond(429, ERROR_BODY, **{"retry-after-ms": "1200"}), respond())
    outcome = await run(runner, make_job())
    assert isinstance(outcome, JobOutcome)
    assert outcome.ok and outcome.attempts == 1
    assert outcome.rate_limit_wait_ms == 1200 and outcome.upstream == "default"
    assert upstreams.clock.slept == [1.2]
    assert sleeps == []


async def test_rate_limited_until_max_wait(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(
        respond(429, ERROR_BODY, **{"retry-after": "0.25"}), max_attempts=3, rate_limit_max_wait=2
    )
    outcome = await run(runner, make_job())
    assert isinstance(outcome, JobOutcome)
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.RATE_LIMITED
    assert "WORKER_RATE_LIMIT_MAX_WAIT" in outcome.error.message
    assert (outcome.status_code, outcome.body) == (429, ERROR_BODY)
    # A call at 0 s and one every 0.25 s up to 2 s; none counts toward max_attempts.
    assert outcome.attempts == 0
    assert len(upstreams.requests) == 9
    assert outcome.rate_limit_wait_ms == 2000
    assert sleeps == []


async def test_wait_past_max_wait_fails_at_once(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(respond(429, ERROR_BODY, **{"retry-after": "10"}))
    job = make_job(headers={H_RATE_LIMIT_WAIT: 3_595_000})  # 3595 s waited before
    outcome = await run(runner, job)
    assert isinstance(outcome, JobOutcome)
    assert outcome.error is not None and outcome.error.code is ErrorCode.RATE_LIMITED
    assert outcome.rate_limit_wait_ms == 3_595_000
    assert upstreams.clock.slept == []


async def test_wait_past_deadline_fails(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(respond(429, ERROR_BODY, **{"retry-after": "20"}))
    deadline = datetime.now(UTC) + timedelta(seconds=10)
    outcome = await run(runner, make_job(headers={"x-deadline": deadline.isoformat()}))
    assert isinstance(outcome, JobOutcome)
    assert outcome.error is not None and outcome.error.code is ErrorCode.RATE_LIMITED
    assert "x-deadline" in outcome.error.message


INSUFFICIENT_QUOTA = {
    "error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
              "code": "insufficient_quota", "param": None}
}  # fmt: skip


async def test_insufficient_quota_cools_then_fails(
    upstreams: Upstreams, sleeps: list[float]
) -> None:
    runner = upstreams.runner(respond(429, INSUFFICIENT_QUOTA), rate_limit_max_wait=100)
    outcome = await run(runner, make_job())
    assert isinstance(outcome, JobOutcome)
    assert outcome.error is not None and outcome.error.code is ErrorCode.QUOTA_EXCEEDED
    assert outcome.status_code == 429 and len(upstreams.requests) == 1
    assert runner.gate.state == "cooling"
    assert (
        upstreams.counter("chat_worker_upstream_rate_limited_total", error_code="quota_exceeded")
        == 1
    )


async def test_insufficient_quota_probe_after_cooldown(
    upstreams: Upstreams, sleeps: list[float]
) -> None:
    runner = upstreams.runner(respond(429, INSUFFICIENT_QUOTA), respond())
    first = await run(runner, make_job())
    assert isinstance(first, Deferral)  # 300 s of cooling: out of the process
    assert first.wait == 120 and first.rate_limit_wait_ms == 120_000
    upstreams.clock.now += 301
    second = await run(runner, make_job())  # the probe
    assert isinstance(second, JobOutcome) and second.ok
    assert runner.gate.state == "open"


TOO_LARGE = {
    "error": {"message": "max_tokens is too large", "type": "invalid_request_error",
              "param": "max_tokens", "code": None}
}  # fmt: skip
TOKEN_BUDGET = {"x-ratelimit-limit-tokens": "60000", "x-ratelimit-remaining-tokens": "59000"}


@pytest.mark.parametrize("budget", ["read from headers", "configured tpm"])
async def test_a_job_asking_a_billion_tokens_fails_alone(
    upstreams: Upstreams, sleeps: list[float], budget: str
) -> None:
    """Issue 22 item 1: the upstream refuses the job that asks ``max_tokens: 1000000000``;
    the jobs after it go at once (they used to fail rate_limited, "waited 0.0s", for hours)."""
    if budget == "configured tpm":
        quota: Quota | None = LocalQuota(ConfiguredLimits(tpm=60_000), upstreams.clock.time)
        headers: dict[str, str] = {}
    else:
        quota, headers = None, TOKEN_BUDGET
    runner = upstreams.runner(respond(400, TOO_LARGE, **headers), respond(**headers), quota=quota)
    huge = await run(runner, make_job({**BODY, "max_tokens": 1_000_000_000}))
    assert isinstance(huge, JobOutcome)
    assert huge.error is not None and huge.error.code is ErrorCode.INVALID_REQUEST
    for _ in range(3):
        outcome = await run(runner, make_job())
        assert isinstance(outcome, JobOutcome) and outcome.ok, outcome.error
        assert outcome.rate_limit_wait_ms < 100
    assert runner.gate.state == "open"


@pytest.mark.parametrize(
    "retry_after", ["31536000", "Fri, 01 Jan 2100 00:00:00 GMT"], ids=["seconds", "date"]
)
async def test_a_retry_after_of_years_holds_jobs_a_minute_and_a_success_reopens(
    upstreams: Upstreams, sleeps: list[float], retry_after: str
) -> None:
    """Issue 22 item 6: the gate closes for a minute at most (the job goes round a delay
    queue instead of failing at once); then one call probes, and its success reopens it."""
    runner = upstreams.runner(respond(429, ERROR_BODY, **{"retry-after": retry_after}), respond())
    first = await run(runner, make_job())
    assert isinstance(first, Deferral), first
    assert first.wait <= 60 and isinstance(first.error, RateLimited)
    upstreams.clock.now += 61
    second = await run(runner, make_job())
    assert isinstance(second, JobOutcome) and second.ok
    assert runner.gate.state == "open"
    third = await run(runner, make_job())
    assert isinstance(third, JobOutcome) and third.ok and third.rate_limit_wait_ms == 0


class SlotsThatBreak(LocalQuota):
    """Configured limits whose store fails while a call's slot is given back."""

    async def release_slot(self, slot: str) -> None:
        import redis

        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


async def test_an_error_giving_budget_back_never_masks_the_outcome(
    upstreams: Upstreams, sleeps: list[float]
) -> None:
    """Issue 22 item 9: the call is made and paid; a store that breaks while its slot is
    given back must not turn that into an error (and a redelivery: a second payment)."""
    quota = SlotsThatBreak(ConfiguredLimits(max_concurrency=4), upstreams.clock.time)
    runner = upstreams.runner(respond(), quota=quota)
    outcome = await run(runner, make_job())
    assert isinstance(outcome, JobOutcome) and outcome.ok
    assert len(upstreams.requests) == 1


async def test_connection_error_is_retried(upstreams: Upstreams, sleeps: list[float]) -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    runner = upstreams.runner(refuse, respond())
    outcome = await run(runner, make_job())
    assert isinstance(outcome, JobOutcome)
    assert outcome.ok and outcome.attempts == 2


async def test_plain_call_timeout(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(hang, request_timeout=0.05, max_attempts=1)
    outcome = await asyncio.wait_for(run(runner, make_job()), 5)
    assert isinstance(outcome, JobOutcome)
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.TIMEOUT
    assert "WORKER_REQUEST_TIMEOUT" in outcome.error.message
    assert outcome.attempts == 1


async def test_timeout_is_retried(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(hang, respond(), request_timeout=0.05)
    outcome = await asyncio.wait_for(run(runner, make_job()), 5)
    assert isinstance(outcome, JobOutcome)
    assert outcome.ok and outcome.attempts == 2
    assert len(sleeps) == 1


@pytest.mark.parametrize("prior", [5, 7])
async def test_prior_attempts_exhausted(
    upstreams: Upstreams, sleeps: list[float], prior: int
) -> None:
    runner = upstreams.runner(respond())
    outcome = await run(runner, make_job(headers={"x-attempts": prior}))
    assert isinstance(outcome, JobOutcome)
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.UPSTREAM_ERROR
    assert outcome.attempts == prior
    assert upstreams.requests == []


async def test_prior_attempts_count_towards_max(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(respond(500, ERROR_BODY))
    outcome = await run(runner, make_job(headers={"x-attempts": 3}, redelivered=True))
    assert isinstance(outcome, JobOutcome)
    assert outcome.attempts == 5
    assert len(upstreams.requests) == 1


# --- streamed jobs ----------------------------------------------------------------------------

STREAM_BODY = {**BODY, "stream": True}
HELLO = sse(
    {**chunk(), "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
    chunk("Hel"),
    chunk("lo"),
    chunk(finish_reason="stop"),
    USAGE_CHUNK,
)


async def test_streamed_job(upstreams: Upstreams, sleeps: list[float]) -> None:
    runner = upstreams.runner(stream_of(HELLO), stream_flush_interval=0)
    deltas = Deltas()
    outcome = await run(runner, make_job(STREAM_BODY), deltas)
    assert isinstance(outcome, JobOutcome)
    assert outcome.ok and outcome.attempts == 1
    assert (outcome.status_code, outcome.request_id) == (200, "r-s")
    assert outcome.usage == USAGE
    assert outcome.ttft_ms is not None and outcome.ttft_ms >= 0
    assert outcome.body is not None
    assert outcome.body["object"] == "chat.completion"
    assert outcome.body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}
    ]
    assert outcome.body["usage"] == USAGE
    assert [(a, s) for a, s, _ in deltas.sent] == [(1, 0), (1, 1), (1, 2)]
    assert deltas.text(1) == "Hello"
    assert deltas.sent[-1][2] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    # The usage chunk is asked for; the rest of the body goes as it came.
    (sent,) = upstreams.bodies
    assert sent == {**STREAM_BODY, "stream_options": {"include_usage": True}}


async def test_stream_options_kept_and_usage_forced(
    upstreams: Upstreams, sleeps: list[float]
) -> None:
    runner = upstreams.runner(stream_of(HELLO))
    options = {"include_usage": False, "continuous_usage_stats": True}
    await run(runner, make_job({**STREAM_BODY, "stream_options": options}))
    assert upstreams.bodies[0]["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }


async def test_streamed_deltas_coalesced(upstreams: Upstreams, sleeps: list[float]) -> None:
    async def reads() -> AsyncIterator[bytes]:
        yield sse(
            {**chunk(), "choices": [{"index": 0, "delta": {"role": "assistant"}}]}, done=False
        )
        for part in ("Hel", "l", "o"):
            yield sse(chunk(part), done=False)
        yield sse(chunk(finish_reason="stop"), USAGE_CHUNK)

    runner = upstreams.runner(stream_of(reads), stream_flush_interval=60)
    deltas = Deltas()
    outcome = await run(runner, make_job(STREAM_BODY), deltas)
    assert isinstance(outcome, JobOutcome) and outcome.ok
    # The first content at once; the rest, within the interval, in one delta at the end.
    assert [(s, c[0]["delta"]) for s, c in deltas.of_attempt(1)] == [
        (0, {"content": "Hel"}),
        (1, {"content": "lo"}),
    ]
    assert deltas.sent[-1][2][0]["finish_reason"] == "stop"
    assert deltas.settled == 1


async def test_chunks_of_one_read_leave_in_one_delta(
    upstreams: Upstreams, sleeps: list[float]
) -> None:
    runner = upstreams.runner(stream_of(HELLO), stream_flush_interval=0.05)
    deltas = Deltas()
    outcome = await run(runner, make_job(STREAM_BODY), deltas)
    assert isinstance(outcome, JobOutcome) and outcome.ok
    assert deltas.of_attempt(1) == [
        (0, [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": "stop"}])
    ]


async def test_stream_error_mid_way_then_success(upstreams: Upstreams, sleeps: list[float]) -> None:
    broken = sse(chunk("Hel"), chunk("p"), {"error": {"message": "overloaded"}}, done=False)
    runner = upstreams.runner(stream_of(broken), stream_of(HELLO), stream_flush_interval=0)
    deltas = Deltas()
    outcome = await run(runner, make_job(STREAM_BODY), deltas)
    assert isinstance(outcome, JobOutcome)
    assert outcome.ok and outcome.attempts == 2
    assert [(a, s) for a, s, _ in deltas.sent] == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    assert deltas.text(1) == "Help"
    assert outcome.body is not None
    content = outcome.body["choices"][0]["message"]["content"]
    assert content == "Hello" == deltas.text(2)
    assert len(sleeps) == 1


async def test_stream_error_on_every_attempt(upstreams: Upstreams, sleeps: list[float]) -> None:
    error = {"error": {"message": "overloaded", "type": "server_error"}}
    runner = upstreams.runner(stream_of(sse(chunk("a"), error)), max_attempts=2)
    deltas = Deltas()
    outcome = await run(runner, make_job(STREAM_BODY), deltas)
    assert isinstance(outcome, JobOutcome)
    assert isinstance(outcome.error, UpstreamError)
    assert outcome.attempts == 2
    assert outcome.body == error
    assert outcome.status_code == 200
    assert [(a, s) for a, s, _ in deltas.sent] == [(1, 0), (2, 0)]


async def test_stream_idle_timeout(upstreams: Upstreams, sleeps: list[float]) -> None:
    async def stall() -> AsyncIterator[bytes]:
        yield sse(chunk("Hel"), done=False)
        await asyncio.Event().wait()

    runner = upstreams.runner(
        stream_of(stall), stream_idle_timeout=0.05, stream_flush_interval=0, max_attempts=1
    )
    deltas = Deltas()
    outcome = await asyncio.wait_for(run(runner, make_job(STREAM_BODY), deltas), 5)
    assert isinstance(outcome, JobOutcome)
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.TIMEOUT
    assert "WORKER_STREAM_IDLE_TIMEOUT" in outcome.error.message
    assert outcome.status_code == 200
    assert outcome.attempts == 1
    assert deltas.text(1) == "Hel"


async def test_slow_but_steady_stream_is_not_idle(upstreams: Upstreams) -> None:
    async def steady() -> AsyncIterator[bytes]:
        for part in "abcdef":
            await asyncio.sleep(0.05)
            yield sse(chunk(part), done=False)
        yield b"data: [DONE]\n\n"

    # Each gap (50 ms) is well under the idle timeout; the whole stream (300 ms) is not.
    runner = upstreams.runner(stream_of(steady), stream_idle_timeout=0.2, max_attempts=1)
    outcome = await run(runner, make_job(STREAM_BODY))
    assert isinstance(outcome, JobOutcome)
    assert outcome.ok, outcome.error
    assert outcome.body is not None
    assert outcome.body["choices"][0]["message"]["content"] == "abcdef"


async def test_stream_rejected_status_fails_at_once(
    upstreams: Upstreams, sleeps: list[float]
) -> None:
    runner = upstreams.runner(respond(401, ERROR_BODY))
    deltas = Deltas()
    outcome = await run(runner, make_job(STREAM_BODY), deltas)
    assert isinstance(outcome, JobOutcome)
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.AUTHENTICATION_ERROR
    assert (outcome.attempts, outcome.status_code, outcome.body) == (1, 401, ERROR_BODY)
    assert deltas.sent == []


async def test_malformed_stream_fails_as_upstream_error(
    upstreams: Upstreams, sleeps: list[float]
) -> None:
    bad = {"choices": [{"index": 0, "delta": "not an object"}]}
    runner = upstreams.runner(stream_of(sse(chunk("a"), bad)), max_attempts=2)
    outcome = await run(runner, make_job(STREAM_BODY))
    assert isinstance(outcome, JobOutcome)
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.UPSTREAM_ERROR
    assert outcome.attempts == 2


def test_a_deadline_sent_as_an_amqp_timestamp_is_read_as_utc() -> None:
    from datetime import datetime as _datetime

    naive = _datetime(2030, 1, 2, 3, 4, 5)
    from worker.amqp.envelope import _parse_deadline

    deadline, bad = _parse_deadline(naive)
    assert bad is None
    assert deadline is not None
    assert deadline.tzinfo is not None
    assert deadline.utcoffset() is not None
    assert deadline.replace(tzinfo=None) == naive


# --- embeddings (contract §18) ------------------------------------------------------------------

EMBED_BODY: dict[str, Any] = {
    "model": "text-embedding-3-small",
    "input": ["a cat", "a dog"],
    "dimensions": 4,
    "truncate": "END",  # not in OpenAI's reference: must reach the upstream unchanged
}
EMBEDDINGS = {
    "object": "list",
    "data": [
        {"object": "embedding", "index": 0, "embedding": [0.5, 0.5, 0.5, 0.5]},
        {"object": "embedding", "index": 1, "embedding": [1.0, 0.0, 0.0, 0.0]},
    ],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 4, "total_tokens": 4},
}


@pytest.mark.parametrize("url", ["/v1/embeddings", "/embeddings"])
def test_an_embeddings_line_becomes_an_embeddings_job(url: str) -> None:
    job = decode_job(request_line(EMBED_BODY, url=url), envelope(), make_settings())
    assert isinstance(job, Job)
    assert (job.endpoint, job.model, job.stream) == ("embeddings", "text-embedding-3-small", False)
    assert job.body == EMBED_BODY  # unknown fields included, nothing added


def test_a_chat_line_is_a_chat_job() -> None:
    job = decode_job(request_line(), envelope(), make_settings())
    assert isinstance(job, Job) and job.endpoint == "chat"


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({**EMBED_BODY, "stream": True}, "body.stream: embeddings are never streamed"),
        ({**EMBED_BODY, "dimensions": 0}, "body.dimensions"),
        ({**EMBED_BODY, "input": []}, "body.input"),
        (BODY, "body.input: Field required"),  # the url decides: a chat body is not one
    ],
)
def test_an_embeddings_line_off_schema_is_invalid_message(body: dict[str, Any], where: str) -> None:
    rejection = _rejected(request_line(body, url="/v1/embeddings"))
    assert type(rejection.error) is InvalidMessage
    assert rejection.error.message.startswith(where), rejection.error.message
    assert rejection.custom_id == "order-42"


def test_an_embeddings_body_on_the_chat_url_is_invalid_message() -> None:
    rejection = _rejected(request_line(EMBED_BODY, url="/v1/chat/completions"))
    assert type(rejection.error) is InvalidMessage
    assert "body.messages" in rejection.error.message


def test_an_embeddings_model_is_checked_against_allowed_models() -> None:
    settings = make_settings(allowed_models="gpt-4o-mini")
    rejection = _rejected(request_line(EMBED_BODY, url="/v1/embeddings"), settings=settings)
    assert type(rejection.error) is ModelNotAllowed


async def test_an_embeddings_job_calls_the_embeddings_endpoint(
    upstreams: Upstreams, sleeps: list[float]
) -> None:
    runner = upstreams.runner(respond(json=EMBEDDINGS, **{"x-request-id": "req-e"}))
    settings = make_settings()
    job = decode_job(request_line(EMBED_BODY, url="/v1/embeddings"), envelope(), settings)
    assert isinstance(job, Job)
    outcome = await run(runner, job)
    assert isinstance(outcome, JobOutcome) and outcome.ok, outcome
    assert (outcome.status_code, outcome.request_id) == (200, "req-e")
    assert outcome.body == EMBEDDINGS
    assert outcome.usage == {"prompt_tokens": 4, "total_tokens": 4}
    assert outcome.ttft_ms is None
    (request,) = upstreams.requests
    assert str(request.url) == f"{BASE_URL}/embeddings"
    assert request.headers["accept"] == "application/json"
    assert orjson.loads(request.content) == EMBED_BODY  # never asked to stream
    durations = {
        sample.labels["gen_ai_operation_name"]
        for metric in upstreams.telemetry.registry.collect()
        for sample in metric.samples
        if sample.name == "gen_ai_client_operation_duration_seconds_count"
    }
    assert durations == {"embeddings"}


async def test_an_embeddings_answer_without_data_is_an_upstream_error(
    upstreams: Upstreams, sleeps: list[float]
) -> None:
    runner = upstreams.runner(respond(json=COMPLETION), max_attempts=1)
    job = decode_job(request_line(EMBED_BODY, url="/v1/embeddings"), envelope(), make_settings())
    assert isinstance(job, Job)
    outcome = await run(runner, job)
    assert isinstance(outcome, JobOutcome) and outcome.error is not None
    assert outcome.error.code is ErrorCode.UPSTREAM_ERROR
    assert "not an embeddings list" in outcome.error.message


# --- issue 22 item 13: a delivery is never held past the broker's consumer timeout -----------


async def test_item13_timeouts_leave_through_a_delay_queue_before_the_consumer_timeout(
    upstreams: Upstreams, sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each timed-out attempt holds the delivery a whole WORKER_REQUEST_TIMEOUT: with 5
    attempts inline, 5 x 0.4 s plus backoff, past the consumer timeout of 2 s. The job
    must leave through a delay queue while the next attempt still fits in 80 % of it."""
    monkeypatch.setattr(retry, "RATE_LIMIT_INLINE_WAIT", 0.0)
    runner = upstreams.runner(hang, request_timeout=0.4, consumer_timeout=2.0)
    started = time.monotonic()
    outcome = await asyncio.wait_for(run(runner, make_job()), 10)
    assert isinstance(outcome, Deferral), outcome
    assert outcome.error.code is ErrorCode.TIMEOUT
    assert outcome.attempts == 2, "attempt 3 could have ended past 0.8 x 2 s"
    assert time.monotonic() - started < 0.8 * 2.0


async def test_item13_the_hold_counts_from_the_delivery_not_the_first_attempt(
    upstreams: Upstreams, sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery that waited (a blocked connection) before its job started."""
    monkeypatch.setattr(retry, "RATE_LIMIT_INLINE_WAIT", 0.0)
    runner = upstreams.runner(hang, respond(), request_timeout=0.4, consumer_timeout=2.0)
    outcome = await runner.run(make_job(), Deltas(), held_since=time.monotonic() - 0.5)
    assert isinstance(outcome, Deferral) and outcome.attempts == 1


async def test_item13_a_retry_that_fits_still_waits_inline(
    upstreams: Upstreams, sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retry, "RATE_LIMIT_INLINE_WAIT", 0.0)
    runner = upstreams.runner(hang, respond(), request_timeout=0.4, consumer_timeout=2.0)
    outcome = await runner.run(make_job(), Deltas(), held_since=time.monotonic())
    assert isinstance(outcome, JobOutcome) and outcome.ok and outcome.attempts == 2


async def test_item13_refused_calls_waiting_for_budget_leave_in_time_too(
    upstreams: Upstreams, sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """429s are no attempts and their waits are bounded by WORKER_RATE_LIMIT_MAX_WAIT (an
    hour), not by the consumer timeout: a delivery held long leaves between two of them."""
    monkeypatch.setattr(retry, "RATE_LIMIT_INLINE_WAIT", 0.0)
    runner = upstreams.runner(
        respond(429, ERROR_BODY, **{"retry-after": "1"}), request_timeout=0.4, consumer_timeout=2.0
    )
    outcome = await runner.run(make_job(), Deltas(), held_since=time.monotonic() - 1.3)
    assert isinstance(outcome, Deferral), outcome
    assert outcome.error.code is ErrorCode.RATE_LIMITED
    assert len(upstreams.requests) == 1
