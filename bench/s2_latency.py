"""S2 latency-bound: a 0.5 s mock upstream at concurrency 64, 256 and 1024.

Throughput is held against Little's law (concurrency / latency) and against the S1 rate of
the same run (the CPU-bound ceiling): the bound is the smaller of the two. Memory per
in-flight job is (RSS under load - RSS idle) / concurrency, where "idle" is a probe worker
with the same settings consuming an empty queue, and "under load" the median of the RSS
samples over the middle 80 % of the run.
"""

from __future__ import annotations

import argparse

from common import MockArgs, chat_worker, run_main
from measure import Setup, idle_rss, measure, progress
from report import Row, Section, table, write_json
from s1_overhead import s1_worker_rate

LATENCY = 0.5
CONCURRENCIES = (64, 256, 1024)
TARGET_CONCURRENCY = 1024
TARGET_RATIO = 0.8
TARGET_KIB_PER_JOB = 64.0


def jobs_for(concurrency: int, bound: float, seconds: float, max_jobs: int) -> int:
    """Enough jobs for ``seconds`` at the expected rate, in whole waves of ``concurrency``."""
    waves = max(2, round(bound * seconds / concurrency))
    return min(max_jobs, waves * concurrency)


async def run_s2(
    s1_rate: float | None,
    concurrencies: tuple[int, ...] = CONCURRENCIES,
    seconds: float = 12.0,
    max_jobs: int = 20_000,
    timeout: float = 240.0,
) -> Section:
    rows: list[Row] = []
    data: dict[str, object] = {"latency": LATENCY, "s1_rate": s1_rate, "levels": {}}
    rss_at: dict[int, int] = {}
    for concurrency in concurrencies:
        little = concurrency / LATENCY
        bound = min(little, s1_rate) if s1_rate else little
        jobs = jobs_for(concurrency, bound, seconds, max_jobs)
        spawn = chat_worker(concurrency)
        idle = await idle_rss(spawn, f"s2-c{concurrency}")
        setup = Setup(f"s2-c{concurrency}", jobs, MockArgs(latency=LATENCY), timeout=timeout)
        run, _, _ = await measure(setup, spawn)
        progress(run)
        rss_at[concurrency] = run.rss_load
        kib_per_job = (run.rss_load - idle) / concurrency / 1024
        is_target = concurrency == TARGET_CONCURRENCY
        rows.append(
            Row(
                f"S2 c={concurrency} (L={LATENCY:g}s)",
                run.rate,
                baseline=bound,
                baseline_label="Little" if bound == little else "S1",
                target=TARGET_RATIO if is_target else None,
                cpu_us_per_job=run.cpu_us_per_job,
            )
        )
        rows.append(
            Row(
                f"S2 c={concurrency} RSS per in-flight job",
                kib_per_job,
                unit="KiB",
                target=TARGET_KIB_PER_JOB if is_target else None,
                upper=True,
            )
        )
        data["levels"][concurrency] = {  # type: ignore[index]
            "run": run,
            "little_rate": little,
            "bound": bound,
            "rss_idle": idle,
            "rss_load": run.rss_load,
            "kib_per_job": kib_per_job,
        }
    levels = sorted(rss_at)
    if len(levels) >= 2:
        low, high = levels[-2], levels[-1]
        slope = (rss_at[high] - rss_at[low]) / (high - low) / 1024
        rows.append(Row(f"S2 RSS slope c={low}->{high}", slope, unit="KiB/job"))
        data["rss_slope_kib_per_job"] = slope
    return Section("s2", rows, data)


async def main(args: argparse.Namespace) -> None:
    s1_rate = args.s1_rate or await s1_worker_rate(args.s1_jobs, args.timeout)
    section = await run_s2(s1_rate, tuple(args.concurrency), args.seconds, args.max_jobs)
    print(table(section.rows))
    print(write_json("s2_latency", {"args": vars(args), "section": section.__dict__}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES))
    parser.add_argument("--seconds", type=float, default=12.0, help="steady state to aim at")
    parser.add_argument("--max-jobs", type=int, default=20_000)
    parser.add_argument("--s1-rate", type=float, help="skip the S1 worker run, use this rate")
    parser.add_argument("--s1-jobs", type=int, default=5_000)
    parser.add_argument("--timeout", type=float, default=240.0)
    run_main(main(parser.parse_args()))
