"""The upstream pool: routing by model, priority and weight, cooldowns and probes, the
clients it builds, and the runner's fallback over it (transports swapped, clock faked)."""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import prometheus_client
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from worker.errors import (
    AuthenticationFailed,
    InvalidRequest,
    ModelNotAllowed,
    QuotaExceeded,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)
from worker.job import Deferral, Envelope, Job, JobOutcome
from worker.limits.configured import ConfiguredLimits, LocalQuota
from worker.limits.gate import Gate
from worker.runner import JobRunner
from worker.settings import Settings, UpstreamSpec
from worker.telemetry import Telemetry
from worker.upstream.check import check_upstreams
from worker.upstream.pool import Member, UpstreamPool, provider_for_host

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "served-name",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def closed_gate(name: str, seconds: float = 60.0) -> Gate:
    """A real gate, closed as a 429 would close it."""
    gate = Gate(name)
    gate.close(seconds, reason="test")
    return gate


def spec(name: str, models: list[str] | None = None, **fields: Any) -> UpstreamSpec:
    return UpstreamSpec(
        name=name,
        base_url=fields.pop("base_url", f"http://{name}.test/v1"),
        models=["*"] if models is None else models,
        **fields,
    )


def pool_of(
    *specs: UpstreamSpec,
    clock: FakeClock | None = None,
    seed: int = 7,
    gates: dict[str, Gate] | None = None,
    handler: Callable[[httpx.Request], httpx.Response] | None = None,
) -> UpstreamPool:
    def transport(_: UpstreamSpec) -> httpx.AsyncBaseTransport:
        return httpx.MockTransport(handler or (lambda _: httpx.Response(200, json=COMPLETION)))

    return UpstreamPool.from_specs(
        specs,
        transport=transport,
        gate=(lambda s: (gates or {}).get(s.name)),
        clock=clock or FakeClock(),
        rng=random.Random(seed),
    )


@pytest.fixture
async def pools() -> AsyncIterator[list[UpstreamPool]]:
    opened: list[UpstreamPool] = []
    yield opened
    for pool in opened:
        await pool.aclose()


# --- routing ---------------------------------------------------------------------------------


def test_exact_names_star_and_model_map_keys_route() -> None:
    pool = pool_of(
        spec("azure", ["gpt-4o-mini"], model_map={"fast": "gpt-4o-mini"}),
        spec("vllm", ["llama-3.1-8b"]),
        spec("gateway", ["*"], priority=5),
    )
    assert pool.choose("gpt-4o-mini").name == "azure"  # type: ignore[union-attr]
    assert pool.choose("fast").name == "azure"  # type: ignore[union-attr]
    assert pool.choose("llama-3.1-8b").name == "vllm"  # type: ignore[union-attr]
    assert pool.choose("anything-else").name == "gateway"  # type: ignore[union-attr]
    tiers = pool.route("gpt-4o-mini").tiers
    assert [[m.name for m in tier] for tier in tiers] == [["azure"], ["gateway"]]


def test_a_model_no_upstream_serves_is_not_allowed() -> None:
    pool = pool_of(spec("a", ["gpt-4o"]), spec("b", ["gpt-4o-mini"]))
    with pytest.raises(ModelNotAllowed, match="no upstream serves model 'o3'"):
        pool.choose("o3")


def test_lowest_priority_first_then_the_next_on_exclusion() -> None:
    pool = pool_of(
        spec("backup", priority=1), spec("primary", priority=0), spec("last", priority=9)
    )
    first = pool.choose("m")
    assert first is not None and first.name == "primary"
    second = pool.choose("m", [first])
    assert second is not None and second.name == "backup"
    third = pool.choose("m", [first, second])
    assert third is not None and third.name == "last"
    assert pool.choose("m", [first, second, third]) is None


def test_weights_share_equal_priorities_chi_squared() -> None:
    """10 000 draws over weights 1:2:7 fit the expected shares (chi-squared, 2 degrees of
    freedom, critical value 13.82 at p = 0.001), and the lower tier is never drawn."""
    pool = pool_of(
        spec("a", weight=1),
        spec("b", weight=2),
        spec("c", weight=7),
        spec("spare", priority=1, weight=100),
        seed=12345,
    )
    draws = 10_000
    counts = collections.Counter(pool.choose("m").name for _ in range(draws))  # type: ignore[union-attr]
    expected = {"a": 0.1 * draws, "b": 0.2 * draws, "c": 0.7 * draws}
    assert set(counts) == set(expected)
    chi2 = sum((counts[name] - e) ** 2 / e for name, e in expected.items())
    assert chi2 < 13.82, (counts, chi2)


