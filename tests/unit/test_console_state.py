"""Folding heartbeats into the fleet: silent workers, restarts, rates that never go negative."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from worker.console.app import ConsoleApp
from worker.console.state import BUCKET_SECONDS, SILENT_AFTER, Fleet
from worker.settings import Settings

T0 = 1_800_000_000.0  # a bucket boundary (a multiple of BUCKET_SECONDS)


def beat(
    worker: str,
    *,
    ok: int = 0,
    error: int = 0,
    errors: dict[str, int] | None = None,
    tokens: dict[str, dict[str, float]] | None = None,
    started: str = "2026-01-01T00:00:00+00:00",
    in_flight: int = 0,
    upstreams: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "type": "heartbeat",
        "worker": worker,
        "started_at": started,
        "ready": True,
        "in_flight": in_flight,
        "lanes": {"chat.requests": {"weight": 1, "in_flight": in_flight}},
        "jobs": {"ok": ok, "error": error},
        "errors": errors or {},
        "tokens": tokens or {},
        "upstreams": upstreams or {},
    }


def recent_jobs(fleet: Fleet, now: float) -> list[float]:
    series = fleet.series(now)
    return [a + b for a, b in zip(series["jobs_ok"], series["jobs_error"], strict=True)]


def test_rates_come_from_counter_differences() -> None:
    fleet = Fleet()
    fleet.observe(beat("h/1", ok=100), T0)  # history before the console saw it: no rate
    fleet.observe(beat("h/1", ok=120, tokens={"m": {"input": 50, "output": 30}}), T0 + 2)
    fleet.observe(beat("h/1", ok=150, tokens={"m": {"input": 80, "output": 50}}), T0 + 4)
    now = T0 + BUCKET_SECONDS  # the bucket of T0 is complete
    series = fleet.series(now)
    assert series["jobs_ok"][-1] == pytest.approx((150 - 100) / BUCKET_SECONDS, abs=1e-3)
    assert series["tokens"]["m"][-1] == pytest.approx(130 / BUCKET_SECONDS, abs=1e-3)
    assert fleet.totals(now)["jobs_per_s"] == round(50 / 60, 3)
    assert fleet.totals(T0 + 1)["jobs_per_s"] == 0, "a bucket in progress is not counted yet"


def test_a_worker_that_stops_is_greyed_then_forgotten() -> None:
    fleet = Fleet()
    fleet.observe(beat("h/1", in_flight=3), T0)
    fleet.observe(beat("h/2", in_flight=2), T0)
    fleet.observe(beat("h/2", in_flight=4), T0 + SILENT_AFTER)
    snapshot = fleet.snapshot(T0 + SILENT_AFTER + 0.5)
    alive = {w["worker"]: w["alive"] for w in snapshot["workers"]}
    assert alive == {"h/1": False, "h/2": True}
    assert snapshot["alive"] == 1
    assert snapshot["in_flight"] == 4, "a silent worker's last in-flight count is not live"
    later = fleet.snapshot(T0 + SILENT_AFTER + 601)
    assert [w["worker"] for w in later["workers"]] == []


def test_a_restarted_worker_counts_from_zero_without_negative_rates() -> None:
    fleet = Fleet()
    fleet.observe(beat("h/1", ok=500, error=20, errors={"timeout": 20}), T0)
    fleet.observe(beat("h/1", ok=510, error=20, errors={"timeout": 20}), T0 + 2)
    # Same identity (a container restarted with pid 1), new process: counters from zero.
    fleet.observe(beat("h/1", ok=3, started="2026-01-01T01:00:00+00:00"), T0 + 4)
    fleet.observe(beat("h/1", ok=7, started="2026-01-01T01:00:00+00:00"), T0 + 5)
    series = fleet.series(T0 + BUCKET_SECONDS)
    assert all(v >= 0 for values in (series["jobs_ok"], series["jobs_error"]) for v in values)
    assert series["jobs_ok"][-1] == pytest.approx((10 + 3 + 4) / BUCKET_SECONDS, abs=1e-3)
    snapshot = fleet.snapshot(T0 + 7)
    assert snapshot["workers"][0]["restarts"] == 1
    assert snapshot["jobs"] == {"ok": 7, "error": 0}, "totals are the live processes' counters"


def test_counters_going_back_count_as_a_restart_even_with_the_same_start_time() -> None:
    fleet = Fleet()
    fleet.observe(beat("h/1", ok=40, tokens={"m": {"input": 400, "output": 100}}), T0)
    fleet.observe(beat("h/1", ok=2, tokens={"m": {"input": 20, "output": 5}}), T0 + 2)
    series = fleet.series(T0 + BUCKET_SECONDS)
    assert series["jobs_ok"][-1] == pytest.approx(2 / BUCKET_SECONDS, abs=1e-3)
    assert series["tokens"]["m"][-1] == pytest.approx(25 / BUCKET_SECONDS, abs=1e-3)
    assert min(series["tokens"]["m"]) >= 0


def test_error_rates_by_code_and_ratio() -> None:
    fleet = Fleet()
    fleet.observe(beat("h/1"), T0)
    fleet.observe(beat("h/1", ok=6, error=4, errors={"timeout": 3, "invalid_request": 1}), T0 + 5)
    totals = fleet.totals(T0 + BUCKET_SECONDS)
    assert totals["error_ratio"] == 0.4
    assert totals["errors_per_min"] == {"invalid_request": 1.0, "timeout": 3.0}


def test_upstream_gates_show_the_most_cautious_view_of_live_workers() -> None:
    fleet = Fleet()
    fleet.observe(
        beat("h/1", upstreams={"openai": {"state": "open", "remaining_requests": 900}}), T0
    )
    fleet.observe(
        beat(
            "h/2",
            upstreams={"openai": {"state": "cooling", "remaining_requests": 10, "cooldown_s": 4}},
        ),
        T0,
    )
    gate = fleet.snapshot(T0 + 1)["upstreams"]["openai"]
    assert gate == {"workers": 2, "state": "cooling", "remaining_requests": 10, "cooldown_s": 4}


def test_malformed_heartbeats_are_dropped_and_counted() -> None:
    fleet = Fleet()
    assert not fleet.observe({"type": "heartbeat"}, T0)
    assert not fleet.observe({"worker": "h/1", "jobs": "many", "tokens": [1], "in_flight": -3}, T0)
    snapshot = fleet.snapshot(T0)
    assert snapshot["workers"] == []
    assert snapshot["heartbeats_dropped"] == 2


# Issue 22 item 14: one foreign heartbeat must not break /api/state or the page's tables.
FOREIGN = [
    pytest.param({"in_flight": 1e20}, id="in-flight-1e20"),
    pytest.param({"in_flight": 10**20}, id="in-flight-huge-int"),
    pytest.param({"lanes": {"q": None}}, id="lane-null"),
    pytest.param({"lanes": {"q": {"weight": 1, "in_flight": "3"}}}, id="lane-count-text"),
    pytest.param({"jobs": {"ok": 2**70, "error": 0}}, id="jobs-huge"),
    pytest.param({"errors": {"timeout": -1}}, id="errors-negative"),
    pytest.param({"tokens": {"m": None}}, id="tokens-null"),
    pytest.param({"tokens": {"m" * 10_000: {"input": 1, "output": 1}}}, id="model-name-huge"),
    pytest.param({"tenants": {"t": {"jobs": 1, "cost": float("inf")}}}, id="tenant-cost-inf"),
    pytest.param({"upstreams": {"u": {"state": "open", "remaining_tokens": 1e300}}}, id="budget"),
    pytest.param({"upstreams": {"u": {"state": "open", "cooldown_s": "soon"}}}, id="cooldown"),
    pytest.param({"concurrency": True}, id="concurrency-bool"),
    pytest.param({"started_at": "yesterday"}, id="started-at-text"),
    pytest.param({"worker": "w" * 10_000}, id="worker-name-huge"),
]


@pytest.mark.parametrize("foreign", FOREIGN)
def test_item14_a_foreign_heartbeat_is_dropped_and_the_state_still_renders(
    foreign: dict[str, Any],
) -> None:
    fleet = Fleet()
    fleet.observe(beat("h/1", ok=1), T0)
    taken = fleet.observe({**beat("h/1", ok=2), **foreign}, T0 + 2)
    assert not taken
    snapshot = fleet.snapshot(T0 + 3)
    assert snapshot["heartbeats_dropped"] == 1 and snapshot["last_drop"]
    orjson.dumps(snapshot)  # what /api/state answers: no integer past 64 bits, no NaN
    (worker,) = snapshot["workers"]
    assert worker["jobs"] == {"ok": 1, "error": 0}, "the last good heartbeat stands"
    assert all(isinstance(lane, dict) for lane in worker["lanes"].values())


def test_item14_the_console_state_answers_after_a_foreign_heartbeat() -> None:
    console = ConsoleApp(Settings(_env_file=None))  # type: ignore[call-arg]
    console.fleet.observe({**beat("h/1"), "in_flight": 1e20}, time.time())
    console.fleet.observe({**beat("h/2"), "lanes": {"q": None}}, time.time())
    console.fleet.observe(beat("h/3", in_flight=2), time.time())
    state = orjson.loads(orjson.dumps(console.state()))
    assert [w["worker"] for w in state["workers"]] == ["h/3"]
    assert state["heartbeats_dropped"] == 2


def test_a_heartbeat_of_a_newer_worker_keeps_what_the_console_knows() -> None:
    fleet = Fleet()
    newer = beat("h/1", ok=3, upstreams={"u": {"state": "open", "remaining_requests": 5}})
    newer["tenants"] = {"t": {"jobs": 3, "input": 1, "output": 1, "cost": 0.25}}
    newer["something_new"] = {"x": [1, 2]}
    assert fleet.observe(newer, T0)
    (worker,) = fleet.snapshot(T0)["workers"]
    assert worker["tenants"] == {"t": {"jobs": 3, "input": 1, "output": 1, "cost": 0.25}}
    assert worker["upstreams"] == {"u": {"state": "open", "remaining_requests": 5}}


def test_a_worker_seen_from_its_start_counts_its_first_jobs() -> None:
    fleet = Fleet()
    fresh = beat("h/1", ok=5, started="2026-01-01T00:00:00+00:00")
    fresh["sent_at"] = "2026-01-01T00:00:02+00:00"
    fleet.observe(fresh, T0)
    midlife = beat("h/2", ok=500, started="2026-01-01T00:00:00+00:00")
    midlife["sent_at"] = "2026-01-01T05:00:00+00:00"
    fleet.observe(midlife, T0)
    assert fleet.series(T0 + BUCKET_SECONDS)["jobs_ok"][-1] == pytest.approx(
        5 / BUCKET_SECONDS, abs=1e-3
    )


def test_spend_by_tenant_and_model_sums_the_workers() -> None:
    fleet = Fleet()
    one = beat("h/1", tokens={"m": {"input": 5, "output": 1, "cost_usd": 0.5}})
    one["tenants"] = {"a": {"jobs": 2, "input": 5, "output": 1, "cost_usd": 0.5}}
    two = beat(
        "h/2",
        tokens={
            "m": {"input": 1, "output": 1, "cost_usd": 0.25},
            "n": {"input": 9, "output": 9, "cost_usd": 1.0},
        },
    )
    two["tenants"] = {
        "a": {"jobs": 1, "input": 1, "output": 1, "cost_usd": 0.25},
        "b": {"jobs": 1, "input": 9, "output": 9, "cost_usd": 1.0},
        "free": {"jobs": 1, "input": 0, "output": 0},
    }
    assert fleet.observe(one, T0) and fleet.observe(two, T0)
    spend = fleet.snapshot(T0 + 1)["spend"]
    assert spend == {
        "total_usd": 1.75,
        "tenants": {"b": 1.0, "a": 0.75},
        "models": {"n": 1.0, "m": 0.75},
    }
    # A cost that is not a finite number never reaches the fold: the heartbeat is dropped.
    assert not fleet.observe({**beat("h/3"), "tokens": {"m": {"cost_usd": -1}}}, T0)
    assert not fleet.observe({**beat("h/3"), "tenants": {"a": {"cost_usd": "1"}}}, T0)


def test_the_fleets_cache_hit_rate_since_start_and_recently() -> None:
    fleet = Fleet()
    assert fleet.snapshot(T0)["cache"]["workers"] == 0, "no store anywhere: no rate"
    assert fleet.snapshot(T0)["cache"]["hit_rate"] is None
    cache = {"hit": 30, "miss": 10, "stored": 1, "skipped": 0}
    fleet.observe({**beat("h/1"), "cache": cache}, T0)
    fleet.observe({**beat("h/2"), "cache": {**cache, "hit": 10, "miss": 10}}, T0)
    fleet.observe(beat("h/3"), T0)  # a worker without a store
    fleet.observe({**beat("h/1"), "cache": {**cache, "hit": 36, "miss": 12}}, T0 + 2)
    state = fleet.snapshot(T0 + BUCKET_SECONDS)["cache"]
    assert (state["hit"], state["miss"], state["stored"], state["workers"]) == (46, 22, 2, 2)
    assert state["hit_rate"] == round(46 / 68, 4)
    assert state["recent_hit_rate"] == 0.75, "6 hits, 2 misses since the console listened"
    assert not fleet.observe({**beat("h/1"), "cache": {"hit": -1}}, T0 + 4)
