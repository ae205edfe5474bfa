"""S3 streaming: 200-chunk answers at 10 ms a chunk, deltas and results to a reply queue; the
worker beside the raw baseline (bare aiohttp + aiormq, ``raw_loop.py --mode stream``), at
several numbers of concurrent streams.

Measured per run: worker CPU per upstream chunk (the process's user + system time over the
run, divided by the data chunks it relayed: 200 content chunks plus the role, finish and
usage chunks of each job), messages that arrive per job (deltas + result), upstream
content chunks per published delta, resident memory per in-flight stream, and the time
added before the first delta: its arrival at the reply queue minus the moment the mock
wrote the first content chunk (``timed_mock.py``; both clocks are this machine's
``time.time()``). That span holds the read, parse and publish, and the broker's hop.

The targets hold at the issue's load: 128 jobs at 64 concurrent streams.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from baseline_raw import raw_loop
from common import MockArgs, WorkerFactory, chat_worker, percentile, run_main
from measure import Setup, idle_rss, measure, progress
from report import Row, Section, table, write_json

TARGET_CONCURRENCY = 64
TARGET_CPU_US_PER_CHUNK = 25.0
TARGET_CHUNKS_PER_DELTA = 4.0
TARGET_ADDED_P50_MS = 5.0
TARGET_ADDED_P99_MS = 20.0
TARGET_KIB_PER_STREAM = 64.0
LEVELS = (16, 64, 128)
QUICK_LEVELS = (16, 64)
# Data chunks the mock sends besides content: the opening role chunk, the finish chunk and
# the usage chunk; the pauses between chunks number one less than the chunks.
EXTRA_CHUNKS = 3


async def _one(
    label: str,
    spawn: WorkerFactory,
    jobs: int,
    chunks: int,
    interval: float,
    timeout: float,
) -> dict[str, Any]:
    setup = Setup(
        label,
        jobs,
        MockArgs(chunks=chunks, chunk_interval=interval, timed=True),
        stream=True,
        reply_to=True,
        timeout=timeout,
    )
    run, collector, first_content = await measure(setup, spawn)
    progress(run)
    done = list(collector.result_at)
    deltas = [collector.deltas[job] for job in done]
    per_job = statistics.mean(deltas) if deltas else float("nan")
    added_ms = [
        1000 * (collector.first_delta_at[job] - first_content[job])
        for job in done
        if job in collector.first_delta_at and job in first_content
    ]
    relayed = run.completed * (chunks + EXTRA_CHUNKS)
    return {
        "run": run,
        "deltas_per_job": per_job,
        "chunks_per_delta": chunks / per_job if per_job else float("nan"),
        "cpu_us_per_chunk": 1e6 * run.worker_cpu_s / relayed if relayed else float("nan"),
        "first_delta_added_ms": {
            "p50": percentile(added_ms, 50),
            "p90": percentile(added_ms, 90),
            "p99": percentile(added_ms, 99),
            "max": max(added_ms, default=float("nan")),
            "samples": len(added_ms),
            "all": sorted(added_ms),
        },
    }


async def run_s3(
    levels: tuple[int, ...] = LEVELS,
    chunks: int = 200,
    interval: float = 0.01,
    timeout: float = 240.0,
    waves: int = 2,
) -> Section:
    rows: list[Row] = []
    data: dict[str, Any] = {"chunks": chunks, "chunk_interval": interval, "levels": {}}
    for concurrency in levels:
        jobs = waves * concurrency
        spawn = chat_worker(concurrency)
        worker = await _one(f"s3-worker-c{concurrency}", spawn, jobs, chunks, interval, timeout)
        raw = await _one(
            f"s3-raw-c{concurrency}",
            # As many deltas as the worker published in the same load.
            raw_loop(
                concurrency=concurrency,
                mode="stream",
                chunks_per_delta=max(1, round(worker["chunks_per_delta"])),
            ),
            jobs,
            chunks,
            interval,
            timeout,
        )
        idle = await idle_rss(spawn, f"s3-c{concurrency}")
        kib = (worker["run"].rss_load - idle) / concurrency / 1024
        worker["kib_per_stream"] = kib
        worker["rss_idle"] = idle
        data["levels"][concurrency] = {"worker": worker, "raw": raw}
        target = concurrency == TARGET_CONCURRENCY
        little = concurrency / ((chunks + EXTRA_CHUNKS - 1) * interval)
        w, r = worker["first_delta_added_ms"], raw["first_delta_added_ms"]
        tag = f"S3 c={concurrency}"
        rows += [
            Row(
                f"{tag} streaming, worker",
                worker["run"].rate,
                baseline=little,
                baseline_label="Little",
                cpu_us_per_job=worker["run"].cpu_us_per_job,
            ),
            Row(
                f"{tag} worker CPU per upstream chunk",
                worker["cpu_us_per_chunk"],
                unit="us",
                target=TARGET_CPU_US_PER_CHUNK if target else None,
                upper=True,
            ),
            Row(f"{tag} raw CPU per upstream chunk", raw["cpu_us_per_chunk"], unit="us"),
            Row(
                f"{tag} first delta added p50, worker",
                w["p50"],
                unit="ms",
                target=TARGET_ADDED_P50_MS if target else None,
                upper=True,
            ),
            Row(
                f"{tag} first delta added p99, worker",
                w["p99"],
                unit="ms",
                target=TARGET_ADDED_P99_MS if target else None,
                upper=True,
            ),
            Row(f"{tag} first delta added p50/p99, raw", r["p50"], unit=f"ms / {r['p99']:.1f} ms"),
            Row(
                f"{tag} upstream chunks per delta, worker",
                worker["chunks_per_delta"],
                unit="chunks",
                target=TARGET_CHUNKS_PER_DELTA if target else None,
            ),
            Row(
                f"{tag} deltas per job, worker / raw",
                worker["deltas_per_job"],
                unit=f"/ {raw['deltas_per_job']:.1f}",
            ),
            Row(
                f"{tag} RSS per in-flight stream",
                kib,
                unit="KiB",
                target=TARGET_KIB_PER_STREAM if target else None,
                upper=True,
            ),
        ]
    return Section("s3", rows, data)


async def main(args: argparse.Namespace) -> None:
    section = await run_s3(tuple(args.concurrency), args.chunks, timeout=args.timeout)
    print(table(section.rows))
    print(write_json("s3_streaming", {"args": vars(args), "section": section.__dict__}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=240.0)
    run_main(main(parser.parse_args()))
