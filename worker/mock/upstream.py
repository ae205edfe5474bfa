"""The bundled OpenAI-compatible chat-completions (and embeddings) server, with per-request
fault injection."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from worker.mock import embeddings
from worker.mock.budget import BudgetConfig, OrgBudget
from worker.mock.compose import Plan, compose, reply_body, stream_events
from worker.mock.faults import (
    FAULTS,
    MALFORMED,
    QUOTA_FAULT,
    RANDOM_FAULTS,
    STATUS_FAULTS,
    BadRequest,
    error_response,
    interrupt,
    status_fault,
)

__all__ = ["MockConfig", "MockStats", "MockUpstream", "RecordedRequest", "serve"]

# A random stall must not pin a soak test's connections for the default hour.
_RANDOM_STALL_CAP = 5.0
_KEEPALIVE_EVERY = 5.0
_KEEPALIVE = b": keep-alive\n\n"


@dataclass(frozen=True)
class MockConfig:
    """Server-wide defaults; a request's `mock` options override the per-request ones."""

    latency: float = 0.0
    chunks: int = 8
    chunk_interval: float = 0.0
    fault_rate: float = 0.0
    random_faults: tuple[str, ...] = RANDOM_FAULTS
    stall_seconds: float = 3600.0
    api_key: str | None = None
    seed: int | None = None
    record: bool = True
    # An organisation-wide rate-limit budget (off by default).
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self) -> None:
        if unknown := set(self.random_faults) - FAULTS:
            raise ValueError(f"unknown mock faults: {sorted(unknown)}")
        if not 0.0 <= self.fault_rate <= 1.0 or self.chunks < 1:
            raise ValueError("fault_rate must be within [0, 1] and chunks at least 1")


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    query: dict[str, str] = field(default_factory=dict)
    peer: str = ""  # the client's address and port: one per connection it used


@dataclass
class MockStats:
    total: int = 0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "faults": dict(self.faults)}


