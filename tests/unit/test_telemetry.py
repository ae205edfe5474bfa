"""The bounded ``model`` label of the worker's metrics."""

from __future__ import annotations

import random
from typing import Any

import prometheus_client
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from worker.telemetry import MAX_MODEL_LABELS, OTHER_MODEL, Tally, Telemetry


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


# --- Tally: a summed counter read at collection, equal to the SDK's Counter ---------------

_LABELS = st.fixed_dictionaries(
    {},
    optional={
        "outcome": st.sampled_from(["ok", "error"]),
        "tenant": st.sampled_from(["", "acme", "globex"]),
        "lane": st.sampled_from(["default", "batch"]),
    },
)


def _points(reader: InMemoryMetricReader, name: str) -> dict[frozenset[Any], float]:
    data = reader.get_metrics_data()
    if data is None:  # nothing recorded yet
        return {}
    return {
        frozenset(point.attributes.items()): point.value
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    }


@settings(max_examples=200, deadline=None)
@given(
    adds=st.lists(
        st.tuples(st.integers(min_value=0, max_value=10_000), _LABELS, st.randoms()),
        max_size=40,
    ),
    collect_between=st.integers(min_value=0, max_value=40),
)
def test_a_tally_reads_as_the_sdks_counter_on_generated_adds(
    adds: list[tuple[int, dict[str, str], random.Random]], collect_between: int
) -> None:
    """The same adds, attributes in any order, collected midway and at the end: the same
    series with the same cumulative values as a synchronous Counter."""
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    counter = meter.create_counter("sdk")
    tally = Tally(meter, "tally", "{job}", "a tally")
    for index, (amount, labels, shuffle) in enumerate(adds):
        items = list(labels.items())
        shuffle.shuffle(items)
        counter.add(amount, labels)
        tally.add(amount, dict(items))
        if index == collect_between:
            assert _points(reader, "tally") == _points(reader, "sdk")
    assert _points(reader, "tally") == _points(reader, "sdk")


def test_tallied_counters_keep_their_prometheus_names() -> None:
    registry = prometheus_client.CollectorRegistry()
    telemetry = Telemetry(registry=registry)
    telemetry.jobs.add(2, {"outcome": "ok", "lane": "default"})
    telemetry.retries.add(1, {"error_code": "upstream_error", "upstream": "u"})
    text = prometheus_client.generate_latest(registry).decode()
    assert "# TYPE chat_worker_jobs_total counter" in text
    assert 'chat_worker_retries_total{error_code="upstream_error"' in text
    assert [line for line in text.splitlines() if line.startswith("chat_worker_jobs_total{")]
    sample = next(line for line in text.splitlines() if line.startswith("chat_worker_jobs_total{"))
    assert sample.endswith(" 2.0")
