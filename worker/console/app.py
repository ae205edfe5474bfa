"""The console's HTTP side: the page, ``/api/state``, live updates, dead letters, replay,
batch cancels.

Reads are open to whoever can reach the port (it binds 127.0.0.1 unless told otherwise);
actions need ``Authorization: Bearer $WORKER_CONSOLE_TOKEN``, compared in constant time,
and are off without that setting. Every action is logged with what it did. Nothing here
ever reads a request's body beyond its ``custom_id`` (``worker.amqp.dlq``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiormq
import orjson
import structlog
from aiohttp import web

from worker.amqp.dlq import DeadLetter, ReplayFailed
from worker.console.batches import GatewayBatches
from worker.console.broker import ConsoleBroker
from worker.console.state import Fleet
from worker.settings import Settings

__all__ = ["ConsoleApp", "serve_console"]

log = structlog.get_logger(__name__)

STATIC = Path(__file__).parent / "static"
PUSH_INTERVAL = 1.0
MAX_PAGE = 500
MAX_REPLAY_IDS = 10_000


class ConsoleApp:
    """Routes over one :class:`Fleet` and one :class:`ConsoleBroker`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.fleet = Fleet()
        self.batches = GatewayBatches()
        self.broker = ConsoleBroker(settings, self.fleet, self.batches)
        token = settings.console_token
        self._token = token.get_secret_value().encode() if token else None
        self._closing = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_security_headers])
        app.router.add_get("/", self._index)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/dead-letters", self._dead_letters)
        app.router.add_post("/api/replay", self._replay)
        app.router.add_post("/api/batches/{batch_id}/cancel", self._cancel_batch)
        app.router.add_static("/static/", STATIC)
        app.cleanup_ctx.append(self._broker_task)
        app.on_shutdown.append(self._close_streams)
        return app

    async def _close_streams(self, _app: web.Application) -> None:
        self._closing.set()

    async def _broker_task(self, _app: web.Application) -> Any:
        task = asyncio.create_task(self.broker.run(), name="console-broker")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # --- reads ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        now = time.time()
        broker = self.broker
        return {
            **self.fleet.snapshot(now),
            **self.batches.snapshot(now),
            "queues": dict(broker.depths),
            "lanes": [
                {
                    "lane": q.lane,
                    "kind": q.kind,
                    "name": q.name,
                    "delay_s": q.delay_s,
                    "depth": broker.depths.get(q.name),
                    "consumers": broker.consumers.get(q.name),
                }
                for q in broker.queues
            ],
            "dead_letters": broker.dead_letter_count,
            "broker": {"connected": broker.connected},
            "actions": self._token is not None,
            "generated_at": now,
        }

    async def _index(self, _request: web.Request) -> web.StreamResponse:
        """The page with the state of now in it, so that it draws at once rather than after
        the first server-sent event: a JSON data block (not a script: the page's CSP
        holds), ``<`` escaped so no value can end it."""
        state = orjson.dumps(self.state()).replace(b"<", b"\\u003c").replace(b">", b"\\u003e")
        block = b'<script id="initial-state" type="application/json">' + state + b"</script>"
        page = _page().replace(INITIAL_STATE_MARK, block, 1)
        return web.Response(
            body=page,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "broker": self.broker.connected})

    async def _state(self, _request: web.Request) -> web.Response:
        return _json(self.state())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the state once a second, until the page goes away."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while not self._closing.is_set():
                await response.write(b"data: " + orjson.dumps(self.state()) + b"\n\n")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), PUSH_INTERVAL)
        return response

    async def _dead_letters(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            offset = max(int(query.get("offset", "0")), 0)
            limit = min(max(int(query.get("limit", "50")), 1), MAX_PAGE)
            min_attempts = int(query["min_attempts"]) if query.get("min_attempts") else None
            min_age = float(query["min_age"]) if query.get("min_age") else None
        except ValueError:
            raise web.HTTPBadRequest(text="offset, limit, min_attempts, min_age: numbers") from None
        try:
            listing, meta = await self.broker.dead_letters()
        except (ConnectionError, aiormq.exceptions.AMQPError) as exc:
            raise web.HTTPServiceUnavailable(text=f"broker unavailable: {exc}") from None
        now = time.time()
        listing = [{**row, "age_s": round(max(now - row["since"], 0.0), 1)} for row in listing]
        codes: dict[str, int] = {}
        for row in listing:
            code = row["error_code"] or row["reason"]
            codes[code] = codes.get(code, 0) + 1
        chosen = [row for row in listing if _matches(row, query, min_attempts, min_age)]
        return _json(
            {
                "total": len(chosen),
                "listed": len(listing),
                "offset": offset,
                "items": chosen[offset : offset + limit],
                "codes": dict(sorted(codes.items())),
                **meta,
            }
        )

    # --- actions -------------------------------------------------------------------------

    def _authorize(self, request: web.Request, action: str) -> None:
        if self._token is None:
            log.warning("console action refused: actions are off", action=action)
            raise web.HTTPForbidden(text="actions are off: WORKER_CONSOLE_TOKEN is not set")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self._token):
            log.warning("console action refused: bad token", action=action, remote=request.remote)
            raise web.HTTPUnauthorized(
                text="a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )

    async def _replay(self, request: web.Request) -> web.Response:
        self._authorize(request, "replay")
        try:
            document = await request.json(loads=orjson.loads)
        except ValueError:
            raise web.HTTPBadRequest(text="a JSON body is required") from None
        code = document.get("code") if isinstance(document, dict) else None
        ids = document.get("job_ids") if isinstance(document, dict) else None
        if isinstance(code, str) and code and ids is None:
            selection: dict[str, Any] = {"code": code}

            def select(letter: DeadLetter) -> bool:
                return (letter.error_code or letter.reason) == code

        elif (
            code is None
            and isinstance(ids, list)
            and 0 < len(ids) <= MAX_REPLAY_IDS
            and all(isinstance(i, str) for i in ids)
        ):
            wanted = frozenset(ids)
            selection = {"job_ids": len(wanted)}

            def select(letter: DeadLetter) -> bool:
                return letter.job_id in wanted

        else:
            raise web.HTTPBadRequest(text='send {"code": C} or {"job_ids": [...]}')
        try:
            replayed = await self.broker.replay(select)
        except ReplayFailed as exc:
            # What was replayed before the refusal is gone from the dead letters; say so.
            log.error("console action failed", action="replay", **selection, error=str(exc))
            raise web.HTTPBadGateway(text=f"replay stopped: {exc}") from None
        except (ConnectionError, aiormq.exceptions.AMQPError) as exc:
            log.error("console action failed", action="replay", **selection, error=repr(exc))
            raise web.HTTPServiceUnavailable(text=f"replay stopped: {exc}") from None
        total = sum(replayed.values())
        log.info(
            "console action",
            action="replay",
            **selection,
            replayed=total,
            by_lane=replayed,
            remote=request.remote,
        )
        return _json({"replayed": total, "by_lane": replayed})

    async def _cancel_batch(self, request: web.Request) -> web.Response:
        """Ask the gateways to cancel a batch they report: the replica whose store holds it
        cancels it as ``POST /v1/batches/{id}/cancel`` would (``worker.gateway.status``)."""
        self._authorize(request, "cancel_batch")
        batch_id = request.match_info["batch_id"]
        batch = self.batches.known(batch_id, time.time())
        if batch is None:
            raise web.HTTPNotFound(text=f"no gateway reports a batch {batch_id[:128]!r}")
        try:
            await self.broker.request_batch_cancel(batch.id)
        except (ConnectionError, aiormq.exceptions.AMQPError) as exc:
            log.error("console action failed", action="cancel_batch", batch_id=batch.id)
            raise web.HTTPServiceUnavailable(text=f"cancel not sent: {exc}") from None
        log.info(
            "console action",
            action="cancel_batch",
            batch_id=batch.id,
            tenant=batch.tenant,
            status=batch.status,
            remote=request.remote,
        )
        return web.json_response(
            {"batch_id": batch.id, "requested": True, "status": batch.status}, status=202
        )


def _matches(
    row: Mapping[str, Any],
    query: Mapping[str, str],
    min_attempts: int | None,
    min_age: float | None,
) -> bool:
    if (code := query.get("code")) and (row["error_code"] or row["reason"]) != code:
        return False
    for field in ("job_id", "custom_id"):
        wanted = query.get(field)
        if wanted and wanted.lower() not in (row[field] or "").lower():
            return False
    text = query.get("q", "").lower()
    if text and not any(
        text in (row[f] or "").lower() for f in ("job_id", "custom_id", "error_message")
    ):
        return False
    if min_attempts is not None and (row["attempts"] or 0) < min_attempts:
        return False
    return min_age is None or row["age_s"] >= min_age


INITIAL_STATE_MARK = b"<!-- initial state -->"


@functools.cache
def _page() -> bytes:
    return (STATIC / "index.html").read_bytes()


def _json(document: Any) -> web.Response:
    return web.Response(body=orjson.dumps(document), content_type="application/json")


@web.middleware
async def _security_headers(request: web.Request, handler: Any) -> web.StreamResponse:
    response: web.StreamResponse = await handler(request)
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
    )
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


async def serve_console(settings: Settings, host: str, port: int) -> None:
    """``chat-worker console``: serve until SIGTERM/SIGINT."""
    console = ConsoleApp(settings)
    # Open event streams end with the process: do not wait for pages to go away.
    runner = web.AppRunner(
        console.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()  # the broker task started with the setup
        raise
    log.info(
        "console listening",
        url=f"http://{host}:{port}/",
        actions="on" if settings.console_token else "off (read-only)",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
