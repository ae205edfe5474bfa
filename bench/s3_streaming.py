"""S3 streaming: 200-chunk answers at 10 ms a chunk, deltas and results to a reply queue.

Measured per job: messages that arrive (deltas + result), upstream content chunks per
published delta, and the time the worker adds before the first delta: its arrival at the
reply queue minus the moment the mock wrote the first content chunk (``timed_mock.py``;
both clocks are this machine's ``time.time()``). That span holds the worker's read, parse
and publish, and the broker's hop to the consumer.
"""

from __future__ import annotations

import argparse
import statistics

from common import MockArgs, chat_worker, percentile, run_main
from measure import Setup, measure, progress
from report import Row, Section, table, write_json

TARGET_CHUNKS_PER_DELTA = 4.0
TARGET_ADDED_P50_MS = 5.0
# Data chunks the mock sends besides content: the opening role chunk, the finish chunk and
# the usage chunk; the pauses between chunks number one less than the chunks.
EXTRA_CHUNKS = 3


async def run_s3(
    jobs: int,
    concurrency: int = 64,
    chunks: int = 200,
    interval: float = 0.01,
    timeout: float = 240.0,
) -> Section:
    setup = Setup(
        "s3-stream",
        jobs,
        MockArgs(chunks=chunks, chunk_interval=interval, timed=True),
        stream=True,
        reply_to=True,
        timeout=timeout,
    )
    run, collector, first_content = await measure(setup, chat_worker(concurrency))
    progress(run)
    done = list(collector.result_at)
    deltas = [collector.deltas[job] for job in done]
    per_job = statistics.mean(deltas) if deltas else float("nan")
    added_ms = [
        1000 * (collector.first_delta_at[job] - first_content[job])
        for job in done
        if job in collector.first_delta_at and job in first_content
    ]
    p50, p99 = percentile(added_ms, 50), percentile(added_ms, 99)
    little = concurrency / ((chunks + EXTRA_CHUNKS - 1) * interval)
    cpu = run.cpu_us_per_job
    rows = [
        Row("S3 streaming", run.rate, baseline=little, baseline_label="Little", cpu_us_per_job=cpu),
        Row("S3 messages published per job", per_job + 1, unit="msgs"),
        Row(
            "S3 upstream chunks per delta",
            chunks / per_job,
            unit="chunks",
            target=TARGET_CHUNKS_PER_DELTA,
        ),
        Row("S3 first delta added, p50", p50, unit="ms", target=TARGET_ADDED_P50_MS, upper=True),
        Row("S3 first delta added, p99", p99, unit="ms"),
    ]
    data = {
        "run": run,
        "concurrency": concurrency,
        "chunks": chunks,
        "chunk_interval": interval,
        "little_rate": little,
        "deltas_per_job": {
            "mean": per_job,
            "min": min(deltas, default=0),
            "max": max(deltas, default=0),
        },
        "first_delta_added_ms": {
            "p50": p50,
            "p90": percentile(added_ms, 90),
            "p99": p99,
            "max": max(added_ms, default=float("nan")),
            "samples": len(added_ms),
        },
    }
    return Section("s3", rows, data)


async def main(args: argparse.Namespace) -> None:
    section = await run_s3(args.jobs, args.concurrency, timeout=args.timeout)
    print(table(section.rows))
    print(write_json("s3_streaming", {"args": vars(args), "section": section.__dict__}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=384)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=240.0)
    run_main(main(parser.parse_args()))
