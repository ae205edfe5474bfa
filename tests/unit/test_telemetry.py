"""The bounded ``model`` label of the worker's metrics."""

from __future__ import annotations

import prometheus_client

from worker.telemetry import MAX_MODEL_LABELS, OTHER_MODEL, Telemetry


def telemetry() -> Telemetry:
    return Telemetry(registry=prometheus_client.CollectorRegistry())


def test_without_an_allow_list_the_first_models_keep_their_label() -> None:
    metrics = telemetry()
    seen = {metrics.model_label(f"model-{i}") for i in range(MAX_MODEL_LABELS + 50)}
    assert len(seen) == MAX_MODEL_LABELS + 1
    assert OTHER_MODEL in seen
    assert metrics.model_label("model-0") == "model-0", "a known model keeps its label"
    assert metrics.model_label(f"model-{MAX_MODEL_LABELS}") == OTHER_MODEL


def test_with_an_allow_list_only_its_models_are_labels() -> None:
    metrics = telemetry()
    metrics.allowed_models = frozenset({"gpt-4o-mini"})
    assert metrics.model_label("gpt-4o-mini") == "gpt-4o-mini"
    assert metrics.model_label("made-up") == OTHER_MODEL
    assert metrics.model_label(None) == ""


def test_a_flood_of_models_makes_a_bounded_number_of_series() -> None:
    metrics = telemetry()
    from opentelemetry.trace import INVALID_SPAN

    for i in range(500):
        metrics.record_job(INVALID_SPAN, model=f"m{i}", error_code=None, seconds=0.01)
    text = prometheus_client.generate_latest(metrics.registry).decode()
    series = [line for line in text.splitlines() if line.startswith("chat_worker_jobs_total{")]
    assert len(series) == MAX_MODEL_LABELS + 1