def test_weights_among_the_members_left_after_exclusion() -> None:
    pool = pool_of(spec("a", weight=1), spec("b", weight=3), spec("c", weight=6), seed=99)
    a = pool.members[0]
    counts = collections.Counter(pool.choose("m", [a]).name for _ in range(4000))  # type: ignore[union-attr]
    assert set(counts) == {"b", "c"}
    assert abs(counts["b"] / 4000 - 1 / 3) < 0.04  # 3:6 of what is left


def test_a_closed_gate_sends_the_job_to_an_upstream_with_budget() -> None:
    gates = {"primary": closed_gate("primary"), "backup": Gate("backup")}
    clock = FakeClock()
    pool = pool_of(spec("primary"), spec("backup", priority=1), gates=gates, clock=clock)
    assert pool.choose("m").name == "backup"  # type: ignore[union-attr]
    assert pool.choose("m", ready=True).name == "backup"  # type: ignore[union-attr]
    gates["primary"] = Gate("primary")
    pool.members[0].gate = gates["primary"]
    assert pool.choose("m").name == "primary"  # type: ignore[union-attr]


def test_every_gate_closed_waits_at_the_best_one_unless_ready_is_asked() -> None:
    gates = {"primary": closed_gate("primary"), "backup": closed_gate("backup")}
    pool = pool_of(spec("primary"), spec("backup", priority=1), gates=gates)
    assert pool.choose("m").name == "primary"  # type: ignore[union-attr]
    assert pool.choose("m", ready=True) is None


def test_a_cooling_gate_quota_spent_is_skipped() -> None:
    quota_spent = Gate("k1")
    quota_spent.cool(300)
    pool = pool_of(spec("k1"), spec("k2"), gates={"k1": quota_spent, "k2": Gate("k2")})
    assert {pool.choose("m").name for _ in range(50)} == {"k2"}  # type: ignore[union-attr]


def test_equal_priorities_prefer_the_one_with_budget() -> None:
    gates = {"k1": closed_gate("k1"), "k2": Gate("k2")}
    pool = pool_of(spec("k1"), spec("k2"), gates=gates)
    assert {pool.choose("m").name for _ in range(50)} == {"k2"}  # type: ignore[union-attr]


# --- cooldowns and probes ----------------------------------------------------------------------


def test_consecutive_failures_cool_then_one_probe_brings_it_back() -> None:
    clock = FakeClock()
    pool = pool_of(
        spec("primary", cooldown={"failures": 3, "seconds": 30}),
        spec("backup", priority=1),
        clock=clock,
    )
    primary = pool.members[0]
    with capture_logs() as logs:
        for _ in range(2):
            pool.report(primary, UpstreamError("502"), probe=False)
        assert pool.choose("m") is primary  # two in a row: not yet
        pool.report(primary, UpstreamTimeout("slow"), probe=False)
        assert pool.states()["primary"] == "cooling"
        assert pool.choose("m").name == "backup"  # type: ignore[union-attr]
        assert pool.cooling_wait("m", [pool.members[1]]) == pytest.approx(30)
        clock.now += 29.9
        assert pool.choose("m").name == "backup"  # type: ignore[union-attr]
        clock.now += 0.2
        probe = pool.choose("m")
        assert probe is primary and primary.probing
        # While the probe is out, every other job goes elsewhere: exactly one probe.
        assert {pool.choose("m").name for _ in range(20)} == {"backup"}  # type: ignore[union-attr]
        pool.report(primary, None, probe=True)
        assert pool.states()["primary"] == "open"
        assert pool.choose("m") is primary
    events = [(e["event"], e.get("upstream")) for e in logs if e["event"].startswith("upstream")]
    assert events == [
        ("upstream cooling down", "primary"),
        ("upstream probe", "primary"),
        ("upstream back", "primary"),
    ]