class MockUpstream:
    """An aiohttp server imitating `POST /v1/chat/completions` and `POST /v1/embeddings`
    (:mod:`worker.mock.embeddings`: deterministic vectors).

    Per-request control comes from the body field `mock` or the `X-Mock` header (JSON; body
    keys win): `fault`, `times`, `key`, `retry_after`, `retry_after_ms`, `retry_after_date`,
    `latency`, `chunks`, `chunk_interval`, `after_chunks`, `stall`, `reasoning`,
    `reasoning_field`, `tool_calls`, `content`, `refusal` (the model refuses with this
    text), `usage_choices` (false: the usage chunk has no `choices` key). The request's own
    `logprobs` and `modalities: ["audio", ...]` are honoured (logprobs per piece; the text
    as audio with its transcript). `after_chunks` counts every `data:` chunk,
    the opening role chunk included, and defaults to `chunks // 2`. A fault drawn at random
    (`MockConfig.fault_rate`) ignores `times`, and its stall lasts `min(stall_seconds, 5)`
    seconds unless the request sets `stall`. Embeddings calls take the same faults as a
    non-streamed chat call (`error_event` is a 500 there; the stream-only faults do nothing),
    and `latency`.
    """

    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config or MockConfig()
        self.requests: collections.deque[RecordedRequest] = collections.deque(maxlen=10_000)
        self.stats = MockStats()
        self._auth = None if self.config.api_key is None else f"Bearer {self.config.api_key}"
        self._rng = random.Random(self.config.seed)
        self.budget = OrgBudget(self.config.budget) if self.config.budget.enabled else None
        self._times: dict[str, int] = {}
        self._counter = 0
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("MockUpstream is not started")
        return self._base_url

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/chat/completions", self._chat)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/embeddings", self._embeddings)
        app.router.add_post("/openai/deployments/{deployment}/embeddings", self._embeddings)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/mock/stats", self._stats)
        app.router.add_post("/mock/reset", self._reset)
        app.router.add_get("/mock/requests", self._recorded)
        return app

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Serve on ``host:port`` (0: a free port), over TLS with ``ssl_context``; returns
        the base URL (``http(s)://host:port/v1``)."""
        # Cancelling handlers on disconnect keeps stalled requests from outliving their client.
        runner = web.AppRunner(
            self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        self._runner = runner
        bound = runner.addresses[0][1]
        scheme = "https" if ssl_context is not None else "http"
        self._base_url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{bound}/v1"
        return self._base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._base_url = None

    async def __aenter__(self) -> MockUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def reset(self) -> None:
        self.requests.clear()
        self.stats.total = 0
        self.stats.faults.clear()
        self._times.clear()
        self._rng = random.Random(self.config.seed)

    async def _healthz(self, _: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _stats(self, _: web.Request) -> web.Response:
        return _json(self.stats.as_dict())

    async def _reset(self, _: web.Request) -> web.Response:
        self.reset()
        return _json({"status": "ok"})

    async def _recorded(self, _: web.Request) -> web.Response:
        return _json(
            [
                {
                    "path": r.path,
                    "query": r.query,
                    "headers": r.headers,
                    "body": r.body,
                    "peer": r.peer,
                }
                for r in self.requests
            ]
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._plan)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._embeddings_plan)

    async def _serve(
        self, request: web.Request, planner: Callable[[dict[str, Any], dict[str, Any]], Plan]
    ) -> web.StreamResponse:
        self._counter += 1
        self.stats.total += 1
        headers = {"x-request-id": f"req_{self._counter}"}
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return error_response(
                400, "Request body must be a JSON object", "invalid_json", None, headers
            )
        if self.config.record:
            lowered = {k.lower(): v for k, v in request.headers.items()}
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self.requests.append(
                RecordedRequest(
                    request.path,
                    lowered,
                    body,
                    dict(request.query),
                    f"{peer[0]}:{peer[1]}" if peer else "",
                )
            )
        # The key as a bearer token (OpenAI) or in an `api-key` header (Azure OpenAI).
        if self._auth is not None and (
            request.headers.get("Authorization") != self._auth
            and request.headers.get("api-key") != self.config.api_key
        ):
            return error_response(
                401, "Incorrect API key provided", "invalid_api_key", None, headers
            )
        try:
            opts = self._options(request, body)
            plan = planner(body, opts)
        except (BadRequest, AttributeError, KeyError, TypeError, ValueError) as exc:
            code, param = (exc.code, exc.param) if isinstance(exc, BadRequest) else ("mock", "mock")
            return error_response(400, str(exc), code, param, headers)
        if plan.fault is not None:
            self.stats.faults[plan.fault] += 1
        if self.budget is None:
            return await self._answer(request, body, plan, opts, headers)
        verdict = self.budget.admit(body)
        headers.update(verdict.headers)
        if verdict.refused is not None:
            self.stats.faults["rate_limit"] += 1
            return error_response(
                429, verdict.message, "rate_limit_exceeded", None, headers, verdict.refused
            )
        try:
            return await self._answer(request, body, plan, opts, headers)
        finally:
            self.budget.done()

    async def _answer(
        self,
        request: web.Request,
        body: dict[str, Any],
        plan: Plan,
        opts: dict[str, Any],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        stream = body.get("stream") is True and plan.embeddings is None
        if plan.fault == QUOTA_FAULT:
            message = "You exceeded your current quota, please check your plan and billing."
            return error_response(429, message, QUOTA_FAULT, None, headers, QUOTA_FAULT)
        if plan.fault in STATUS_FAULTS or (plan.fault == "error_event" and not stream):
            return await status_fault(plan, opts, headers)
        if plan.fault == "error_body":
            error = {"message": "Mock fault error_body", "type": "server_error", "code": None}
            return web.json_response({"error": error}, headers=headers)
        if plan.embeddings is not None:
            return await _send(request, headers, plan, plan.embeddings)
        base = {
            "id": f"chatcmpl-mock{self._counter}",
            "object": "chat.completion.chunk" if stream else "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_mock",
        }
        if stream:
            stream_options = body.get("stream_options")
            if isinstance(stream_options, dict) and stream_options.get("include_usage"):
                base["usage"] = None
            return await _stream(request, headers, plan, base)
        return await _send(request, headers, plan, reply_body(plan, base))

    def _options(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise BadRequest("Missing required parameter: 'model'", "missing_parameter", "model")
        opts: dict[str, Any] = {}
        if raw := request.headers.get("X-Mock"):
            opts.update(orjson.loads(raw))
        if isinstance(body.get("mock"), dict):
            opts.update(body["mock"])
        return opts

    def _plan(self, body: dict[str, Any], opts: dict[str, Any]) -> Plan:
        if not isinstance(body.get("messages"), list):
            raise BadRequest("'messages' must be a list", "missing_parameter", "messages")
        cfg = self.config
        key = hashlib.blake2b(orjson.dumps(body["messages"], option=orjson.OPT_SORT_KEYS))
        digest = key.digest()
        fault, stall = self._fault(opts, digest)
        chunks = max(1, int(opts.get("chunks", cfg.chunks)))
        choices, reasoning, usage = compose(body, opts, digest, chunks)
        if "cached_tokens" in opts:  # a prompt-cache hit upstream, for pricing tests
            cached = min(int(opts["cached_tokens"]), usage["prompt_tokens"])
            usage["prompt_tokens_details"]["cached_tokens"] = cached
        return Plan(
            fault=fault,
            stall=stall,
            latency=float(opts.get("latency", cfg.latency)),
            chunks=chunks,
            after=max(0, int(opts.get("after_chunks", chunks // 2))),
            interval=float(opts.get("chunk_interval", cfg.chunk_interval)),
            reasoning_field=str(opts.get("reasoning_field", "reasoning_content")),
            reasoning=reasoning,
            choices=choices,
            usage=usage,
            logprobs=body.get("logprobs") is True,
            audio=isinstance(body.get("modalities"), list) and "audio" in body["modalities"],
            usage_choices=bool(opts.get("usage_choices", True)),
        )

    def _embeddings_plan(self, body: dict[str, Any], opts: dict[str, Any]) -> Plan:
        if (problem := embeddings.problem(body)) is not None:
            raise BadRequest(problem[0], "invalid_value", problem[1])
        digest = hashlib.blake2b(orjson.dumps(body["input"])).digest()
        fault, stall = self._fault(opts, digest)
        reply = embeddings.embeddings_reply(body)
        latency = float(opts.get("latency", self.config.latency))
        return Plan(fault, stall, latency, usage=reply["usage"], embeddings=reply)

    def _fault(self, opts: dict[str, Any], digest: bytes) -> tuple[str | None, float]:
        """The request's fault (its own, or one drawn at random) and how long a stall lasts."""
        cfg = self.config
        stall = float(opts.get("stall", cfg.stall_seconds))
        fault = None if opts.get("fault") is None else str(opts["fault"])
        if fault is not None:
            if fault not in FAULTS:
                raise BadRequest(f"Unknown mock fault {fault!r}", "unknown_fault")
            if "times" in opts:
                counter = str(opts.get("key", digest.hex()))
                seen = self._times[counter] = self._times.get(counter, 0) + 1
                if seen > int(opts["times"]):
                    fault = None
        elif cfg.fault_rate and self._rng.random() < cfg.fault_rate:
            fault = self._rng.choice(cfg.random_faults)
            stall = float(opts.get("stall", min(cfg.stall_seconds, _RANDOM_STALL_CAP)))
        return fault, stall


def serve(
    config: MockConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    ssl_context: ssl.SSLContext | None = None,
    *,
    sock: socket.socket | None = None,
) -> None:
    """Blocking: run the server until SIGINT/SIGTERM (the `chat-worker mock-upstream` command),
    over TLS with ``ssl_context``; on ``sock`` (bound already) rather than ``host:port``
    when given."""
    loop: asyncio.AbstractEventLoop | None = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        pass
    app = MockUpstream(config).app()
    # The CLI announces the address itself, so aiohttp's banner is silenced.
    web.run_app(
        app,
        host=None if sock else host,
        port=None if sock else port,
        sock=sock,
        ssl_context=ssl_context,
        access_log=None,
        handler_cancellation=True,
        loop=loop,
        print=None,
    )


async def _send(
    request: web.Request, headers: dict[str, str], plan: Plan, reply: dict[str, Any]
) -> web.StreamResponse:
    """A non-streamed answer, after the plan's latency and through its fault."""
    if plan.latency > 0:
        await asyncio.sleep(plan.latency)
    if plan.fault == "disconnect":
        if request.transport is not None:
            request.transport.abort()
        return web.Response()  # never sent: the connection is already gone
    if plan.fault == "stall":
        await asyncio.sleep(plan.stall)
    elif plan.fault == "malformed":
        return web.Response(body=MALFORMED, content_type="application/json", headers=headers)
    return web.Response(body=orjson.dumps(reply), content_type="application/json", headers=headers)


async def _stream(
    request: web.Request, headers: dict[str, str], plan: Plan, base: dict[str, Any]
) -> web.StreamResponse:
    events = stream_events(plan, base)

    response = web.StreamResponse(headers={**headers, "Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    await response.write(_KEEPALIVE)
    if plan.latency > 0:
        await asyncio.sleep(plan.latency)
    for i, data in enumerate(events):
        if i == plan.after and await interrupt(request, response, plan):
            return response
        if i and plan.interval > 0:
            await _pause(response, plan.interval)
        await response.write(data)
    if plan.after >= len(events) and await interrupt(request, response, plan):
        return response
    if plan.fault not in ("no_done", "truncated"):
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _pause(response: web.StreamResponse, seconds: float) -> None:
    while seconds > _KEEPALIVE_EVERY:
        await asyncio.sleep(_KEEPALIVE_EVERY)
        await response.write(_KEEPALIVE)
        seconds -= _KEEPALIVE_EVERY
    await asyncio.sleep(seconds)


def _json(value: Any) -> web.Response:
    return web.Response(body=orjson.dumps(value), content_type="application/json")
