"""``chat-worker upstreams check``: one tiny call to each upstream before a rollout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import httpx
import orjson

from worker.errors import JobError
from worker.messages import Endpoint
from worker.upstream.pool import Member, UpstreamPool
from worker.upstreams_file import UpstreamSpec

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
    allowed_models: Collection[str] = (),
) -> list[CheckRow]:
    """One tiny request (``max_tokens: 1``) to each upstream, all at once, each bounded
    by ``limit`` seconds.

    The model asked for: ``model``, else the upstream's first named model; one that
    serves any (``"*"``, the single URL of ``WORKER_UPSTREAM_BASE_URL``) is asked for its
    ``{base}/models`` (the first one ``allowed_models`` allows, else the first), else the
    first of ``allowed_models`` (``WORKER_ALLOWED_MODELS``) is sent."""
    pool = UpstreamPool.from_specs(specs, max_connections=1, transport=transport)
    allowed = sorted(allowed_models)
    try:
        return list(await asyncio.gather(*(_check(m, model, limit, allowed) for m in pool.members)))
    finally:
        await pool.aclose()


async def _any_model(member: Member, limit: float, allowed: list[str]) -> tuple[str | None, str]:
    """A model for an upstream that serves any: from its list, else the allow-list; or
    None and what to pass instead."""
    problem = "names no model"
    try:
        async with asyncio.timeout(limit):
            listed = await member.client.list_models()
    except TimeoutError:
        listed, problem = [], f"gave no answer within {limit:g}s"
    except JobError as exc:
        listed, problem = [], f"answered {exc.cause or exc.code.value}"
    if listed:
        return next((m for m in listed if m in allowed), listed[0]), ""
    if allowed:
        return allowed[0], ""
    where = f"{member.spec.base_url}/models"
    return None, f"serves any model and {where} {problem}: pass --model MODEL"


async def _check(member: Member, model: str | None, limit: float, allowed: list[str]) -> CheckRow:
    spec = member.spec
    models = spec.models + [m for m in spec.model_map if m not in spec.models]
    asked = model or next((m for m in models if m != "*"), None)
    if asked is None:
        asked, problem = await _any_model(member, limit, allowed)
        if asked is None:
            return CheckRow(spec.name, models, "-", problem, ok=False)
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
        # The code and the worker's own words for the cause only: an upstream's message
        # may quote part of the key.
        status = f"{exc.status_code or '-'} {exc.code.value}"
        if exc.status_code is None and exc.cause:
            status += f": {exc.cause}"
        ok = False
    else:
        status, ok = f"{completion.status_code} ok", True
    latency = round((time.perf_counter() - started) * 1000, 1)
    return CheckRow(spec.name, models, sent, status, ok, latency)