def test_a_failed_probe_cools_again_for_the_full_time() -> None:
    clock = FakeClock()
    pool = pool_of(spec("a", cooldown={"failures": 1, "seconds": 10}), spec("b"), clock=clock)
    a = pool.members[0]
    pool.report(a, UpstreamError("500"), probe=False)
    clock.now += 10
    assert pool.choose("m", [pool.members[1]]) is a
    pool.report(a, UpstreamError("500 again"), probe=True)
    assert pool.states()["a"] == "cooling"
    assert pool.cooling_wait("m", [pool.members[1]]) == pytest.approx(10)


def test_a_cancelled_probe_frees_the_probe_for_another_job() -> None:
    clock = FakeClock()
    pool = pool_of(spec("a", cooldown={"failures": 1, "seconds": 5}), spec("b"), clock=clock)
    a, b = pool.members
    pool.report(a, UpstreamError("500"), probe=False)
    clock.now += 5
    assert pool.choose("m", [b]) is a
    assert pool.choose("m", [b]) is None
    pool.report(a, None, probe=True, cancelled=True)
    assert pool.choose("m", [b]) is a


def test_answers_that_are_not_retryable_failures_reset_the_count() -> None:
    pool = pool_of(spec("a", cooldown={"failures": 2, "seconds": 5}), spec("b"))
    a = pool.members[0]
    for answer in (InvalidRequest("400"), AuthenticationFailed("401"), RateLimited("429"), None):
        pool.report(a, UpstreamError("500"), probe=False)
        pool.report(a, answer, probe=False)
        assert a.failures == 0 and pool.states()["a"] == "open"


def test_stragglers_of_a_cooled_upstream_do_not_extend_it() -> None:
    clock = FakeClock()
    pool = pool_of(spec("a", cooldown={"failures": 1, "seconds": 30}), spec("b"), clock=clock)
    a = pool.members[0]
    pool.report(a, UpstreamError("500"), probe=False)
    until = a.cooling_until
    clock.now += 20
    pool.report(a, UpstreamError("500 from a call begun earlier"), probe=False)
    assert a.cooling_until == until


def test_budget_refusals_are_the_gates_business_not_a_cooldown() -> None:
    pool = pool_of(spec("a", cooldown={"failures": 1, "seconds": 30}), spec("b"))
    a = pool.members[0]
    pool.report(a, QuotaExceeded("insufficient_quota"), probe=False)
    pool.report(a, RateLimited("429"), probe=False)
    assert pool.states()["a"] == "open" and a.failures == 0


def test_a_pool_of_one_never_cools() -> None:
    pool = pool_of(spec("default", cooldown={"failures": 1, "seconds": 60}))
    only = pool.members[0]
    for _ in range(5):
        pool.report(only, UpstreamError("503"), probe=False)
    assert pool.choose("m") is only


def test_every_upstream_cooling_returns_none_and_the_wait() -> None:
    clock = FakeClock()
    pool = pool_of(
        spec("a", cooldown={"failures": 1, "seconds": 10}),
        spec("b", cooldown={"failures": 1, "seconds": 40}),
        clock=clock,
    )
    for member in pool.members:
        pool.report(member, UpstreamError("500"), probe=False)
    assert pool.choose("m") is None
    assert pool.cooling_wait("m") == pytest.approx(10)


# --- clients built from specs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ("bearer", {"authorization": "Bearer sk-1"}),
        ("api-key", {"api-key": "sk-1"}),
        ("none", {}),
    ],
)
async def test_auth_style_query_and_fixed_headers(
    auth: str, expected: dict[str, str], pools: list[UpstreamPool]
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=COMPLETION)

    one = spec(
        "azure",
        base_url="https://example.openai.azure.com/openai/deployments/gpt-4o-mini",
        auth=auth,
        query={"api-version": "2024-10-21"},
        headers={"X-Team": "search"},
    ).model_copy(update={"api_key": SecretStr("sk-1")})
    pool = pool_of(one, handler=handler)
    pools.append(pool)
    await pool.members[0].client.complete(b"{}", {})
    (request,) = seen
    assert str(request.url) == (
        "https://example.openai.azure.com/openai/deployments/gpt-4o-mini/chat/completions"
        "?api-version=2024-10-21"
    )
    assert request.headers["x-team"] == "search"
    keys = {k: v for k, v in request.headers.items() if k in ("authorization", "api-key")}
    assert keys == expected


async def test_each_upstream_has_its_own_client(pools: list[UpstreamPool]) -> None:
    pool = UpstreamPool.from_specs([spec("a"), spec("b")])
    pools.append(pool)
    a, b = pool.members
    assert a.client is not b.client
    assert a.client._transport is not b.client._transport


