"""S1 overhead: plain jobs on a zero-latency mock; the worker against the raw limit and the
peer, all three in the same run (order rotated when repeated)."""

from __future__ import annotations

import argparse

from baseline_faststream import faststream_peer
from baseline_raw import raw_loop
from common import chat_worker, run_main
from measure import Setup, measure_each, median_run
from report import Row, Section, table, write_json

TARGET_VS_RAW = 0.6
TARGET_VS_PEER = 2.5


async def run_s1(jobs: int, repeat: int = 1, timeout: float = 240.0) -> Section:
    runs = await measure_each(
        [
            (Setup("s1-raw", jobs, timeout=timeout), raw_loop()),
            (Setup("s1-peer", jobs, timeout=timeout), faststream_peer()),
            (Setup("s1-worker", jobs, timeout=timeout), chat_worker(64)),
        ],
        repeat,
    )
    raw, peer, worker = (median_run(runs[k]) for k in ("s1-raw", "s1-peer", "s1-worker"))
    rows = [
        Row("raw limit (aio-pika + aiohttp)", raw.rate, cpu_us_per_job=raw.cpu_us_per_job),
        Row("peer (FastStream + httpx)", peer.rate, cpu_us_per_job=peer.cpu_us_per_job),
        Row(
            "S1 worker vs raw limit",
            worker.rate,
            baseline=raw.rate,
            baseline_label="raw",
            target=TARGET_VS_RAW,
            cpu_us_per_job=worker.cpu_us_per_job,
        ),
        Row(
            "S1 worker vs peer",
            worker.rate,
            baseline=peer.rate,
            baseline_label="peer",
            target=TARGET_VS_PEER,
            cpu_us_per_job=worker.cpu_us_per_job,
        ),
    ]
    return Section("s1", rows, {"jobs": jobs, "runs": runs, "worker_rate": worker.rate})


async def s1_worker_rate(jobs: int, timeout: float = 240.0) -> float:
    """The worker's S1 rate alone, for scenarios run without S1 (S2 compares against it)."""
    runs = await measure_each([(Setup("s1-worker", jobs, timeout=timeout), chat_worker(64))])
    return runs["s1-worker"][0].rate


async def main(args: argparse.Namespace) -> None:
    section = await run_s1(args.jobs, args.repeat, args.timeout)
    print(table(section.rows))
    print(write_json("s1_overhead", {"args": vars(args), "section": section.__dict__}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=240.0)
    run_main(main(parser.parse_args()))
