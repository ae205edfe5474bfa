"""The gateway's life cycle, top to bottom: store, broker, background tasks, HTTP; and its
routes (Files, Batches, calls, probes and metrics on one port)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
from typing import Any

import aio_pika
import prometheus_client
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from worker.amqp.connect import Nodes, NoNodeAnswers, redact
from worker.amqp.topology import declare
from worker.gateway import batches as batch_routes
from worker.gateway import calls as call_routes
from worker.gateway import files as file_routes
from worker.gateway.batchstore import BatchStore
from worker.gateway.context import CONTEXT, GatewayContext
from worker.gateway.errors import error_middleware
from worker.gateway.keys import Keys, auth_middleware, load_keys
from worker.gateway.ledger import Ledger
from worker.gateway.lifecycle import Lifecycle
from worker.gateway.metrics import GatewayMetrics
from worker.gateway.publish import LinePublisher
from worker.gateway.replies import CallReplies, reply_queue_name
from worker.gateway.results import ResultConsumer
from worker.gateway.runner import BatchRunner
from worker.gateway.status import GatewayStatus
from worker.gateway.store import Store
from worker.settings import Settings

__all__ = ["Gateway", "serve_gateway"]

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT = 10.0
#: connections waiting to be accepted: a burst of new clients (a thousand calls at once)
#: overflows aiohttp's default of 128, and the kernel then resets some of them
BACKLOG = 4096
#: the largest JSON body a request may send (a batch creation is a few hundred bytes)
MAX_JSON_BODY = 1024 * 1024


async def connect_robust(settings: Settings, name: str) -> AbstractRobustConnection:
    """A self-healing connection to the first broker node that answers (§13)."""
    problems = []
    for url in Nodes(settings.amqp_urls).order():
        try:
            return await aio_pika.connect_robust(
                url, timeout=CONNECT_TIMEOUT, client_properties={"connection_name": name}
            )
        except (OSError, aio_pika.exceptions.AMQPError, TimeoutError) as exc:
            problems.append(f"{redact(url)}: {type(exc).__name__}: {exc}")
    raise NoNodeAnswers("; ".join(problems))


class Gateway:
    """One gateway replica: ``await start()``, serve, ``await stop()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        keys: Keys | None = None,
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        if keys is None and settings.gateway_keys_file is not None:
            keys = load_keys(settings.gateway_keys_file)
        self.keys = keys
        self.metrics = GatewayMetrics(registry)
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self.port = settings.gateway_port
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._connection: AbstractRobustConnection | None = None
        self._store: Store | None = None
        self._consumer: ResultConsumer | None = None
        #: the calls waiting for their replies (one reply queue for the process)
        self.replies = CallReplies(reply_queue_name(settings.gateway_results_queue))

    async def start(self) -> None:
        self._store = store = await Store.open(self.settings.database_url.get_secret_value())
        await store.discard_stale_uploads()
        self._connection = connection = await connect_robust(
            self.settings, f"chat-worker gateway {self.owner}"
        )
        await declare(connection, self.settings)
        publishing = await connection.channel(publisher_confirms=True, on_return_raises=True)
        events = await connection.channel(publisher_confirms=False)
        consuming = await connection.channel(publisher_confirms=False)
        # Calls publish on a channel of their own: a batch's chunks do not hold them up.
        calling = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await self.replies.start(calling)
        pattern = self.settings.reply_to_pattern
        if pattern is not None and not pattern.fullmatch(self.replies.name):
            log.warning(
                "WORKER_REPLY_TO_PATTERN does not admit the gateway's reply queue: workers "
                "with it send calls' results elsewhere, and calls time out",
                reply_queue=self.replies.name,
            )
        calls = call_routes.Calls(calling, self.replies, self.settings, self.metrics)
        batches, ledger = BatchStore(store.engine), Ledger(store.engine)
        lifecycle = Lifecycle(
            store,
            ledger,
            batches,
            events,
            self.settings,
            self.settings.events_exchange,
            self.metrics,
        )
        publisher = LinePublisher(
            publishing,
            self.settings.batch_lane,
            self.settings.gateway_results_queue,
        )
        runner = BatchRunner(store, batches, publisher, self.settings, self.metrics, self.owner)
        self._consumer = ResultConsumer(ledger, self.metrics, lifecycle.finalize)
        await self._consumer.start(
            consuming, self.settings.gateway_results_queue, self.settings.queue_type
        )
        context = GatewayContext(
            store=store,
            batches=batches,
            lifecycle=lifecycle,
            settings=self.settings,
            max_line_bytes=self.settings.max_message_bytes,
            wake_runner=runner.wake,
        )
        self._tasks = [
            asyncio.create_task(runner.run(), name="gateway-runner"),
            asyncio.create_task(lifecycle.run(), name="gateway-lifecycle"),
            asyncio.create_task(  # the operator page's batches panel, and its cancels
                GatewayStatus(
                    connection, self.settings.events_exchange, batches, lifecycle, self.owner
                ).run()
            ),
        ]
        # A client that goes away cancels its handler: a call waiting for its job ends at once.
        self._runner = web.AppRunner(
            self.app(context, calls),
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=self.settings.shutdown_grace,
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.settings.gateway_host,
            self.settings.gateway_port,
            reuse_address=True,
            backlog=BACKLOG,
        )
        await site.start()
        if self._runner.addresses:
            self.port = int(self._runner.addresses[0][1])
        log.info("gateway listening", host=self.settings.gateway_host, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # calls in flight get WORKER_SHUTDOWN_GRACE
        await self.replies.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        if self._store is not None:
            await self._store.close()

    def app(self, context: GatewayContext, calls: call_routes.Calls) -> web.Application:
        app = web.Application(
            middlewares=[error_middleware, auth_middleware(self.keys)],
            client_max_size=MAX_JSON_BODY,
        )
        app[CONTEXT] = context
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        file_routes.add_routes(app)
        batch_routes.add_routes(app)
        call_routes.add_routes(app, calls)
        return app

    @property
    def ready(self) -> bool:
        connected = self._connection is not None and not self._connection.is_closed
        consuming = self._consumer is not None and self._consumer.consuming
        return connected and consuming and self.replies.consuming

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        database = self._store is not None and await self._store.ping()
        ready = self.ready and database
        body: dict[str, Any] = {
            "status": "ready" if ready else "not ready",
            "broker": self.ready,
            "database": database,
        }
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=prometheus_client.generate_latest(self.metrics.registry),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )


async def serve_gateway(settings: Settings) -> None:
    """``chat-worker gateway``: serve until SIGTERM or SIGINT."""
    server = Gateway(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()