@pytest.mark.parametrize(
    ("host", "provider"),
    [
        ("api.openai.com", "openai"),
        ("example.openai.azure.com", "azure.ai.openai"),
        ("api.anthropic.com", "anthropic"),
        ("bedrock-runtime.us-east-1.amazonaws.com", "aws.bedrock"),
        ("s3.amazonaws.com", "openai"),
        ("vllm.internal", "openai"),
        (None, "openai"),
    ],
)
def test_provider_from_host(host: str | None, provider: str) -> None:
    assert provider_for_host(host) == provider


async def test_check_upstreams_reports_each_without_the_key() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "bad.test":
            return httpx.Response(401, json={"error": {"message": "Incorrect API key sk-1***"}})
        if request.method == "GET":  # {base}/models: not served here
            return httpx.Response(404, json={"error": {"message": "no such route"}})
        body = orjson.loads(request.content)
        assert body["max_tokens"] == 1
        return httpx.Response(200, json=COMPLETION)

    specs = [
        spec("good", ["gpt-4o-mini"], model_map={"gpt-4o-mini": "deployment-1"}),
        spec("bad", ["gpt-4o"]).model_copy(update={"api_key": SecretStr("sk-1-secret")}),
        spec("any", ["*"]),
    ]
    rows = await check_upstreams(specs, transport=lambda _: httpx.MockTransport(handler), limit=5)
    by_name = {row.name: row for row in rows}
    assert by_name["good"].ok and by_name["good"].status == "200 ok"
    assert by_name["good"].model == "deployment-1"
    assert not by_name["bad"].ok and by_name["bad"].status == "401 authentication_error"
    assert not by_name["any"].ok and "--model" in by_name["any"].status
    assert "sk-1" not in repr(rows)


# Issue 27 item 5: `upstreams check` says why, and finds a model for a single URL.


async def test_item5_check_says_why_a_connection_failed() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    rows = await check_upstreams(
        [spec("down", ["m"])], transport=lambda _: httpx.MockTransport(refuse), limit=5
    )
    assert rows[0].status == "- upstream_error: connection refused"


def models_then_completion(
    listed: httpx.Response, sent: list[str]
) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            assert request.url.path == "/v1/models"
            assert request.headers["authorization"] == "Bearer sk-single"
            return listed
        sent.append(orjson.loads(request.content)["model"])
        return httpx.Response(200, json=COMPLETION)

    return handler


SINGLE = spec("default", ["*"]).model_copy(update={"api_key": SecretStr("sk-single")})


