"""A cache hit's publish → result latency at low load, against the worker's own share of the
latency today plus one Redis round trip, all measured in the same run.

One job at a time, the contenders taking turns sample by sample (as ``added_latency.py``):

- **direct**: this process POSTs a body straight to the mock (bare aiohttp);
- **Redis GET**: this process GETs the cached answer's key (``redis.asyncio``, the worker's
  client): one round trip to the Redis;
- **bare loop**: ``raw_loop.py --mode echo`` (consume, publish a fixed reply, ack);
- **worker**: ``chat-worker run`` as the ``latency`` scenario runs it (no Redis): its own
  share is ``worker - bare loop - direct``;
- **hit, store on**: ``WORKER_REDIS_URL``, ``WORKER_CACHE=on`` and the result store on (the
  default ``WORKER_RESULT_TTL``), every job the same body under a new job id: before its
  result is published a hit takes the job id's lease (with the lookup, one script), GETs
  the answer and keeps the result (three round trips; the lease is released after);
- **hit, store off**: the same with ``WORKER_RESULT_TTL=0``: the GET alone.

A hit makes no upstream call, so its own share is ``hit - bare loop``. The target: that
share ≤ the worker's own share + one Redis GET round trip (p50s of the same run; and the
same per round, paired as in ``added_latency.py``).

    python bench/cache_latency.py --samples 300
"""

from __future__ import annotations

import argparse
import contextlib
import time
import uuid
from typing import Any

import aio_pika
import aiohttp
import orjson
import redis.asyncio as aioredis
from added_latency import _Path, _stats
from baseline_raw import raw_loop
from common import (
    AMQP_URL,
    MODEL,
    REDIS_URL,
    MockArgs,
    chat_worker,
    job_body,
    percentile,
    redis_answers,
    redis_keys,
    run_main,
    start_mock,
)
from measure import _drop_logs, log_dir_for
from report import Row, Section, table, write_json

from worker.store import cache_key

TARGET_RATIO = 1.0  # hit's own share / (worker's own share + Redis GET), at most


