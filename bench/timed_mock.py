"""The bundled mock upstream, plus a record of when it sent each job's first content chunk.

S3 measures the time a worker adds before the first delta: its arrival at the consumer
minus the moment the mock wrote the first content chunk. The mock is ``worker.mock.upstream``
unchanged; this wrapper only

- reads the job id from the prompt (``common.job_body`` puts it there) in a middleware, and
- wraps the module's ``_pause`` (the sleep before every chunk after the opening role chunk):
  the first pause of a request ends right before its first content chunk is written, as
  long as the reply has no reasoning and one choice (true of the benchmark's jobs).

``GET /bench/first-content`` answers ``{job id: epoch seconds}``. Same options as
``chat-worker mock-upstream``.
"""

from __future__ import annotations

import argparse
import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from common import job_id_of_prompt

import worker.mock.upstream as mock_upstream
from worker.mock.upstream import MockConfig, MockUpstream

_job: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("bench_job", default=None)
first_content: dict[str, float] = {}
_pause = mock_upstream._pause


async def _timed_pause(response: web.StreamResponse, seconds: float) -> None:
    await _pause(response, seconds)
    slot = _job.get()
    if slot is not None and len(slot) == 1:
        slot.append(time.time())
        first_content[slot[0]] = slot[1]


@web.middleware
async def _tag_job(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.method == "POST":
        try:
            job = job_id_of_prompt(orjson.loads(await request.read()))
        except orjson.JSONDecodeError:
            job = None
        if job is not None:
            _job.set([job])
    return await handler(request)


async def _first_content(_: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(first_content), content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-interval", type=float, default=0.0)
    args = parser.parse_args()
    if args.chunk_interval <= 0:
        parser.error("--chunk-interval must be > 0: the first pause marks the first content")
    mock_upstream._pause = _timed_pause  # type: ignore[assignment]
    config = MockConfig(
        latency=args.latency, chunks=args.chunks, chunk_interval=args.chunk_interval
    )
    app = MockUpstream(config).app()
    app.middlewares.append(_tag_job)
    app.router.add_get("/bench/first-content", _first_content)
    import uvloop

    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        handler_cancellation=True,
        loop=uvloop.new_event_loop(),
        print=None,
    )


if __name__ == "__main__":
    main()