async def test_item5_check_asks_a_single_url_for_its_first_model() -> None:
    sent: list[str] = []
    listed = httpx.Response(200, json={"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]})
    handler = models_then_completion(listed, sent)
    rows = await check_upstreams(
        [SINGLE], transport=lambda _: httpx.MockTransport(handler), limit=5
    )
    assert (rows[0].model, rows[0].status, rows[0].ok) == ("m1", "200 ok", True)
    assert sent == ["m1"]
    # An allowed model among those listed is preferred.
    rows = await check_upstreams(
        [SINGLE],
        transport=lambda _: httpx.MockTransport(handler),
        limit=5,
        allowed_models={"m2", "zz"},
    )
    assert rows[0].model == "m2" and sent == ["m1", "m2"]


async def test_item5_check_falls_back_to_the_allowed_models() -> None:
    sent: list[str] = []
    handler = models_then_completion(httpx.Response(404, json={"error": {}}), sent)
    rows = await check_upstreams(
        [SINGLE],
        transport=lambda _: httpx.MockTransport(handler),
        limit=5,
        allowed_models={"gpt-4o-mini", "gpt-4o"},
    )
    assert (rows[0].model, rows[0].ok) == ("gpt-4o", True)
    assert sent == ["gpt-4o"]


async def test_item5_check_says_exactly_what_to_pass_when_nothing_names_a_model() -> None:
    sent: list[str] = []
    handler = models_then_completion(httpx.Response(404, json={"error": {}}), sent)
    rows = await check_upstreams(
        [SINGLE], transport=lambda _: httpx.MockTransport(handler), limit=5
    )
    assert rows[0].status == (
        "serves any model and http://default.test/v1/models answered status 404: pass --model MODEL"
    )
    assert not rows[0].ok and sent == []


# Issue 27 item 5: "every upstream is cooling down" names the last cause.


def test_item5_the_pool_keeps_each_upstreams_last_cause() -> None:
    pool = pool_of(spec("a", cooldown={"failures": 1, "seconds": 30}), spec("b"))
    a = pool.members[0]
    pool.report(a, UpstreamError("x", cause="connection refused by a.test:80"), probe=False)
    assert a.cause == "connection refused by a.test:80"
    assert pool.cooling_cause("m") == "a: connection refused by a.test:80"


async def test_item5_every_upstream_cooling_names_the_last_cause(
    pools: list[UpstreamPool],
) -> None:
    clock = FakeClock()
    pool = pool_of(
        spec("a", cooldown={"failures": 1, "seconds": 60}),
        spec("b", cooldown={"failures": 1, "seconds": 90}),
        clock=clock,
    )
    pools.append(pool)
    a, b = pool.members
    pool.report(a, UpstreamError("x", cause="DNS: cannot resolve a.test"), probe=False)
    pool.report(b, UpstreamError("x", cause="connection refused by b.test:80"), probe=False)
    outcome = await runner_over(pool).run(make_job("gpt-4o"), no_deltas)
    assert isinstance(outcome, Deferral)
    assert outcome.error.message == (
        "every upstream of model 'gpt-4o' is cooling down "
        "(last failure: b: connection refused by b.test:80)"
    )


# --- the runner over a pool (fallback, model_map, metadata.upstream) -------------------------


def make_job(model: str = "gpt-4o-mini", prior_attempts: int = 0) -> Job:
    envelope = Envelope(
        job_id="job-1",
        correlation_id="job-1",
        reply_to=None,
        reply_to_forbidden=False,
        deadline=None,
        bad_deadline=None,
        prior_attempts=prior_attempts,
        redeliveries=0,
        headers={},
    )
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
    return Job(envelope, None, model, False, body)


async def no_deltas(*_: Any) -> None:
    raise AssertionError("no deltas for a plain call")


class Scripted:
    """Per upstream host, a list of statuses to answer (the last repeated)."""

    def __init__(self, **statuses: list[int]) -> None:
        self.statuses = statuses
        self.calls: list[tuple[str, str]] = []  # (host, model sent)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host.removesuffix(".test")
        self.calls.append((host, orjson.loads(request.content)["model"]))
        script = self.statuses[host]
        status = script.pop(0) if len(script) > 1 else script[0]
        if status == 200:
            return httpx.Response(200, json=COMPLETION)
        return httpx.Response(status, json={"error": {"message": f"status {status}"}})


def runner_over(pool: UpstreamPool, **settings: Any) -> JobRunner:
    config = Settings(_env_file=None, **{"max_attempts": 5, **settings})  # type: ignore[call-arg]
    telemetry = Telemetry(registry=prometheus_client.CollectorRegistry())
    return JobRunner(config, pool, telemetry)


async def test_fallback_on_5xx_goes_to_the_next_candidate_at_once(
    pools: list[UpstreamPool],
) -> None:
    script = Scripted(primary=[502], backup=[200])
    pool = pool_of(spec("primary"), spec("backup", priority=1), handler=script)
    pools.append(pool)
    outcome = await runner_over(pool).run(make_job(), no_deltas)
    assert isinstance(outcome, JobOutcome) and outcome.ok
    assert outcome.upstream == "backup" and outcome.attempts == 2
    assert [host for host, _ in script.calls] == ["primary", "backup"]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_no_fallback_on_a_permanent_error(status: int, pools: list[UpstreamPool]) -> None:
    script = Scripted(primary=[status], backup=[200])
    pool = pool_of(spec("primary"), spec("backup", priority=1), handler=script)
    pools.append(pool)
    outcome = await runner_over(pool).run(make_job(), no_deltas)
    assert isinstance(outcome, JobOutcome) and not outcome.ok
    assert outcome.upstream == "primary" and outcome.attempts == 1
    assert [host for host, _ in script.calls] == ["primary"]


async def test_model_map_renames_only_what_goes_upstream(pools: list[UpstreamPool]) -> None:
    script = Scripted(azure=[200])
    pool = pool_of(
        spec("azure", ["gpt-4o-mini"], model_map={"fast": "gpt-4o-mini"}), handler=script
    )
    pools.append(pool)
    job = make_job("fast")
    outcome = await runner_over(pool).run(job, no_deltas)
    assert isinstance(outcome, JobOutcome) and outcome.ok
    assert script.calls == [("azure", "gpt-4o-mini")]
    assert job.body["model"] == "fast"  # the job (and its result's metadata.model) keeps it


async def test_a_model_no_upstream_serves_fails_at_once(pools: list[UpstreamPool]) -> None:
    script = Scripted(a=[200])
    pool = pool_of(spec("a", ["gpt-4o"]), handler=script)
    pools.append(pool)
    outcome = await runner_over(pool).run(make_job("o3"), no_deltas)
    assert isinstance(outcome, JobOutcome)
    assert outcome.error is not None and outcome.error.code.value == "model_not_allowed"
    assert outcome.attempts == 0 and script.calls == []


async def test_all_candidates_failing_backs_off_then_round_again(
    pools: list[UpstreamPool],
) -> None:
    script = Scripted(a=[500, 200], b=[500])
    pool = pool_of(spec("a"), spec("b", priority=1), handler=script)
    pools.append(pool)
    outcome = await runner_over(pool).run(make_job(), no_deltas)
    assert isinstance(outcome, JobOutcome) and outcome.ok and outcome.upstream == "a"
    assert [host for host, _ in script.calls] == ["a", "b", "a"]


async def test_every_upstream_cooling_defers_the_job(pools: list[UpstreamPool]) -> None:
    clock = FakeClock()
    script = Scripted(a=[200], b=[200])
    pool = pool_of(
        spec("a", cooldown={"failures": 1, "seconds": 60}),
        spec("b", cooldown={"failures": 1, "seconds": 90}),
        clock=clock,
        handler=script,
    )
    pools.append(pool)
    for member in pool.members:
        pool.report(member, UpstreamError("500"), probe=False)
    outcome = await runner_over(pool).run(make_job(), no_deltas)
    assert isinstance(outcome, Deferral) and outcome.wait == pytest.approx(60)
    assert outcome.attempts == 1 and script.calls == []


def test_members_are_told_apart_by_identity() -> None:
    pool = pool_of(spec("a"), spec("b"))
    a, b = pool.members
    assert isinstance(a, Member) and a != b and a in [a] and b not in [a]


async def test_spans_carry_the_upstream_its_host_and_provider(pools: list[UpstreamPool]) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host.endswith("azure.com"):
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(200, json=COMPLETION)

    azure = spec(
        "azure",
        ["gpt-4o-mini"],
        base_url="https://contoso.openai.azure.com/openai/deployments/mini",
        model_map={"gpt-4o-mini": "mini-2024"},
    )
    openai = spec("openai", base_url="https://api.openai.com/v1", priority=1)
    pool = pool_of(azure, openai, handler=handler)
    pools.append(pool)
    exported = InMemorySpanExporter()
    telemetry = Telemetry(
        span_processor=SimpleSpanProcessor(exported),
        registry=prometheus_client.CollectorRegistry(),
    )
    config = Settings(_env_file=None)  # type: ignore[call-arg]
    outcome = await JobRunner(config, pool, telemetry).run(make_job(), no_deltas)
    assert isinstance(outcome, JobOutcome) and outcome.upstream == "openai"
    spans = [dict(span.attributes or {}) for span in exported.get_finished_spans()]
    assert [
        (
            a["chat_worker.upstream"],
            a["server.address"],
            a["gen_ai.provider.name"],
            a["gen_ai.request.model"],
            a.get("error.type"),
        )
        for a in spans
    ] == [
        ("azure", "contoso.openai.azure.com", "azure.ai.openai", "mini-2024", "upstream_error"),
        ("openai", "api.openai.com", "openai", "gpt-4o-mini", None),
    ]
    telemetry.shutdown()


async def test_a_429_is_no_attempt_and_the_job_goes_where_there_is_budget(
    pools: list[UpstreamPool],
) -> None:
    script = Scripted(primary=[429, 200], backup=[200])
    pool = pool_of(spec("primary"), spec("backup", priority=1), handler=script)
    pools.append(pool)
    runner = runner_over(pool)
    outcome = await runner.run(make_job(), no_deltas)
    assert isinstance(outcome, JobOutcome) and outcome.ok
    assert outcome.upstream == "backup" and outcome.attempts == 1
    assert [host for host, _ in script.calls] == ["primary", "backup"]
    # The primary's gate is closed by its 429: the next job does not knock on it.
    assert pool.members[0].gate is not None and pool.members[0].gate.state == "closed"
    again = await runner.run(make_job(), no_deltas)
    assert isinstance(again, JobOutcome) and again.upstream == "backup"
    await runner.aclose()


async def test_a_closed_gate_is_not_called_while_another_upstream_has_budget(
    pools: list[UpstreamPool],
) -> None:
    script = Scripted(primary=[200], backup=[200])
    pool = pool_of(
        spec("primary"),
        spec("backup", priority=1),
        handler=script,
        gates={"primary": closed_gate("primary")},
    )
    pools.append(pool)
    outcome = await runner_over(pool).run(make_job(), no_deltas)
    assert isinstance(outcome, JobOutcome) and outcome.upstream == "backup"
    assert [host for host, _ in script.calls] == ["backup"]


async def test_every_gate_closed_defers_the_job_for_budget(pools: list[UpstreamPool]) -> None:
    script = Scripted(primary=[200], backup=[200])
    pool = pool_of(
        spec("primary"),
        spec("backup", priority=1),
        handler=script,
        gates={"primary": closed_gate("primary", 120), "backup": closed_gate("backup", 90)},
    )
    pools.append(pool)
    outcome = await runner_over(pool).run(make_job(), no_deltas)
    assert isinstance(outcome, Deferral) and outcome.error.code.value == "rate_limited"
    assert outcome.attempts == 0 and script.calls == []


def test_the_route_cache_is_bounded_when_any_name_is_served() -> None:
    from worker.upstream.pool import MAX_ROUTES

    pool = pool_of(spec("gateway", ["*"]))
    for index in range(MAX_ROUTES + 10):
        assert pool.choose(f"model-{index}") is pool.members[0]
    assert len(pool._routes) <= MAX_ROUTES


# --- endpoints (contract §18) --------------------------------------------------------------

EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}],
    "model": "e5",
    "usage": {"prompt_tokens": 2, "total_tokens": 2},
}


