"""``chat-worker upstreams check``: one tiny call to each upstream before a rollout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import orjson

from worker.errors import JobError
from worker.messages import Endpoint
from worker.settings import UpstreamSpec
from worker.upstream.pool import Member, UpstreamPool

__all__ = ["CheckRow", "check_upstreams"]

PING_CONTENT = "ping"


@dataclass(frozen=True, slots=True)
class CheckRow:
    """What ``chat-worker upstreams check`` learnt of one upstream (no key, no content)."""

    name: str
    models: list[str]
    model: str
    status: str
    ok: bool
    latency_ms: float | None = None


async def check_upstreams(
    specs: Sequence[UpstreamSpec],
    *,
    model: str | None = None,
    limit: float = 30.0,
    transport: Callable[[UpstreamSpec], httpx.AsyncBaseTransport | None] | None = None,
) -> list[CheckRow]:
    """One tiny request (``max_tokens: 1``) to each upstream, all at once, each bounded
    by ``limit`` seconds."""
    pool = UpstreamPool.from_specs(specs, max_connections=1, transport=transport)
    try:
        return list(await asyncio.gather(*(_check(m, model, limit) for m in pool.members)))
    finally:
        await pool.aclose()


async def _check(member: Member, model: str | None, limit: float) -> CheckRow:
    spec = member.spec
    models = spec.models + [m for m in spec.model_map if m not in spec.models]
    asked = model or next((m for m in models if m != "*"), None)
    if asked is None:
        return CheckRow(spec.name, models, "-", "serves any model: pass --model", ok=False)
    sent = spec.upstream_model(asked)
    # An upstream that serves embeddings only is asked for one embedding (contract §18).
    endpoint: Endpoint = "chat" if "chat" in spec.endpoints else "embeddings"
    ping = (
        {"model": sent, "messages": [{"role": "user", "content": PING_CONTENT}], "max_tokens": 1}
        if endpoint == "chat"
        else {"model": sent, "input": PING_CONTENT}
    )
    started = time.perf_counter()
    try:
        async with asyncio.timeout(limit):
            completion = await member.client.complete(orjson.dumps(ping), {}, endpoint=endpoint)
    except TimeoutError:
        status, ok = f"no answer within {limit:g}s", False
    except JobError as exc:
        # The code only: an upstream's message may quote part of the key.
        status = f"{exc.status_code or '-'} {exc.code.value}"
        ok = False
    else:
        status, ok = f"{completion.status_code} ok", True
    latency = round((time.perf_counter() - started) * 1000, 1)
    return CheckRow(spec.name, models, sent, status, ok, latency)
