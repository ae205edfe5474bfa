"""The bundled OpenAI-compatible chat-completions (and embeddings) server, with per-request
fault injection."""

from __future__ import annotations

import asyncio
import base64
import collections
import email.utils
import hashlib
import http
import math
import random
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain, zip_longest
from typing import Any

import orjson
from aiohttp import web

from worker.mock import embeddings
from worker.mock.budget import BudgetConfig, OrgBudget

__all__ = ["MockConfig", "MockStats", "MockUpstream", "RecordedRequest", "serve"]

_STATUS_FAULTS = frozenset(
    ("400", "401", "403", "404", "408", "409", "422", "429", "500", "502", "503")
)
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_QUOTA_FAULT = "insufficient_quota"  # a 429 whose code says the account's credit is spent
_OTHER_FAULTS = (
    _QUOTA_FAULT,
    "stall",
    "malformed",
    "error_event",
    "disconnect",
    "no_done",
    "no_finish_reason",
    "truncated",  # a stream that ends cleanly with neither a finish_reason nor [DONE]
    "error_body",  # a 200 whose body is {"error": ...} without choices, as some proxies send
)
_FAULTS = _STATUS_FAULTS.union(_OTHER_FAULTS)
_RANDOM_FAULTS = ("429", "500", "503", "stall", "malformed", "error_event", "disconnect")
# A random stall must not pin a soak test's connections for the default hour.
_RANDOM_STALL_CAP = 5.0
_KEEPALIVE_EVERY = 5.0
_KEEPALIVE = b": keep-alive\n\n"
_MALFORMED = b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess'
_LEXICON = "alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike \
november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu amber"
_VOCAB = tuple(_LEXICON.split())
_SAMPLES: dict[str, Any] = {"integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
_UNITS = re.compile(r"\s*\S+\s*")


@dataclass(frozen=True)
class MockConfig:
    """Server-wide defaults; a request's `mock` options override the per-request ones."""

    latency: float = 0.0
    chunks: int = 8
    chunk_interval: float = 0.0
    fault_rate: float = 0.0
    random_faults: tuple[str, ...] = _RANDOM_FAULTS
    stall_seconds: float = 3600.0
    api_key: str | None = None
    seed: int | None = None
    record: bool = True
    # An organisation-wide rate-limit budget (off by default).
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self) -> None:
        if unknown := set(self.random_faults) - _FAULTS:
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


@dataclass(slots=True)
class _Choice:
    content: str | None
    tool_calls: list[tuple[str, str]]  # (function name, arguments)
    finish_reason: str | None
    refusal: str | None = None


@dataclass(slots=True)
class _Plan:
    fault: str | None
    stall: float
    latency: float
    chunks: int = 1
    after: int = 0
    interval: float = 0.0
    reasoning_field: str = "reasoning_content"
    reasoning: str | None = None
    choices: list[_Choice] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    embeddings: dict[str, Any] | None = None  # the whole answer of an embeddings call
    logprobs: bool = False  # the request's "logprobs": every content piece gets its entry
    audio: bool = False  # "audio" in the request's modalities: the text comes as audio
    usage_choices: bool = True  # False: the usage chunk has no "choices" key at all


