"""The result store's cost on the hot path: the S1 job (zero-latency mock, concurrency 64)
with the store off, on, and on with the cache (every job a miss), in the same run.

- **off**: ``WORKER_RESULT_TTL=0`` and no ``WORKER_REDIS_URL``: no store, no cache;
- **store**: ``WORKER_REDIS_URL`` and ``WORKER_RESULT_TTL=86400`` (the default): a lease
  taken with the lookup (one Lua script), the result kept before it is published, the
  lease released: three Redis round trips a job;
- **store + cache**: the same with ``WORKER_CACHE=on``; every prompt is unique, so every
  job is a miss: one GET before the call and one SET of the answer after it, five round
  trips a job.

Every run has job ids (and prompts) of its own, so no run is answered from another's
results or cache, and its keys are counted (every job's result must be there) and deleted
afterwards. Reported: jobs/s and worker CPU per job; the Redis server's CPU per job beside
it (the Redis is shared, so that figure also holds other users' commands).

    python bench/store_overhead.py --jobs 10000 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

import orjson
import psutil
from common import REDIS_URL, Proc, chat_worker, job_body, redis_answers, redis_keys, run_main
from measure import Run, Setup, measure, median_run, progress
from report import Row, Section, table, write_json

from worker.store import cache_key

TARGET_STORE_VS_OFF = 0.85
CONTENDERS = ("store-off", "store-on", "store-cache")


def _redis_server() -> psutil.Process | None:
    """The local redis-server process, to read its CPU time (None if not found or remote)."""
    if "127.0.0.1" not in REDIS_URL and "localhost" not in REDIS_URL:
        return None
    for proc in psutil.process_iter(["name"]):
        if (proc.info["name"] or "").startswith("redis-server"):
            return proc
    return None


class _RedisCpu:
    """The redis-server's CPU seconds between the first consume and the last result."""

    def __init__(self) -> None:
        self.server = _redis_server()
        self.seconds = 0.0

    def _now(self) -> float:
        if self.server is None:
            return 0.0
        try:
            times = self.server.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def hook(self, _: list[Proc]) -> Callable[[], None]:
        start = self._now()

        def finish() -> None:
            self.seconds = self._now() - start

        return finish


def _spawn(label: str) -> Any:
    if label == "store-off":
        return chat_worker(64, WORKER_RESULT_TTL="0")
    env = {"WORKER_REDIS_URL": REDIS_URL, "WORKER_RESULT_TTL": "86400"}
    if label == "store-cache":
        env["WORKER_CACHE"] = "on"
    return chat_worker(64, **env)


async def _keys_of(run: Run, label: str) -> dict[str, int]:
    """Count the run's keys in Redis (the store must have kept every result), then delete
    them: results and leases by the run's job ids, cache entries by their bodies' keys."""
    found = {"results": 0, "cache": 0}
    if label == "store-off":
        return found
    found["results"] = await redis_keys(f"cw:result:{{{run.prefix}-j*}}")
    await redis_keys(f"cw:*:{{{run.prefix}-j*}}", delete=True)
    if label == "store-cache":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [
                f"cw:cache:{cache_key(None, orjson.loads(job_body(f'{run.prefix}-j{i}'))['body'])}"
                for i in range(run.jobs)
            ]
            for start in range(0, len(keys), 1000):
                chunk = keys[start : start + 1000]
                found["cache"] += int(await client.exists(*chunk))
                await client.delete(*chunk)
        finally:
            await client.aclose()
    return found


