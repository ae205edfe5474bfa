"""Logs, traces and metrics: structlog and OpenTelemetry, wrapped round the job handler.

- Logs: one JSON object a line on stdout (``WORKER_LOG_FORMAT=console`` for people), the
  standard library's loggers (aio-pika, aiormq, httpx) routed through the same pipeline,
  ``trace_id``/``span_id`` added from the current span. No prompt, completion or secret is
  ever handed to a logger or put on a span.
- Traces: a CONSUMER span per job (messaging conventions) whose parent is the producer's
  ``traceparent``; a CLIENT span per upstream attempt (GenAI conventions). OTLP export when
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; otherwise spans are not recorded at all, and the
  producer's context still flows through to the upstream and the result.
- Metrics: OpenTelemetry instruments read by a Prometheus reader, served on ``/metrics``,
  and exported over OTLP too when an endpoint is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import prometheus_client
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.metrics import Histogram, Observation
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from worker.metrics import Tally, meter_provider, otlp_configured, sdk_disabled, store_observations
from worker.tenants import TenantLabels

__all__ = ["Tally", "Telemetry"]

SERVICE_NAME = "chat-worker"
DEFER_SECONDS = 1.0  # the longest an attempt's measurements wait (see Telemetry)
PROVIDER = "openai"  # the API flavour spoken, whoever serves it (semconv well-known value)
#: distinct ``model`` label values a process reports before the rest count as ``other``
#: (models in WORKER_ALLOWED_MODELS always have their own): the label comes from messages,
#: and a producer must not be able to create unbounded metric series.
MAX_MODEL_LABELS = 100
OTHER_MODEL = "other"


class Telemetry:
    """The worker's tracer and instruments; one per worker process (or per test)."""

    #: models that always get their own label (the worker sets WORKER_ALLOWED_MODELS here)
    allowed_models: frozenset[str] = frozenset()

    def model_label(self, model: str | None) -> str:
        """The bounded ``model`` label of a metric: see :data:`MAX_MODEL_LABELS`."""
        if not model:
            return ""
        if model in self.allowed_models or model in self._model_labels:
            return model
        if self.allowed_models or len(self._model_labels) >= MAX_MODEL_LABELS:
            return OTHER_MODEL
        self._model_labels.add(model)
        return model

    def __init__(
        self,
        *,
        span_processor: SpanProcessor | None = None,
        registry: prometheus_client.CollectorRegistry | None = None,
        metric_readers: tuple[MetricReader, ...] = (),
    ) -> None:
        os.environ.setdefault("OTEL_SERVICE_NAME", SERVICE_NAME)
        self._model_labels: set[str] = set()
        resource = Resource.create()
        self.registry = registry or prometheus_client.REGISTRY
        self._tracer_provider: TracerProvider | None = None
        if span_processor is not None or (otlp_configured("TRACES") and not sdk_disabled()):
            provider = TracerProvider(resource=resource)
            if span_processor is not None:
                provider.add_span_processor(span_processor)
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
                from opentelemetry.sdk.trace.export import BatchSpanProcessor

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            self._tracer_provider = provider
            self.tracer: trace.Tracer = provider.get_tracer("worker")
        else:
            # Nothing would be exported: no span is recorded, context still propagates.
            self.tracer = trace.NoOpTracer()
        # An attempt's measurements are recorded when its job has settled (the OTel SDK
        # takes ~50 µs for one attempt's three, which would otherwise sit between the
        # upstream's answer and the result), at the latest DEFER_SECONDS after the attempt
        # (a job still retrying); a scrape records what is still waiting first.
        self._deferred: list[tuple[Histogram, float, dict[str, Any]]] = []
        self._flush_soon: asyncio.TimerHandle | None = None
        self._meter_provider = meter_provider(
            resource, self.registry, metric_readers, self.flush_deferred
        )
        meter = self._meter = self._meter_provider.get_meter("worker")
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens used per call"
        )
        self.operation_duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Upstream call duration"
        )
        self.time_to_first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time from the upstream request to its first streamed output",
        )
        # Counters are summed here and read by the SDK when it collects (see Tally).
        self.jobs = Tally(meter, "chat_worker.jobs", "{job}", "Jobs finished, by outcome")
        self.tokens = Tally(
            meter, "chat_worker.tokens", "{token}", "Tokens of finished jobs, by tenant"
        )
        self.cost_usd = Tally(
            meter,
            "chat_worker.cost_usd",
            "{usd}",
            "What finished jobs cost, by model and tenant (§17)",
        )
        self.tenant_labels = TenantLabels()
        self.job_duration = meter.create_histogram(
            "chat_worker.job.duration", unit="s", description="Time from delivery to result"
        )
        self._in_flight: Callable[[], int] = lambda: 0
        meter.create_observable_up_down_counter(
            "chat_worker.jobs.in_flight",
            callbacks=[lambda _: [Observation(self._in_flight())]],
            unit="{job}",
            description="Jobs being processed",
        )
        self.retries = Tally(meter, "chat_worker.retries", "{retry}", "Upstream attempts retried")
        self.dead_lettered = Tally(
            meter, "chat_worker.dead_lettered", "{job}", "Requests dead-lettered"
        )
        self.dead_letters_lost = Tally(
            meter,
            "chat_worker.dead_letters.lost",
            "{job}",
            "Failed requests the dead-letter queue did not take (their result went out)",
        )
        # §11 rate limits: gates are read at scrape time (see watch_gate).
        self._gates: list[Any] = []
        meter.create_observable_gauge(
            "chat_worker.upstream.state",
            callbacks=[self._observe_gate_states],
            description="1 for each upstream's current gate state (open, closed, cooling)",
        )
        meter.create_observable_gauge(
            "chat_worker.upstream.budget.remaining",
            callbacks=[self._observe_budgets],
            description="Rate-limit budget the upstream last reported as remaining",
        )
        meter.create_observable_gauge(
            "chat_worker.shared_limits.degraded",
            callbacks=[self._observe_shared_limits],
            description="1 while an upstream's limits shared in Redis are kept per process "
            "(Redis is away), else 0; upstreams whose limits are not shared are not listed",
        )
        self.rate_limit_wait = meter.create_histogram(
            "chat_worker.rate_limit.wait.duration",
            unit="s",
            description="Time a job waited for rate-limit budget, per delivery",
        )
        self.rate_limited = Tally(
            meter,
            "chat_worker.upstream.rate_limited",
            "{answer}",
            "429 answers received, by upstream and error code",
        )

    @property
    def recording(self) -> bool:
        """True when spans are recorded (an exporter or a test's processor is set)."""
        return self._tracer_provider is not None

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        """Read the in-flight gauge from ``count`` at scrape time (free on the hot path)."""
        self._in_flight = count

    def watch_store(self, metrics: Any) -> None:
        """Report a :class:`worker.store.StoreMetrics` (result store and cache, §16) at
        scrape time: counted in the store, read here, free on the hot path."""
        self._meter.create_observable_counter(
            "chat_worker.store.events",
            callbacks=[lambda _: store_observations(metrics)],
            unit="{event}",
            description="Result store and cache: hits, misses, stored, served, skipped",
        )
        self._meter.create_observable_gauge(
            "chat_worker.store.circuit",
            callbacks=[lambda _: [Observation(metrics.snapshot()["circuit"])]],
            description="The store's Redis circuit: 0 closed, 1 half-open, 2 open",
        )

    def watch_gate(self, gate: Any) -> None:
        """Report a :class:`worker.limits.gate.Gate`'s state and budget at scrape time."""
        self._gates.append(gate)

    def _observe_gate_states(self, _: Any) -> list[Observation]:
        return [
            Observation(int(gate.state == state), {"upstream": gate.name, "state": state})
            for gate in self._gates
            for state in ("open", "closed", "cooling")
        ]

    def _observe_shared_limits(self, _: Any) -> list[Observation]:
        return [
            Observation(int(degraded), {"upstream": gate.name})
            for gate in self._gates
            if (degraded := gate.shared_limits_degraded) is not None
        ]

    def _observe_budgets(self, _: Any) -> list[Observation]:
        return [
            Observation(value, {"upstream": gate.name, "kind": kind})
            for gate in self._gates
            for kind, value in gate.remaining().items()
        ]

    def shutdown(self) -> None:
        self.flush_deferred()
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        self._meter_provider.shutdown()

    # Spans -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def job_span(
        self,
        queue: str,
        headers: Mapping[str, Any],
        *,
        job_id: str,
        correlation_id: str,
        delivery_tag: int | None,
    ) -> Iterator[Span]:
        """The CONSUMER span of one job, child of the producer's trace context."""
        if not self.recording and "traceparent" not in headers:
            yield trace.INVALID_SPAN  # nothing to record, nothing to pass on
            return
        # Some AMQP clients send string headers as bytes (longstr).
        carrier = {
            k: v.decode(errors="replace") if isinstance(v, bytes | bytearray) else str(v)
            for k, v in headers.items()
            if k in ("traceparent", "tracestate")
        }
        parent = propagate.extract(carrier)
        token = otel_context.attach(parent)
        try:
            with self.tracer.start_as_current_span(
                f"process {queue}",
                kind=SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "rabbitmq",
                    "messaging.operation.name": "process",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": queue,
                    "messaging.message.id": job_id,
                    "messaging.message.conversation_id": correlation_id,
                    "messaging.rabbitmq.message.delivery_tag": delivery_tag or 0,
                },
            ) as span:
                yield span
        finally:
            otel_context.detach(token)

    @contextlib.contextmanager
    def upstream_span(
        self,
        url: str,
        body: Mapping[str, Any],
        attempt: int,
        *,
        upstream: str | None = None,
        provider: str = PROVIDER,
        operation: str = "chat",
    ) -> Iterator[Span]:
        """The CLIENT span of one upstream attempt (GenAI conventions, no content);
        ``upstream`` is the pool member's name, ``provider`` read from its host,
        ``operation`` the ``gen_ai.operation.name`` (``chat``, ``embeddings``)."""
        if not self.recording:
            yield trace.get_current_span()
            return
        model = str(body.get("model"))
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
            "chat_worker.attempt": attempt,
        }
        if upstream is not None:
            attributes["chat_worker.upstream"] = upstream
        parts = urlsplit(url)
        if parts.hostname:
            attributes["server.address"] = parts.hostname
            attributes["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
        for key, name in (
            ("max_tokens", "gen_ai.request.max_tokens"),
            ("max_completion_tokens", "gen_ai.request.max_tokens"),
            ("temperature", "gen_ai.request.temperature"),
            ("top_p", "gen_ai.request.top_p"),
        ):
            if isinstance(body.get(key), int | float):
                attributes[name] = body[key]
        if operation == "embeddings":
            if isinstance(body.get("dimensions"), int):
                attributes["gen_ai.embeddings.dimension.count"] = body["dimensions"]
            attributes["gen_ai.request.encoding_formats"] = [
                str(body.get("encoding_format") or "float")
            ]
        with self.tracer.start_as_current_span(
            f"{operation} {model}",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span

    @staticmethod
    def outgoing_headers() -> dict[str, str]:
        """``traceparent``/``tracestate`` of the current context, for a message or request."""
        carrier: dict[str, str] = {}
        if trace.get_current_span().get_span_context().is_valid:
            propagate.inject(carrier)
        return carrier

    # Recording -------------------------------------------------------------------------

    def record_attempt(
        self,
        span: Span,
        model: str,
        *,
        seconds: float,
        body: Mapping[str, Any] | None,
        ttft_seconds: float | None = None,
        error_type: str | None = None,
        upstream: str | None = None,
        provider: str = PROVIDER,
        operation: str = "chat",
    ) -> None:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": self.model_label(model),
        }
        if upstream is not None:
            attributes["upstream"] = upstream
        usage = (body or {}).get("usage") or {}
        if body is not None and span.is_recording():
            if response_id := body.get("id"):
                span.set_attribute("gen_ai.response.id", str(response_id))
            if response_model := body.get("model"):
                span.set_attribute("gen_ai.response.model", str(response_model))
            if operation == "chat":
                reasons = [
                    str(c.get("finish_reason"))
                    for c in body.get("choices") or ()
                    if isinstance(c, dict) and c.get("finish_reason")
                ]
                span.set_attribute("gen_ai.response.finish_reasons", reasons)
            if isinstance(usage.get("prompt_tokens"), int):
                span.set_attribute("gen_ai.usage.input_tokens", usage["prompt_tokens"])
            if isinstance(usage.get("completion_tokens"), int):
                span.set_attribute("gen_ai.usage.output_tokens", usage["completion_tokens"])
        if error_type is not None:
            attributes["error.type"] = error_type
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR))
        deferred = self._deferred
        deferred.append((self.operation_duration, seconds, attributes))
        if ttft_seconds is not None:
            deferred.append((self.time_to_first_chunk, ttft_seconds, attributes))
        for kind, key in (("input", "prompt_tokens"), ("output", "completion_tokens")):
            if isinstance(usage.get(key), int):
                deferred.append(
                    (self.token_usage, usage[key], {**attributes, "gen_ai.token.type": kind})
                )
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_soon is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush_deferred()
            return
        self._flush_soon = loop.call_later(DEFER_SECONDS, self.flush_deferred)

    def flush_deferred(self) -> None:
        """Record the measurements still waiting (see ``_deferred``)."""
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        deferred, self._deferred = self._deferred, []
        for instrument, value, attributes in deferred:
            instrument.record(value, attributes)

    def record_job(
        self,
        span: Span,
        *,
        model: str | None,
        error_code: str | None,
        seconds: float,
        lane: str = "",
        tenant: str | None = None,
        usage: Mapping[str, Any] | None = None,
        cost: float | None = None,
        upstream: str | None = None,
        dead_lettered: bool = True,
    ) -> None:
        # Lane and tenant label jobs and tokens (§12); tenants bounded to 100 per process.
        owner = {"lane": lane, "tenant": self.tenant_labels.label(tenant)}
        attributes = {
            "outcome": "error" if error_code else "ok",
            "error_code": error_code or "",
            "gen_ai.request.model": self.model_label(model),
            **owner,
        }
        self.jobs.add(1, attributes)
        for kind, key in (("input", "prompt_tokens"), ("output", "completion_tokens")):
            if usage and isinstance(usage.get(key), int):
                self.tokens.add(
                    usage[key],
                    {
                        "gen_ai.token.type": kind,
                        **owner,
                        "gen_ai.request.model": attributes["gen_ai.request.model"],
                    },
                )
        self.job_duration.record(seconds, {"outcome": attributes["outcome"], "lane": lane})
        if cost:
            self.cost_usd.add(
                cost,
                {"model": attributes["gen_ai.request.model"], "upstream": upstream or "", **owner},
            )
        if error_code:
            span.set_attribute("error.type", error_code)
            span.set_status(Status(StatusCode.ERROR))
            if dead_lettered:
                self.dead_lettered.add(1, {"error_code": error_code})