class _BadRequest(Exception):
    def __init__(self, message: str, code: str, param: str | None = "mock") -> None:
        super().__init__(message)
        self.code, self.param = code, param


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
        self, request: web.Request, planner: Callable[[dict[str, Any], dict[str, Any]], _Plan]
    ) -> web.StreamResponse:
        self._counter += 1
        self.stats.total += 1
        headers = {"x-request-id": f"req_{self._counter}"}
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return _error(400, "Request body must be a JSON object", "invalid_json", None, headers)
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
            return _error(401, "Incorrect API key provided", "invalid_api_key", None, headers)
        try:
            opts = self._options(request, body)
            plan = planner(body, opts)
        except (_BadRequest, AttributeError, KeyError, TypeError, ValueError) as exc:
            code, param = (
                (exc.code, exc.param) if isinstance(exc, _BadRequest) else ("mock", "mock")
            )
            return _error(400, str(exc), code, param, headers)
        if plan.fault is not None:
            self.stats.faults[plan.fault] += 1
        if self.budget is None:
            return await self._answer(request, body, plan, opts, headers)
        verdict = self.budget.admit(body)
        headers.update(verdict.headers)
        if verdict.refused is not None:
            self.stats.faults["rate_limit"] += 1
            return _error(
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
        plan: _Plan,
        opts: dict[str, Any],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        stream = body.get("stream") is True and plan.embeddings is None
        if plan.fault == _QUOTA_FAULT:
            message = "You exceeded your current quota, please check your plan and billing."
            return _error(429, message, _QUOTA_FAULT, None, headers, _QUOTA_FAULT)
        if plan.fault in _STATUS_FAULTS or (plan.fault == "error_event" and not stream):
            return await _status_fault(plan, opts, headers)
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
        return await _reply(request, headers, plan, base)

    def _options(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise _BadRequest("Missing required parameter: 'model'", "missing_parameter", "model")
        opts: dict[str, Any] = {}
        if raw := request.headers.get("X-Mock"):
            opts.update(orjson.loads(raw))
        if isinstance(body.get("mock"), dict):
            opts.update(body["mock"])
        return opts

    def _plan(self, body: dict[str, Any], opts: dict[str, Any]) -> _Plan:
        if not isinstance(body.get("messages"), list):
            raise _BadRequest("'messages' must be a list", "missing_parameter", "messages")
        cfg = self.config
        key = hashlib.blake2b(orjson.dumps(body["messages"], option=orjson.OPT_SORT_KEYS))
        digest = key.digest()
        fault, stall = self._fault(opts, digest)
        chunks = max(1, int(opts.get("chunks", cfg.chunks)))
        choices, reasoning, usage = _compose(body, opts, digest, chunks)
        if "cached_tokens" in opts:  # a prompt-cache hit upstream, for pricing tests
            cached = min(int(opts["cached_tokens"]), usage["prompt_tokens"])
            usage["prompt_tokens_details"]["cached_tokens"] = cached
        return _Plan(
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

    def _embeddings_plan(self, body: dict[str, Any], opts: dict[str, Any]) -> _Plan:
        if (problem := embeddings.problem(body)) is not None:
            raise _BadRequest(problem[0], "invalid_value", problem[1])
        digest = hashlib.blake2b(orjson.dumps(body["input"])).digest()
        fault, stall = self._fault(opts, digest)
        reply = embeddings.embeddings_reply(body)
        latency = float(opts.get("latency", self.config.latency))
        return _Plan(fault, stall, latency, usage=reply["usage"], embeddings=reply)

    def _fault(self, opts: dict[str, Any], digest: bytes) -> tuple[str | None, float]:
        """The request's fault (its own, or one drawn at random) and how long a stall lasts."""
        cfg = self.config
        stall = float(opts.get("stall", cfg.stall_seconds))
        fault = None if opts.get("fault") is None else str(opts["fault"])
        if fault is not None:
            if fault not in _FAULTS:
                raise _BadRequest(f"Unknown mock fault {fault!r}", "unknown_fault")
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


async def _status_fault(plan: _Plan, opts: dict[str, Any], headers: dict[str, str]) -> web.Response:
    status = int(plan.fault) if plan.fault in _STATUS_FAULTS else 500
    if "retry_after" in opts or opts.get("retry_after_date"):
        secs = float(opts.get("retry_after", 1))
        headers["Retry-After"] = (
            email.utils.formatdate(time.time() + secs, usegmt=True)
            if opts.get("retry_after_date")
            else str(math.ceil(secs))
        )
    if "retry_after_ms" in opts:
        headers["retry-after-ms"] = str(int(opts["retry_after_ms"]))
    if plan.latency > 0:
        await asyncio.sleep(plan.latency)
    phrase = http.HTTPStatus(status).phrase
    kind = "server_error" if status >= 500 else _ERROR_TYPES.get(status, "invalid_request_error")
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    return _error(status, f"Mock fault {plan.fault}: {phrase}", code, None, headers, kind)


async def _reply(
    request: web.Request, headers: dict[str, str], plan: _Plan, base: dict[str, Any]
) -> web.StreamResponse:
    rows = []
    for index, choice in enumerate(plan.choices):
        message: dict[str, Any] = {"role": "assistant", "content": choice.content}
        if choice.refusal is not None:
            message["refusal"] = choice.refusal
        if plan.audio and choice.content is not None:
            message["content"] = None
            message["audio"] = _audio(index, choice.content)
        if plan.reasoning is not None:
            message[plan.reasoning_field] = plan.reasoning
        if choice.tool_calls:
            message["tool_calls"] = [
                {"id": f"call_{k}", "type": "function", "function": {"name": n, "arguments": a}}
                for k, (n, a) in enumerate(choice.tool_calls)
            ]
        finish = None if plan.fault == "no_finish_reason" else choice.finish_reason
        row = {"index": index, "message": message, "finish_reason": finish}
        if plan.logprobs:
            row["logprobs"] = {"content": [_logprob(choice.content or "")], "refusal": None}
        rows.append(row)
    return await _send(request, headers, plan, {**base, "choices": rows, "usage": plan.usage})


async def _send(
    request: web.Request, headers: dict[str, str], plan: _Plan, reply: dict[str, Any]
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
        return web.Response(body=_MALFORMED, content_type="application/json", headers=headers)
    return web.Response(body=orjson.dumps(reply), content_type="application/json", headers=headers)


async def _stream(
    request: web.Request, headers: dict[str, str], plan: _Plan, base: dict[str, Any]
) -> web.StreamResponse:
    def event(
        index: int,
        delta: dict[str, Any],
        finish: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> bytes:
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

    def text_event(index: int, text: str, field: str) -> bytes:
        if field == "audio":
            # As OpenAI streams audio: the id and expiry once, then data with its transcript.
            audio = _audio(index, text)
            if not first_audio[index]:
                audio = {"data": audio["data"], "transcript": text}
            first_audio[index] = False
            return event(index, {"audio": audio})
        if not plan.logprobs:
            return event(index, {field: text})
        entry = _logprob(text)
        key = "refusal" if field == "refusal" else "content"
        return event(
            index, {field: text}, logprobs={"content": None, "refusal": None, key: [entry]}
        )

    first_audio = [True] * len(plan.choices)
    lanes: list[list[bytes]] = []
    thoughts = _split(plan.reasoning or "", plan.chunks)
    truncated = plan.fault in ("no_finish_reason", "truncated")
    for index, choice in enumerate(plan.choices):
        if choice.refusal is not None:
            lane = [event(index, {"role": "assistant", "content": None, "refusal": ""})]
        elif choice.tool_calls or plan.audio:
            lane = [event(index, {"role": "assistant", "content": None})]
        else:
            lane = [event(index, {"role": "assistant", "content": ""})]
        lane += [event(index, {plan.reasoning_field: piece}) for piece in thoughts]
        field = "audio" if plan.audio else "content"
        lane += [text_event(index, p, field) for p in _split(choice.content or "", plan.chunks)]
        lane += [text_event(index, p, "refusal") for p in _split(choice.refusal or "", plan.chunks)]
        for k, (name, arguments) in enumerate(choice.tool_calls):
            head = {"name": name, "arguments": ""}
            fragments: list[dict[str, Any]] = [
                {"id": f"call_{k}", "type": "function", "function": head}
            ]
            fragments += [{"function": {"arguments": piece}} for piece in _split(arguments, 3)]
            lane += [event(index, {"tool_calls": [{"index": k, **f}]}) for f in fragments]
        if not truncated:
            lane.append(event(index, {}, choice.finish_reason))
        lanes.append(lane)
    # Choices interleave step by step, as real servers send them.
    events = [e for e in chain.from_iterable(zip_longest(*lanes)) if e is not None]
    if "usage" in base:
        last = {**base, "choices": [], "usage": plan.usage}
        if not plan.usage_choices:
            del last["choices"]
        events.append(b"data: " + orjson.dumps(last) + b"\n\n")

    response = web.StreamResponse(headers={**headers, "Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    await response.write(_KEEPALIVE)
    if plan.latency > 0:
        await asyncio.sleep(plan.latency)
    for i, data in enumerate(events):
        if i == plan.after and await _interrupt(request, response, plan):
            return response
        if i and plan.interval > 0:
            await _pause(response, plan.interval)
        await response.write(data)
    if plan.after >= len(events) and await _interrupt(request, response, plan):
        return response
    if plan.fault not in ("no_done", "truncated"):
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _interrupt(request: web.Request, response: web.StreamResponse, plan: _Plan) -> bool:
    """Apply a mid-stream fault; True when the stream ends here."""
    if plan.fault == "stall":
        await asyncio.sleep(plan.stall)
        return False
    if plan.fault == "disconnect":
        # close(), not abort(): the chunks already written must still reach the client.
        if request.transport is not None:
            request.transport.close()
        return True
    if plan.fault == "malformed":
        await response.write(b"data: " + _MALFORMED + b"\n\n")
    elif plan.fault == "error_event":
        error = {"message": "Mock fault error_event", "type": "server_error", "code": "mock_error"}
        await response.write(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
    else:
        return False
    await response.write_eof()
    return True


async def _pause(response: web.StreamResponse, seconds: float) -> None:
    while seconds > _KEEPALIVE_EVERY:
        await asyncio.sleep(_KEEPALIVE_EVERY)
        await response.write(_KEEPALIVE)
        seconds -= _KEEPALIVE_EVERY
    await asyncio.sleep(seconds)


def _compose(
    body: dict[str, Any], opts: dict[str, Any], digest: bytes, chunks: int
) -> tuple[list[_Choice], str | None, dict[str, Any]]:
    """Build the deterministic reply: the choices, the reasoning text and the usage."""
    messages: list[Any] = body["messages"]
    n = max(1, int(body.get("n") or 1))
    reasoning = None
    if body.get("reasoning_effort") or opts.get("reasoning"):
        reasoning = f"Thinking about {len(messages)} messages: " + _words(digest, 3, chunks)
    calls: list[tuple[str, str]] = []
    tools, tool_choice = body.get("tools"), body.get("tool_choice")
    functions = [t["function"] for t in tools if "function" in t] if isinstance(tools, list) else []
    if functions and tool_choice != "none":
        wanted = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
        function = next((f for f in functions if f.get("name") == wanted), functions[0])
        for k in range(int(opts.get("tool_calls", 1))):
            word = _VOCAB[(digest[k % len(digest)] + k) % len(_VOCAB)]
            calls.append((str(function["name"]), _arguments(function.get("parameters"), k, word)))
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    choices = []
    for index in range(n):
        if calls:
            choices.append(_Choice(None, calls, "tool_calls"))
            continue
        if "refusal" in opts:
            choices.append(_Choice(None, [], "stop", refusal=str(opts["refusal"])))
            continue
        if "content" in opts:
            content = str(opts["content"])
        else:
            content = f"Mock reply to {len(messages)} messages: " + _words(
                digest, 5 * index, chunks
            )
        words = content.split()
        if isinstance(limit, int) and 0 < limit < len(words):
            choices.append(_Choice(" ".join(words[:limit]), [], "length"))
        else:
            choices.append(_Choice(content, [], "stop"))
    prompt = max(1, sum(_content_words(m) for m in messages))
    thought = n * len(reasoning.split()) if reasoning else 0
    # Arguments have no spaces to count, so they are priced like a tokenizer would: ~4 chars each.
    text = sum(
        len((c.content or "").split()) + sum(len(a) // 4 for _, a in c.tool_calls) for c in choices
    )
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": text + thought,
        "total_tokens": prompt + text + thought,
        "prompt_tokens_details": {
            "cached_tokens": 0,
            "text_tokens": prompt,
            "audio_tokens": 0,
            "image_tokens": 0,
        },
        "completion_tokens_details": {
            "text_tokens": text,
            "audio_tokens": 0,
            "reasoning_tokens": thought,
        },
    }
    return choices, reasoning, usage


def _logprob(text: str) -> dict[str, Any]:
    return {"token": text, "logprob": -0.25, "bytes": list(text.encode()), "top_logprobs": []}


def _audio(index: int, transcript: str) -> dict[str, Any]:
    """An audio part: the transcript, and "audio" bytes standing for it (base64); its id
    depends on the text only, so that the same request gets the same answer."""
    digest = hashlib.blake2b(transcript.encode(), digest_size=6).hexdigest()
    return {
        "id": f"audio_{digest}_{index}",
        "data": base64.b64encode(transcript.encode()).decode(),
        "expires_at": 1_900_000_000,
        "transcript": transcript,
    }


def _words(digest: bytes, start: int, chunks: int) -> str:
    count = max(chunks, 12)
    picks = (_VOCAB[(digest[(start + i) % len(digest)] + i) % len(_VOCAB)] for i in range(count))
    return " ".join(picks)


def _arguments(parameters: Any, k: int, word: str) -> str:
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    if not isinstance(properties, dict) or not properties:
        return orjson.dumps({"call": k, "topic": word}).decode()
    args = {}
    for name, spec in properties.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        args[name] = _SAMPLES.get(kind, word) if isinstance(kind, str) else word
    return orjson.dumps(args).decode()


def _content_words(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        texts = (part.get("text") for part in content if isinstance(part, dict))
        return sum(len(text.split()) for text in texts if isinstance(text, str))
    return 0


def _split(text: str, parts: int) -> list[str]:
    """Split text into `parts` non-empty pieces (fewer when it is shorter), keeping words whole."""
    units: list[str] = _UNITS.findall(text)
    if len(units) < parts or "".join(units) != text:
        units = list(text)
    size, parts = len(units), min(parts, len(units))
    return ["".join(units[i * size // parts : (i + 1) * size // parts]) for i in range(parts)]


def _json(value: Any) -> web.Response:
    return web.Response(body=orjson.dumps(value), content_type="application/json")


def _error(
    status: int,
    message: str,
    code: str,
    param: str | None,
    headers: dict[str, str],
    kind: str = "invalid_request_error",
) -> web.Response:
    error = {"message": message, "type": kind, "code": code, "param": param}
    body = orjson.dumps({"error": error})
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)