PING = [{"role": "user", "content": "ping"}]


def embeddings_job(model: str = "e5") -> Job:
    job = make_job(model)
    job.body = {"model": model, "input": "a cat"}
    job.endpoint = "embeddings"
    return job


def by_path(request: httpx.Request) -> httpx.Response:
    """Each endpoint's answer, by the path called."""
    if request.url.path.endswith("/embeddings"):
        return httpx.Response(200, json=EMBEDDINGS)
    return httpx.Response(200, json=COMPLETION)


def test_a_job_goes_only_to_upstreams_serving_its_endpoint() -> None:
    pool = pool_of(
        spec("talk", endpoints=["chat"]),
        spec("vectors", endpoints=["embeddings"]),
        spec("both", priority=1),
    )
    assert pool.choose("m").name == "talk"  # type: ignore[union-attr]
    assert pool.choose("m", endpoint="embeddings").name == "vectors"  # type: ignore[union-attr]
    chat = [[m.name for m in tier] for tier in pool.route("m").tiers]
    embeddings = [[m.name for m in tier] for tier in pool.route("m", "embeddings").tiers]
    assert (chat, embeddings) == ([["talk"], ["both"]], [["vectors"], ["both"]])
    vectors = pool.members[1]
    assert pool.choose("m", [vectors], endpoint="embeddings").name == "both"  # type: ignore[union-attr]