def _hit_body(tag: str) -> tuple[bytes, str]:
    """The one request line every hit job sends, and its cache key in Redis."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"cache {tag}: say hello"}]}
    line = orjson.dumps(
        {"custom_id": "hit", "method": "POST", "url": "/v1/chat/completions", "body": body}
    )
    return line, f"cw:cache:{cache_key(None, body)}"


async def run_cache_latency(samples: int = 300, warmup: int = 30) -> Section:
    if not await redis_answers():
        raise RuntimeError(f"the cache scenario needs a Redis at {REDIS_URL} (BENCH_REDIS_URL)")
    tag = uuid.uuid4().hex[:8]
    line, key = _hit_body(tag)
    log_dir = log_dir_for("cache-mock")
    mock, upstream = await start_mock(MockArgs(), log_dir)
    direct: list[float] = []
    rtt: list[float] = []
    failed = False
    redis_env = {"WORKER_REDIS_URL": REDIS_URL, "WORKER_CACHE": "on"}
    client = aioredis.Redis.from_url(REDIS_URL)
    paths: list[_Path] = []
    try:
        connection = await aio_pika.connect(AMQP_URL)
        paths = [
            _Path(connection, "cache-bare", raw_loop(mode="echo")),
            _Path(connection, "cache-worker", chat_worker(64)),
            _Path(connection, "cache-hit-store", chat_worker(64, **redis_env), body=line),
            _Path(
                connection,
                "cache-hit-nostore",
                chat_worker(64, WORKER_RESULT_TTL="0", **redis_env),
                body=line,
            ),
        ]
        try:
            for path in paths:
                await path.start(upstream)
            url = f"{upstream}/chat/completions"
            body = orjson.dumps(orjson.loads(job_body("direct"))["body"])
            async with aiohttp.ClientSession() as session:
                for i in range(warmup + samples):
                    keep = i >= warmup
                    started = time.perf_counter()
                    async with session.post(
                        url, data=body, headers={"content-type": "application/json"}
                    ) as response:
                        await response.read()
                    if keep:
                        direct.append(1000 * (time.perf_counter() - started))
                    started = time.perf_counter()
                    await client.get(key)  # the first rounds' GET may miss: untimed warm-up
                    if keep:
                        rtt.append(1000 * (time.perf_counter() - started))
                    for path in paths:
                        await path.sample(keep=keep)
        except BaseException:
            failed = True
            raise
        finally:
            for path in paths:
                await path.stop(failed)
            await connection.close()
    finally:
        mock.stop()
        _drop_logs(log_dir, keep=failed)
        with contextlib.suppress(Exception):
            await client.delete(key)
            for path in paths[2:]:
                await redis_keys(f"cw:*:{{{path.names.prefix}-*}}", delete=True)
        await client.aclose()
    bare, worker, hit, hit_nostore = (path.samples for path in paths)
    parts: dict[str, Any] = {
        "direct": _stats(direct),
        "redis_get": _stats(rtt),
        "bare": _stats(bare),
        "worker": _stats(worker),
        "hit_store": _stats(hit),
        "hit_nostore": _stats(hit_nostore),
    }
    p50 = {name: part["p50"] for name, part in parts.items()}
    p99 = {name: part["p99"] for name, part in parts.items()}
    share = p50["worker"] - p50["bare"] - p50["direct"]
    bound = share + p50["redis_get"]
    hit_share = p50["hit_store"] - p50["bare"]
    nostore_share = p50["hit_nostore"] - p50["bare"]
    # Per round: hit - bare - (worker - bare - direct + GET) = hit - worker + direct - GET.
    rounds = list(zip(hit, hit_nostore, worker, direct, rtt, strict=True))
    paired = percentile([h - w + d - g for h, _, w, d, g in rounds], 50)
    paired_nostore = percentile([n - w + d - g for _, n, w, d, g in rounds], 50)
    rows = [
        Row("cache: Redis GET round trip p50", p50["redis_get"], unit="ms"),
        Row("cache: Redis GET round trip p99", p99["redis_get"], unit="ms"),
        Row("cache: direct HTTP call p50", p50["direct"], unit="ms"),
        Row("cache: bare broker loop p50", p50["bare"], unit="ms"),
        Row("cache: worker path (no Redis) p50", p50["worker"], unit="ms"),
        Row("cache: worker path (no Redis) p99", p99["worker"], unit="ms"),
        Row("cache: worker's own share p50 (worker - bare - direct)", share, unit="ms"),
        Row("cache: hit, store on, publish -> result p50", p50["hit_store"], unit="ms"),
        Row("cache: hit, store on, publish -> result p99", p99["hit_store"], unit="ms"),
        Row("cache: hit, store off, publish -> result p50", p50["hit_nostore"], unit="ms"),
        Row("cache: hit, store off, publish -> result p99", p99["hit_nostore"], unit="ms"),
        Row(
            "cache: hit's own share p50 (hit - bare), store on",
            hit_share,
            unit="ms",
            baseline=bound,
            baseline_label="share+GET",
            target=TARGET_RATIO,
            upper=True,
        ),
        Row(
            "cache: hit's own share p50, store off",
            nostore_share,
            unit="ms",
            baseline=bound,
            baseline_label="share+GET",
            target=TARGET_RATIO,
            upper=True,
        ),
        Row(
            "cache: hit share - (share + GET), per round p50, store on",
            paired,
            unit="ms",
            target=0.0,
            upper=True,
        ),
        Row(
            "cache: hit share - (share + GET), per round p50, store off",
            paired_nostore,
            unit="ms",
            target=0.0,
            upper=True,
        ),
    ]
    data = {
        "samples": samples,
        "warmup": warmup,
        **parts,
        "share_p50_ms": share,
        "bound_p50_ms": bound,
        "hit_share_p50_ms": hit_share,
        "hit_nostore_share_p50_ms": nostore_share,
        "paired_excess_p50_ms": paired,
        "paired_excess_nostore_p50_ms": paired_nostore,
        "cache_seen": {path.label: dict(path.cache) for path in paths[2:]},
    }
    for path in paths[2:]:
        if path.cache.get("hit", 0) != len(path.samples):
            print(f"  {path.label}: not every kept sample was a hit: {dict(path.cache)}")
    return Section("cache", rows, data)


async def main(args: argparse.Namespace) -> None:
    section = await run_cache_latency(args.samples, args.warmup)
    print(table(section.rows))
    print("metadata.cache of the kept samples:", section.data["cache_seen"])
    print(write_json("cache_latency", {"args": vars(args), "section": section.__dict__}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    run_main(main(parser.parse_args()))
