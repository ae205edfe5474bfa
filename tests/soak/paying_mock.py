"""The bundled mock upstream, plus a record of the complete answers it sent for each job.

The soak counts what each job was paid for: an answer the provider finished sending is
billed, whatever the client did with it. The mock is ``worker.mock.upstream`` unchanged;
this wrapper only

- reads the job id from the prompt (``"<job id>: soak job"``, as ``soak.py`` writes it);
- wraps the module's ``_send`` and ``_stream`` to learn the fault the mock planned for
  the request (a complete answer is one planned without a fault, or with a stall that the
  client waited out: a malformed body, an error event or a dropped connection is not);
- in a middleware, finishes sending a plain answer itself (``prepare`` and ``write_eof``,
  which aiohttp would do right after) so that the answer is counted only once it has been
  written out whole; a stream has been written out whole when ``_stream`` returns. A
  client gone before then cancels the handler (``handler_cancellation``) or fails the
  write, and nothing is counted.

``GET /soak/paid`` answers ``{"paid": {job id: [[epoch seconds, "host:port"], ...]},
"calls": {job id: requests}}``: when each complete 200 answer was finished, to which
client connection, and every request per job (faults included). Same options as
``chat-worker mock-upstream`` (the ones the soak uses).
"""

from __future__ import annotations

import argparse
import collections
import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

import worker.mock.upstream as mock_upstream
from worker.mock.upstream import MockConfig, MockUpstream

COMPLETE = (None, "stall")  # planned faults whose answer is still whole when it ends
_slot: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "soak_slot", default=None
)
paid: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
calls: collections.Counter[str] = collections.Counter()
_send, _stream = mock_upstream._send, mock_upstream._stream


def job_of(body: Any) -> str | None:
    """The job id of a soak prompt (``"<job id>: soak job"``)."""
    try:
        content = body["messages"][-1]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(content, str) or ": " not in content:
        return None
    return content.split(": ", 1)[0]


def _planned(plan: Any, *, stream: bool) -> None:
    slot = _slot.get()
    if slot is not None:
        slot["fault"], slot["answered"], slot["stream"] = plan.fault, True, stream


async def _send_noted(request: web.Request, headers: Any, plan: Any, reply: Any) -> Any:
    _planned(plan, stream=False)
    return await _send(request, headers, plan, reply)


async def _stream_noted(request: web.Request, headers: Any, plan: Any, base: Any) -> Any:
    _planned(plan, stream=True)
    return await _stream(request, headers, plan, base)


@web.middleware
async def _count(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.method != "POST":
        return await handler(request)
    try:
        job = job_of(orjson.loads(await request.read()))
    except orjson.JSONDecodeError:
        job = None
    slot: dict[str, Any] = {"answered": False}
    _slot.set(slot)
    response = await handler(request)
    if job is None:
        return response
    calls[job] += 1
    if not slot["answered"] or slot.get("fault") not in COMPLETE or response.status != 200:
        return response
    if not slot["stream"]:
        # What aiohttp does after the handler, done here to know it was done (idempotent).
        await response.prepare(request)
        await response.write_eof()
    peer = request.transport.get_extra_info("peername") if request.transport else None
    paid[job].append((time.time(), f"{peer[0]}:{peer[1]}" if peer else ""))
    return response


async def _paid(_: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps({"paid": paid, "calls": calls}), content_type="application/json"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-interval", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    mock_upstream._send = _send_noted  # type: ignore[assignment]
    mock_upstream._stream = _stream_noted  # type: ignore[assignment]
    config = MockConfig(
        latency=args.latency,
        chunks=args.chunks,
        chunk_interval=args.chunk_interval,
        fault_rate=args.fault_rate,
        seed=args.seed,
        record=False,  # the soak reads /soak/paid; a deque of every body is not needed
    )
    app = MockUpstream(config).app()
    app.middlewares.append(_count)
    app.router.add_get("/soak/paid", _paid)
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = None
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        handler_cancellation=True,
        loop=loop,
        print=None,
    )


if __name__ == "__main__":
    main()