def test_a_model_no_upstream_serves_at_the_endpoint_is_not_allowed() -> None:
    pool = pool_of(spec("talk", ["e5"], endpoints=["chat"]), spec("vectors", ["ada"]))
    assert pool.choose("e5") is not None
    with pytest.raises(ModelNotAllowed, match="no upstream serves model 'e5' for embeddings"):
        pool.choose("e5", endpoint="embeddings")


async def test_an_embeddings_job_calls_only_an_embeddings_upstream(
    pools: list[UpstreamPool],
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "broken.test":
            return httpx.Response(500, json={"error": {"message": "down"}})
        return by_path(request)

    vectors = spec(
        "vectors",
        base_url="https://vectors.test/openai/deployments/e5",
        query={"api-version": "2024-10-21"},
        endpoints=["embeddings"],
        priority=1,
    )
    pool = pool_of(
        spec("talk", endpoints=["chat"]),
        spec("broken", endpoints=["embeddings"]),
        vectors,
        handler=handler,
    )
    pools.append(pool)
    exported = InMemorySpanExporter()
    telemetry = Telemetry(
        span_processor=SimpleSpanProcessor(exported),
        registry=prometheus_client.CollectorRegistry(),
    )
    config = Settings(_env_file=None)  # type: ignore[call-arg]
    outcome = await JobRunner(config, pool, telemetry).run(embeddings_job(), no_deltas)
    assert isinstance(outcome, JobOutcome) and outcome.ok, outcome.error
    assert outcome.upstream == "vectors" and outcome.attempts == 2  # broken, then vectors
    assert outcome.body == EMBEDDINGS and outcome.usage == EMBEDDINGS["usage"]
    assert [str(r.url) for r in seen] == [
        "http://broken.test/v1/embeddings",
        "https://vectors.test/openai/deployments/e5/embeddings?api-version=2024-10-21",
    ]
    spans = exported.get_finished_spans()
    assert [span.name for span in spans] == ["embeddings e5", "embeddings e5"]
    attributes = dict(spans[-1].attributes or {})
    assert attributes["gen_ai.operation.name"] == "embeddings"
    assert attributes["gen_ai.usage.input_tokens"] == 2
    assert "gen_ai.response.finish_reasons" not in attributes
    telemetry.shutdown()


async def test_an_embeddings_model_no_upstream_serves_fails_at_once(
    pools: list[UpstreamPool],
) -> None:
    script = Scripted(talk=[200])
    pool = pool_of(spec("talk", endpoints=["chat"]), handler=script)
    pools.append(pool)
    outcome = await runner_over(pool).run(embeddings_job(), no_deltas)
    assert isinstance(outcome, JobOutcome) and outcome.error is not None
    assert outcome.error.code.value == "model_not_allowed" and "for embeddings" in str(
        outcome.error.message
    )
    assert outcome.attempts == 0 and script.calls == []


async def test_check_upstreams_asks_an_embeddings_only_upstream_for_an_embedding() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, orjson.loads(request.content)))
        return by_path(request)

    specs = [spec("talk", ["gpt-4o-mini"]), spec("vectors", ["e5"], endpoints=["embeddings"])]
    rows = await check_upstreams(specs, transport=lambda _: httpx.MockTransport(handler), limit=5)
    assert [(row.name, row.status) for row in rows] == [("talk", "200 ok"), ("vectors", "200 ok")]
    assert sorted(seen, key=lambda call: call[0]) == [
        ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": PING, "max_tokens": 1}),
        ("/v1/embeddings", {"model": "e5", "input": "ping"}),
    ]


