"""The heartbeat a worker publishes every 2 s to the events exchange (contract §14).

Two parts: :class:`JobStats`, counters the worker bumps once per finished job (a few dict
operations, no lock: the event loop is the only writer), and :class:`Heartbeat`, a task
that renders those counters with the worker's live state into one small JSON message on
the fanout exchange ``WORKER_EVENTS_EXCHANGE``. Heartbeats are fire-and-forget (no
publisher confirms, not persistent): a lost one is replaced two seconds later, and a
worker never waits on its audience. Nothing of a job's content goes in: counts, model
names, error codes and tenant names only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import orjson
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from worker.settings import Settings

__all__ = [
    "HEARTBEAT_INTERVAL",
    "MAX_MODELS",
    "MAX_TENANTS",
    "OTHER_MODEL",
    "OTHER_TENANT",
    "TYPE_HEARTBEAT",
    "Heartbeat",
    "JobStats",
    "cache_counts",
]

log = structlog.get_logger(__name__)

HEARTBEAT_INTERVAL = 2.0
TYPE_HEARTBEAT = "chat.heartbeat"
# Bounded like the metrics' tenant and model labels (§12): a heartbeat stays small whatever
# the traffic (model names come from messages: 25,000 of them made a 1.3 MB heartbeat that
# the console dropped, and the worker vanished from the page).
MAX_TENANTS = 100
OTHER_TENANT = "other"
MAX_MODELS = 100
OTHER_MODEL = "other"
MAX_MODEL_NAME = 256  # a longer name counts as ``other`` too
# A heartbeat older than this is worthless: let the broker drop it rather than queue it.
HEARTBEAT_TTL_MS = 10_000


class JobStats:
    """What the worker has done since the process started: jobs, errors, tokens, tenants."""

    __slots__ = ("errors", "jobs", "started_at", "tenants", "tokens")

    def __init__(self) -> None:
        self.started_at = datetime.now(UTC)
        self.jobs = {"ok": 0, "error": 0}
        self.errors: dict[str, int] = {}
        # input and output tokens by model; cost_usd once a job of the model had a price
        self.tokens: dict[str, dict[str, float]] = {}
        # jobs, input and output tokens; cost_usd once a job of the tenant had a price (§17)
        self.tenants: dict[str, dict[str, float]] = {}

    def record(
        self,
        *,
        error_code: str | None,
        model: str | None,
        usage: Mapping[str, Any] | None,
        tenant: str | None,
        cost: float | None = None,
    ) -> None:
        """Count one finished job (ok or error; deferrals are not finished)."""
        if error_code is None:
            self.jobs["ok"] += 1
        else:
            self.jobs["error"] += 1
            self.errors[error_code] = self.errors.get(error_code, 0) + 1
        prompt = completion = 0
        if usage:
            prompt = _count(usage.get("prompt_tokens"))
            completion = _count(usage.get("completion_tokens"))
        if model is not None and (prompt or completion or cost):
            tokens = self.tokens.get(model)
            if tokens is None:
                if len(self.tokens) >= MAX_MODELS or len(model) > MAX_MODEL_NAME:
                    model = OTHER_MODEL
                tokens = self.tokens.get(model)
            if tokens is None:
                tokens = self.tokens[model] = {"input": 0, "output": 0}
            tokens["input"] += prompt
            tokens["output"] += completion
            if cost:
                tokens["cost_usd"] = round(tokens.get("cost_usd", 0) + cost, 9)
        if tenant is not None:
            if tenant not in self.tenants and len(self.tenants) >= MAX_TENANTS:
                tenant = OTHER_TENANT
            counts = self.tenants.get(tenant)
            if counts is None:
                counts = self.tenants[tenant] = {"jobs": 0, "input": 0, "output": 0}
            counts["jobs"] += 1
            if cost:
                counts["cost_usd"] = round(counts.get("cost_usd", 0) + cost, 9)
            counts["input"] += prompt
            counts["output"] += completion


def cache_counts(store: Mapping[str, Any]) -> dict[str, int]:
    """The heartbeat's ``cache`` (§16) from a ``StoreMetrics.snapshot()``: lookups answered
    from the cache (``hit``) or called (``miss``), deliveries answered from the result store
    (``stored``), and store operations skipped while Redis was away (``skipped``)."""
    skipped = store.get("skipped")
    return {
        "hit": _count(store.get("cache_hits")),
        "miss": _count(store.get("cache_misses")),
        "stored": _count(store.get("results_served")),
        "skipped": sum(_count(n) for n in skipped.values()) if isinstance(skipped, dict) else 0,
    }


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


class Heartbeat:
    """Publishes the worker's state every :data:`HEARTBEAT_INTERVAL` seconds while started.

    ``lanes`` gives the jobs in flight per lane queue and ``upstreams`` each upstream's
    gate (``state``, ``remaining_requests``, ``remaining_tokens``, ``cooldown_s``…); both
    default to nothing, so the heartbeat works before the pool and the lanes report.
    ``store`` (the result store's ``StoreMetrics.snapshot``, when there is one) adds the
    ``cache`` counts.
    """

    def __init__(
        self,
        settings: Settings,
        identity: str,
        stats: JobStats,
        *,
        ready: Callable[[], bool],
        in_flight: Callable[[], int],
        lanes: Callable[[], Mapping[str, int]] = dict,
        upstreams: Callable[[], Mapping[str, Mapping[str, Any]]] = dict,
        store: Callable[[], Mapping[str, Any]] | None = None,
        interval: float = HEARTBEAT_INTERVAL,
    ) -> None:
        self._settings = settings
        self._identity = identity
        self._stats = stats
        self._ready = ready
        self._in_flight = in_flight
        self._lanes = lanes
        self._upstreams = upstreams
        self._store = store
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.sent = 0

    def body(self) -> dict[str, Any]:
        """The heartbeat document (§14)."""
        stats = self._stats
        in_flight = self._in_flight()
        lane_counts = self._lanes()
        lanes = self._settings.lanes
        return {
            "type": "heartbeat",
            "worker": self._identity,
            "sent_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "started_at": stats.started_at.isoformat(timespec="milliseconds"),
            "ready": self._ready(),
            "concurrency": self._settings.concurrency,
            "lanes": {
                lane.queue: {
                    "weight": lane.weight,
                    # One lane holds every job in flight; several need the lanes' own count.
                    "in_flight": lane_counts.get(
                        lane.queue, in_flight if len(lanes) == 1 else None
                    ),
                }
                for lane in lanes
            },
            "in_flight": in_flight,
            "jobs": stats.jobs,
            "errors": stats.errors,
            "tokens": stats.tokens,
            "tenants": stats.tenants,
            "upstreams": dict(self._upstreams()),
            **({"cache": cache_counts(self._store())} if self._store is not None else {}),
        }

    def start(self, connection: AbstractConnection) -> None:
        """Start publishing on ``connection`` (a no-op with ``WORKER_EVENTS=false``)."""
        if self._settings.events and self._task is None:
            self._task = asyncio.create_task(self._run(connection), name="heartbeat")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, connection: AbstractConnection) -> None:
        channel: AbstractChannel | None = None
        try:
            channel = await connection.channel(publisher_confirms=False)
            exchange = await channel.declare_exchange(
                self._settings.events_exchange, aio_pika.ExchangeType.FANOUT, durable=True
            )
            while True:
                started = time.monotonic()
                message = aio_pika.Message(
                    orjson.dumps(self.body()),
                    content_type="application/json",
                    type=TYPE_HEARTBEAT,
                    expiration=HEARTBEAT_TTL_MS / 1000,
                    delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                )
                # Not mandatory: with no console listening, the broker drops it silently.
                await exchange.publish(message, routing_key="", mandatory=False)
                self.sent += 1
                await asyncio.sleep(max(self._interval - (time.monotonic() - started), 0.0))
        except (OSError, aiormq.exceptions.AMQPError, RuntimeError) as exc:
            # The worker's own loss handling reconnects and starts a new heartbeat.
            log.warning("heartbeat stopped", error=repr(exc))
        finally:
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()
