"""The store's circuit breaker: bounded calls, Skipped instead of errors, back-off, probes."""

from __future__ import annotations

import asyncio

import pytest

from worker.store import Circuit, CircuitState, Skipped, StoreMetrics

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, changes: list[tuple[str, str]], **options: float) -> Circuit:
    def record(old: CircuitState, new: CircuitState, reason: str) -> None:
        changes.append((old.value, new.value))

    return Circuit(
        timeout=options.get("timeout", 0.05), errors=(ConnectionError,), on_change=record,
        clock=clock,
    )  # fmt: skip


async def ok() -> str:
    return "ok"


async def down() -> str:
    raise ConnectionError("refused")


async def test_a_call_that_answers_passes_its_value() -> None:
    circuit = breaker(Clock(), [])
    assert await circuit.call("get", ok) == "ok"
    assert circuit.state is CircuitState.CLOSED


async def test_an_error_is_skipped_and_opens_the_circuit_once() -> None:
    clock, changes = Clock(), list[tuple[str, str]]()
    circuit = breaker(clock, changes)
    outcome = await circuit.call("get", down)
    assert isinstance(outcome, Skipped)
    assert outcome.op == "get"
    assert "ConnectionError" in outcome.reason
    assert circuit.state is CircuitState.OPEN
    # While open, calls are skipped without being made.
    calls = 0

    async def counted() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    for _ in range(5):
        assert isinstance(await circuit.call("get", counted), Skipped)
    assert calls == 0
    assert changes == [("closed", "open")]


async def test_a_slow_call_is_skipped_within_the_timeout() -> None:
    circuit = breaker(Clock(), [], timeout=0.02)

    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    loop = asyncio.get_running_loop()
    started = loop.time()
    outcome = await circuit.call("get", slow)
    assert isinstance(outcome, Skipped)
    assert loop.time() - started < 0.5
    assert circuit.state is CircuitState.OPEN


async def test_backoff_doubles_to_thirty_seconds_and_a_probe_closes_it() -> None:
    clock, changes = Clock(), list[tuple[str, str]]()
    circuit = breaker(clock, changes)
    await circuit.call("get", down)
    waits = []
    for _ in range(7):
        waits.append(circuit.backoff)
        clock.now += circuit.backoff / 2 - 0.01
        assert isinstance(await circuit.call("get", ok), Skipped)  # still open: no probe
        clock.now += 30
        assert isinstance(await circuit.call("get", down), Skipped)  # the probe fails
        assert circuit.state is CircuitState.OPEN
    assert waits == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert changes == [("closed", "open")]  # failed probes are not news
    clock.now += 30
    assert await circuit.call("get", ok) == "ok"
    assert circuit.state is CircuitState.CLOSED
    assert circuit.backoff == 1.0
    assert changes == [("closed", "open"), ("half_open", "closed")]


async def test_one_probe_at_a_time() -> None:
    clock = Clock()
    circuit = breaker(clock, [], timeout=1.0)
    await circuit.call("get", down)
    clock.now += 1
    gate = asyncio.Event()

    async def held() -> str:
        await gate.wait()
        return "ok"

    probe = asyncio.create_task(circuit.call("get", held))
    await asyncio.sleep(0)
    assert circuit.state is CircuitState.HALF_OPEN
    assert isinstance(await circuit.call("get", ok), Skipped)
    gate.set()
    assert await probe == "ok"
    assert circuit.state is CircuitState.CLOSED


async def test_failures_in_flight_when_it_opened_do_not_extend_the_backoff() -> None:
    circuit = breaker(Clock(), [], timeout=1.0)
    gate = asyncio.Event()

    async def fails_later() -> str:
        await gate.wait()
        raise ConnectionError("refused")

    calls = [asyncio.create_task(circuit.call("get", fails_later)) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    assert all(isinstance(outcome, Skipped) for outcome in await asyncio.gather(*calls))
    assert circuit.backoff == 2.0  # opened once, for one second


async def test_other_errors_are_the_callers() -> None:
    circuit = breaker(Clock(), [])

    async def bug() -> str:
        raise KeyError("a bug, not an outage")

    with pytest.raises(KeyError):
        await circuit.call("get", bug)
    assert circuit.state is CircuitState.CLOSED


def test_metrics_follow_the_circuit_as_a_gauge() -> None:
    metrics = StoreMetrics()
    metrics.circuit_changed(CircuitState.CLOSED, CircuitState.OPEN, "down")
    assert metrics.snapshot()["circuit"] == 2
    metrics.circuit_changed(CircuitState.OPEN, CircuitState.CLOSED, "up")
    assert (metrics.circuit, metrics.circuit_changes) == (0, 2)
