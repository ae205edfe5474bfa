"""Telemetry's metrics plumbing: readers and views, the summed counter, store observations."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import prometheus_client
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

__all__ = [
    "SECONDS_BUCKETS",
    "TOKEN_BUCKETS",
    "Tally",
    "meter_provider",
    "otlp_configured",
    "sdk_disabled",
    "store_observations",
]

# Bucket boundaries recommended by the GenAI semantic conventions.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
SECONDS_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                   20.48, 40.96, 81.92)  # fmt: skip


def otlp_configured(signal: str) -> bool:
    """An OTLP endpoint is set for ``signal`` (TRACES or METRICS), or for all signals."""
    return any(
        os.environ.get(name)
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    )


def sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def meter_provider(
    resource: Resource,
    registry: prometheus_client.CollectorRegistry,
    metric_readers: tuple[MetricReader, ...],
    flush: Callable[[], None],
) -> MeterProvider:
    """The meter provider: ``metric_readers``, a Prometheus reader on ``registry`` (scraped
    after ``flush`` has run), and an OTLP one when an endpoint is set; the GenAI buckets."""
    registry.register(_FlushBeforeCollect(flush))
    readers: list[MetricReader] = [*metric_readers]
    if not sdk_disabled():
        readers.append(PrometheusMetricReader(registry=registry))
        if otlp_configured("METRICS"):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    return MeterProvider(
        resource=resource,
        metric_readers=readers,
        views=[
            View(
                instrument_name="gen_ai.client.token.usage",
                aggregation=ExplicitBucketHistogramAggregation(TOKEN_BUCKETS),
            ),
            View(
                instrument_name="*duration*",
                aggregation=ExplicitBucketHistogramAggregation(SECONDS_BUCKETS),
            ),
            View(
                instrument_name="*first_chunk*",
                aggregation=ExplicitBucketHistogramAggregation(SECONDS_BUCKETS),
            ),
        ],
    )


def store_observations(metrics: Any) -> list[Observation]:
    """The ``chat_worker.store.events`` of a :class:`worker.store.StoreMetrics`, now."""
    snap = metrics.snapshot()
    found = [
        Observation(snap[name], {"event": name})
        for name in (
            "cache_hits",
            "cache_misses",
            "cache_stored",
            "results_stored",
            "results_served",
        )
    ]
    found += [Observation(n, {"event": "skipped", "op": op}) for op, n in snap["skipped"].items()]
    found += [
        Observation(n, {"event": "too_large", "kind": kind})
        for kind, n in snap["too_large"].items()
    ]
    return found


class Tally:
    """A monotonic counter summed in the process, which the SDK reads as an observable
    counter whenever it collects (a scrape, an OTLP export): the same series as a Counter,
    but an ``add`` is a dict update of about a microsecond where a synchronous Counter's
    costs about 15 µs in the SDK (attribute checks, hashing, aggregation), three times a
    job. Attribute sets must stay bounded, as for any counter (tenants and models are)."""

    __slots__ = ("_sums",)

    def __init__(self, meter: Meter, name: str, unit: str, description: str) -> None:
        self._sums: dict[tuple[tuple[str, Any], ...], float] = {}
        meter.create_observable_counter(
            name, callbacks=[self._observe], unit=unit, description=description
        )

    def add(self, amount: float, attributes: Mapping[str, Any] | None = None) -> None:
        key = tuple(sorted(attributes.items())) if attributes else ()
        sums = self._sums
        sums[key] = sums.get(key, 0) + amount

    def _observe(self, _: CallbackOptions) -> list[Observation]:
        # A copy first: an OTLP reader collects on its own thread (dict.copy holds the GIL).
        return [Observation(total, dict(key)) for key, total in self._sums.copy().items()]


class _FlushBeforeCollect(prometheus_client.registry.Collector):
    """Registered ahead of the OTel reader: a scrape records the waiting measurements first
    (a registry collects in the order of registration)."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def collect(self) -> Iterator[prometheus_client.Metric]:
        self._flush()
        return iter(())