async def run_store(jobs: int, repeat: int = 1, timeout: float = 300.0) -> Section:
    """The three contenders, ``repeat`` times each in rotated order; the median run of each."""
    if not await redis_answers():
        raise RuntimeError(f"the store scenario needs a Redis at {REDIS_URL} (BENCH_REDIS_URL)")
    runs: dict[str, list[Run]] = {label: [] for label in CONTENDERS}
    redis_cpu: dict[str, list[float]] = {label: [] for label in CONTENDERS}
    keys: dict[str, list[dict[str, int]]] = {label: [] for label in CONTENDERS}
    for round_ in range(repeat):
        shift = round_ % len(CONTENDERS)
        for label in [*CONTENDERS[shift:], *CONTENDERS[:shift]]:
            setup = Setup(label, jobs, timeout=timeout, unique_ids=True)
            redis = _RedisCpu()
            run, _, _ = await measure(setup, _spawn(label), on_started=redis.hook)
            progress(run)
            found = await _keys_of(run, label)
            if label != "store-off" and found["results"] < run.completed:
                print(
                    f"  {label}: only {found['results']} of {run.completed} results were in "
                    "Redis: the store was not on for every job",
                    file=sys.stderr,
                )
            runs[label].append(run)
            redis_cpu[label].append(1e6 * redis.seconds / run.completed if run.completed else 0.0)
            keys[label].append(found)
    off, store, cache = (median_run(runs[label]) for label in CONTENDERS)
    # CPU per job moves less than the wall clock on a shared machine: the median over the
    # runs of each contender, and off / on as the rate a CPU-bound worker would keep.
    cpu = {label: statistics.median(r.cpu_us_per_job for r in runs[label]) for label in runs}
    redis_us = {label: statistics.median(redis_cpu[label]) for label in redis_cpu}
    rows = [
        Row(
            "store off (WORKER_RESULT_TTL=0, no Redis)", off.rate, cpu_us_per_job=off.cpu_us_per_job
        ),
        Row(
            "store on (2 Redis round trips a job) vs off",
            store.rate,
            baseline=off.rate,
            baseline_label="off",
            target=TARGET_STORE_VS_OFF,
            cpu_us_per_job=store.cpu_us_per_job,
        ),
        Row(
            "store + cache on, all misses (5 round trips) vs off",
            cache.rate,
            baseline=off.rate,
            baseline_label="off",
            cpu_us_per_job=cache.cpu_us_per_job,
        ),
        Row(
            "store on vs off by worker CPU/job (on / off, medians)",
            cpu["store-on"],
            unit="us",
            baseline=cpu["store-off"],
            baseline_label="off",
        ),
        Row(
            "store + cache vs off by worker CPU/job (medians)",
            cpu["store-cache"],
            unit="us",
            baseline=cpu["store-off"],
            baseline_label="off",
        ),
        Row(
            "store on: jobs/s a CPU-bound worker keeps (off / on CPU)",
            cpu["store-off"] / cpu["store-on"] if cpu["store-on"] else 0.0,
            unit="x",
            target=TARGET_STORE_VS_OFF,
        ),
        Row("store on: worker CPU added per job", cpu["store-on"] - cpu["store-off"], unit="us"),
        Row(
            "store + cache: worker CPU added per job",
            cpu["store-cache"] - cpu["store-off"],
            unit="us",
        ),
        Row("store on: redis-server CPU per job (shared Redis)", redis_us["store-on"], unit="us"),
        Row(
            "store + cache: redis-server CPU per job (shared Redis)",
            redis_us["store-cache"],
            unit="us",
        ),
    ]
    data = {
        "jobs": jobs,
        "repeat": repeat,
        "runs": runs,
        "redis_cpu_us_per_job": redis_cpu,
        "keys": keys,
        "ratio_store": store.rate / off.rate if off.rate else None,
        "ratio_cache": cache.rate / off.rate if off.rate else None,
        "cpu_us_per_job_median": cpu,
        "redis_cpu_us_per_job_median": redis_us,
    }
    return Section("store", rows, data)


async def main(args: argparse.Namespace) -> None:
    section = await run_store(args.jobs, args.repeat, args.timeout)
    print(table(section.rows))
    print(write_json("store_overhead", {"args": vars(args), "section": section.__dict__}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    run_main(main(parser.parse_args()))