@pytest.mark.parametrize("how", ["cancelled", "store error"])
async def test_a_probe_cut_short_at_its_gate_frees_the_upstream(
    how: str, pools: list[UpstreamPool]
) -> None:
    """Issue 22 item 8: the job probing an upstream after its cooldown is cut short while it
    waits at the gate (a drain, a lost Redis): the upstream is not left "being probed" for
    the life of the process; the next job probes it."""
    clock = FakeClock()
    script = Scripted(primary=[200], backup=[200])
    quota = LocalQuota(ConfiguredLimits(max_concurrency=1))
    pool = pool_of(
        spec("primary", cooldown={"failures": 1, "seconds": 30}),
        spec("backup", priority=1),
        clock=clock,
        handler=script,
        gates={"primary": Gate("primary", quota)},
    )
    pools.append(pool)
    primary = pool.members[0]
    pool.report(primary, UpstreamError("500"), probe=False)
    clock.now += 31
    runner = runner_over(pool)
    if how == "cancelled":
        held = await quota.acquire_slot(0)  # the probe waits for this slot
        assert held is not None
        job = asyncio.ensure_future(runner.run(make_job(), no_deltas))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not job.done() and primary.probing
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        await quota.release_slot(held)
    else:

        async def broken(within: float) -> str | None:
            raise ConnectionError("Redis went away")

        real = quota.acquire_slot
        quota.acquire_slot = broken  # type: ignore[method-assign]
        with pytest.raises(ConnectionError):
            await runner.run(make_job(), no_deltas)
        quota.acquire_slot = real  # type: ignore[method-assign]
    assert not primary.probing
    assert script.calls == []
    outcome = await runner.run(make_job(), no_deltas)
    assert isinstance(outcome, JobOutcome) and outcome.upstream == "primary"
    assert pool.states()["primary"] == "open"
