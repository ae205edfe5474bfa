"""The gateway's Prometheus metrics, on a registry of its own."""

from __future__ import annotations

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

__all__ = ["GatewayMetrics"]

_DURATIONS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)


class GatewayMetrics:
    def __init__(self, registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self.registry = registry or prometheus_client.CollectorRegistry()
        self.batches = Gauge(
            "chat_gateway_batches",
            "Batches in the store, by status",
            ["status"],
            registry=self.registry,
        )
        self.lines = Counter(
            "chat_gateway_batch_lines",
            "Batch lines ended by this gateway, by outcome (ok, or the error code)",
            ["outcome"],
            registry=self.registry,
        )
        self.published = Counter(
            "chat_gateway_lines_published",
            "Batch lines published to the request queue (confirmed by the broker)",
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "chat_gateway_publish_seconds",
            "Seconds to publish a batch's lines (one gateway's share, from its claim)",
            buckets=_DURATIONS,
            registry=self.registry,
        )
        self.finalize_seconds = Histogram(
            "chat_gateway_finalize_seconds",
            "Seconds from finalizing to the batch's end status",
            buckets=_DURATIONS,
            registry=self.registry,
        )

        self.calls = Counter(
            "chat_gateway_calls",
            "Calls answered, by endpoint and outcome (ok, an error code, client_gone)",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.calls_waiting = Gauge(
            "chat_gateway_calls_waiting",
            "Calls waiting for their job's replies now",
            registry=self.registry,
        )
        self.call_seconds = Histogram(
            "chat_gateway_call_seconds",
            "Seconds from a call's request to the end of its answer, by endpoint",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600),
            registry=self.registry,
        )

    def set_batches(self, counts: dict[str, int]) -> None:
        for status in STATUSES:
            self.batches.labels(status).set(counts.get(status, 0))

    def ended(self, outcome: str, count: int = 1) -> None:
        self.lines.labels(outcome).inc(count)
