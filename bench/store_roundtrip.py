"""Time the result store's delivery path against a Redis: lookup, acquire, store, release.

    python bench/store_roundtrip.py [--url redis://127.0.0.1:6379/0] [--rounds 2000]

Prints the median and 99th percentile, in microseconds, of each step and of the whole
round (one job id per round, as one delivery would), then deletes its keys.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import redis

from worker.store import Acquired, Circuit, ResultStore
from worker.store.backends import RedisBackend

STEPS = ("lookup", "acquire", "store", "release", "round")


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _run(url: str, rounds: int, size: int) -> dict[str, list[float]]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    backend = RedisBackend(url)
    store = ResultStore(backend, Circuit(errors=backend.errors), prefix=prefix, ttl=60)
    body = b"x" * size
    times: dict[str, list[float]] = {step: [] for step in STEPS}
    clock = time.perf_counter
    try:
        for i in range(rounds + rounds // 10):  # the first tenth warms up, untimed
            job = f"job-{i}"
            t0 = clock()
            assert await store.lookup(job) is None
            t1 = clock()
            assert await store.acquire(job, "bench", 30) == Acquired()
            t2 = clock()
            assert await store.store(job, body)
            t3 = clock()
            assert await store.release(job, "bench")
            t4 = clock()
            if i >= rounds // 10:
                took = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)
                for step, seconds in zip(STEPS, took, strict=True):
                    times[step].append(seconds * 1e6)
    finally:
        await backend.aclose()
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        client.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2048, help="bytes of the stored result")
    args = parser.parse_args()
    times = asyncio.run(_run(args.url, args.rounds, args.size))
    print(f"{args.rounds} rounds, {args.size} B results, {args.url}")
    for step in STEPS:
        median = statistics.median(times[step])
        print(f"  {step:8} median {median:7.1f} µs   p99 {_percentile(times[step], 0.99):7.1f} µs")


if __name__ == "__main__":
    main()
