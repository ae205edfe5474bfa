"""Folding the gateways' status reports into the batches panel (contract §15, operator page)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker.console.batches import GATEWAY_FORGET_AFTER, GatewayBatches

T0 = 1_800_000_000.0


def batch(batch_id: str, **fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": batch_id,
        "tenant": "team-a",
        "status": "in_progress",
        "total": 10,
        "completed": 0,
        "failed": 0,
        "created_at": int(T0) - 60,
        "cost": None,
    }
    return {**values, **fields}


def report(gateway: str, *batches: dict[str, Any]) -> dict[str, Any]:
    return {"type": "gateway", "gateway": gateway, "sent_at": "2027-01-15T08:00:00+00:00",
            "batches": list(batches)}  # fmt: skip


def test_batches_are_merged_across_replicas_by_id_newest_first() -> None:
    folded = GatewayBatches()
    older = batch("batch_old", created_at=int(T0) - 3600, status="completed", completed=10)
    assert folded.observe(report("g/1", batch("batch_a", completed=2), older), T0)
    # A replica on the same database reports the same batch, further on, a moment later.
    assert folded.observe(report("g/2", batch("batch_a", completed=5, failed=1, cost=0.5)), T0 + 1)
    state = folded.snapshot(T0 + 2)
    assert [b["id"] for b in state["batches"]] == ["batch_a", "batch_old"]
    first = state["batches"][0]
    assert (first["completed"], first["failed"], first["total"]) == (5, 1, 10)
    assert first["progress"] == 0.6 and first["cost"] == 0.5 and first["tenant"] == "team-a"
    assert first["age_s"] == 62.0
    assert state["batches"][1]["progress"] == 1.0
    assert [g["gateway"] for g in state["gateways"]] == ["g/1", "g/2"]
    assert folded.known("batch_a", T0 + 2) is not None
    assert folded.known("batch_zzz", T0 + 2) is None
    orjson.dumps(state)


def test_a_silent_gateways_batches_go_with_it() -> None:
    folded = GatewayBatches()
    folded.observe(report("g/1", batch("batch_a")), T0)
    assert folded.snapshot(T0 + 15)["gateways"][0]["alive"] is False
    assert folded.snapshot(T0 + GATEWAY_FORGET_AFTER + 1) == {
        "batches": [],
        "gateways": [],
        "gateway_reports_dropped": 0,
        "last_gateway_drop": None,
    }


@pytest.mark.parametrize(
    "foreign",
    [
        report("g/1", batch("batch_a", completed=-1)),
        report("g/1", batch("batch_a", total=2**60)),
        report("g/1", batch("batch_a", cost=float("inf"))),
        report("g/1", batch("batch_a", completed="3")),
        report("g/1", batch("<script>")),
        report("g/1", batch("batch_a", tenant="x" * 300)),
        report("g/1", *[batch(f"batch_{n}") for n in range(201)]),
        {**report("g/1"), "gateway": ""},
        {**report("g/1"), "batches": {"a": 1}},
    ],
)
def test_a_report_that_does_not_fit_is_dropped_whole_and_counted(foreign: dict[str, Any]) -> None:
    folded = GatewayBatches()
    folded.observe(report("g/1", batch("batch_a", completed=1)), T0)
    assert not folded.observe(foreign, T0 + 1)
    state = folded.snapshot(T0 + 2)
    assert state["gateway_reports_dropped"] == 1 and state["last_gateway_drop"]
    assert [b["completed"] for b in state["batches"]] == [1], "the last good report stands"
